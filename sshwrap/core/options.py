"""The keyword lists of the calls, defined once and typed.

Every face that runs ssh (``sshwrap.run``/``Popen``, ``sshwrap.aio.run``/``create_process``,
a :class:`~sshwrap.Connection`'s ``ssh -S`` fallback, the fan-out) takes the same groups of
keywords; each group is one :class:`~typing.TypedDict` here, and a call's keywords are the
union of its groups (``**kwargs: Unpack[PopenOptions]``).  The ``*_KEYS`` sets name the keys
of a group, for code that splits a call's keywords between its steps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import IO, Any, TypedDict, cast

from .argv import OptionValue

__all__ = [
    "COMMAND_KEYS",
    "SSH_SETTINGS_KEYS",
    "ArgvSettings",
    "Command",
    "CommandOptions",
    "PopenOptions",
    "ProcessOptions",
    "RunOptions",
    "SSHSettings",
    "StdSpec",
    "StreamOptions",
    "TerminalOptions",
    "TextOptions",
    "check_keywords",
    "invocation_settings",
    "keys_of",
]

Command = str | Sequence[str]
"""A remote command: a ``str`` for the remote shell as it is, or a list of arguments."""

StdSpec = int | IO[Any] | None
"""Like subprocess: PIPE, DEVNULL, STDOUT, None (inherit), an fd, or a file object."""


class ArgvSettings(TypedDict, total=False):
    """The settings that become ssh options (:func:`sshwrap.core.argv.ssh_settings_args`)."""

    config: str | os.PathLike[str] | None
    user: str | None
    port: int | str | None
    identity: str | os.PathLike[str] | None
    jump: str | None
    options: Mapping[str, OptionValue] | None


class SSHSettings(ArgvSettings, total=False):
    """ssh settings accepted by every call: :class:`ArgvSettings` and ``ssh``, the ssh binary
    (default: the one on ``PATH``)."""

    ssh: str | None


class CommandOptions(TypedDict, total=False):
    """Where the remote command runs: extra environment variables and a working directory
    (both set by the remote shell, see :func:`sshwrap.core.argv.remote_command`)."""

    env: Mapping[str, str] | None
    cwd: str | os.PathLike[str] | None


class StreamOptions(TypedDict, total=False):
    """The local ends of the command's streams, as in :mod:`subprocess` (stdin defaults to
    DEVNULL, see :mod:`sshwrap.process`)."""

    stdin: StdSpec
    stdout: StdSpec
    stderr: StdSpec


class TextOptions(TypedDict, total=False):
    """Text mode, as in :mod:`subprocess` (any of them set: ``str`` in and out)."""

    text: bool | None
    encoding: str | None
    errors: str | None


class TerminalOptions(TypedDict, total=False):
    """``tty=True``: the command runs in a remote terminal of ``size=(rows, cols)``."""

    tty: bool
    size: tuple[int, int] | None


class PopenOptions(
    SSHSettings, CommandOptions, StreamOptions, TextOptions, TerminalOptions, total=False
):
    """The keyword arguments of :class:`sshwrap.Popen` (and of ``sshwrap.run``/``call``/...
    besides their own) after host and command."""

    bufsize: int


class ProcessOptions(SSHSettings, CommandOptions, StreamOptions, total=False):
    """Keyword arguments of :func:`sshwrap.aio.create_process` besides host and command;
    ``limit`` is the buffer limit of its stream readers."""

    limit: int


class RunOptions(ProcessOptions, TextOptions, TerminalOptions, total=False):
    """Keyword arguments of :func:`sshwrap.aio.run` besides its own (``input``,
    ``capture_output``, ``timeout``, ``check``)."""


def keys_of(options: type) -> frozenset[str]:
    """The keys of a TypedDict (its own and its bases')."""
    typed: Any = options
    return frozenset(typed.__required_keys__) | frozenset(typed.__optional_keys__)


SSH_SETTINGS_KEYS = keys_of(SSHSettings)
"""The keys of :class:`SSHSettings`."""

COMMAND_KEYS = keys_of(CommandOptions)
"""The keys of :class:`CommandOptions`."""


def check_keywords(func: str, kwargs: Mapping[str, object], accepted: type) -> None:
    """Raise :class:`TypeError` as Python does for a keyword ``func`` does not take (the
    TypedDict ``accepted`` lists those it takes)."""
    unknown = set(kwargs) - keys_of(accepted)
    if unknown:
        raise TypeError(f"{func}() got an unexpected keyword argument {min(unknown)!r}")


def invocation_settings(kwargs: Mapping[str, Any]) -> SSHSettings | CommandOptions:
    """The :class:`SSHSettings` and :class:`CommandOptions` among a call's keywords (what
    :class:`~sshwrap.core.invocation.Invocation` takes besides ``tty``)."""
    wanted = SSH_SETTINGS_KEYS | COMMAND_KEYS
    return cast(SSHSettings | CommandOptions, {k: v for k, v in kwargs.items() if k in wanted})
