"""Reading what ssh says: its ``-E`` debug log and its own stderr (pure: text in, facts out).

sshwrap runs ssh with ``-E <private file> -o LogLevel=DEBUG2`` and reads that log here:

- :func:`ssh_messages`: what ssh would have printed at its default log level;
- :func:`failure_kind` and :func:`failure_message`: which kind of failure ssh reported (host
  key, authentication, a setting it refused, the connection) and its own words for it;
- :func:`read_exit`: how ssh's exit relates to the remote command.  ssh exits 255 both when it
  fails and when the remote command was killed by a signal (and for a genuine ``exit 255``):
  ``rtype exit-status`` in the log means the remote command exited (255 is then its own
  status), ``rtype exit-signal`` means a signal killed it, and neither means no remote command
  finished: an ssh failure.  (DEBUG2 rather than DEBUG1 because a client going through the
  user's ControlMaster logs the master's answer only there: ``Received exit status from master
  N``, or ``Control master terminated unexpectedly`` when the session ended without a status,
  i.e. by a signal.)
- :data:`SHORT_LOG_SETTINGS` and :func:`short_log_supported`: the fan-out's shorter log
  (``LogLevel=VERBOSE`` with ``LogVerbose`` for the two source files whose debug lines it
  reads).  Those lines come tagged, ``debug1: clientloop.c:client_loop():1290 (pid=N):
  Entering interactive session.``, and every marker here reads both forms.
- :class:`SSHStderr`: ssh's own stderr, kept bounded.  ssh prints some failures (an unknown
  option, a bad port, the destination's syntax) on stderr *before* it opens its ``-E`` log, so
  reading the log alone would lose them.

The exceptions built from these facts are in :mod:`sshwrap.errors`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

UNKNOWN_SIGNAL = -128
"""``returncode`` of a remote command killed by a signal that sshwrap did not send itself.

The ssh client does not report which signal it was (OpenSSH's ``clientloop.c`` handles only
``exit-status``; its log says ``rtype exit-signal`` and nothing more), so a plain ``run()``
cannot know the number honestly.  -128 is negative like every signal death in
:mod:`subprocess` but is no real signal number, so it is never mistaken for one.  When sshwrap
itself signalled the command (``terminate()``, ``kill()``, ``send_signal()``, a timeout) the
returncode is minus the signal it sent.
"""

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
_TAG_BODY = r"\S+:\S+\(\):\d+ \(pid=\d+\): "
_TAG = f"(?:{_TAG_BODY})?"
"""The tag ssh puts in front of a message that ``LogVerbose`` selected (OpenSSH's log.c:
``file:function():line (pid=N): ``), after the ``debugN: `` of a debug line."""
_TAG_AT_START = re.compile(r"^\S+:(\S+)\(\):\d+ \(pid=\d+\): ")

SHORT_LOG_SETTINGS = (
    "-o",
    "LogLevel=VERBOSE",
    "-o",
    "LogVerbose=clientloop.c:client_session2_setup():*,"
    "clientloop.c:client_input_channel_req():*,mux.c:mux_client_request_session():*",
)
"""ssh settings for a short ``-E`` log that still holds every line sshwrap reads: the
session up (``Sending command``, ``Entering interactive session``, the mux client's ``master
session id``), the remote command's end (``rtype exit-status`` / ``exit-signal``, ``Exit
status N``, ``Received exit status from master``) and every failure ssh reports (those are at
VERBOSE level or above): about 14 lines for a command instead of DEBUG1's 50 or so.  OpenSSH
8.5 and later (:func:`short_log_supported`)."""

_OPENSSH_VERSION = re.compile(r"OpenSSH_(\d+)\.(\d+)")


def short_log_supported(version_text: str) -> bool:
    """Whether the ssh whose ``ssh -V`` said ``version_text`` takes
    :data:`SHORT_LOG_SETTINGS` (OpenSSH 8.5 or later: ``LogVerbose``)."""
    m = _OPENSSH_VERSION.search(version_text)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (8, 5)


def ssh_messages(log: str) -> str:
    """What ssh would have printed on stderr at its default log level, from its debug log.

    ssh ends every log message with ``\\r\\n``; a message may itself contain plain newlines
    (``Sending command: ...`` with a multi-line command), so messages are split on ``\\r\\n``.
    A message that ``LogVerbose`` tagged is shown as ssh's ``error_f()`` shows it by default,
    after its function's name (the tag took the place of that name).
    """
    out = []
    for msg in log.split("\r\n"):
        if not msg or _DEBUG.match(msg):
            continue
        tag = _TAG_AT_START.match(msg) if "(pid=" in msg else None
        if tag is not None:
            msg = msg[tag.end() :]
        if msg.startswith(_VERBOSE_PREFIXES):
            continue
        if tag is not None:
            msg = f"{tag.group(1)}: {msg}"
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
# The log shows a session (so a remote command may have written to ssh's stderr).
_SESSION = re.compile(
    r"^Authenticated to |^debug\d: " + _TAG + r"(?:Sending command|Sending subsystem|"
    r"Entering interactive session)|mux_client_request_session(?:\(\):\d+ \(pid=\d+\))?: "
    r"master session id",
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


class FailureKind(enum.Enum):
    """What ssh's words say went wrong (the exception class follows from it)."""

    HOST_KEY = "host key"
    AUTHENTICATION = "authentication"
    CONFIG = "config"
    CONNECTION = "connection"
    OTHER = "other"


_KINDS: tuple[tuple[re.Pattern[str], FailureKind], ...] = (
    (_HOSTKEY, FailureKind.HOST_KEY),
    (_AUTH, FailureKind.AUTHENTICATION),
    (_CONFIG, FailureKind.CONFIG),
    (_CONNECT, FailureKind.CONNECTION),
)


