"""Background threads that never take the process's signals.

A signal sent to a process (Ctrl-C's SIGINT, SIGTERM, SIGALRM ...) goes to any one of its
threads that does not block it.  If it lands on one of sshwrap's helper threads, Python's
C-level handler only sets a flag there: the main thread, blocked in a lock or a wait, is not
woken, so its ``KeyboardInterrupt`` never comes and ``Connection.run`` hangs on Ctrl-C.
sshwrap's long-lived helper threads (the mux pump, the askpass server) therefore start with
every asynchronous signal blocked; the kernel then delivers them to the user's threads.

A blocked mask is inherited by processes the thread starts, so code of the user's that runs
in such a thread (a prompt callback) runs inside :func:`signals_unblocked`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

__all__ = ["ASYNC_SIGNALS", "signals_unblocked", "start_daemon"]

# Signals a fault raises in the thread that caused it stay deliverable.
_SYNCHRONOUS = {
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
    signal.SIGKILL,
    signal.SIGSTOP,
}
ASYNC_SIGNALS = frozenset(signal.valid_signals() - _SYNCHRONOUS)


def start_daemon(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread running ``target`` with :data:`ASYNC_SIGNALS` blocked.

    The mask is set around ``start()``, so the new thread has it from its first instruction.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ASYNC_SIGNALS)
    try:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread


@contextlib.contextmanager
def signals_unblocked() -> Iterator[None]:
    """Run a block (user code) in a helper thread with the usual signal mask."""
    old = signal.pthread_sigmask(signal.SIG_UNBLOCK, ASYNC_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
