"""OpenSSH's multiplexing (ControlMaster) protocol, spoken from Python.

A ControlMaster listens on a unix socket.  Each connection to it starts with a hello
exchange (protocol version 4), then carries requests and replies framed as
``uint32 length`` + ``uint32 type`` + body (``PROTOCOL.mux`` in the OpenSSH sources).
The messages themselves are typed in ``sshwrap.protocol.mux`` (pure); this module does the
socket IO for the control requests sshwrap needs:

- ``alive_check()`` (``ssh -O check``): the master's pid;
- ``terminate()`` (``ssh -O exit``);
- ``open_forward()`` / ``close_forward()`` (``ssh -O forward`` / ``-O cancel``), reporting the
  port the server allocated for a remote forward of port 0;
- ``enter_proxy()`` (``MUX_C_PROXY``, OpenSSH >= 7.4): after it the socket stops speaking the
  mux protocol and carries unencrypted, unpadded SSH connection-protocol packets (RFC 4254);
  ``sshwrap.io.pump`` speaks that;
- ``start_session()`` (``MUX_C_NEW_SESSION``, what ``ssh -S host cmd`` sends, with our file
  descriptors passed to the master): :class:`MuxSession` runs a subsystem such as ``sftp``
  over the master with no ssh process of its own.

Everything here is blocking and owns its socket; one ``MuxControl`` per thread.
"""

from __future__ import annotations

import contextlib
import math
import select
import signal
import socket
import subprocess
import time
from typing import BinaryIO

from ..errors import SSHConnectionError
from ..protocol import mux, wire
from ..protocol.mux import MUX_FWD_DYNAMIC, MUX_FWD_LOCAL, MUX_FWD_REMOTE, SSHMUX_VER, ForwardSpec
from ..protocol.wire import pack_string, pack_u32

