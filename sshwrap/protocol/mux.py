"""OpenSSH's multiplexing (ControlMaster) protocol as typed messages (``PROTOCOL.mux``).

A ControlMaster listens on a unix socket.  Each connection to it starts with a hello exchange
(protocol version 4), then carries requests and replies, each framed as ``uint32 length`` +
``uint32 type`` + body.  Every message here is a frozen dataclass with ``encode()`` (the framed
bytes, ready for the socket) and ``decode(payload)`` (from the bytes after the length): the
requests sshwrap sends (:data:`Request`) and the replies a master sends (:data:`Reply`).
:func:`decode_reply` reads any reply; a message that does not parse raises
:class:`MuxProtocolError` (never another exception).  ``sshwrap.io.mux_control`` does the
socket IO.

Pure: no IO.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Self, TypeVar

from .wire import Reader, pack_string, pack_u32

__all__ = [
    "MAX_MESSAGE",
    "MUX_FWD_DYNAMIC",
    "MUX_FWD_LOCAL",
    "MUX_FWD_REMOTE",
    "SSHMUX_VER",
    "Alive",
    "AliveCheck",
    "CloseForward",
    "ExitMessage",
    "Failure",
    "Hello",
    "MuxProtocolError",
    "NewSession",
    "Ok",
    "OpenForward",
    "PermissionDenied",
    "Proxy",
    "ProxyReady",
    "RemotePort",
    "Reply",
    "Request",
    "SessionOpened",
    "StopListening",
    "Terminate",
    "TtyAllocFail",
    "decode_reply",
    "decode_request",
    "frame",
    "message_length",
]

SSHMUX_VER = 4

MUX_MSG_HELLO = 0x00000001
MUX_C_NEW_SESSION = 0x10000002
MUX_C_ALIVE_CHECK = 0x10000004
MUX_C_TERMINATE = 0x10000005
MUX_C_OPEN_FWD = 0x10000006
MUX_C_CLOSE_FWD = 0x10000007
MUX_C_NEW_STDIO_FWD = 0x10000008
MUX_C_STOP_LISTENING = 0x10000009
MUX_C_PROXY = 0x1000000F
MUX_S_OK = 0x80000001
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_S_FAILURE = 0x80000003
MUX_S_EXIT_MESSAGE = 0x80000004
MUX_S_ALIVE = 0x80000005
MUX_S_SESSION_OPENED = 0x80000006
MUX_S_REMOTE_PORT = 0x80000007
MUX_S_TTY_ALLOC_FAIL = 0x80000008
MUX_S_PROXY = 0x8000000F

MUX_FWD_LOCAL = 1
MUX_FWD_REMOTE = 2
MUX_FWD_DYNAMIC = 3

ForwardSpec = tuple[int, str, int, str, int]
"""``(type, listen_host, listen_port, connect_host, connect_port)`` as the mux protocol has it
(type ``MUX_FWD_LOCAL``, ``MUX_FWD_REMOTE`` or ``MUX_FWD_DYNAMIC``)."""

PORT_STREAMLOCAL = 0xFFFFFFFE
"""A listen or connect "port" of (uint32)-2: the host field is a unix socket path."""

_T = TypeVar("_T")

MAX_MESSAGE = 256 * 1024
"""The longest mux message we take (OpenSSH's own limit for them)."""


class MuxProtocolError(ValueError):
    """A mux message does not parse (truncated, oversized, or of an unexpected type)."""


class _Reader(Reader):
    __slots__ = ()

    def truncated(self) -> Exception:
        return MuxProtocolError("truncated mux message")


def frame(payload: bytes) -> bytes:
    """``payload`` with its ``uint32 length`` in front."""
    return pack_u32(len(payload)) + payload


def message_length(header: bytes) -> int:
    """The length a message's 4-byte header gives; MuxProtocolError past MAX_MESSAGE."""
    n = _Reader(header).u32()
    if n > MAX_MESSAGE:
        raise MuxProtocolError(f"oversized mux message ({n} bytes)")
    return n


def _open(payload: bytes, kind: int) -> _Reader:
    r = _Reader(payload)
    got = r.u32()
    if got != kind:
        raise MuxProtocolError(f"expected mux message 0x{kind:08x}, got 0x{got:08x}")
    return r


class _Message:
    """A mux message: its type (``KIND``), then its dataclass fields in order, each an
    ``int`` (``uint32``) or a ``str`` (``string``)."""

    __slots__ = ()
    KIND: ClassVar[int] = 0

    def encode(self) -> bytes:
        """The framed message."""
        out = [pack_u32(self.KIND)]
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out.append(pack_string(value) if f.type == "str" else pack_u32(value))
        return frame(b"".join(out))

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Read one from a message's payload (bytes after the last field are ignored)."""
        r = _open(payload, cls.KIND)
        return cls(*[r.text() if f.type == "str" else r.u32() for f in fields(cls)])  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    """``MUX_MSG_HELLO``: both sides send it first, with their protocol version."""

    KIND: ClassVar[int] = MUX_MSG_HELLO
    version: int = SSHMUX_VER


@dataclass(frozen=True, slots=True)
class _Plain(_Message):
    """A message of a request id and nothing else."""

    request_id: int


# -- requests ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AliveCheck(_Plain):
    """``MUX_C_ALIVE_CHECK`` (``ssh -O check``): answered with :class:`Alive`."""

    KIND: ClassVar[int] = MUX_C_ALIVE_CHECK


@dataclass(frozen=True, slots=True)
class Terminate(_Plain):
    """``MUX_C_TERMINATE`` (``ssh -O exit``)."""

    KIND: ClassVar[int] = MUX_C_TERMINATE


@dataclass(frozen=True, slots=True)
class StopListening(_Plain):
    """``MUX_C_STOP_LISTENING`` (``ssh -O stop``)."""

    KIND: ClassVar[int] = MUX_C_STOP_LISTENING


@dataclass(frozen=True, slots=True)
class Proxy(_Plain):
    """``MUX_C_PROXY`` (OpenSSH >= 7.4): after :class:`ProxyReady` the socket carries
    connection-protocol packets (``sshwrap.protocol.channel``)."""

    KIND: ClassVar[int] = MUX_C_PROXY


@dataclass(frozen=True, slots=True)
class _Forward(_Message):
    request_id: int
    ftype: int
    listen_host: str
    listen_port: int
    connect_host: str = ""
    connect_port: int = 0


@dataclass(frozen=True, slots=True)
class OpenForward(_Forward):
    """``MUX_C_OPEN_FWD`` (``ssh -O forward``): :class:`Ok`, or :class:`RemotePort` for a
    remote forward of port 0."""

    KIND: ClassVar[int] = MUX_C_OPEN_FWD


@dataclass(frozen=True, slots=True)
class CloseForward(_Forward):
    """``MUX_C_CLOSE_FWD`` (``ssh -O cancel``): the fields the forward was opened with."""

    KIND: ClassVar[int] = MUX_C_CLOSE_FWD


@dataclass(frozen=True, slots=True)
class NewSession(_Message):
    """``MUX_C_NEW_SESSION`` (what ``ssh -S host cmd`` sends): the master runs ``command``
    (a subsystem's name with ``subsystem=1``) on the stdin, stdout and stderr the client passes
    next (three ``SCM_RIGHTS`` messages of one byte); answered with :class:`SessionOpened`,
    then :class:`ExitMessage`.  The flags are ``uint32`` 0/1; ``escape_char`` 0xffffffff is
    none."""

    KIND: ClassVar[int] = MUX_C_NEW_SESSION
    request_id: int
    reserved: str = ""
    want_tty: int = 0
    want_x11: int = 0
    want_agent: int = 0
    subsystem: int = 0
    escape_char: int = 0xFFFFFFFF
    term: str = ""
    command: str = ""


Request = AliveCheck | Terminate | StopListening | Proxy | OpenForward | CloseForward | NewSession


# -- replies -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ok(_Plain):
    """``MUX_S_OK``."""

    KIND: ClassVar[int] = MUX_S_OK


@dataclass(frozen=True, slots=True)
class ProxyReady(_Plain):
    """``MUX_S_PROXY``: the socket is in proxy mode from the next byte on."""

    KIND: ClassVar[int] = MUX_S_PROXY


@dataclass(frozen=True, slots=True)
class _Refusal(_Message):
    request_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Failure(_Refusal):
    """``MUX_S_FAILURE``, with the master's reason."""

    KIND: ClassVar[int] = MUX_S_FAILURE


@dataclass(frozen=True, slots=True)
class PermissionDenied(_Refusal):
    """``MUX_S_PERMISSION_DENIED``, with the master's reason."""

    KIND: ClassVar[int] = MUX_S_PERMISSION_DENIED


@dataclass(frozen=True, slots=True)
class _Numbered(_Message):
    request_id: int
    value: int


@dataclass(frozen=True, slots=True)
class Alive(_Numbered):
    """``MUX_S_ALIVE``: ``value`` is the master's pid."""

    KIND: ClassVar[int] = MUX_S_ALIVE


@dataclass(frozen=True, slots=True)
class RemotePort(_Numbered):
    """``MUX_S_REMOTE_PORT``: ``value`` is the port the server allocated."""

    KIND: ClassVar[int] = MUX_S_REMOTE_PORT


@dataclass(frozen=True, slots=True)
class SessionOpened(_Numbered):
    """``MUX_S_SESSION_OPENED``: ``value`` is the session id."""

    KIND: ClassVar[int] = MUX_S_SESSION_OPENED


@dataclass(frozen=True, slots=True)
class ExitMessage(_Message):
    """``MUX_S_EXIT_MESSAGE``: a session's exit value (unsolicited: no request id)."""

    KIND: ClassVar[int] = MUX_S_EXIT_MESSAGE
    session_id: int
    exit_value: int


@dataclass(frozen=True, slots=True)
class TtyAllocFail(_Message):
    """``MUX_S_TTY_ALLOC_FAIL``: the server gave a session no terminal (no request id)."""

    KIND: ClassVar[int] = MUX_S_TTY_ALLOC_FAIL
    session_id: int


Reply = (
    Ok
    | ProxyReady
    | Failure
    | PermissionDenied
    | Alive
    | RemotePort
    | SessionOpened
    | ExitMessage
    | TtyAllocFail
)

_REPLIES: dict[int, type[Reply]] = {
    c.KIND: c
    for c in (
        Ok,
        ProxyReady,
        Failure,
        PermissionDenied,
        Alive,
        RemotePort,
        SessionOpened,
        ExitMessage,
        TtyAllocFail,
    )
}
_REQUESTS: dict[int, type[Request]] = {
    c.KIND: c
    for c in (AliveCheck, Terminate, StopListening, Proxy, OpenForward, CloseForward, NewSession)
}


def _class_of(payload: bytes, table: dict[int, _T], what: str) -> _T:
    kind = _Reader(payload).u32()
    cls = table.get(kind)
    if cls is None:
        raise MuxProtocolError(f"unexpected mux {what} 0x{kind:08x}")
    return cls


def decode_reply(payload: bytes) -> Reply:
    """The reply one message's payload holds (MuxProtocolError if it is none)."""
    return _class_of(payload, _REPLIES, "reply").decode(payload)


def decode_request(payload: bytes) -> Request:
    """The request one message's payload holds (for a master's side, as in tests)."""
    return _class_of(payload, _REQUESTS, "request").decode(payload)
