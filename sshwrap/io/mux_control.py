"""OpenSSH's multiplexing (ControlMaster) protocol, spoken from Python.

A ControlMaster listens on a unix socket.  Each connection to it starts with a hello
exchange (protocol version 4), then carries requests and replies framed as
``uint32 length`` + ``uint32 type`` + body (``PROTOCOL.mux`` in the OpenSSH sources).
This module implements the control requests sshwrap needs:

- ``alive_check()`` (``ssh -O check``): the master's pid;
- ``terminate()`` (``ssh -O exit``);
- ``open_forward()`` / ``close_forward()`` (``ssh -O forward`` / ``-O cancel``), reporting the
  port the server allocated for a remote forward of port 0;
- ``enter_proxy()`` (``MUX_C_PROXY``, OpenSSH >= 7.4): after it the socket stops speaking the
  mux protocol and carries unencrypted, unpadded SSH connection-protocol packets (RFC 4254);
  ``sshwrap.io.pump`` speaks that.

Everything here is blocking and owns its socket; one ``MuxControl`` per thread.
"""

from __future__ import annotations

import socket
from types import TracebackType

from ..protocol import wire
from ..protocol.wire import pack_string, pack_u32

__all__ = [
    "MUX_FWD_DYNAMIC",
    "MUX_FWD_LOCAL",
    "MUX_FWD_REMOTE",
    "MuxControl",
    "MuxError",
    "MuxRefused",
    "MuxUnsupported",
    "pack_string",
    "pack_u32",
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

# A listen or connect "port" of (uint32)-2 means the host field is a unix socket path.
PORT_STREAMLOCAL = 0xFFFFFFFE

_MAX_PACKET = 256 * 1024


class MuxError(OSError):
    """The control socket could not be used (master gone, protocol error)."""


class MuxRefused(MuxError):
    """The master answered a request with MUX_S_FAILURE or MUX_S_PERMISSION_DENIED."""


class MuxUnsupported(MuxError):
    """The master speaks a protocol version or lacks a request sshwrap needs."""


class Reader(wire.Reader):
    """Reads SSH wire types from one mux message; a truncated one raises ``MuxError``."""

    __slots__ = ()

    def truncated(self) -> Exception:
        """``MuxError("truncated mux message")``."""
        return MuxError("truncated mux message")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise MuxError("control master closed the connection")
        buf += chunk
    return bytes(buf)


class MuxControl:
    """One connection to a ControlMaster's socket, speaking the mux protocol (blocking).

    ``MuxControl(path)`` connects and exchanges hellos; it raises ``MuxError`` when nothing
    listens there (a dead master) and ``MuxUnsupported`` for another protocol version.
    Use it as a context manager, or call ``close()``.
    """

    def __init__(self, path: str, *, timeout: float | None = 10.0) -> None:
        self.path = path
        self._rid = 0
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise MuxError(f"no control master at {path}: {e.strerror or e}") from None
        self.sock = sock
        try:
            self._hello()
        except BaseException:
            sock.close()
            raise

    # -- framing -----------------------------------------------------------------------
    def _send(self, payload: bytes) -> None:
        try:
            self.sock.sendall(pack_u32(len(payload)) + payload)
        except OSError as e:
            raise MuxError(f"control master connection failed: {e}") from None

    def _recv(self) -> Reader:
        try:
            n = Reader(_recv_exact(self.sock, 4)).u32()
            if n > _MAX_PACKET:
                raise MuxError(f"oversized mux message ({n} bytes)")
            return Reader(_recv_exact(self.sock, n))
        except TimeoutError:
            raise MuxError("control master did not answer in time") from None
        except MuxError:
            raise
        except OSError as e:
            raise MuxError(f"control master connection failed: {e}") from None

    def _hello(self) -> None:
        self._send(pack_u32(MUX_MSG_HELLO) + pack_u32(SSHMUX_VER))
        r = self._recv()
        kind = r.u32()
        if kind != MUX_MSG_HELLO:
            raise MuxError(f"expected mux hello, got message 0x{kind:08x}")
        ver = r.u32()
        if ver != SSHMUX_VER:
            raise MuxUnsupported(f"control master speaks mux protocol {ver}, not {SSHMUX_VER}")

    def request(self, kind: int, body: bytes = b"") -> tuple[int, Reader]:
        """Send one request (a fresh request id is added); return (reply type, rest of reply).

        MUX_S_FAILURE and MUX_S_PERMISSION_DENIED raise ``MuxRefused`` with the master's reason.
        """
        self._rid += 1
        rid = self._rid
        self._send(pack_u32(kind) + pack_u32(rid) + body)
        r = self._recv()
        rtype = r.u32()
        if rtype in (MUX_S_FAILURE, MUX_S_PERMISSION_DENIED):
            r.u32()
            reason = r.text()
            raise MuxRefused(reason or "request refused by the control master")
        got = r.u32()
        if got != rid:
            raise MuxError(f"mux reply for request {got}, expected {rid}")
        return rtype, r

    # -- requests ----------------------------------------------------------------------
    def alive_check(self) -> int:
        """``ssh -O check``: the master's pid."""
        rtype, r = self.request(MUX_C_ALIVE_CHECK)
        if rtype != MUX_S_ALIVE:
            raise MuxError(f"unexpected reply 0x{rtype:08x} to an alive check")
        return r.u32()

    def terminate(self) -> None:
        """``ssh -O exit``: ask the master to exit now."""
        try:
            rtype, _ = self.request(MUX_C_TERMINATE)
        except MuxRefused:
            raise
        except MuxError:
            return  # the master exited before its reply went out, as ``ssh -O exit`` accepts
        if rtype != MUX_S_OK:
            raise MuxError(f"unexpected reply 0x{rtype:08x} to terminate")

    def stop_listening(self) -> None:
        """``ssh -O stop``: the master stops accepting new mux clients."""
        self.request(MUX_C_STOP_LISTENING)

    @staticmethod
    def _fwd_body(
        ftype: int, listen_host: str, listen_port: int, connect_host: str, connect_port: int
    ) -> bytes:
        return (
            pack_u32(ftype)
            + pack_string(listen_host)
            + pack_u32(listen_port)
            + pack_string(connect_host)
            + pack_u32(connect_port)
        )

    def open_forward(
        self,
        ftype: int,
        listen_host: str,
        listen_port: int,
        connect_host: str = "",
        connect_port: int = 0,
    ) -> int | None:
        """``ssh -O forward``.  Returns the allocated port for a remote forward of port 0,
        else None.  Raises ``MuxRefused`` when the master or the server refuses."""
        body = self._fwd_body(ftype, listen_host, listen_port, connect_host, connect_port)
        rtype, r = self.request(MUX_C_OPEN_FWD, body)
        if rtype == MUX_S_REMOTE_PORT:
            return r.u32()
        if rtype != MUX_S_OK:
            raise MuxError(f"unexpected reply 0x{rtype:08x} to a forward request")
        return None

    def close_forward(
        self,
        ftype: int,
        listen_host: str,
        listen_port: int,
        connect_host: str = "",
        connect_port: int = 0,
    ) -> None:
        """``ssh -O cancel``: the same fields as given to ``open_forward``."""
        body = self._fwd_body(ftype, listen_host, listen_port, connect_host, connect_port)
        self.request(MUX_C_CLOSE_FWD, body)

    def enter_proxy(self) -> socket.socket:
        """Switch this connection to proxy mode and hand its socket over (blocking mode,
        no timeout).  This object is unusable afterwards."""
        try:
            rtype, _ = self.request(MUX_C_PROXY)
        except MuxRefused as e:
            raise MuxUnsupported(f"control master refused proxy mode: {e}") from None
        if rtype != MUX_S_PROXY:
            raise MuxUnsupported(f"unexpected reply 0x{rtype:08x} to a proxy request")
        sock = self.sock
        sock.settimeout(None)
        self.sock = socket.socket()  # a placeholder; close() closes it, not the handed socket
        return sock

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Close the control connection."""
        self.sock.close()

    def __enter__(self) -> MuxControl:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