__all__ = [
    "MUX_FWD_DYNAMIC",
    "MUX_FWD_LOCAL",
    "MUX_FWD_REMOTE",
    "MuxControl",
    "MuxError",
    "MuxRefused",
    "MuxSession",
    "MuxUnsupported",
    "master_answers",
    "pack_string",
    "pack_u32",
]


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
    def _send(self, message: bytes) -> None:
        try:
            self.sock.sendall(message)
        except OSError as e:
            raise MuxError(f"control master connection failed: {e}") from None

    def _recv(self) -> bytes:
        """The payload of the next message."""
        try:
            return _recv_exact(self.sock, mux.message_length(_recv_exact(self.sock, 4)))
        except mux.MuxProtocolError as e:
            raise MuxError(str(e)) from None
        except TimeoutError:
            raise MuxError("control master did not answer in time") from None
        except MuxError:
            raise
        except OSError as e:
            raise MuxError(f"control master connection failed: {e}") from None

    def _hello(self) -> None:
        self._send(mux.Hello().encode())
        try:
            ver = mux.Hello.decode(self._recv()).version
        except mux.MuxProtocolError as e:
            raise MuxError(f"expected mux hello: {e}") from None
        if ver != SSHMUX_VER:
            raise MuxUnsupported(f"control master speaks mux protocol {ver}, not {SSHMUX_VER}")

    def _next_id(self) -> int:
        self._rid += 1
        return self._rid

    def request(self, message: mux.Request) -> mux.Reply:
        """Send one request; return the master's reply to it.

        MUX_S_FAILURE and MUX_S_PERMISSION_DENIED raise ``MuxRefused`` with the master's
        reason; a reply that does not parse, or answers another request, ``MuxError``.
        """
        self._send(message.encode())
        try:
            reply = mux.decode_reply(self._recv())
        except mux.MuxProtocolError as e:
            raise MuxError(str(e)) from None
        if isinstance(reply, (mux.Failure, mux.PermissionDenied)):
            raise MuxRefused(reply.reason or "request refused by the control master")
        got = getattr(reply, "request_id", None)
        if got != message.request_id:
            raise MuxError(f"mux reply for request {got}, expected {message.request_id}")
        return reply

    # -- requests ----------------------------------------------------------------------
    def alive_check(self) -> int:
        """``ssh -O check``: the master's pid."""
        reply = self.request(mux.AliveCheck(self._next_id()))
        if not isinstance(reply, mux.Alive):
            raise MuxError(f"unexpected reply 0x{reply.KIND:08x} to an alive check")
        return reply.value

    def terminate(self) -> None:
        """``ssh -O exit``: ask the master to exit now."""
        try:
            reply = self.request(mux.Terminate(self._next_id()))
        except MuxRefused:
            raise
        except MuxError:
            return  # the master exited before its reply went out, as ``ssh -O exit`` accepts
        if not isinstance(reply, mux.Ok):
            raise MuxError(f"unexpected reply 0x{reply.KIND:08x} to terminate")

    def stop_listening(self) -> None:
        """``ssh -O stop``: the master stops accepting new mux clients."""
        self.request(mux.StopListening(self._next_id()))

    def open_forward(self, spec: ForwardSpec) -> int | None:
        """``ssh -O forward``.  Returns the allocated port for a remote forward of port 0,
        else None.  Raises ``MuxRefused`` when the master or the server refuses."""
        reply = self.request(mux.OpenForward(self._next_id(), *spec))
        if isinstance(reply, mux.RemotePort):
            return reply.value
        if not isinstance(reply, mux.Ok):
            raise MuxError(f"unexpected reply 0x{reply.KIND:08x} to a forward request")
        return None

    def close_forward(self, spec: ForwardSpec) -> None:
        """``ssh -O cancel``: the same ``spec`` as given to ``open_forward``."""
        self.request(mux.CloseForward(self._next_id(), *spec))

    def enter_proxy(self) -> socket.socket:
        """Switch this connection to proxy mode and hand its socket over (blocking mode,
        no timeout).  This object is unusable afterwards."""
        try:
            reply = self.request(mux.Proxy(self._next_id()))
        except MuxRefused as e:
            raise MuxUnsupported(f"control master refused proxy mode: {e}") from None
        if not isinstance(reply, mux.ProxyReady):
            raise MuxUnsupported(f"unexpected reply 0x{reply.KIND:08x} to a proxy request")
        sock = self.sock
        sock.settimeout(None)
        self.sock = socket.socket()  # a placeholder; close() closes it, not the handed socket
        return sock

    def start_session(self, command: str, fds: tuple[int, int, int], *, subsystem: bool) -> None:
        """Ask the master for a session running ``command`` (``MUX_C_NEW_SESSION``) on
        ``fds`` (stdin, stdout, stderr: passed to the master, which then does their IO);
        its replies are :class:`MuxSession`'s to read."""
        request = mux.NewSession(self._next_id(), subsystem=int(subsystem), command=command)
        self._send(request.encode())
        try:
            for fd in fds:
                socket.send_fds(self.sock, [b"\0"], [fd])
        except OSError as e:
            raise MuxError(f"control master connection failed: {e}") from None

    def next_reply(self, timeout: float | None) -> mux.Reply | None:
        """The next message the master sends (None: none within ``timeout`` seconds)."""
        poller = select.poll()  # (not select(): a descriptor may be past FD_SETSIZE)
        poller.register(self.sock, select.POLLIN)
        if not poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))):
            return None
        try:
            return mux.decode_reply(self._recv())
        except mux.MuxProtocolError as e:
            raise MuxError(str(e)) from None

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Close the control connection."""
        self.sock.close()

    def __enter__(self) -> MuxControl:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_SESSION_TIMEOUT = 10.0  # a master's answer to hello and to each read of its messages


class MuxSession:
    """A session a master runs on our file descriptors (:meth:`MuxControl.start_session`):
    what ``ssh -S`` does, without its process.  The part of ``subprocess.Popen`` a caller of
    a child ssh uses: ``poll``, ``wait``, ``kill`` (closing the control connection: the master
    then ends the session's channel), ``returncode`` (the master's exit message; 255 when it
    refused or lost the session, its reason written to ``stderr``)."""

    def __init__(self, path: str, command: str, io_fd: int, stderr: BinaryIO, *, host: str) -> None:
        self.returncode: int | None = None
        self._stderr = stderr
        try:
            self._mux: MuxControl | None = MuxControl(path, timeout=_SESSION_TIMEOUT)
        except MuxError as e:  # the master is gone: as ssh -S says it
            raise SSHConnectionError(host, f"the control master is gone ({e})") from None
        try:
            self._mux.start_session(command, (io_fd, io_fd, stderr.fileno()), subsystem=True)
        except MuxError as e:
            self._mux.close()
            raise SSHConnectionError(host, f"the control master failed: {e}") from None
        except BaseException:
            self._mux.close()
            raise

    def _end(self, code: int, why: str = "") -> None:
        if why:
            with contextlib.suppress(OSError, ValueError):
                self._stderr.write(why.encode() + b"\n")
                self._stderr.flush()
        self.returncode = code
        if self._mux is not None:
            self._mux.close()
            self._mux = None

    def _pump(self, timeout: float | None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        while self._mux is not None:
            left = None if end is None else max(0.0, end - time.monotonic())
            try:
                reply = self._mux.next_reply(left)
            except MuxError as e:
                self._end(255, f"the control master ended the session: {e}")
                return
            if reply is None:
                return
            if isinstance(reply, mux.ExitMessage):
                self._end(reply.exit_value)
            elif isinstance(reply, mux.Failure | mux.PermissionDenied):
                self._end(255, f"the control master refused the session: {reply.reason}")

    def poll(self) -> int | None:
        """The exit value, or None while the session runs."""
        self._pump(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the session's end (``subprocess.TimeoutExpired`` after ``timeout``)."""
        self._pump(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired("mux session", timeout or 0)
        return self.returncode

    def kill(self) -> None:
        """End the session now (its channel closed by the master)."""
        if self.returncode is None:
            self._end(-signal.SIGKILL)


def master_answers(path: str, timeout: float) -> bool:
    """True if a ControlMaster at ``path`` answers an alive check within ``timeout`` s (a
    master killed leaves its socket file behind: nothing listens there any more)."""
    try:
        with MuxControl(path, timeout=timeout) as m:
            m.alive_check()
    except MuxError:
        return False
    return True
