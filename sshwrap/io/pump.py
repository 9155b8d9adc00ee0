"""RFC 4254 session channels over a ControlMaster's proxy-mode socket.

After ``MUX_C_PROXY`` (see ``sshwrap.io.mux_control``) the control socket carries SSH
connection-protocol packets, unencrypted and unpadded (``uint32 length, byte 0, byte type,
payload``); the master keeps the transport, crypto, keys and authentication, and renumbers
our channel ids so that several proxy clients never collide.  ``ProxyCore`` is one such
socket plus one I/O thread (the *pump*) that serves every channel opened over it:

- callers (any thread) open channels and send requests; a packet is written straight to the
  socket when nothing is queued (no thread hop on the fast path), else queued for the pump;
- the pump reads packets and routes them: data into a collector (``run``), into the write end
  of a pipe handed to the user (``Popen``), to a file descriptor, or nowhere; it reads the
  user's stdin pipe and sends it within the peer's window; it grants window to the peer only
  for bytes actually delivered (so a slow reader throttles the remote writer, never the pump);
- ``exit-status`` and ``exit-signal`` are recorded as they come, so a remote signal death is
  reported exactly (``-signum``); ``signal`` requests reach the remote process group (sshd
  >= 7.9 delivers them with ``killpg`` to the session).

All shared state is guarded by one lock; waiting is done on ``threading.Event`` objects.
The pump never blocks on a pipe it made: those ends are non-blocking and polled.  Descriptors
a caller hands over as they are (``stdout=some_file``, or ``None`` for this process's own
stdout) are written with blocking writes, as a child process would: a pipe there that nobody
reads stalls every channel of the connection.

Sessions beyond the server's ``MaxSessions`` (10 by default) are refused by sshd;
``SessionPacer`` makes opens wait for a slot instead of failing.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

from ..errors import UNKNOWN_SIGNAL, CommandTooLongError
from ..protocol.wire import Reader, pack_string, pack_u32
from .threads import start_daemon

__all__ = [
    "MAX_COMMAND",
    "PACKET_LIMIT",
    "ChannelError",
    "ChannelLost",
    "ChannelOpenTimeout",
    "ProxyCore",
    "Session",
    "SessionPacer",
    "Sink",
    "Source",
    "check_exec_size",
    "signal_name",
    "signal_number",
]

MSG_GLOBAL_REQUEST = 80
MSG_REQUEST_SUCCESS = 81
MSG_REQUEST_FAILURE = 82
MSG_CHANNEL_OPEN = 90
MSG_CHANNEL_OPEN_CONFIRMATION = 91
MSG_CHANNEL_OPEN_FAILURE = 92
MSG_CHANNEL_WINDOW_ADJUST = 93
MSG_CHANNEL_DATA = 94
MSG_CHANNEL_EXTENDED_DATA = 95
MSG_CHANNEL_EOF = 96
MSG_CHANNEL_CLOSE = 97
MSG_CHANNEL_REQUEST = 98
MSG_CHANNEL_SUCCESS = 99
MSG_CHANNEL_FAILURE = 100

OPEN_ADMINISTRATIVELY_PROHIBITED = 1
OPEN_CONNECT_FAILED = 2
# What sshd answers a session open beyond MaxSessions ("open failed"): 9.x sends
# CONNECT_FAILED, older servers ADMINISTRATIVELY_PROHIBITED.
_SESSION_LIMIT_CODES = (OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED)

# What OpenSSH's client grants a session: 64 packets of 32 KiB.
WINDOW = 2 * 1024 * 1024
MAX_PACKET = 32 * 1024
_READ_CHUNK = 256 * 1024
_OUT_HIGH = 4 * 1024 * 1024  # stop reading stdin sources while this much waits for the socket
_HDR = struct.Struct(">IBB")

PACKET_LIMIT = 256 * 1024
"""OpenSSH's packet size limit, in bytes (measured against OpenSSH 9.2 and in its sources).

