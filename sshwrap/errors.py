"""sshwrap's exceptions, and telling ssh's own failures apart from the remote command's status.

Every exception sshwrap raises derives from :class:`SSHWrapError`:

- :class:`SSHError` (ssh itself failed; nothing ran remotely, or the connection broke) with
  ``host``, ``message`` (ssh's own words) and ``stderr`` (everything ssh printed):
  :class:`SSHConnectionError` (refused, timed out, unreachable, name not resolved, closed),
  :class:`AuthenticationError`, :class:`HostKeyError` (unknown or changed host key),
  :class:`SSHConfigError` (ssh refused to parse a setting: an option, a value, a port, a
  config file, the destination's syntax).
- :class:`CommandTooLongError` (also a :class:`ValueError`): a command or argument larger than
  the operating system lets a program receive, refused before ssh starts.
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
from typing import Any, TypeAlias

__all__ = [
    "UNKNOWN_SIGNAL",
    "AuthenticationError",
    "CalledProcessError",
    "CommandLostError",
    "CommandTooLongError",
    "ExitInfo",
    "HostKeyError",
    "SSHConfigError",
    "SSHConnectionError",
    "SSHError",
    "SSHStderr",
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
# What OpenSSH 9.x prints when it refuses a setting (readconf.c, ssh.c, misc.c), as seen from
# ssh itself: ``command-line: line 0: Bad configuration option: x``, ``command-line line 0:
# invalid time value.``, ``/path/config line 3: Bad port '99999'.``, ``Bad port 'abc'``,
# ``Unknown cipher type 'x'``, ``hostname contains invalid characters`` ...
_CONFIG = re.compile(
    r"^(?:command-line|\S*/\S*) line \d+: |^command-line: line \d+: |"
    r": terminating, \d+ bad configuration options|"
    r"Bad configuration option|^Bad port '|Can't open user config file|"
    r"Bad owner or permissions on|Unknown cipher type|Unsupported KEX algorithm|"
    r"Invalid number of ConnectionAttempts|hostname contains invalid characters|"
    r"username contains invalid characters|Invalid -J argument|parse_jump: invalid|"
    r"Bad escape character|Bad stdio forwarding specification|Bad forwarding specification|"
    r"Cannot execute command-line and remote command|unsupported log level|Bad number '",
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
_KINDS: tuple[tuple[re.Pattern[str], type[SSHError]], ...] = (
    (_HOSTKEY, HostKeyError),
    (_AUTH, AuthenticationError),
    (_CONFIG, SSHConfigError),
)

# The log shows a session (so a remote command may have written to ssh's stderr).
_SESSION = re.compile(
    r"^Authenticated to |^debug\d: (?:Sending command|Sending subsystem|"
    r"Entering interactive session)|mux_client_request_session: master session id",
    re.M,
)


class SSHStderr:
    """What ssh wrote on its own stderr, kept bounded (the first 64 KiB and the last 16 KiB).

    ssh prints some failures (an unknown option, a bad port or value, the destination's syntax)
    on stderr *before* it opens its ``-E`` log, so reading the log alone loses them.  Feed this
    with the bytes of ssh's stderr as they pass (they still go where the caller wanted) and
    give :meth:`text` to :func:`interpret_exit` / :func:`classify_ssh_failure` as ``stderr=``.
    """

    HEAD = 65536
    TAIL = 16384

    def __init__(self) -> None:
        self._head = bytearray()
        self._tail = bytearray()
        self.dropped = 0

    def feed(self, data: bytes | bytearray | memoryview | str) -> None:
        """Record a chunk of ssh's stderr (a ``str`` is taken as UTF-8)."""
        raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
        room = self.HEAD - len(self._head)
        if room > 0:
            self._head += raw[:room]
            raw = raw[room:]
        if raw:
            self._tail += raw
            if len(self._tail) > self.TAIL:
                cut = len(self._tail) - self.TAIL
                self.dropped += cut
                del self._tail[:cut]

    def text(self) -> str:
        """Everything kept, decoded (``[...]`` where the middle was dropped)."""
        mid = b"\n[...]\n" if self.dropped else b""
        return (bytes(self._head) + mid + bytes(self._tail)).decode("utf-8", "replace")

    def __bool__(self) -> bool:
        return bool(self._head)


def _stderr_lines(stderr: str, log: str) -> list[str]:
    """ssh's own lines from its stderr, when the log shows no session (else they may be the
    remote command's)."""
    if not stderr or _SESSION.search(log):
        return []
    return [ln.strip() for ln in stderr.splitlines() if ln.strip() and ln.strip() != "[...]"]


def _pick(lines: list[str], pattern: re.Pattern[str]) -> str | None:
    for line in lines:
        # the banner of ``@`` around a changed host key only says "warning"
        if not line.startswith("@") and pattern.search(line):
            return line
    return None


def classify_ssh_failure(
    host: str, text: str, returncode: int = 255, *, stderr: str = ""
) -> SSHError:
    """The :class:`SSHError` subclass for ssh's messages ``text`` (its stderr, or its log).

    Only what ssh shows at its normal log level counts (debug lines are ignored: they mention
    "Broken pipe" and the like on perfectly good connections).  ``stderr`` is what ssh wrote
    on its own stderr beside an ``-E`` log (:class:`SSHStderr`): used when the log shows no
    session (then it is all ssh's: what it printed before the log opened, a ProxyCommand's or
    jump host's words), put in front of the log's lines.

    ``message`` is ssh's last line; when an earlier line tells more (a changed host key, an
    unresolved jump host), it is that line followed by the last one in parentheses.
    """
    log_messages = ssh_messages(text)
    early = _stderr_lines(stderr, text)
    shown = early + [ln.strip() for ln in log_messages.split("\r\n") if ln.strip()]
    messages = "".join(ln + "\r\n" for ln in early) + log_messages
    cls: type[SSHError] = SSHError
    line: str | None = None
    for pattern, kind in _KINDS:
        line = _pick(shown, pattern)
        if line is not None:
            cls = kind
            break
    else:
        line = _pick(shown, _CONNECT)
        if line is not None:
            cls = SSHConnectionError
    if not shown:
        return cls(
            host, f"ssh exited with status {returncode} and said nothing", messages, returncode
        )
    last = shown[-1]
    message = last if line is None or line == last else f"{line} ({last})"
    return cls(host, message, messages, returncode)


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


def interpret_exit(
    host: str, ssh_returncode: int, log: str, sent_signal: int = 0, *, stderr: str = ""
) -> ExitInfo:
    """Turn ssh's exit status and log into the remote command's returncode or an SSHError.

    ``sent_signal`` is the signal sshwrap last sent to the remote command (0 if none): it is
    what a ``rtype exit-signal`` is reported as; otherwise :data:`UNKNOWN_SIGNAL`.
    A negative ``ssh_returncode`` (the local ssh process itself was killed) is kept as is, and
    so is a signal ssh caught itself (``Killed by signal N.``, exit 255): ``-N``, with
    ``local_signal`` set, since the remote command may still be running.  ``stderr``: what ssh
    wrote on its own stderr (see :class:`SSHStderr` and :func:`classify_ssh_failure`).
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
    return ExitInfo(255, classify_ssh_failure(host, log, 255, stderr=stderr), messages)
