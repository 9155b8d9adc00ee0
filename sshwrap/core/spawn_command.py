"""The remote command line of a spawned program (``Spawned``, ``Connection.spawn``)."""

from __future__ import annotations

from typing import Unpack

from .argv import remote_command
from .options import Command, CommandOptions

__all__ = ["LOGIN_SHELL", "spawn_command_line"]

LOGIN_SHELL = 'exec "${SHELL:-/bin/sh}" -l'  # a login shell (command None) with env or cwd


def spawn_command_line(command: Command | None, **where: Unpack[CommandOptions]) -> str | None:
    """The command line ssh hands the remote shell (None: sshd's login shell).  ``env`` and
    ``cwd`` as for ``sshwrap.run`` (:func:`sshwrap.core.argv.remote_command`); with them a
    login shell runs as :data:`LOGIN_SHELL` (sshd then shows no MOTD)."""
    if command is None:
        if not where.get("env") and where.get("cwd") is None:
            return None
        command = LOGIN_SHELL
    return remote_command(command, **where)