Two limits of that size meet a channel request: the master drops a proxy client whose frame
(``uint32 length`` then that many bytes) is longer than 256 KiB (``channels.c``,
``CHANNEL_MUX_MAX_PACKET``), which loses *every* channel on that socket; and sshd drops the
whole connection (the master with it) for a packet whose ``packet_length`` (padding-length
byte + payload + 4 to ``block size + 3`` bytes of padding) exceeds 256 KiB (``packet.c``,
``PACKET_MAX_SIZE``, "Bad packet length").  The second is the tighter one.
"""
_PAYLOAD_MAX = PACKET_LIMIT - 1 - 4 - 15  # padding: at least 4, up to 15 more (16-byte blocks)
_EXEC_OVERHEAD = 1 + 4 + (4 + 4) + 1 + 4  # type, channel, string "exec", want-reply, length
MAX_COMMAND = _PAYLOAD_MAX - _EXEC_OVERHEAD
"""The longest command (bytes, UTF-8) one ``exec`` request can carry over a master: 262,106.

Measured with OpenSSH 9.2 (chacha20-poly1305, 8-byte blocks): 262,121 bytes work, 262,122
make sshd drop the connection ("Bad packet length") and from 262,126 on the master drops the
proxy socket.  15 bytes are kept for ciphers with 16-byte blocks (aes-gcm, aes-ctr).
Compression (``Compression yes``) could make an incompressible command grow past it.
A Linux server also caps any single argument, and so the ``sh -c`` command string, at
131,072 bytes (``MAX_ARG_STRLEN``): longer commands reach it and fail there with
"Argument list too long" (exit status 1), on that channel only.
"""
_U32 = struct.Struct(">I")


class ChannelError(OSError):
    """A channel could not be opened or a request on it failed."""


class ChannelOpenTimeout(ChannelError):
    """The server did not confirm a channel open in time."""


class ChannelLost(ChannelError):
    """The connection to the master ended while the channel was open (master gone)."""


def check_exec_size(command: str, env: dict[str, str] | None = None) -> None:
    """``CommandTooLongError`` (a ``ValueError``) naming the limit when ``command`` (or an
    ``env`` request) would not fit in one packet (see :data:`MAX_COMMAND`); checked before
    anything is sent, since an oversized request breaks every channel of the connection."""
    size = len(command.encode("utf-8", "surrogateescape"))
    if size > MAX_COMMAND:
        raise CommandTooLongError(
            f"the command is {size} bytes; one exec request over an OpenSSH master carries at "
            f"most {MAX_COMMAND} bytes (its {PACKET_LIMIT // 1024} KiB packet limit)",
            limit=MAX_COMMAND,
            size=size,
        )
    for k, v in (env or {}).items():
        n = 1 + 4 + (4 + 3) + 1 + (4 + len(k.encode())) + (4 + len(v.encode()))
        if n > _PAYLOAD_MAX:
            raise CommandTooLongError(
                f"the environment variable {k!r} is too long for one env request "
                f"({n} bytes; at most {_PAYLOAD_MAX}, OpenSSH's packet limit)",
                limit=_PAYLOAD_MAX,
                size=n,
            )


def signal_name(sig: int) -> str:
    """The RFC 4254 name of a signal number (``signal.SIGINT`` -> ``"INT"``)."""
    return signal.Signals(sig).name.removeprefix("SIG")


def signal_number(name: str) -> int | None:
    """The local number of an RFC 4254 signal name (``"KILL"`` -> 9), None if unknown."""
    try:
        return int(signal.Signals["SIG" + name.split("@", 1)[0]])
    except KeyError:
        return None


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _packet(msg: int, body: bytes) -> bytes:
    return _HDR.pack(len(body) + 2, 0, msg) + body


def _selectable(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


class Sink:
    """Where one stream of channel data goes."""

    __slots__ = ("broken", "buf", "closed", "collect", "fd", "nonblocking", "own", "pending")

    def __init__(
        self,
        *,
        collect: bool = False,
        fd: int | None = None,
        own: bool = False,
        nonblocking: bool = False,
    ) -> None:
        self.collect = collect  # append to ``buf``
        self.buf = bytearray()
        self.fd = fd  # write to this fd (None and not collect: discard)
        self.own = own  # close ``fd`` when done
        self.nonblocking = nonblocking  # a pipe we made: non-blocking writes, polled
        self.pending = bytearray()
        self.broken = False  # the reader went away: discard the rest
        self.closed = False


class Source:
    """Where a channel's input comes from."""

    __slots__ = ("data", "eof", "fd", "own", "pos", "selectable")

    def __init__(
        self, *, data: bytes | None = None, fd: int | None = None, own: bool = False
    ) -> None:
        self.data = memoryview(data) if data is not None else None
        self.pos = 0
        self.fd = fd
        self.own = own
        self.selectable = fd is not None and _selectable(fd)
        self.eof = data is None and fd is None  # nothing to send: EOF at once


