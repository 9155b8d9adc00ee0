"""RFC 4254 session channels as a pure state machine: bytes in, events out, bytes to send.

``ChannelMux`` holds every channel of one connection-protocol stream, as a ControlMaster's
proxy-mode socket carries it (``MUX_C_PROXY``): packets framed ``uint32 length, byte 0
(padding length), byte type, payload``, unencrypted and unpadded; the master keeps the
transport and renumbers channel ids.  The object does no IO, keeps no time and starts no
thread (as h11 does for HTTP): a driver feeds it what the socket read (:meth:`receive`, which
returns events, :mod:`sshwrap.protocol.channel_events`), calls its methods to open channels
and send requests or data, and writes :meth:`data_to_send` to the socket.
``sshwrap.io.pump`` is that driver.

Each channel has one explicit :class:`ChannelState`; the EOF flags each way are independent
of it (either side may send EOF while the channel is open).  Windows follow RFC 4254 5.2: we
grant :data:`WINDOW` bytes and grant again (``WINDOW_ADJUST``) only for bytes the driver says
it delivered (:meth:`ChannelMux.consumed`), so a slow reader throttles the remote writer;
:meth:`ChannelMux.send_data` accepts only what the peer's window and packet size allow, the
rest waits for :class:`~sshwrap.protocol.channel_events.WindowOpened`.

Input that breaks the protocol (a truncated or oversized packet, an unknown channel, data
beyond the window or after EOF, a reply nobody asked for) raises
:class:`ChannelProtocolError`: the driver then gives up the whole connection (its channels
are lost: :meth:`ChannelMux.connection_lost`).
"""

from __future__ import annotations

import struct
from collections import deque
from enum import Enum

from . import channel_events as ev
from .channel_events import OPEN_UNKNOWN_CHANNEL_TYPE, SESSION_LIMIT_CODES, Event
from .wire import Reader, WireError, pack_string, pack_u32

