"""``getoutput`` and ``getstatusoutput`` as :mod:`subprocess` has them, written once.

Every face runs the command with its own ``run`` and the keywords of
:func:`getoutput_options` (stdout captured, stderr merged into it, text mode), and turns the
result into the answer with :func:`status_output`::

    status_output(run(host, cmd, **getoutput_options(encoding=..., errors=...)))

As in :func:`subprocess.getstatusoutput`: the output is decoded (the locale's encoding unless
one is given, universal newlines), one trailing newline is stripped, and the status is the
command's returncode (negative for a signal), not an exception.  An ssh failure still raises
its :class:`~sshwrap.errors.SSHError`: a command whose status never arrived has none to give.
"""

from __future__ import annotations

import subprocess
from typing import Any, TypedDict

__all__ = ["GetoutputOptions", "getoutput_options", "status_output"]


class GetoutputOptions(TypedDict):
    """The ``run`` keywords of ``getoutput``/``getstatusoutput``."""

    stdout: int
    stderr: int
    text: bool
    encoding: str | None
    errors: str | None
    timeout: float | None


def getoutput_options(
    *, encoding: str | None = None, errors: str | None = None, timeout: float | None = None
) -> GetoutputOptions:
    """``run``'s keywords for ``getstatusoutput``: stdout captured with stderr merged into it
    (``stderr=STDOUT``), text mode in ``encoding``/``errors``, bounded by ``timeout``."""
    return {
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT,
        "text": True,
        "encoding": encoding,
        "errors": errors,
        "timeout": timeout,
    }


def status_output(result: subprocess.CompletedProcess[Any]) -> tuple[int, str]:
    """``(returncode, output)`` of a finished ``run`` (a ``CompletedProcess``) made with
    :func:`getoutput_options`: one trailing newline stripped, as subprocess does."""
    data: str = result.stdout or ""
    if data[-1:] == "\n":
        data = data[:-1]
    return result.returncode, data
