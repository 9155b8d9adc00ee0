"""What a finished command gives back: :class:`CompletedProcess` (every face's ``run``)."""

from __future__ import annotations

import subprocess
from typing import Any

from ..errors import CalledProcessError
from .options import Command

__all__ = ["CompletedProcess"]


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
