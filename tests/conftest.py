"""Shared test setup: the ``local_sshd`` fixtures come from sshwrap's pytest plugin."""

from __future__ import annotations

import signal


def pytest_configure() -> None:
    """Ctrl-C's tests need SIGINT to be deliverable, as under a terminal.

    A test run started in the background by a shell without job control (``make test &``,
    ``nohup``) inherits SIGINT *ignored*, and so would every process the tests start: ssh
    would ignore the SIGINT the tests send it.  A handler here makes the children start with
    the default action again (exec resets handled signals, not ignored ones).
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
