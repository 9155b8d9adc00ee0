"""Session channels over a ControlMaster's proxy-mode socket: the pump thread that drives
the pure channel machine (:mod:`sshwrap.protocol.channel`).

After ``MUX_C_PROXY`` (see ``sshwrap.io.mux_control``) the control socket carries SSH
connection-protocol packets; the master keeps the transport, crypto, keys and
authentication, and renumbers our channel ids.  ``ProxyCore`` is one such socket, one
``ChannelMux`` (all the protocol state: channel states, windows, pending replies) and one I/O
thread, the *pump*, that serves every channel opened over it:

- callers (any thread) open channels and send requests: the machine queues the packet and it
  is written straight to the socket when nothing waits before it (no thread hop on the fast
  path), else left for the pump;
- the pump reads the socket and feeds the machine (under ``lock``, which guards the machine);
  its events then go, *outside* the lock, to the channel's ``Sink``s (a collector for
  ``run``, the write end of a pipe handed to the user for ``Popen``, an fd, or nowhere) and to
  the ``Session`` (exit status, flags); window is granted again only for bytes delivered;
- it reads each channel's ``Source`` and sends it within the peer's window;
- ``exit-status`` and ``exit-signal`` are recorded as they come, so a remote signal death is
  reported exactly (``-signum``); ``signal`` requests reach the remote process group (sshd
  >= 7.9 delivers them with ``killpg`` to the session).

Waiting is done on :class:`~sshwrap.io.flags.Flag` (``Session.opened``, ``Session.closed``)
and :class:`~sshwrap.io.flags.Changes` (``ProxyCore.closes``), which a blocked thread and an
event loop can both wait on.  A packet that breaks the protocol ends the connection: every
channel is lost, with the protocol error as ``dead_reason``.

``check_exec_size``, ``MAX_COMMAND`` and ``PACKET_LIMIT`` (from ``sshwrap.protocol.channel``),
``Sink``/``Source``/``signal_name``/``signal_number`` (from ``sshwrap.io.channel_io``) are
re-exported here for the callers that import them from this module.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading

from ..protocol import channel as proto
from ..protocol.channel import (
    MAX_COMMAND,
    PACKET_LIMIT,
    ChannelMux,
    ChannelProtocolError,
    ChannelState,
)
from ..protocol.channel_events import (
    Closed,
    Data,
    Eof,
    Event,
    ExitSignal,
    ExitStatus,
    ExtendedData,
    Lost,
    Opened,
    OpenFailed,
    RequestReply,
    WindowOpened,
)
from .channel_io import (
    Sink,
    Source,
    close_fds,
    deliver,
    finish_sink,
    flush_sink,
    read_ready,
    signal_name,
    signal_number,
)
from .flags import Changes
from .session import (
    ChannelError,
    ChannelLost,
    ChannelOpenTimeout,
    Session,
    check_exec_size,
)
from .threads import start_daemon

__all__ = [
    "MAX_COMMAND",
    "PACKET_LIMIT",
    "ChannelError",
    "ChannelLost",
    "ChannelOpenTimeout",
    "ProxyCore",
    "Session",
    "Sink",
    "Source",
    "check_exec_size",
    "signal_name",
    "signal_number",
]

_READ_CHUNK = 256 * 1024
_OUT_HIGH = 4 * 1024 * 1024  # stop reading stdin sources while this much waits for the socket
_LIVE = (ChannelState.OPENING, ChannelState.OPEN)
_DISCARD = Sink()


class ProxyCore:
    """One proxy-mode socket to a ControlMaster and the thread that pumps its channels."""

    def __init__(self, sock: socket.socket, *, prestart: bool = True) -> None:
        self.sock = sock
        self.prestart = prestart
        # SetEnv / SendEnv of the user's ssh config: the master does not send them for
        # channels we open ourselves, so each session sends them as ``env`` requests.
        self.session_env: dict[str, str] = {}
        self.mux = ChannelMux()
        """The protocol state of every channel (guarded by ``lock``)."""
        self.lock = threading.Lock()
        self.closes = Changes()
        """Bumped when one of our channels closes (or is lost) and when the socket ends."""
        self.dead = False
        self.dead_reason = ""
        sock.setblocking(False)
        self._spare: Session | None = None
        self._out = bytearray()  # bytes for the socket that it did not take yet
        self._sessions: dict[int, Session] = {}
        self._draining: set[Session] = set()  # closed channels whose pipes still get data
        self._failure: str | None = None  # a send error a caller met: the pump ends on it
        self._later: list[Event] = []  # events of a close() for the pump to deliver
        self._death_told = False  # ``closes`` was bumped for the end of the socket
        self._drop = False  # close(): forget what closed channels still had for their pipes
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The pump closes its wake pipe when it ends; ``_wake`` checks under this lock, so it
        # never writes to a closed descriptor number (which another file may have reused).
        self._wake_lock = threading.Lock()
        self._thread = start_daemon(self._run, "sshwrap-mux-pump")

    # -- public ------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """False once the socket to the master has ended."""
        return not self.dead

    @property
    def open_channels(self) -> int:
        """How many of our channels count towards the server's ``MaxSessions`` now (opening,
        open or closing; the prestarted spare included)."""
        with self.lock:
            return self.mux.open_channels

    def abandon(self, ch: Session) -> None:
        """Give up on a channel nobody waits for: closed as soon as it is open."""
        with self.lock:
            self.close_channel_locked(ch)

    def check_opened(self, ch: Session) -> None:
        """Raise if the channel could not be opened (after ``ch.opened`` is set)."""
        if ch.lost:
            raise ChannelLost(self.dead_reason or "the control master connection was lost")
        if ch.open_error is not None:
            raise ChannelError(f"the server refused a session channel: {ch.open_error}")

    def start_session(self) -> Session:
        """Send a ``session`` channel open and return at once (``opened`` tells when it is up;
        its ``opened``/``closed`` flags wake a thread or a loop, see :mod:`sshwrap.io.flags`).

        With ``prestart`` (the default) one spare session channel is kept opening ahead: a
        call takes it (already open, or on its way) and asks for the next spare, so a command
        waits for no channel-open round trip.  An open session costs sshd nothing until
        ``exec`` (no process), but it counts towards ``MaxSessions``.
        """
        with self.lock:
            if self.dead:
                raise ChannelLost(self.dead_reason or "the control master connection is closed")
            ch, self._spare = self._spare, None
            if ch is None or ch.state not in _LIVE:
                ch = self._open_locked()
            if self.prestart:
                self._spare = self._open_locked()
            self.send_queued_locked()
        return ch

    def close(self, wait: float = 5.0) -> None:
        """Stop the pump and close the socket; open channels are marked lost.  Waits up to
        ``wait`` seconds for the pump thread to end (it ends at once unless it is stuck in a
        blocking write to a descriptor the caller gave)."""
        with self.lock:
            if not self.dead:
                self._later += self._die_locked("closed")
            self._drop = True  # nobody will read what closed channels still had for pipes
        if threading.current_thread() is self._thread:
            return  # the pump delivers the events when this callback returns
        self._wake()
        self._thread.join(wait)

    # -- with the lock held ------------------------------------------------------------
    def _open_locked(self) -> Session:
        ch = Session(self, self.mux.open_session())
        self._sessions[ch.local_id] = ch
        return ch

    def close_channel_locked(self, ch: Session) -> None:
        """(lock held) Close ``ch`` (once the server confirms it, if it is still opening)
        and its input."""
        self.mux.close(ch.local_id)
        ch.src.close()
        self.send_queued_locked()

    def send_queued_locked(self) -> None:
        """(lock held) Write what the machine queued: straight to the socket when nothing
        waits before it, else after what waits (the pump sends that)."""
        data = self.mux.data_to_send()
        if not data or self.dead:
            return
        if self._out:
            self._out += data
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._failure = f"control master connection failed: {e}"
            self._wake()
            return
        if n < len(data):
            self._out += data[n:]
            self._wake()

    def start_input_locked(self, ch: Session) -> None:
        """(lock held) ``ch``'s command was sent: its input may flow from now on."""
        ch.started = True
        self.service_source_locked(ch)

    def service_source_locked(self, ch: Session) -> None:
        """(lock held) Send what input is available within the peer's window (bytes and
        regular-file sources; a pipe or terminal is read when the pump sees it readable);
        then EOF."""
        src = ch.src
        mux = self.mux
        if not ch.started or ch.state is not ChannelState.OPEN:
            return
        if src.data is not None:
            while src.pos < len(src.data) and len(self._out) < _OUT_HIGH:
                n = mux.send_data(ch.local_id, src.data[src.pos : src.pos + _READ_CHUNK])
                if not n:
                    break
                src.pos += n
                self.send_queued_locked()
            if src.pos >= len(src.data):
                src.eof = True
        elif src.fd is not None and not src.selectable:
            # A regular file: reads never block, so read as the window allows.
            while len(self._out) < _OUT_HIGH and not src.eof:
                room = mux.send_room(ch.local_id)
                if not room:
                    break
                try:
                    chunk = os.read(src.fd, min(room, _READ_CHUNK))
                except OSError:
                    chunk = b""
                if not chunk:
                    src.eof = True
                    break
                mux.send_data(ch.local_id, chunk)
                self.send_queued_locked()
        if src.eof:
            self._input_ended_locked(ch)

    def _read_source_locked(self, ch: Session) -> None:
        """A selectable source is readable: send one read's worth within the window."""
        src = ch.src
        room = self.mux.send_room(ch.local_id)
        if src.fd is None or not room or not ch.started:
            return
        chunk = read_ready(src.fd, min(room, _READ_CHUNK))
        if chunk is None:
            return
        if chunk:
            self.mux.send_data(ch.local_id, chunk)
            self.send_queued_locked()
        else:
            self._input_ended_locked(ch)

    def _input_ended_locked(self, ch: Session) -> None:
        """(lock held) ``ch``'s input is over: its source closed and EOF sent, except on a
        remote terminal (``pty-req``).  A terminal's input has no end (the end is a typed ^D):
        sshd takes EOF as closing its write side of the pty, which is the fd a later
        ``window-change`` resizes (OpenSSH's session.c ``session_set_fds(ssh, s, ptyfd, ...)``
        and ``session_window_change_req``; nchan.c ``chan_shutdown_write``), so the remote
        command would never see a resize."""
        ch.src.close()
        if not ch.tty:
            self.mux.send_eof(ch.local_id)
        self.send_queued_locked()

    def _die_locked(self, reason: str) -> list[Event]:
        """The socket is over: every channel not closed is lost (events to deliver)."""
        if self.dead:
            return []
        self.dead = True
        self.dead_reason = reason
        self._out.clear()
        events = self.mux.connection_lost(reason)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # the pump polls it: the pump closes it
        return events

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._wake_w, b"x")

    # -- the pump thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # pragma: no cover - a bug; never leave callers hanging
            with self.lock:
                events = self._die_locked(f"internal error in the channel pump: {e!r}")
                events += self._later
                self._later = []
            with contextlib.suppress(BaseException):
                self._deliver(self._route(events))
        finally:
            self._drop_draining()
            with contextlib.suppress(OSError):
                self.sock.close()
            with self._wake_lock:
                close_fds(self._wake_r, self._wake_w)
                self._wake_r = self._wake_w = -1

    def _loop(self) -> None:
        poll = select.poll()
        registered: dict[int, int] = {}
        sockfd = self.sock.fileno()
        buf = bytearray(_READ_CHUNK)
        view = memoryview(buf)
        while True:
            with self.lock:
                events = self._later
                self._later = []
                if self._failure is not None:
                    events += self._die_locked(self._failure)
                routed = self._route(events)
            self._deliver(routed)
            if self.dead and self.sock.fileno() >= 0:
                self.sock.close()  # out of the poll set below, before the next poll
            if self._drop:
                self._drop_draining()
            with self.lock:
                if self.dead and not self._draining:
                    return
                want = self._interest_locked(sockfd)
            for fd in list(registered):
                if fd not in want:
                    with contextlib.suppress(KeyError, OSError):
                        poll.unregister(fd)
                    del registered[fd]
            for fd, mask in want.items():
                if registered.get(fd) != mask:
                    poll.register(fd, mask)
                    registered[fd] = mask
            owners: dict[int, tuple[Session, Sink | None]] | None = None
            for fd, ev in poll.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.read(self._wake_r, 4096)
                elif fd == sockfd and not self.dead:
                    if ev & select.POLLOUT:
                        with self.lock:
                            self._flush_locked()
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        self._read_socket(view)
                else:
                    if owners is None:
                        owners = self._fd_owners()
                    owner = owners.get(fd)
                    if owner is None:
                        continue
                    ch, sink = owner
                    if sink is None:
                        with self.lock:
                            self._read_source_locked(ch)
                    else:
                        self._flush_sink(ch, sink)

    def _interest_locked(self, sockfd: int) -> dict[int, int]:
        want: dict[int, int] = {self._wake_r: select.POLLIN}
        if not self.dead:
            want[sockfd] = select.POLLIN | (select.POLLOUT if self._out else 0)
        room = len(self._out) < _OUT_HIGH
        for ch in self._sessions.values():
            src = ch.src
            if (
                src.fd is not None
                and src.selectable
                and room
                and ch.started
                and self.mux.send_room(ch.local_id)
            ):
                want[src.fd] = want.get(src.fd, 0) | select.POLLIN
        for ch in (*self._sessions.values(), *self._draining):
            for sink in (ch.out, ch.err):
                if sink.pending and sink.fd is not None:
                    want[sink.fd] = want.get(sink.fd, 0) | select.POLLOUT
        return want

    def _fd_owners(self) -> dict[int, tuple[Session, Sink | None]]:
        owners: dict[int, tuple[Session, Sink | None]] = {}
        with self.lock:
            sessions = (*self._sessions.values(), *self._draining)
        for ch in sessions:
            if ch.src.fd is not None:
                owners[ch.src.fd] = (ch, None)
            for sink in (ch.out, ch.err):
                if sink.fd is not None and sink.pending:
                    owners[sink.fd] = (ch, sink)
        return owners

    def _flush_locked(self) -> None:
        while self._out:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._failure = f"control master connection failed: {e}"
                return
            del self._out[:n]
        # The socket drained: stdin sources may go on.
        for ch in list(self._sessions.values()):
            if ch.src.data is not None or (ch.src.fd is not None and not ch.src.selectable):
                self.service_source_locked(ch)

    def _read_socket(self, view: memoryview) -> None:
        try:
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            n, reason = -1, f"control master connection failed: {e}"
        else:
            reason = "the control master closed the connection (master gone?)"
        with self.lock:
            if n <= 0:
                events = self._die_locked(reason)
            else:
                try:
                    events = self.mux.receive(view[:n])
                except ChannelProtocolError as e:
                    events = self._die_locked(
                        f"the control master sent a packet that breaks the SSH connection "
                        f"protocol ({e})"
                    )
            routed = self._route(events)
            self.send_queued_locked()
        self._deliver(routed)

    def _route(self, events: list[Event]) -> list[tuple[Session, Event]]:
        """(lock held) What the machine's events do to the protocol side: sources, replies;
        returns them with their sessions for :meth:`_deliver`."""
        routed: list[tuple[Session, Event]] = []
        for ev in events:
            ch = self._sessions.get(ev.channel)
            if ch is None:
                continue
            if isinstance(ev, (Closed, Lost, OpenFailed)):
                del self._sessions[ev.channel]
                ch.src.close()
            elif isinstance(ev, (WindowOpened, Opened)):
                self.service_source_locked(ch)
            elif isinstance(ev, RequestReply) and not ev.ok:
                if ev.request == "exec":
                    ch.exec_failed = True
                    self.close_channel_locked(ch)
                elif ev.request == "pty-req":
                    ch.pty_refused = True
            routed.append((ch, ev))
        return routed

    def _deliver(self, routed: list[tuple[Session, Event]]) -> None:
        """(pump thread, lock not held) Hand data to the sinks and news to the sessions."""
        done: dict[int, int] = {}
        for ch, ev in routed:
            if isinstance(ev, Data):
                done[ch.local_id] = done.get(ch.local_id, 0) + deliver(ch.out, ev.data)
            elif isinstance(ev, ExtendedData):
                sink = ch.err if ev.code == proto.EXTENDED_DATA_STDERR else _DISCARD
                done[ch.local_id] = done.get(ch.local_id, 0) + deliver(sink, ev.data)
            elif isinstance(ev, ExitStatus):
                ch.exit_status = ev.status
            elif isinstance(ev, ExitSignal):
                ch.exit_signal, ch.exit_core_dumped = ev.name, ev.core_dumped
                ch.exit_message = ev.message
            elif isinstance(ev, Eof):
                finish_sink(ch.out)
                finish_sink(ch.err)
            elif isinstance(ev, Opened):
                ch.opened.set()
            elif isinstance(ev, OpenFailed):
                ch.open_code, ch.open_error = ev.code, ev.description
                ch.opened.set()
            elif isinstance(ev, (Closed, Lost)):
                self._end(ch)
        if done:
            with self.lock:
                for local_id, n in done.items():
                    self.mux.consumed(local_id, n)
                self.send_queued_locked()
        if self.dead and not self._death_told:
            self._death_told = True  # the lost channels (and the socket) ended: one bump
            self.closes.bump()

    def _end(self, ch: Session) -> None:
        for sink in (ch.out, ch.err):
            finish_sink(sink)
            if sink.pending:
                self._draining.add(ch)
        ch.opened.set()
        ch.closed.set()
        if not ch.lost:
            self.closes.bump()

    def _flush_sink(self, ch: Session, sink: Sink) -> None:
        n = flush_sink(sink)
        if n and ch.state is ChannelState.OPEN:
            with self.lock:
                self.mux.consumed(ch.local_id, n)
                self.send_queued_locked()
        if not sink.pending and (ch.remote_eof or ch.lost):
            finish_sink(sink)
        if ch in self._draining and ch.out.closed and ch.err.closed:
            self._draining.discard(ch)

    def _drop_draining(self) -> None:
        for ch in list(self._draining):
            for sink in (ch.out, ch.err):
                sink.pending.clear()
                finish_sink(sink)
        self._draining.clear()
