"""The keyword lists of the calls, defined once and typed.

Every face that runs ssh (``sshwrap.run``/``Popen``, ``sshwrap.aio.run``/``create_process``,
a :class:`~sshwrap.Connection`'s ``ssh -S`` fallback, the fan-out) takes the same groups of
keywords; each group is one :class:`~typing.TypedDict` here, and a call's keywords are the
union of its groups (``**kwargs: Unpack[PopenOptions]``).  The ``*_KEYS`` sets name the keys
of a group, for code that splits a call's keywords between its steps.

The checks :mod:`subprocess` makes of those keywords are here too, written once for every
face: :func:`run_streams` (``input`` with ``stdin``, ``capture_output`` with ``stdout``),
:func:`popen_text` (``text``/``universal_newlines``/``encoding``/``errors``, and the encoding a
text-mode ``Popen`` reports), and :func:`check_terminal` (``size`` needs ``tty=True``).
"""

from __future__ import annotations

import locale
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, TypedDict, cast

from .argv import OptionValue

__all__ = [
    "COMMAND_KEYS",
    "SSH_SETTINGS_KEYS",
    "Arg",
    "ArgvSettings",
    "Command",
    "CommandOptions",
    "PopenOptions",
    "ProcessOptions",
    "RunOptions",
    "SSHRunOptions",
    "SSHSettings",
    "StdSpec",
    "StreamOptions",
    "SudoOptions",
    "TerminalOptions",
    "TextOptions",
    "check_keywords",
    "check_terminal",
    "invocation_settings",
    "keys_of",
    "popen_text",
    "run_streams",
    "text_encoding",
    "text_option",
    "tty_input",
]

Arg = str | bytes | os.PathLike[str] | os.PathLike[bytes]
"""One argument of a command list, as :mod:`subprocess` takes it: ``str``, ``bytes`` (any
bytes: they reach the remote side unchanged) or ``os.PathLike``."""

Command = str | bytes | Sequence[Arg]
"""A remote command: a ``str`` (or ``bytes``) for the remote shell as it is, or a list of
arguments (:data:`Arg`)."""

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
    """Text mode, as in :mod:`subprocess` (any of them set: ``str`` in and out;
    ``universal_newlines`` is ``text``'s old name, see :func:`popen_text`)."""

    text: bool | None
    universal_newlines: bool | None
    encoding: str | None
    errors: str | None


class TerminalOptions(TypedDict, total=False):
    """``tty=True``: the command runs in a remote terminal of ``size=(rows, cols)``."""

    tty: bool
    size: tuple[int, int] | None


class SudoOptions(TypedDict, total=False):
    """``sudo=True``: the command runs through ``sudo -S`` on the remote side
    (:mod:`sshwrap.core.sudo`), as ``sudo_user`` (``sudo -u``; default root), with
    ``sudo_password`` (a ``str``, ``bytes``, or a callable returning one, asked once when sudo
    asks) sent on the command's stdin only; ``run`` calls only (no terminal, stdin from
    ``input=``)."""

    sudo: bool
    sudo_password: str | bytes | Callable[[], str | bytes] | None
    sudo_user: str | None


class PopenOptions(
    SSHSettings, CommandOptions, StreamOptions, TextOptions, TerminalOptions, total=False
):
    """The keyword arguments of :class:`sshwrap.Popen` (and of ``sshwrap.run``/``call``/...
    besides their own) after host and command."""

    bufsize: int


class SSHRunOptions(PopenOptions, SudoOptions, total=False):
    """The keyword arguments of ``sshwrap.run`` (and ``call``/``check_call``/``check_output``)
    after host and command besides their own: :class:`PopenOptions` and :class:`SudoOptions`."""


class ProcessOptions(SSHSettings, CommandOptions, StreamOptions, TerminalOptions, total=False):
    """Keyword arguments of :func:`sshwrap.aio.create_process` besides host and command: the
    ssh settings, ``env``/``cwd``, the streams, ``tty``/``size``; ``limit`` is the buffer
    limit of its stream readers."""

    limit: int


class RunOptions(ProcessOptions, TextOptions, SudoOptions, total=False):
    """Keyword arguments of :func:`sshwrap.aio.run` besides its own (``input``,
    ``capture_output``, ``timeout``, ``check``), :class:`SudoOptions` included."""


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


def text_encoding() -> str:
    """The encoding text mode uses when none is given: the locale's, as :mod:`subprocess`
    uses (``"utf-8"`` in Python's UTF-8 mode)."""
    return locale.getpreferredencoding(False)


def text_option(options: Mapping[str, Any]) -> bool | None:
    """``text`` of a call's keywords, ``universal_newlines`` taken as its alias; both given
    and different: :class:`subprocess.SubprocessError`, as :class:`subprocess.Popen` raises."""
    text, universal = options.get("text"), options.get("universal_newlines")
    if text is not None and universal is not None and bool(universal) != bool(text):
        raise subprocess.SubprocessError(
            "Cannot disambiguate when both text and universal_newlines are supplied but "
            "different. Pass one or the other."
        )
    return text if text is not None else universal


def popen_text(options: Mapping[str, Any]) -> tuple[bool, str | None]:
    """``(text mode, encoding)`` of a call as :class:`subprocess.Popen` sets them: text mode
    when any of ``text``/``universal_newlines``/``encoding``/``errors`` asks for it, and then
    the encoding is :func:`text_encoding` unless one is given (``Popen.encoding`` reports it;
    Python >= 3.10)."""
    encoding = options.get("encoding")
    textual = bool(text_option(options) or encoding or options.get("errors"))
    if textual and encoding is None:
        encoding = text_encoding()
    return textual, encoding


def check_terminal(options: Mapping[str, Any]) -> None:
    """``size`` without ``tty=True`` raises :class:`ValueError` (there is no terminal to size)."""
    if options.get("size") is not None and not options.get("tty"):
        raise ValueError("size= needs tty=True: without a terminal there is nothing to size")


def run_streams(
    input: Any, capture_output: bool, options: Mapping[str, Any]
) -> tuple[Any, Any, Any]:
    """``(stdin, stdout, stderr)`` of a ``run`` call from ``input``, ``capture_output`` and its
    stream keywords, refusing what :func:`subprocess.run` refuses: ``input`` with a ``stdin``
    (any but None) and ``capture_output`` with ``stdout`` or ``stderr``.  With ``input``,
    stdin is PIPE; else the given one, DEVNULL by default (see :mod:`sshwrap.process`)."""
    stdin = options.get("stdin", subprocess.DEVNULL)
    if input is not None:
        if options.get("stdin") is not None:
            raise ValueError("stdin and input arguments may not both be used.")
        stdin = subprocess.PIPE
    stdout, stderr = options.get("stdout"), options.get("stderr")
    if capture_output:
        if stdout is not None or stderr is not None:
            raise ValueError("stdout and stderr arguments may not be used with capture_output.")
        stdout = stderr = subprocess.PIPE
    return stdin, stdout, stderr


def tty_input(data: bytes) -> bytes:
    """Input typed into a terminal, ended by ^D at the start of a line (nothing: nothing)."""
    if not data:
        return b""
    return data + (b"\x04" if data.endswith(b"\n") else b"\x04\x04")