__all__ = [
    "MAX_COMMAND",
    "MAX_PACKET",
    "PACKET_LIMIT",
    "PAYLOAD_MAX",
    "SESSION_LIMIT_CODES",
    "WINDOW",
    "Channel",
    "ChannelMux",
    "ChannelProtocolError",
    "ChannelState",
    "ChannelStateError",
    "env_request_size",
    "exec_command_size",
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

EXTENDED_DATA_STDERR = 1

WINDOW = 2 * 1024 * 1024
"""The window we grant a channel (what OpenSSH's client grants a session: 64 x 32 KiB)."""
MAX_PACKET = 32 * 1024
"""The largest data packet we accept (OpenSSH's client's value)."""

PACKET_LIMIT = 256 * 1024
"""OpenSSH's packet size limit, in bytes (measured against OpenSSH 9.2 and in its sources).

Two limits of that size meet a channel request: the master drops a proxy client whose frame
(``uint32 length`` then that many bytes) is longer than 256 KiB (``channels.c``,
``CHANNEL_MUX_MAX_PACKET``), which loses *every* channel on that socket; and sshd drops the
whole connection (the master with it) for a packet whose ``packet_length`` (padding-length
byte + payload + 4 to ``block size + 3`` bytes of padding) exceeds 256 KiB (``packet.c``,
``PACKET_MAX_SIZE``, "Bad packet length").  The second is the tighter one.  A frame longer
than this from the master breaks the protocol here too.
"""
PAYLOAD_MAX = PACKET_LIMIT - 1 - 4 - 15
"""The largest payload we send in one packet: the limit less the padding-length byte and up
to 4 + 15 bytes of padding (16-byte cipher blocks)."""
_EXEC_OVERHEAD = 1 + 4 + (4 + 4) + 1 + 4  # type, channel, string "exec", want-reply, length
MAX_COMMAND = PAYLOAD_MAX - _EXEC_OVERHEAD
"""The longest command (bytes, UTF-8) one ``exec`` request can carry over a master: 262,106.

Measured with OpenSSH 9.2 (chacha20-poly1305, 8-byte blocks): 262,121 bytes work, 262,122
make sshd drop the connection ("Bad packet length") and from 262,126 on the master drops the
proxy socket.  15 bytes are kept for ciphers with 16-byte blocks (aes-gcm, aes-ctr).
Compression (``Compression yes``) could make an incompressible command grow past it.
A Linux server also caps any single argument, and so the ``sh -c`` command string, at
131,072 bytes (``MAX_ARG_STRLEN``): longer commands reach it and fail there with
"Argument list too long" (exit status 1), on that channel only.
"""

_HDR = struct.Struct(">IBB")
_U32 = struct.Struct(">I")
_DATA_HDR = struct.Struct(">IBBII")  # length, padding, type, channel, data length
_WINDOW_MAX = 0xFFFFFFFF


def exec_command_size(command: str | bytes) -> int:
    """The size in bytes of ``command`` in an ``exec`` request (compare with MAX_COMMAND)."""
    if isinstance(command, str):
        return len(command.encode("utf-8", "surrogateescape"))
    return len(command)


def env_request_size(name: str, value: str) -> int:
    """The payload size of an ``env`` request for ``name=value`` (compare with PAYLOAD_MAX)."""
    return 1 + 4 + (4 + 3) + 1 + (4 + len(name.encode())) + (4 + len(value.encode()))


class ChannelProtocolError(ValueError):
    """The peer broke the connection protocol (a malformed, oversized or unexpected packet).

    A truncated field is a ``wire.WireError`` underneath (``__cause__``)."""


class ChannelStateError(ValueError):
    """A method was called that the channel's (or the connection's) state does not allow."""


class _Reader(Reader):
    __slots__ = ()

    def truncated(self) -> Exception:
        return ChannelProtocolError("truncated channel packet")


class ChannelState(Enum):
    """Where a channel is in its life (RFC 4254 section 5)."""

    OPENING = "opening"
    """We sent CHANNEL_OPEN; no answer yet."""
    OPEN = "open"
    """Confirmed: requests and data flow."""
    CLOSING = "closing"
    """We closed (or asked to close a channel still opening); the peer's CLOSE is due."""
    CLOSED = "closed"
    """Both sides sent CLOSE: over."""
    FAILED = "failed"
    """The peer refused the open."""
    LOST = "lost"
    """The connection ended before the channel was closed."""


_LIVE = (ChannelState.OPENING, ChannelState.OPEN, ChannelState.CLOSING)


class Channel:
    """One channel's protocol state (read it; :class:`ChannelMux` changes it).

    The record stays valid after the channel ends, with its final state."""

    __slots__ = (
        "eof_received",
        "eof_sent",
        "local_id",
        "local_window",
        "remote_id",
        "remote_max_packet",
        "remote_window",
        "replies",
        "state",
        "unadjusted",
    )

    def __init__(self, local_id: int) -> None:
        self.local_id = local_id
        self.remote_id: int | None = None
        self.state = ChannelState.OPENING
        self.eof_sent = False
        self.eof_received = False
        self.local_window = WINDOW  # what the peer may still send us
        self.unadjusted = 0  # delivered since the last WINDOW_ADJUST we sent
        self.remote_window = 0  # what we may still send
        self.remote_max_packet = 0
        self.replies: deque[str] = deque()  # requests awaiting CHANNEL_SUCCESS/FAILURE

    def __repr__(self) -> str:
        return f"<Channel {self.local_id} {self.state.value}>"


def _packet(msg: int, body: bytes) -> bytes:
    return _HDR.pack(len(body) + 2, 0, msg) + body


class ChannelMux:
    """Every channel of one proxy-mode connection: the protocol state and nothing else.

    Local channel ids count up from 1 (modulo 2**31).  Methods that send queue bytes for
    :meth:`data_to_send`; those on a channel that cannot take them any more (closing, closed,
    lost) send nothing, since another party may have ended the channel a moment before.
    """

    def __init__(self, *, window: int = WINDOW, max_packet: int = MAX_PACKET) -> None:
        self.window = window
        self.max_packet = max_packet
        self._channels: dict[int, Channel] = {}
        self._next_id = 0
        self._in = bytearray()
        self._out = bytearray()
        self.lost_reason: str | None = None
        """Why the connection ended (:meth:`connection_lost`), None while it lasts."""

    # -- channels --------------------------------------------------------------------------
    def open_session(self) -> int:
        """Queue a ``session`` CHANNEL_OPEN; returns the new channel's local id."""
        if self.lost_reason is not None:
            raise ChannelStateError(f"the connection is lost: {self.lost_reason}")
        while True:
            self._next_id = (self._next_id + 1) & 0x7FFFFFFF
            if self._next_id and self._next_id not in self._channels:
                break
        ch = Channel(self._next_id)
        ch.local_window = self.window
        self._channels[ch.local_id] = ch
        body = pack_string("session") + pack_u32(ch.local_id)
        self._out += _packet(
            MSG_CHANNEL_OPEN, body + pack_u32(self.window) + pack_u32(self.max_packet)
        )
        return ch.local_id

    def channel(self, local_id: int) -> Channel:
        """The record of a live channel (keep it: it stays valid after the channel ends)."""
        try:
            return self._channels[local_id]
        except KeyError:
            raise ChannelStateError(f"no live channel {local_id}") from None

    @property
    def open_channels(self) -> int:
        """How many of our channels are not over yet (opening, open or closing): what counts
        towards the server's ``MaxSessions``."""
        return len(self._channels)

    def _live(self, local_id: int) -> Channel | None:
        ch = self._channels.get(local_id)
        if ch is None or ch.state is not ChannelState.OPEN:
            return None
        return ch

    # -- requests --------------------------------------------------------------------------
    def request(self, local_id: int, name: str, body: bytes = b"", *, want_reply: bool) -> bool:
        """Queue a CHANNEL_REQUEST ``name`` with its type-specific ``body``; False (nothing
        sent) unless the channel is open.  With ``want_reply`` a :class:`RequestReply` follows."""
        ch = self._live(local_id)
        if ch is None:
            return False
        assert ch.remote_id is not None
        if want_reply:
            ch.replies.append(name)
        head = pack_u32(ch.remote_id) + pack_string(name) + (b"\x01" if want_reply else b"\x00")
        self._out += _packet(MSG_CHANNEL_REQUEST, head + body)
        return True

    def exec(self, local_id: int, command: str | bytes) -> bool:
        """``exec`` (want-reply: a refusal comes as ``RequestReply(ok=False)``)."""
        if isinstance(command, str):
            command = command.encode("utf-8", "surrogateescape")
        return self.request(local_id, "exec", pack_string(command), want_reply=True)

    def env(self, local_id: int, name: str, value: str) -> bool:
        """``env`` (no reply asked: sshd ignores what its ``AcceptEnv`` does not list)."""
        return self.request(
            local_id, "env", pack_string(name) + pack_string(value), want_reply=False
        )

    def pty_req(
        self, local_id: int, term: str, rows: int, cols: int, modes: bytes = b"\x00"
    ) -> bool:
        """``pty-req`` (want-reply); ``modes`` are encoded terminal modes (default: none)."""
        sizes = pack_u32(cols) + pack_u32(rows) + pack_u32(0) + pack_u32(0)
        body = pack_string(term) + sizes + pack_string(modes)
        return self.request(local_id, "pty-req", body, want_reply=True)

    def window_change(self, local_id: int, rows: int, cols: int) -> bool:
        """``window-change``: the remote terminal's new size."""
        body = pack_u32(cols) + pack_u32(rows) + pack_u32(0) + pack_u32(0)
        return self.request(local_id, "window-change", body, want_reply=False)

    def signal(self, local_id: int, name: str) -> bool:
        """``signal`` with an RFC 4254 name (``"TERM"``, without ``SIG``)."""
        return self.request(local_id, "signal", pack_string(name), want_reply=False)

    # -- data ------------------------------------------------------------------------------
    def send_room(self, local_id: int) -> int:
        """How many bytes :meth:`send_data` would take now (0 unless open and before EOF)."""
        ch = self._live(local_id)
        if ch is None or ch.eof_sent:
            return 0
        return ch.remote_window

    def send_data(self, local_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the peer's window allows, in packets of at most its
        maximum packet size; returns how many bytes were taken (0 when closed or after EOF)."""
        ch = self._live(local_id)
        if ch is None or ch.eof_sent:
            return 0
        assert ch.remote_id is not None
        n = min(len(data), ch.remote_window)
        step = ch.remote_max_packet
        out = self._out
        pos = 0
        while pos < n:
            k = min(step, n - pos)
            out += _DATA_HDR.pack(k + 10, 0, MSG_CHANNEL_DATA, ch.remote_id, k)
            out += data[pos : pos + k]
            pos += k
        ch.remote_window -= n
        return n

    def send_eof(self, local_id: int) -> bool:
        """Queue CHANNEL_EOF (once; nothing on a channel not open)."""
        ch = self._live(local_id)
        if ch is None or ch.eof_sent:
            return False
        assert ch.remote_id is not None
        ch.eof_sent = True
        self._out += _packet(MSG_CHANNEL_EOF, pack_u32(ch.remote_id))
        return True

    def close(self, local_id: int) -> bool:
        """Close the channel: CHANNEL_CLOSE now, or as soon as the peer confirms a channel
        still opening.  False when it is closing or over already."""
        ch = self._channels.get(local_id)
        if ch is None or ch.state not in (ChannelState.OPENING, ChannelState.OPEN):
            return False
        if ch.state is ChannelState.OPEN:
            assert ch.remote_id is not None
            self._out += _packet(MSG_CHANNEL_CLOSE, pack_u32(ch.remote_id))
        ch.state = ChannelState.CLOSING
        return True

    def consumed(self, local_id: int, n: int) -> None:
        """``n`` bytes of the channel's data were delivered: grant them to the peer again
        (a WINDOW_ADJUST is queued once half the window is used up)."""
        ch = self._channels.get(local_id)
        if ch is None:
            return
        ch.unadjusted += n
        if ch.unadjusted >= self.window // 2 and ch.state is ChannelState.OPEN:
            assert ch.remote_id is not None
            self._out += _packet(
                MSG_CHANNEL_WINDOW_ADJUST, pack_u32(ch.remote_id) + pack_u32(ch.unadjusted)
            )
            ch.local_window += ch.unadjusted
            ch.unadjusted = 0

    def data_to_send(self) -> bytes:
        """The bytes queued for the socket since the last call (and forget them)."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def connection_lost(self, reason: str) -> list[Event]:
        """The stream ended (or broke): every channel not over is lost.  Idempotent."""
        if self.lost_reason is not None:
            return []
        self.lost_reason = reason
        events: list[Event] = []
        for ch in self._channels.values():
            ch.state = ChannelState.LOST
            events.append(ev.Lost(ch.local_id, reason))
        self._channels.clear()
        self._in.clear()
        self._out.clear()
        return events

    # -- receiving -------------------------------------------------------------------------
    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Take bytes read from the stream; returns the events of every complete packet.

        Raises :class:`ChannelProtocolError` for input that breaks the protocol (the
        connection cannot go on: call :meth:`connection_lost`)."""
        if self.lost_reason is not None:
            return []
        inb = self._in
        inb += data
        events: list[Event] = []
        pos = 0
        end = len(inb)
        try:
            while end - pos >= 4:
                (length,) = _U32.unpack_from(inb, pos)
                if length > PACKET_LIMIT or length < 2:
                    raise ChannelProtocolError(f"bad channel packet length {length}")
                if end - pos - 4 < length:
                    break
                if inb[pos + 4] != 0:
                    raise ChannelProtocolError(f"unexpected padding length {inb[pos + 4]}")
                msg = inb[pos + 5]
                payload = bytes(inb[pos + 6 : pos + 4 + length])
                pos += 4 + length
                self._handle(msg, _Reader(payload), events)
        except WireError as e:
            raise ChannelProtocolError(str(e)) from e
        finally:
            del inb[:pos]
        return events

    def _channel_for(self, local_id: int, msg: int) -> Channel:
        ch = self._channels.get(local_id)
        if ch is None:
            raise ChannelProtocolError(f"message {msg} for unknown channel {local_id}")
        if ch.remote_id is None and msg != MSG_CHANNEL_OPEN_CONFIRMATION:
            if msg != MSG_CHANNEL_OPEN_FAILURE:
                raise ChannelProtocolError(f"message {msg} for channel {local_id} not open yet")
        elif ch.remote_id is not None and msg in (
            MSG_CHANNEL_OPEN_CONFIRMATION,
            MSG_CHANNEL_OPEN_FAILURE,
        ):
            raise ChannelProtocolError(f"second open answer for channel {local_id}")
        return ch

    def _handle(self, msg: int, r: _Reader, events: list[Event]) -> None:
        if msg < MSG_CHANNEL_OPEN or msg > MSG_CHANNEL_FAILURE:
            if msg == MSG_GLOBAL_REQUEST:
                r.string()
                if r.boolean():
                    self._out += _packet(MSG_REQUEST_FAILURE, b"")
            return  # other messages are not for channels: nothing to do with them
        if msg == MSG_CHANNEL_OPEN:
            r.string()  # the type of channel the peer wants: we open none for it
            sender = r.u32()
            body = pack_u32(sender) + pack_u32(OPEN_UNKNOWN_CHANNEL_TYPE)
            self._out += _packet(MSG_CHANNEL_OPEN_FAILURE, body + pack_string("") + pack_string(""))
            return
        ch = self._channel_for(r.u32(), msg)
        local = ch.local_id
        if msg in (MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA):
            code = r.u32() if msg == MSG_CHANNEL_EXTENDED_DATA else 0
            data = r.string()
            if ch.eof_received:
                raise ChannelProtocolError(f"data after EOF on channel {local}")
            if len(data) > ch.local_window:
                raise ChannelProtocolError(
                    f"{len(data)} bytes on channel {local} beyond its window ({ch.local_window})"
                )
            ch.local_window -= len(data)
            if msg == MSG_CHANNEL_DATA:
                events.append(ev.Data(local, data))
            else:
                events.append(ev.ExtendedData(local, code, data))
        elif msg == MSG_CHANNEL_WINDOW_ADJUST:
            n = r.u32()
            if ch.remote_window + n > _WINDOW_MAX:
                raise ChannelProtocolError(f"window adjust overflows channel {local}'s window")
            ch.remote_window += n
            if n and ch.state is ChannelState.OPEN and not ch.eof_sent:
                events.append(ev.WindowOpened(local, ch.remote_window))
        elif msg == MSG_CHANNEL_REQUEST:
            self._peer_request(ch, r, events)
        elif msg in (MSG_CHANNEL_SUCCESS, MSG_CHANNEL_FAILURE):
            if not ch.replies:
                raise ChannelProtocolError(f"a request reply nobody asked for on channel {local}")
            events.append(ev.RequestReply(local, ch.replies.popleft(), msg == MSG_CHANNEL_SUCCESS))
        elif msg == MSG_CHANNEL_EOF:
            if ch.eof_received:
                raise ChannelProtocolError(f"second EOF on channel {local}")
            ch.eof_received = True
            events.append(ev.Eof(local))
        elif msg == MSG_CHANNEL_CLOSE:
            if ch.state is ChannelState.OPEN:
                assert ch.remote_id is not None
                self._out += _packet(MSG_CHANNEL_CLOSE, pack_u32(ch.remote_id))
            ch.state = ChannelState.CLOSED
            del self._channels[local]
            events.append(ev.Closed(local))
        elif msg == MSG_CHANNEL_OPEN_CONFIRMATION:
            ch.remote_id = r.u32()
            ch.remote_window = r.u32()
            ch.remote_max_packet = r.u32()
            if ch.remote_max_packet == 0:
                raise ChannelProtocolError(f"maximum packet size 0 for channel {local}")
            if ch.state is ChannelState.CLOSING:  # closed while it was opening
                self._out += _packet(MSG_CHANNEL_CLOSE, pack_u32(ch.remote_id))
            else:
                ch.state = ChannelState.OPEN
            events.append(ev.Opened(local))
        else:  # MSG_CHANNEL_OPEN_FAILURE
            code = r.u32()
            description = r.text()
            r.string()  # language tag
            ch.state = ChannelState.FAILED
            del self._channels[local]
            events.append(ev.OpenFailed(local, code, description or f"reason code {code}"))

    def _peer_request(self, ch: Channel, r: _Reader, events: list[Event]) -> None:
        name = r.text()
        want_reply = r.boolean()
        if name == "exit-status":
            events.append(ev.ExitStatus(ch.local_id, r.u32()))
        elif name == "exit-signal":
            sig = r.text()
            core = r.boolean()
            events.append(ev.ExitSignal(ch.local_id, sig, core, r.text()))
        if want_reply and ch.state is ChannelState.OPEN:
            assert ch.remote_id is not None
            # We serve no request of the peer's (keepalive@openssh.com and the like).
            self._out += _packet(MSG_CHANNEL_FAILURE, pack_u32(ch.remote_id))