class Session:
    """One ``session`` channel: exec a command, move its data, learn how it ended.

    Created by ``ProxyCore.open_session``; the caller then calls ``setup_io`` and ``exec``.
    ``closed`` is set when the channel is over (or the master went away: ``lost``).
    """

    def __init__(self, core: ProxyCore, local_id: int) -> None:
        self.core = core
        self.local_id = local_id
        self.remote_id = -1
        self.remote_window = 0
        self.remote_max_packet = 0
        self.opened = threading.Event()
        self.closed = threading.Event()
        self.open_error: str | None = None
        self.open_code = 0
        self.exec_failed = False
        self.pty_refused = False
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.exit_core_dumped = False
        self.exit_message = ""
        self.lost = False
        self.abandoned = False
        self.remote_eof = False
        self.eof_sent = False
        self.close_sent = False
        self.close_received = False
        self.consumed = 0  # bytes delivered since the last window adjust we sent
        self.out = Sink()
        self.err = Sink()
        self.src = Source()
        self._replies: deque[Callable[[bool], None]] = deque()
        # Called (lock held, pump thread) after the channel opened, failed, closed or was lost.
        self.notify: Callable[[], None] | None = None

    # -- caller side -------------------------------------------------------------------
    def setup_io(self, src: Source, out: Sink, err: Sink) -> None:
        """Attach input and output (before ``exec``)."""
        self.src, self.out, self.err = src, out, err

    def exec(self, command: str, env: dict[str, str] | None = None) -> None:
        """Send ``env`` (best effort) and ``exec`` requests; input starts flowing at once.

        The exec reply is not awaited (it comes before any output); a refusal marks the
        session ``exec_failed`` and closes it.
        """
        try:
            check_exec_size(command, env)
        except ValueError:
            self.close()
            raise
        core = self.core
        with core.lock:
            self._check_open()
            if env:
                for k, v in env.items():
                    body = pack_string(k) + pack_string(v)
                    self._request_locked("env", body, want_reply=False)
            self._request_locked("exec", pack_string(command), want_reply=True, cb=self._on_exec)
            core._service_source_locked(self)
        core._wake()

    def _on_exec(self, ok: bool) -> None:
        if not ok:
            self.exec_failed = True
            self._send_close_locked()

    def request_pty(self, term: str, rows: int, cols: int) -> None:
        """Ask for a remote terminal (``pty-req``, before ``exec``).  Not awaited: a refusal
        only means the command runs without a terminal, as with ``ssh -t``."""
        body = (
            pack_string(term)
            + pack_u32(cols)
            + pack_u32(rows)
            + pack_u32(0)
            + pack_u32(0)
            + pack_string(b"\x00")  # no terminal modes: TTY_OP_END
        )
        with self.core.lock:
            self._check_open()
            self._request_locked("pty-req", body, want_reply=True, cb=self._on_pty)

    def _on_pty(self, ok: bool) -> None:
        self.pty_refused = not ok

    def resize(self, rows: int, cols: int) -> None:
        """Tell the remote terminal its new size (``window-change``)."""
        body = pack_u32(cols) + pack_u32(rows) + pack_u32(0) + pack_u32(0)
        with self.core.lock:
            if self.closed.is_set() or self.close_sent:
                return
            self._request_locked("window-change", body, want_reply=False)

    def send_signal(self, sig: int) -> None:
        """Send a ``signal`` request (delivered by sshd >= 7.9 to the session's process group)."""
        with self.core.lock:
            if self.closed.is_set() or self.close_sent:
                return
            self._request_locked("signal", pack_string(signal_name(sig)), want_reply=False)

    def send_eof(self) -> None:
        """Tell the remote side there is no more input."""
        with self.core.lock:
            self._send_eof_locked()

    def close(self) -> None:
        """Close the channel (the remote command gets a hang-up of its channel)."""
        with self.core.lock:
            self._send_close_locked()

    @property
    def returncode(self) -> int | None:
        """``exit-status``, or ``-signum`` for ``exit-signal`` (``UNKNOWN_SIGNAL`` for a name
        this system does not know); None when neither came."""
        if self.exit_status is not None:
            return self.exit_status
        if self.exit_signal is not None:
            num = signal_number(self.exit_signal)
            return -num if num is not None else UNKNOWN_SIGNAL
        return None

    # -- helpers (lock held) -----------------------------------------------------------
    def _check_open(self) -> None:
        if self.lost:
            raise ChannelLost("the connection to the control master was lost")
        if self.closed.is_set():
            raise ChannelError("channel is closed")

    def _request_locked(
        self,
        name: str,
        body: bytes,
        *,
        want_reply: bool,
        cb: Callable[[bool], None] | None = None,
    ) -> None:
        if want_reply:
            self._replies.append(cb or (lambda ok: None))
        self.core._send_locked(
            _packet(
                MSG_CHANNEL_REQUEST,
                pack_u32(self.remote_id)
                + pack_string(name)
                + (b"\x01" if want_reply else b"\x00")
                + body,
            )
        )

    def _send_eof_locked(self) -> None:
        if self.eof_sent or self.close_sent or self.lost or self.remote_id < 0:
            return
        self.eof_sent = True
        self.core._send_locked(_packet(MSG_CHANNEL_EOF, pack_u32(self.remote_id)))

    def _send_close_locked(self) -> None:
        if self.close_sent or self.lost or self.remote_id < 0:
            return
        self.close_sent = True
        self.core._send_locked(_packet(MSG_CHANNEL_CLOSE, pack_u32(self.remote_id)))
        self.core._close_source_locked(self)


