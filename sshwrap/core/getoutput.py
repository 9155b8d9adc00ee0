"""``getoutput`` and ``getstatusoutput`` as :mod:`subprocess` has them, written once.

Every face runs the command with its own ``run`` and the keywords of
:func:`getoutput_options` (stdout captured, stderr merged into it, text mode), and turns the
result into the answer with :func:`status_output`::

    status_output(run(host, cmd, **getoutput_options(options)))

where ``options`` are the call's :class:`OutputOptions` (``encoding``, ``errors``,
``timeout``; at module level also the ssh settings, :class:`GetoutputSettings`).

As in :func:`subprocess.getstatusoutput`: the output is decoded (the locale's encoding unless
one is given, universal newlines), one trailing newline is stripped, and the status is the
command's returncode (negative for a signal), not an exception.  An ssh failure still raises
its :class:`~sshwrap.errors.SSHError`: a command whose status never arrived has none to give.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from typing import Any, TypedDict

from .options import SSHSettings

__all__ = ["GetoutputSettings", "OutputOptions", "getoutput_options", "status_output"]


class OutputOptions(TypedDict, total=False):
    """The keywords of ``getoutput``/``getstatusoutput`` (a Connection's): the output's
    ``encoding``/``errors`` (the locale's, strict, unless given) and the call's ``timeout``."""

    encoding: str | None
    errors: str | None
    timeout: float | None


class GetoutputSettings(SSHSettings, OutputOptions, total=False):
    """The keywords of the module-level ``getoutput``/``getstatusoutput``: the ssh settings
    too."""


def getoutput_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``run``'s keywords for ``getstatusoutput``: the call's ``options`` as they are, stdout
    captured with stderr merged into it (``stderr=STDOUT``), text mode."""
    return {**options, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}


def status_output(result: subprocess.CompletedProcess[Any]) -> tuple[int, str]:
    """``(returncode, output)`` of a finished ``run`` (a ``CompletedProcess``) made with
    :func:`getoutput_options`: one trailing newline stripped, as subprocess does."""
    data: str = result.stdout or ""
    if data[-1:] == "\n":
        data = data[:-1]
    return result.returncode, data
