"""sshwrap's exceptions, and telling ssh's own failures apart from the remote command's status.

Every exception sshwrap raises derives from :class:`SSHWrapError`:

- :class:`SSHError` (ssh itself failed; nothing ran remotely, or the connection broke) with
  ``host``, ``message`` (ssh's own words) and ``stderr`` (everything ssh printed):
  :class:`SSHConnectionError` (refused, timed out, unreachable, name not resolved, closed;
  its :class:`GatewayError`: a fan-out host's gateway failed before reporting it),
  :class:`AuthenticationError`, :class:`HostKeyError` (unknown or changed host key),
  :class:`SSHConfigError` (ssh refused to parse a setting: an option, a value, a port, a
  config file, the destination's syntax).
- :class:`CommandTooLongError` (also a :class:`ValueError`): a command or argument larger than
  the operating system lets a program receive, refused before ssh starts.
- :class:`SudoError`: ``sudo=True`` could not get the command run: the password was refused
  (sudo asked again), none was given when sudo asked, or sudo ended before the command
  started (not allowed by sudoers, sudo missing); it has ``host`` and never the password.
- :class:`SkippedError`: a fleet call's host that never started because ``max_fail`` was
  exceeded or a canary failed (the ``error`` of a result with status ``skipped``).
- :class:`CalledProcessError` and :class:`TimeoutExpired`: also subclasses of the
  :mod:`subprocess` ones, so ``except subprocess.CalledProcessError`` keeps working; they carry
  ``host``.

One exception of sshwrap's stands outside this tree: ``HostPatternError``
(:mod:`sshwrap.core.hostset`), a host pattern or groups file that cannot be read
(``web[01-``, an unknown ``@group``), raised by ``sshwrap.hosts`` and by ``run_many`` before
any ssh runs.  It is a :class:`ValueError` with ``pattern``, ``position``, ``reason`` and
``line``, and not an :class:`SSHWrapError`: the host-pattern module is pure and imports
nothing of sshwrap's, and a bad argument is a ``ValueError`` as everywhere else.

Which of these a failed ssh call raises is read from ssh's own words, its ``-E`` log and its
stderr, by :mod:`sshwrap.protocol.sshlog` (pure); :func:`classify_ssh_failure` and
:func:`interpret_exit` turn what it reads into these exceptions.  ``UNKNOWN_SIGNAL``,
``SSHStderr`` and ``ssh_messages`` are defined there and exported here too.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from .protocol.sshlog import (
    UNKNOWN_SIGNAL,
    FailureKind,
    SSHStderr,
    read_exit,
    read_failure,
    ssh_messages,
)

__all__ = [
    "UNKNOWN_SIGNAL",
    "AuthenticationError",
    "CalledProcessError",
    "CommandLostError",
    "CommandTooLongError",
    "ExitInfo",
    "GatewayError",
    "HostKeyError",
    "SSHConfigError",
    "SSHConnectionError",
    "SSHError",
    "SSHStderr",
    "SSHWrapError",
    "SkippedError",
    "SudoError",
    "TimeoutExpired",
    "classify_ssh_failure",
    "interpret_exit",
    "ssh_messages",
]

_Arg: TypeAlias = "str | bytes | os.PathLike[str] | os.PathLike[bytes]"
Cmd: TypeAlias = "_Arg | Sequence[_Arg]"
"""What a command may be in the exceptions (the same as in :mod:`subprocess`)."""


def signal_description(returncode: int) -> str:
    """``'SIGTERM'``-style name of a negative returncode (a hint when the number is unknown)."""
    if returncode == UNKNOWN_SIGNAL:
        return "a signal (ssh does not say which)"
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"unknown signal {-returncode}"


class SSHWrapError(Exception):
    """Base class of every exception sshwrap raises."""


class SSHError(SSHWrapError):
    """ssh itself failed: the remote command did not run, or the connection broke.

    ``host`` is the destination as given, ``message`` ssh's most telling line (e.g.
    ``ssh: connect to host ... port 22: Connection refused``), ``stderr`` everything ssh printed
    at its normal log level, ``returncode`` ssh's exit status (255).
    """

    def __init__(self, host: str, message: str, stderr: str = "", returncode: int = 255) -> None:
        super().__init__(host, message)
        self.host = host
        self.message = message
        self.stderr = stderr
        self.returncode = returncode

    def __str__(self) -> str:
        return f"{self.host}: {self.message}" if self.message else f"{self.host}: ssh failed"


class SSHConnectionError(SSHError):
    """No connection: refused, timed out, unreachable, name not resolved, or closed early."""


class CommandLostError(SSHConnectionError):
    """The connection to the master ended before the command's end was known.

    Raised (or kept in ``Popen.ssh_error``) when a channel was lost before it had both its
    exit status (or signal) and the end of its output: whatever came is not the whole story,
    so it is never reported as a returncode.  sshd may send ``exit-status`` before the last
    of the output (the command has exited, its output still waits for window), which is why
    an exit status alone is not enough.  ``stdout`` (alias ``output``) and ``command_stderr``
    hold what did arrive, as ``run`` would have returned them (bytes or str for ``PIPE``, else
    None); ``exit_status`` the status if it came (else None).
    """

    def __init__(
        self,
        host: str,
        message: str,
        *,
        stdout: Any = None,
        command_stderr: Any = None,
        exit_status: int | None = None,
    ) -> None:
        super().__init__(host, message)
        self.stdout = self.output = stdout
        self.command_stderr = command_stderr
        self.exit_status = exit_status


class GatewayError(SSHConnectionError):
    """A fan-out host's gateway (``run_many(via=)``) failed before reporting the host: it
    could not be reached, had no suitable ``python3``, or died mid-run.  ``gateway`` names
    it (the innermost one that failed, in a tree of gateways); ``host`` is the host."""

    def __init__(
        self, host: str, message: str, stderr: str = "", returncode: int = 255, *, gateway: str = ""
    ) -> None:
        super().__init__(host, message, stderr, returncode)
        self.gateway = gateway


class AuthenticationError(SSHError):
    """The server did not accept any of the credentials ssh offered."""


class HostKeyError(SSHError):
    """The host key is unknown (with strict checking) or differs from the known one."""


class SSHConfigError(SSHError):
    """ssh refused a setting before connecting: nothing was sent to the host.

    An unknown option, a bad value (``Bad port '99999'``, ``invalid time value``, an unknown
    cipher, KEX or key algorithm, log level ...), a config file it cannot open or parse, a
    destination or user name it rejects.  ``message`` is ssh's own line, e.g.
    ``command-line: line 0: Bad configuration option: nosuchoption``.
    """


class CommandTooLongError(SSHWrapError, ValueError):
    """A command (or one argument of ssh's) exceeds what the OS lets a program receive.

    Raised before anything starts.  ``limit`` is the limit in bytes and ``size`` the size
    asked for; on Linux one argument may hold at most 131,072 bytes (``MAX_ARG_STRLEN``, and the
    whole remote command travels as one argument of ssh's) and all arguments plus the
    environment at most ``os.sysconf("SC_ARG_MAX")``.
    """

    def __init__(self, message: str, *, limit: int, size: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.size = size


class SudoError(SSHWrapError):
    """``sudo=True``: sudo did not run the command.

    ``host`` is the destination as given, ``message`` what went wrong (the password was
    refused, sudo asked for a password and none was given, sudo ended before the command
    started), ``stderr`` what sudo printed (its own words, the prompt removed), ``returncode``
    sudo's exit status when it ended by itself (None when sshwrap stopped it).  The password
    is never part of any of them.
    """

    def __init__(
        self, host: str, message: str, *, stderr: str = "", returncode: int | None = None
    ) -> None:
        super().__init__(host, message)
        self.host = host
        self.message = message
        self.stderr = stderr
        self.returncode = returncode

    def __str__(self) -> str:
        return f"{self.host}: {self.message}"


class CalledProcessError(SSHWrapError, subprocess.CalledProcessError):
    """The remote command exited non-zero (``check=True``); also a subprocess one.

    A negative ``returncode`` means the remote command was killed by a signal and the message
    names it (see :data:`UNKNOWN_SIGNAL`).
    """

    def __init__(
        self,
        returncode: int,
        cmd: Cmd,
        output: bytes | str | None = None,
        stderr: bytes | str | None = None,
        *,
        host: str = "",
    ) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, cmd, output, stderr)
        self.host = host

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_called,
            (self.returncode, self.cmd, self.output, self.stderr, self.host),
        )

    def __str__(self) -> str:
        where = f" on {self.host}" if self.host else ""
        if self.returncode < 0:
            return f"Command {self.cmd!r}{where} died with {signal_description(self.returncode)}."
        return f"Command {self.cmd!r}{where} returned non-zero exit status {self.returncode}."


def _rebuild_called(
    rc: int, cmd: Cmd, out: bytes | str | None, err: bytes | str | None, host: str
) -> CalledProcessError:
    return CalledProcessError(rc, cmd, out, err, host=host)


class TimeoutExpired(SSHWrapError, subprocess.TimeoutExpired):
    """The timeout passed; ``output``/``stderr`` hold what arrived so far (a subprocess one too)."""

    def __init__(
        self,
        cmd: Cmd,
        timeout: float,
        output: bytes | str | None = None,
        stderr: bytes | str | None = None,
        *,
        host: str = "",
    ) -> None:
        subprocess.TimeoutExpired.__init__(self, cmd, timeout, output, stderr)
        self.host = host

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_timeout, (self.cmd, self.timeout, self.output, self.stderr, self.host))

    def __str__(self) -> str:
        where = f" on {self.host}" if self.host else ""
        return f"Command {self.cmd!r}{where} timed out after {self.timeout} seconds"


def _rebuild_timeout(
    cmd: Cmd, timeout: float, out: bytes | str | None, err: bytes | str | None, host: str
) -> TimeoutExpired:
    return TimeoutExpired(cmd, timeout, out, err, host=host)


class SkippedError(SSHWrapError):
    """A fleet call's host that never started: ``max_fail`` was exceeded or a canary did not
    succeed (its result's status is ``skipped``).  ``host`` is the host, ``message`` why
    (``max_fail exceeded: 2 hosts failed (max_fail 1)``)."""

    def __init__(self, host: str, message: str) -> None:
        super().__init__(host, message)
        self.host = host
        self.message = message

    def __str__(self) -> str:
        return f"{self.host}: {self.message}"


_CLASSES: dict[FailureKind, type[SSHError]] = {
    FailureKind.HOST_KEY: HostKeyError,
    FailureKind.AUTHENTICATION: AuthenticationError,
    FailureKind.CONFIG: SSHConfigError,
    FailureKind.CONNECTION: SSHConnectionError,
    FailureKind.OTHER: SSHError,
}


def classify_ssh_failure(
    host: str, text: str, returncode: int = 255, *, stderr: str = ""
) -> SSHError:
    """The :class:`SSHError` subclass for ssh's messages ``text`` (its stderr, or its log).

    ``stderr`` is what ssh wrote on its own stderr beside an ``-E`` log (:class:`SSHStderr`);
    see :func:`sshwrap.protocol.sshlog.read_failure` for how both are read.  ``message`` is
    ssh's last line; when an earlier line tells more (a changed host key, an unresolved jump
    host), it is that line followed by the last one in parentheses.
    """
    failure = read_failure(text, stderr=stderr)
    cls = _CLASSES[failure.kind]
    message = failure.message or f"ssh exited with status {returncode} and said nothing"
    return cls(host, message, failure.messages, returncode)


@dataclass
class ExitInfo:
    """How one ssh call ended, from ssh's exit status and its debug log.

    ``returncode`` is the remote command's (negative for a signal), or ssh's own when it
    failed; ``error`` is set when ssh failed; ``messages`` is what ssh would have printed.
    """

    returncode: int
    error: SSHError | None
    messages: str
    local_signal: int = 0  # the local ssh was stopped by this signal (it says "Killed by")


def interpret_exit(
    host: str, ssh_returncode: int, log: str, sent_signal: int = 0, *, stderr: str = ""
) -> ExitInfo:
    """Turn ssh's exit status and log into the remote command's returncode or an SSHError.

    See :func:`sshwrap.protocol.sshlog.read_exit`: ``sent_signal`` is the signal sshwrap last
    sent to the remote command (0 if none); a local signal gives ``-N`` with ``local_signal``.
    ``stderr``: what ssh wrote on its own stderr (:class:`SSHStderr`).
    """
    reading = read_exit(ssh_returncode, log, sent_signal)
    error = classify_ssh_failure(host, log, 255, stderr=stderr) if reading.failed else None
    return ExitInfo(reading.returncode, error, ssh_messages(log), reading.local_signal)
