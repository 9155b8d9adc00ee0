"""sshwrap's exceptions, and telling ssh's own failures apart from the remote command's status.

Every exception sshwrap raises derives from :class:`SSHWrapError`:

- :class:`SSHError` (ssh itself failed; nothing ran remotely, or the connection broke) with
  ``host``, ``message`` (ssh's own words) and ``stderr`` (everything ssh printed):
  :class:`SSHConnectionError` (refused, timed out, unreachable, name not resolved, closed),
  :class:`AuthenticationError`, :class:`HostKeyError` (unknown or changed host key).
- :class:`CalledProcessError` and :class:`TimeoutExpired`: also subclasses of the
  :mod:`subprocess` ones, so ``except subprocess.CalledProcessError`` keeps working; they carry
  ``host``.

The ssh client exits 255 both when it fails and when the remote command was killed by a
signal (and for a genuine ``exit 255``).  sshwrap runs ssh with ``-E <private file> -o
LogLevel=DEBUG2`` and reads that log with :func:`interpret_exit`: ``rtype exit-status`` means
the remote command exited (255 is then its own status), ``rtype exit-signal`` means it was
killed by a signal, and neither means no remote command ever finished: an ssh failure, then
classified by :func:`classify_ssh_failure`.  (DEBUG2 rather than DEBUG1 because a client that
goes through the user's ControlMaster logs the master's answer only there: ``Received exit
status from master N``, or ``Control master terminated unexpectedly`` when the session ended
without a status, i.e. by a signal.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "UNKNOWN_SIGNAL",
    "AuthenticationError",
    "CalledProcessError",
    "ExitInfo",
    "HostKeyError",
    "SSHConnectionError",
    "SSHError",
    "SSHWrapError",
    "TimeoutExpired",
    "classify_ssh_failure",
    "interpret_exit",
    "ssh_messages",
]

_Arg: TypeAlias = "str | bytes | os.PathLike[str] | os.PathLike[bytes]"
Cmd: TypeAlias = "_Arg | Sequence[_Arg]"
"""What a command may be in the exceptions (the same as in :mod:`subprocess`)."""

UNKNOWN_SIGNAL = -128
"""``returncode`` of a remote command killed by a signal that sshwrap did not send itself.