class SessionPacer:
    """When to try a session open again after the server refused it for its session limit.

    sshd refuses a session beyond ``MaxSessions`` ("open failed") and frees a slot only once
    it has our CLOSE for a finished channel, a moment after we learn the channel ended.  So a
    refused open is tried again when one of our channels closes or after a delay growing
    from 10 ms to 250 ms, whichever comes first.  With no channel of ours open, the refusal
    is taken as final after ``patience`` seconds (someone else holds the sessions, or the
    server refuses sessions for another reason).
    """

    def __init__(self, core: ProxyCore, patience: float = 2.0) -> None:
        self.core = core
        self.patience = patience
        self._delay = 0.01
        self._alone_since: float | None = None

    def pause(self, ch: Session) -> float | None:
        """Seconds to wait at most before trying again, or None: do not try again."""
        if ch.open_code not in _SESSION_LIMIT_CODES or ch.lost or ch.open_error is None:
            return None
        with self.core.lock:
            ours = bool(self.core._channels)
        now = time.monotonic()
        if ours:
            self._alone_since = None
        elif self._alone_since is None:
            self._alone_since = now
        elif now - self._alone_since > self.patience:
            return None
        delay = self._delay
        self._delay = min(self._delay * 2, 0.25)
        return delay


class ProxyCore:
    """One proxy-mode socket to a ControlMaster and the thread that pumps its channels."""

    def __init__(self, sock: socket.socket, *, prestart: bool = True) -> None:
        self.sock = sock
        self.prestart = prestart
        # SetEnv / SendEnv of the user's ssh config: the master does not send them for
        # channels we open ourselves, so each session sends them as ``env`` requests.
        self.session_env: dict[str, str] = {}
        self._spare: Session | None = None
        sock.setblocking(False)
        self.lock = threading.Lock()
        self._out = bytearray()
        self._in = bytearray()
        self._channels: dict[int, Session] = {}
        self._draining: set[Session] = set()  # closed channels whose pipes still get data
        self._next_id = 0
        self.dead = False
        self.dead_reason = ""
        self.close_generation = 0  # counts channel closes (and the end of the socket)
        self._changed = threading.Condition(self.lock)
        self._close_waiters: list[Callable[[], None]] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The pump closes its wake pipe when it ends; ``_wake`` checks under this lock, so it
        # never writes to a closed descriptor number (which another file may have reused).
        self._wake_lock = threading.Lock()
        self._poll = select.poll()
        self._reg: dict[int, int] = {}
        self._thread = start_daemon(self._run, "sshwrap-mux-pump")

    # -- public ------------------------------------------------------------------------
    def open_session(self, timeout: float | None = None) -> Session:
        """Open a ``session`` channel and wait for the server's confirmation.

        When the server refuses because the connection already has as many sessions as it
        allows (sshd's ``MaxSessions``, 10 by default), the open is tried again when one of
        our channels closes or after a short growing delay (see ``SessionPacer``), until
        ``timeout`` (``ChannelOpenTimeout``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pacer = SessionPacer(self)
        while True:
            with self.lock:
                generation = self.close_generation
            ch = self.start_session()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not ch.opened.wait(remaining):
                self.abandon(ch)
                raise ChannelOpenTimeout(
                    "timed out waiting for the server to open a session channel"
                )
            pause = pacer.pause(ch)
            if pause is None:
                break
            with self.lock:
                if self.close_generation == generation and not self.dead:
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise ChannelOpenTimeout(
                                "timed out waiting for the server to allow another session"
                            )
                        pause = min(pause, remaining)
                    self._changed.wait(pause)
        self.check_opened(ch)
        return ch

    def add_close_waiter(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` once (pump thread, lock held) when any channel closes next."""
        with self.lock:
            self._close_waiters.append(cb)

    def abandon(self, ch: Session) -> None:
        """Give up on a channel nobody waits for: closed as soon as it is open."""
        with self.lock:
            ch.abandoned = True
            if ch.remote_id >= 0:
                ch._send_close_locked()

    def check_opened(self, ch: Session) -> None:
        """Raise if the channel could not be opened (after ``ch.opened`` is set)."""
        if ch.lost:
            raise ChannelLost(self.dead_reason or "the control master connection was lost")
        if ch.open_error is not None:
            raise ChannelError(f"the server refused a session channel: {ch.open_error}")

    def start_session(self, notify: Callable[[], None] | None = None) -> Session:
        """Send a ``session`` channel open and return at once (``opened`` tells when it is up).

        ``notify`` is called from the pump thread (lock held) when the channel opens, fails,
        closes or is lost: it must only schedule work (e.g. ``loop.call_soon_threadsafe``).

        With ``prestart`` (the default) one spare session channel is kept opening ahead: a
        call takes it (already open, or on its way) and asks for the next spare, so a command
        waits for no channel-open round trip.  An open session costs sshd nothing until
        ``exec`` (no process), but it counts towards ``MaxSessions``.
        """
        with self.lock:
            if self.dead:
                raise ChannelLost(self.dead_reason or "the control master connection is closed")
            ch = self._take_spare_locked()
            if ch is None:
                ch = self._send_open_locked()
            ch.notify = notify
            if self.prestart and self._spare is None:
                self._spare = self._send_open_locked()
            if notify is not None and ch.opened.is_set():
                notify()
        return ch

    def _take_spare_locked(self) -> Session | None:
        spare, self._spare = self._spare, None
        if spare is None or spare.lost or spare.closed.is_set() or spare.close_sent:
            return None
        if spare.opened.is_set() and spare.open_error is not None:
            return None  # refused (session limit): open a fresh one
        return spare

    def _send_open_locked(self) -> Session:
        self._next_id = (self._next_id + 1) & 0x7FFFFFFF
        ch = Session(self, self._next_id)
        self._channels[ch.local_id] = ch
        self._send_locked(
            _packet(
                MSG_CHANNEL_OPEN,
                pack_string("session")
                + pack_u32(ch.local_id)
                + pack_u32(WINDOW)
                + pack_u32(MAX_PACKET),
            )
        )
        return ch

    @property
    def alive(self) -> bool:
        """False once the socket to the master has ended."""
        return not self.dead

    def close(self, wait: float = 5.0) -> None:
        """Stop the pump and close the socket; open channels are marked lost.  Waits up to
        ``wait`` seconds for the pump thread to end (it ends at once unless it is stuck in a
        blocking write to a descriptor the caller gave)."""
        with self.lock:
            if not self.dead:
                self._die_locked("closed")
            # Nobody will read what the closed channels still had for their pipes.
            self._drop_draining_locked()
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(wait)

    def _drop_draining_locked(self) -> None:
        for ch in list(self._draining):
            for sink in (ch.out, ch.err):
                sink.pending.clear()
                self._finish_sink_locked(sink)
        self._draining.clear()

    # -- sending (lock held) -----------------------------------------------------------
    def _send_locked(self, data: bytes) -> None:
        if self.dead:
            return
        if self._out:
            self._out += data
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._die_locked(f"control master connection failed: {e}")
            return
        if n < len(data):
            self._out += data[n:]
            self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._wake_w, b"x")

    def _service_source_locked(self, ch: Session) -> None:
        """Send what input is available within the peer's window (bytes sources; EOF)."""
        src = ch.src
        if ch.eof_sent or ch.close_sent or ch.remote_id < 0:
            return
        if src.data is not None:
            while ch.remote_window > 0 and src.pos < len(src.data) and len(self._out) < _OUT_HIGH:
                n = min(ch.remote_window, ch.remote_max_packet, len(src.data) - src.pos)
                piece = bytes(src.data[src.pos : src.pos + n])
                src.pos += n
                ch.remote_window -= n
                self._send_data_locked(ch, piece)
            if src.pos >= len(src.data):
                src.eof = True
        elif src.fd is not None and not src.selectable:
            # A regular file: reads never block, so read as the window allows.
            while ch.remote_window > 0 and len(self._out) < _OUT_HIGH and not src.eof:
                n = min(ch.remote_window, ch.remote_max_packet)
                try:
                    chunk = os.read(src.fd, n)
                except OSError:
                    chunk = b""
                if not chunk:
                    src.eof = True
                    break
                ch.remote_window -= len(chunk)
                self._send_data_locked(ch, chunk)
        if src.eof:
            self._close_source_locked(ch)
            ch._send_eof_locked()

    def _send_data_locked(self, ch: Session, chunk: bytes) -> None:
        self._send_locked(
            _HDR.pack(len(chunk) + 10, 0, MSG_CHANNEL_DATA)
            + _U32.pack(ch.remote_id)
            + _U32.pack(len(chunk))
            + chunk
        )

    def _close_source_locked(self, ch: Session) -> None:
        src = ch.src
        src.eof = True
        src.data = None
        if src.fd is not None:
            if src.own:
                with contextlib.suppress(OSError):
                    os.close(src.fd)
            src.fd = None

    # -- receiving (pump thread, lock held) ---------------------------------------------
    def _deliver_locked(self, ch: Session, sink: Sink, data: bytes) -> None:
        if sink.closed or sink.broken:
            ch.consumed += len(data)
        elif sink.collect:
            sink.buf += data
            ch.consumed += len(data)
        elif sink.fd is None:
            ch.consumed += len(data)
        elif sink.nonblocking:
            if sink.pending:
                sink.pending += data
            else:
                n = self._write_sink(sink, data)
                ch.consumed += n
                if n < len(data) and not sink.broken:
                    sink.pending += data[n:]
                elif sink.broken:
                    ch.consumed += len(data) - n
        else:
            # A descriptor the caller gave us (a file, a terminal): written as is, blocking.
            mv = memoryview(data)
            try:
                while mv:
                    mv = mv[os.write(sink.fd, mv) :]
            except OSError:
                sink.broken = True
            ch.consumed += len(data)
        self._maybe_adjust_locked(ch)

    @staticmethod
    def _write_sink(sink: Sink, data: bytes | bytearray) -> int:
        assert sink.fd is not None
        try:
            return os.write(sink.fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            sink.broken = True
            sink.pending.clear()
            return 0

    def _maybe_adjust_locked(self, ch: Session) -> None:
        if ch.consumed >= WINDOW // 2 and not ch.close_sent and not ch.close_received:
            self._send_locked(
                _packet(MSG_CHANNEL_WINDOW_ADJUST, pack_u32(ch.remote_id) + pack_u32(ch.consumed))
            )
            ch.consumed = 0

    def _finish_sink_locked(self, sink: Sink) -> None:
        """Close the pipe end after the remote EOF once everything is written."""
        if sink.closed or sink.pending:
            return
        sink.closed = True
        if sink.own and sink.fd is not None:
            with contextlib.suppress(OSError):
                os.close(sink.fd)

    def _handle_packet_locked(self, msg: int, r: Reader) -> None:
        if msg in (MSG_GLOBAL_REQUEST, MSG_REQUEST_SUCCESS, MSG_REQUEST_FAILURE):
            if msg == MSG_GLOBAL_REQUEST:
                r.string()
                if r.boolean():
                    self._send_locked(_packet(MSG_REQUEST_FAILURE, b""))
            return
        ch = self._channels.get(r.u32())
        if ch is None:
            return
        if msg == MSG_CHANNEL_DATA:
            self._deliver_locked(ch, ch.out, r.string())
        elif msg == MSG_CHANNEL_EXTENDED_DATA:
            code = r.u32()
            data = r.string()
            self._deliver_locked(ch, ch.err if code == 1 else Sink(), data)
        elif msg == MSG_CHANNEL_WINDOW_ADJUST:
            ch.remote_window += r.u32()
            self._service_source_locked(ch)
        elif msg == MSG_CHANNEL_REQUEST:
            name = r.text()
            want_reply = r.boolean()
            if name == "exit-status":
                ch.exit_status = r.u32()
            elif name == "exit-signal":
                ch.exit_signal = r.text()
                ch.exit_core_dumped = r.boolean()
                ch.exit_message = r.text()
            elif want_reply:
                self._send_locked(_packet(MSG_CHANNEL_FAILURE, pack_u32(ch.remote_id)))
        elif msg in (MSG_CHANNEL_SUCCESS, MSG_CHANNEL_FAILURE):
            if ch._replies:
                ch._replies.popleft()(msg == MSG_CHANNEL_SUCCESS)
        elif msg == MSG_CHANNEL_EOF:
            ch.remote_eof = True
            self._finish_sink_locked(ch.out)
            self._finish_sink_locked(ch.err)
        elif msg == MSG_CHANNEL_CLOSE:
            ch.close_received = True
            ch.remote_eof = True
            ch._send_close_locked()
            self._channels.pop(ch.local_id, None)
            self._finish_sink_locked(ch.out)
            self._finish_sink_locked(ch.err)
            if not (ch.out.closed and ch.err.closed):
                self._draining.add(ch)
            self._close_source_locked(ch)
            ch.closed.set()
            if ch.notify is not None:
                ch.notify()
            self._closed_one_locked()
        elif msg == MSG_CHANNEL_OPEN_CONFIRMATION:
            ch.remote_id = r.u32()
            ch.remote_window = r.u32()
            ch.remote_max_packet = r.u32()
            if ch.abandoned:
                ch._send_close_locked()
            ch.opened.set()
            if ch.notify is not None:
                ch.notify()
        elif msg == MSG_CHANNEL_OPEN_FAILURE:
            code = r.u32()
            ch.open_code = code
            ch.open_error = r.text() or f"reason code {code}"
            self._channels.pop(ch.local_id, None)
            ch.opened.set()
            if ch.notify is not None:
                ch.notify()

    def _die_locked(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = True
        self.dead_reason = reason
        with contextlib.suppress(OSError):
            self.sock.close()
        self._out.clear()
        for ch in list(self._channels.values()):
            if not ch.closed.is_set():
                ch.lost = True
                self._close_source_locked(ch)
                for sink in (ch.out, ch.err):
                    self._finish_sink_locked(sink)
                    if sink.pending:
                        self._draining.add(ch)
                ch.opened.set()
                ch.closed.set()
                if ch.notify is not None:
                    ch.notify()
        self._channels.clear()
        self._closed_one_locked()

    def _closed_one_locked(self) -> None:
        self.close_generation += 1
        self._changed.notify_all()
        waiters, self._close_waiters = self._close_waiters, []
        for cb in waiters:
            cb()

    # -- the pump ----------------------------------------------------------------------
    def _interest_locked(self) -> dict[int, int]:
        want: dict[int, int] = {self._wake_r: select.POLLIN}
        if not self.dead:
            want[self.sock.fileno()] = select.POLLIN | (select.POLLOUT if self._out else 0)
        room = len(self._out) < _OUT_HIGH
        for ch in self._channels.values():
            src = ch.src
            if (
                src.fd is not None
                and src.selectable
                and room
                and ch.remote_window > 0
                and not ch.eof_sent
                and not ch.close_sent
            ):
                want[src.fd] = want.get(src.fd, 0) | select.POLLIN
            for sink in (ch.out, ch.err):
                if sink.pending and sink.fd is not None:
                    want[sink.fd] = want.get(sink.fd, 0) | select.POLLOUT
        for ch in self._draining:
            for sink in (ch.out, ch.err):
                if sink.pending and sink.fd is not None:
                    want[sink.fd] = want.get(sink.fd, 0) | select.POLLOUT
        return want

    def _fd_owner_locked(self) -> dict[int, tuple[Session, str]]:
        owners: dict[int, tuple[Session, str]] = {}
        for ch in (*self._channels.values(), *self._draining):
            if ch.src.fd is not None:
                owners[ch.src.fd] = (ch, "src")
            if ch.out.fd is not None and ch.out.pending:
                owners[ch.out.fd] = (ch, "out")
            if ch.err.fd is not None and ch.err.pending:
                owners[ch.err.fd] = (ch, "err")
        return owners

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # pragma: no cover - a bug; never leave callers hanging
            with self.lock:
                self._die_locked(f"internal error in the channel pump: {e!r}")
        finally:
            with self.lock:
                self._drop_draining_locked()
            with self._wake_lock:
                _close_fds(self._wake_r, self._wake_w)
                self._wake_r = self._wake_w = -1

    def _loop(self) -> None:
        sockfd = self.sock.fileno()
        buf = bytearray(_READ_CHUNK)
        view = memoryview(buf)
        while True:
            with self.lock:
                if self.dead and not self._draining:
                    return
                want = self._interest_locked()
                for fd in list(self._reg):
                    if fd not in want:
                        with contextlib.suppress(KeyError, OSError):
                            self._poll.unregister(fd)
                        del self._reg[fd]
                for fd, mask in want.items():
                    if self._reg.get(fd) != mask:
                        self._poll.register(fd, mask)
                        self._reg[fd] = mask
            events = self._poll.poll()
            with self.lock:
                owners: dict[int, tuple[Session, str]] | None = None
                for fd, ev in events:
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError, OSError):
                            os.read(self._wake_r, 4096)
                        continue
                    if fd == sockfd and not self.dead:
                        if ev & select.POLLOUT:
                            self._flush_locked()
                        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                            self._read_sock_locked(view)
                        continue
                    if owners is None:
                        owners = self._fd_owner_locked()
                    owner = owners.get(fd)
                    if owner is None:
                        continue
                    ch, which = owner
                    if which == "src":
                        self._read_source_locked(ch)
                    else:
                        sink = ch.out if which == "out" else ch.err
                        self._flush_sink_locked(ch, sink)

    def _flush_locked(self) -> None:
        while self._out:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._die_locked(f"control master connection failed: {e}")
                return
            del self._out[:n]
        # The socket drained: stdin sources may go on.
        for ch in list(self._channels.values()):
            if ch.src.data is not None or (ch.src.fd is not None and not ch.src.selectable):
                self._service_source_locked(ch)

    def _read_sock_locked(self, view: memoryview) -> None:
        try:
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._die_locked(f"control master connection failed: {e}")
            return
        if n == 0:
            self._die_locked("the control master closed the connection (master gone?)")
            return
        self._in += view[:n]
        inb = self._in
        pos = 0
        end = len(inb)
        while end - pos >= 6:
            (length,) = _U32.unpack_from(inb, pos)
            if end - pos - 4 < length:
                break
            msg = inb[pos + 5]
            payload = bytes(inb[pos + 6 : pos + 4 + length])
            pos += 4 + length
            self._handle_packet_locked(msg, Reader(payload))
            if self.dead:
                return
        del inb[:pos]

    def _read_source_locked(self, ch: Session) -> None:
        src = ch.src
        if src.fd is None or ch.remote_window <= 0 or ch.eof_sent or ch.close_sent:
            return
        n = min(ch.remote_window, ch.remote_max_packet)
        try:
            chunk = os.read(src.fd, n)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close_source_locked(ch)
            ch._send_eof_locked()
            return
        ch.remote_window -= len(chunk)
        self._send_data_locked(ch, chunk)

    def _flush_sink_locked(self, ch: Session, sink: Sink) -> None:
        if not sink.pending:
            return
        n = self._write_sink(sink, sink.pending)
        if sink.broken:
            n = len(sink.pending)
            sink.pending.clear()
        else:
            del sink.pending[:n]
        if not ch.close_received and not ch.lost:
            ch.consumed += n
            self._maybe_adjust_locked(ch)
        if not sink.pending and (ch.remote_eof or ch.lost):
            self._finish_sink_locked(sink)
        if ch in self._draining and ch.out.closed and ch.err.closed:
            self._draining.discard(ch)
