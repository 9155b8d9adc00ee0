"""A persistent remote shell: ``Connection.shell()`` and ``sshwrap.shell(host)``.

::

    with sshwrap.shell("web1") as sh:            # or: with c.shell() as sh (a Connection)
        sh.run("cd /srv/app && . venv/bin/activate")
        r = sh.run("pytest -q", timeout=600)     # CompletedProcess: returncode, stdout, stderr

One POSIX ``sh`` on one session channel of the master keeps its state (cwd, variables,
functions, an activated virtualenv) from one ``run`` to the next.  Each ``run`` is framed by
markers random per call on stdout and stderr apart (no prompt matching, no terminal), and
``timeout`` kills only what the command started: the shell serves the next ``run``.  The
framing, the bounds and what is not supported are in :mod:`sshwrap.core.shell`, with the
sync face (``Shell``: ``run_sync`` in the caller's thread; ``await AsyncConnection.shell()``
is the async one over the same procedures); this module gives ``shell(host)`` and the names.
"""

from __future__ import annotations

import sys
import types
from typing import Unpack

from .connection import ConnectOptions, connect
from .core.shell import Shell, ShellError, ShellRunOptions, check_shell_options

__all__ = ["Shell", "ShellError", "ShellRunOptions", "shell"]


def shell(
    destination: str,
    *,
    tty: bool = False,
    program: str = "sh",
    **options: Unpack[ConnectOptions],
) -> Shell:
    """Connect to ``destination`` (a ``Connection`` of its own, the keywords of
    ``sshwrap.connect``) and start a :class:`Shell` there; closing the shell closes the
    connection."""
    check_shell_options(tty, program)
    conn = connect(destination, **options)
    try:
        return Shell.start(conn.master, program, owner=conn)
    except BaseException:
        conn.close()
        raise


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`shell`: ``sshwrap.shell`` names both (the package's
    attribute is the module once ``sshwrap.shell`` was imported), so ``sshwrap.shell(host)``
    works whichever came first."""

    def __call__(
        self,
        destination: str,
        *,
        tty: bool = False,
        program: str = "sh",
        **options: Unpack[ConnectOptions],
    ) -> Shell:
        return shell(destination, tty=tty, program=program, **options)


sys.modules[__name__].__class__ = _CallableModule