The ssh client does not report which signal it was (OpenSSH's ``clientloop.c`` handles only
``exit-status``; its log says ``rtype exit-signal`` and nothing more), so a plain ``run()``
cannot know the number honestly.  -128 is negative like every signal death in
:mod:`subprocess` but is no real signal number, so it is never mistaken for one.  When sshwrap
itself signalled the command (``terminate()``, ``kill()``, ``send_signal()``, a timeout) the
returncode is minus the signal it sent.
"""


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


class AuthenticationError(SSHError):
    """The server did not accept any of the credentials ssh offered."""


class HostKeyError(SSHError):
    """The host key is unknown (with strict checking) or differs from the known one."""


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


# -- reading ssh's log ----------------------------------------------------------------------

# Lines ssh logs at VERBOSE (shown by -v, not by default): not passed on to the user.
_VERBOSE_PREFIXES = (
    "Authenticated to ",
    "Authenticated using ",
    "Authenticated with partial success",
    "Transferred: ",
    "Bytes per second: ",
    "Server accepts key: ",
    "Authenticator provider ",
)
_DEBUG = re.compile(r"^debug\d: ")


def ssh_messages(log: str) -> str:
    """What ssh would have printed on stderr at its default log level, from its debug log.

    ssh ends every log message with ``\\r\\n``; a message may itself contain plain newlines
    (``Sending command: ...`` with a multi-line command), so messages are split on ``\\r\\n``.
    """
    out = []
    for msg in log.split("\r\n"):
        if not msg or _DEBUG.match(msg) or msg.startswith(_VERBOSE_PREFIXES):
            continue
        out.append(msg + "\r\n")
    return "".join(out)


_HOSTKEY = re.compile(
    r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|"
    r"host key for .* has changed|No .* host key is known for|POSSIBLE DNS SPOOFING|"
    r"Host key for .* has changed",
    re.IGNORECASE,
)
_AUTH = re.compile(
    r"Permission denied \(|Too many authentication failures|"
    r"No more authentication methods|Authentication failed",
    re.IGNORECASE,
)
_CONNECT = re.compile(
    r"Connection refused|Connection timed out|Operation timed out|No route to host|"
    r"Network is unreachable|Host is down|Could not resolve hostname|"
    r"Name or service not known|Temporary failure in name resolution|"
    r"nodename nor servname|Connection closed by|Connection reset by|"
    r"kex_exchange_identification|banner exchange|Broken pipe|"
    r"Connection to .* closed by remote host|proxy dialog failed|"
    r"port forwarding failed|stdio forwarding failed|Could not resolve|connect to host",
    re.IGNORECASE,
)


def _pick(lines: list[str], pattern: re.Pattern[str]) -> str | None:
    for line in lines:
        if pattern.search(line):
            return line
    return None


def classify_ssh_failure(host: str, text: str, returncode: int = 255) -> SSHError:
    """The :class:`SSHError` subclass for ssh's messages ``text`` (its stderr, or its log).

    Only what ssh shows at its normal log level counts (debug lines are ignored: they mention
    "Broken pipe" and the like on perfectly good connections).
    """
    messages = ssh_messages(text)
    shown = [ln.strip() for ln in messages.split("\r\n") if ln.strip()]
    cls: type[SSHError]
    line = _pick(shown, _HOSTKEY)
    if line is not None:
        cls = HostKeyError
    else:
        line = _pick(shown, _AUTH)
        if line is not None:
            cls = AuthenticationError
        else:
            line = _pick(shown, _CONNECT)
            cls = SSHConnectionError if line is not None else SSHError
    if line is None:
        line = shown[-1] if shown else f"ssh exited with status {returncode} and said nothing"
    return cls(host, line, messages, returncode)


_EXIT_STATUS = re.compile(
    r"rtype exit-status|^debug1: Exit status \d+\r?$|Received exit status from master", re.M
)
_EXIT_SIGNAL = re.compile(r"rtype exit-signal")
# Through a ControlMaster (the user's ControlMaster/ControlPath config), the mux client only
# learns an exit status; for a signal the master closes the session without one.
_MUX_SESSION = re.compile(r"mux_client_request_session: master session id")
_MUX_NO_STATUS = re.compile(r"Control master terminated unexpectedly")
_KILLED = re.compile(r"^Killed by signal (\d+)\.", re.M)


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


def interpret_exit(host: str, ssh_returncode: int, log: str, sent_signal: int = 0) -> ExitInfo:
    """Turn ssh's exit status and log into the remote command's returncode or an SSHError.

    ``sent_signal`` is the signal sshwrap last sent to the remote command (0 if none): it is
    what a ``rtype exit-signal`` is reported as; otherwise :data:`UNKNOWN_SIGNAL`.
    A negative ``ssh_returncode`` (the local ssh process itself was killed) is kept as is, and
    so is a signal ssh caught itself (``Killed by signal N.``, exit 255): ``-N``, with
    ``local_signal`` set, since the remote command may still be running.
    """
    messages = ssh_messages(log)
    if ssh_returncode < 0:
        return ExitInfo(ssh_returncode, None, messages, -ssh_returncode)
    if ssh_returncode != 255:
        return ExitInfo(ssh_returncode, None, messages)
    if _EXIT_SIGNAL.search(log) or (_MUX_SESSION.search(log) and _MUX_NO_STATUS.search(log)):
        return ExitInfo(-sent_signal if sent_signal else UNKNOWN_SIGNAL, None, messages)
    if _EXIT_STATUS.search(log):
        return ExitInfo(255, None, messages)
    killed = _KILLED.search(log)
    if killed is not None:
        # ssh caught SIGINT/SIGTERM/SIGHUP itself and exited 255: a local signal, not a failure
        sig = int(killed.group(1))
        return ExitInfo(-sig, None, messages, sig)
    return ExitInfo(255, classify_ssh_failure(host, log, 255), messages)