@dataclass(frozen=True)
class Failure:
    """ssh's account of a failure: ``kind``, ``message`` (ssh's own words: its last line, or
    the line that tells more followed by the last one in parentheses; empty when ssh said
    nothing) and ``messages`` (everything ssh showed, ``\r\n``-terminated lines)."""

    kind: FailureKind
    message: str
    messages: str


def read_failure(text: str, *, stderr: str = "") -> Failure:
    """Read a failure from ssh's messages ``text`` (its stderr, or its log).

    Only what ssh shows at its normal log level counts (debug lines are ignored: they mention
    "Broken pipe" and the like on perfectly good connections).  ``stderr`` is what ssh wrote
    on its own stderr beside an ``-E`` log (:class:`SSHStderr`): used when the log shows no
    session (then it is all ssh's: what it printed before the log opened, a ProxyCommand's or
    jump host's words), put in front of the log's lines.
    """
    log_messages = ssh_messages(text)
    early = _stderr_lines(stderr, text)
    shown = early + [ln.strip() for ln in log_messages.split("\r\n") if ln.strip()]
    messages = "".join(ln + "\r\n" for ln in early) + log_messages
    kind, line = FailureKind.OTHER, None
    for pattern, k in _KINDS:
        line = _pick(shown, pattern)
        if line is not None:
            kind = k
            break
    if not shown:
        return Failure(kind, "", messages)
    last = shown[-1]
    message = last if line is None or line == last else f"{line} ({last})"
    return Failure(kind, message, messages)


_EXIT_STATUS = re.compile(
    r"rtype exit-status|^debug1: " + _TAG + r"Exit status \d+\r?$|"
    r"Received exit status from master",
    re.M,
)
_EXIT_SIGNAL = re.compile(r"rtype exit-signal")
# Through a ControlMaster (the user's ControlMaster/ControlPath config), the mux client only
# learns an exit status; for a signal the master closes the session without one.
_MUX_SESSION = re.compile(r"mux_client_request_session(?:\(\):\d+ \(pid=\d+\))?: master session id")
_MUX_NO_STATUS = re.compile(r"Control master terminated unexpectedly")
_KILLED = re.compile(r"^" + _TAG + r"Killed by signal (\d+)\.", re.M)


_MUX_REFUSED = re.compile(
    r"mux_client_request_session(?:\(\):\d+ \(pid=\d+\))?: session request failed: "
    r"Session open refused by peer"
)


def mux_session_refused(log: str) -> bool:
    """True when ssh asked a ControlMaster for a session and the master's server refused to
    open it (OpenSSH's mux.c ``mux_session_confirm``: "Session open refused by peer", e.g. at
    the server's ``MaxSessions``); ssh then tries a connection of its own."""
    return bool(_MUX_REFUSED.search(log))


_MUX_NO_MASTER = re.compile(
    r"Control socket connect\(|Control socket \".*\" does not exist|"
    r"master hello exchange failed|master alive request failed"
)


def mux_master_unreachable(log: str) -> bool:
    """True when ssh, told to go through a ControlMaster, found none answering on its socket
    (OpenSSH's mux.c ``muxclient``: a refused or missing socket, no hello): ssh then tries a
    connection of its own, and nothing ran over the master."""
    return bool(_MUX_NO_MASTER.search(log))


def mux_session_without_status(log: str) -> bool:
    """True when ssh ran the session through a ControlMaster (``ssh -S``, or the user's
    ControlMaster config) and the master closed it without an exit status.

    OpenSSH's mux client logs the same words ("Control master terminated unexpectedly") for
    a remote command killed by a signal (the master relays only ``exit-status``) and for a
    master that died under the session: whether the master still answers on its socket
    tells them apart (:class:`sshwrap.core.invocation.Invocation` asks)."""
    return bool(_MUX_SESSION.search(log) and _MUX_NO_STATUS.search(log))


@dataclass(frozen=True)
class ExitReading:
    """How one ssh call ended, read from its exit status and log (see :func:`read_exit`).

    ``returncode``: the remote command's (negative for a signal), or ssh's own 255 when
    ``failed``; ``local_signal``: the local ssh was stopped by this signal."""

    returncode: int
    failed: bool
    local_signal: int = 0


def read_exit(ssh_returncode: int, log: str, sent_signal: int = 0) -> ExitReading:
    """Tell the remote command's exit from ssh's own failure.

    ``sent_signal`` is the signal sshwrap last sent to the remote command (0 if none): it is
    what a ``rtype exit-signal`` is reported as; otherwise :data:`UNKNOWN_SIGNAL`.  A negative
    ``ssh_returncode`` (the local ssh process itself was killed) is kept as is, and so is a
    signal ssh caught itself (``Killed by signal N.``, exit 255): ``-N``, with
    ``local_signal`` set, since the remote command may still be running.
    """
    if ssh_returncode < 0:
        return ExitReading(ssh_returncode, False, -ssh_returncode)
    if ssh_returncode != 255:
        return ExitReading(ssh_returncode, False)
    if _EXIT_SIGNAL.search(log) or mux_session_without_status(log):
        return ExitReading(-sent_signal if sent_signal else UNKNOWN_SIGNAL, False)
    if _EXIT_STATUS.search(log):
        return ExitReading(255, False)
    killed = _KILLED.search(log)
    if killed is not None:
        # ssh caught SIGINT/SIGTERM/SIGHUP itself and exited 255: a local signal, not a failure
        sig = int(killed.group(1))
        return ExitReading(-sig, False, sig)
    return ExitReading(255, True)
