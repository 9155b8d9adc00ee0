"""What a finished command gives back: :class:`CompletedProcess` (every face's ``run``), and
how a started one shows itself: :func:`popen_repr` (every face's ``Popen``)."""

from __future__ import annotations

import subprocess
from typing import Any

from ..errors import CalledProcessError
from .options import Command

__all__ = ["CompletedProcess", "popen_repr", "popen_state"]


class CompletedProcess(subprocess.CompletedProcess[Any]):
    """What ``run`` returns: ``args``, ``returncode``, ``stdout``, ``stderr``, ``host``."""

    def __init__(
        self,
        args: Command,
        returncode: int,
        stdout: Any = None,
        stderr: Any = None,
        *,
        host: str = "",
    ) -> None:
        super().__init__(args, returncode, stdout, stderr)
        self.host = host

    def __repr__(self) -> str:
        parts = [f"host={self.host!r}", f"args={self.args!r}", f"returncode={self.returncode!r}"]
        if self.stdout is not None:
            parts.append(f"stdout={self.stdout!r}")
        if self.stderr is not None:
            parts.append(f"stderr={self.stderr!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def check_returncode(self) -> None:
        """Raise :class:`~sshwrap.errors.CalledProcessError` if the returncode is non-zero."""
        if self.returncode:
            raise CalledProcessError(
                self.returncode, self.args, self.stdout, self.stderr, host=self.host
            )


def popen_state(returncode: int | None, error: BaseException | None = None) -> str:
    """A started command's state in words: ``running``, ``exited``, ``killed by a signal``
    (a negative returncode) or ``failed (SSHError)`` when ssh or the channel failed (the
    error's class: the status never arrived)."""
    if error is not None:
        return f"failed ({type(error).__name__})"
    if returncode is None:
        return "running"
    return "killed by a signal" if returncode < 0 else "exited"


def popen_repr(process: object, host: str, state: str) -> str:
    """``repr()`` of a started command: :class:`subprocess.Popen`'s
    (``<Popen: returncode: 0 args: [...]>``, args cut past 80 characters as there) plus the
    host and the state (:func:`popen_state`)."""
    returncode = getattr(process, "returncode", None)
    args = repr(getattr(process, "args", None))
    head = f"<{type(process).__name__}: returncode: {returncode} args: "
    if len(head) + len(args) + 1 > 80:
        args = args[: max(0, 76 - len(head))] + "..."
    return f"{head}{args} host: {host!r} state: {state}>"
