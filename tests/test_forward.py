"""Port forwards over a Connection's master move real bytes (local, remote, dynamic/SOCKS5)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from waiting import wait_until

from sshwrap.connection import Connection, Forward, ForwardError, connect
from sshwrap.testing import LocalSSHD


class EchoServer:
    """A TCP echo server on 127.0.0.1 (one thread per connection)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c: socket.socket) -> None:
        with c:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                c.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    e = EchoServer()
    yield e
    e.close()


@pytest.fixture(scope="module")
def conn(local_sshd: LocalSSHD) -> Iterator[Connection]:
    with connect(local_sshd.host, config=local_sshd.config) as c:
        yield c


def _roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.settimeout(30)
    got = bytearray()

    def reader() -> None:
        while len(got) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    sock.sendall(data)
    t.join(60)
    return bytes(got)


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            # A listener that is going away may still accept; it then closes at once.
            s.sendall(b"x")
            return s.recv(1) == b""
    except OSError:
        return True


def _wait_refused(port: int, timeout: float = 5) -> None:
    wait_until(lambda: _refused(port), timeout, f"port {port} to stop forwarding")


def test_local_forward_port_zero_moves_bytes(conn: Connection, echo: EchoServer) -> None:
    fwd = conn.forward_local(0, "127.0.0.1", echo.port)
    assert isinstance(fwd, Forward) and fwd.port > 0
    assert fwd.port == int(fwd) and fwd.kind == "local"
    data = os.urandom(2 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", fwd.port)) as s:
        assert _roundtrip(s, data) == data
    assert echo.connections == 1
    assert fwd in conn.forwards
    fwd.cancel()
    assert not fwd.active and fwd not in conn.forwards
    _wait_refused(fwd.port)
    fwd.cancel()  # idempotent


def test_local_forward_fixed_port_as_context_manager(conn: Connection, echo: EchoServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with conn.forward_local(port, "127.0.0.1", echo.port) as fwd:
        assert fwd.port == port
        with socket.create_connection(("127.0.0.1", port)) as s:
            assert _roundtrip(s, b"hello local") == b"hello local"
    _wait_refused(port)


def test_local_forward_on_a_taken_port_raises(conn: Connection, echo: EchoServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(ForwardError):
            conn.forward_local(busy.getsockname()[1], "127.0.0.1", echo.port)


def test_remote_forward_port_zero_reports_allocated_port(
    conn: Connection, echo: EchoServer
) -> None:
    # sshd runs on this machine: the server's 127.0.0.1 is ours.
    with conn.forward_remote(0, "127.0.0.1", echo.port) as fwd:
        assert fwd.kind == "remote" and 0 < fwd.port < 65536
        data = os.urandom(1024 * 1024)
        with socket.create_connection(("127.0.0.1", fwd.port)) as s:
            assert _roundtrip(s, data) == data
        assert echo.connections == 1
    _wait_refused(fwd.port)


def _socks5_connect(proxy_port: int, host: str, port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=30)
    s.sendall(b"\x05\x01\x00")  # version 5, one method: no authentication
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack(">H", port))
    reply = b""
    while len(reply) < 10:
        chunk = s.recv(10 - len(reply))
        assert chunk, "SOCKS proxy closed the connection"
        reply += chunk
    assert reply[:2] == b"\x05\x00", reply  # succeeded
    return s


def test_dynamic_forward_socks5(conn: Connection, echo: EchoServer) -> None:
    with conn.forward_dynamic(0) as fwd:
        assert fwd.kind == "dynamic" and fwd.port > 0
        data = os.urandom(512 * 1024)
        with _socks5_connect(fwd.port, "127.0.0.1", echo.port) as s:
            assert _roundtrip(s, data) == data
        with _socks5_connect(fwd.port, "127.0.0.1", echo.port) as s:
            assert _roundtrip(s, b"second") == b"second"
        assert echo.connections == 2
    _wait_refused(fwd.port)


def test_forwards_go_with_the_connection(local_sshd: LocalSSHD, echo: EchoServer) -> None:
    with connect(local_sshd.host, config=local_sshd.config) as c:
        fwd = c.forward_local(0, "127.0.0.1", echo.port)
        with socket.create_connection(("127.0.0.1", fwd.port)) as s:
            assert _roundtrip(s, b"x") == b"x"
    _wait_refused(fwd.port)
    fwd.cancel()  # harmless after close


def test_forwards_come_back_after_a_master_restart(local_sshd: LocalSSHD, echo: EchoServer) -> None:
    with connect(local_sshd.host, config=local_sshd.config) as c:
        local = c.forward_local(0, "127.0.0.1", echo.port)
        remote = c.forward_remote(0, "127.0.0.1", echo.port)
        old = c.master_pid
        os.kill(old, signal.SIGKILL)
        _wait_refused(local.port)
        assert c.run("true").returncode == 0  # the next call restarts the master
        assert c.master_pid != old and c.restarts == 1
        assert local.active and remote.active
        with socket.create_connection(("127.0.0.1", local.port)) as s:
            assert _roundtrip(s, b"local again") == b"local again"
        with socket.create_connection(("127.0.0.1", remote.port)) as s:
            assert _roundtrip(s, b"remote again") == b"remote again"


def test_forward_repr_names_host_spec_and_state(conn: Connection, echo: EchoServer) -> None:
    fwd = conn.forward_local(0, "127.0.0.1", echo.port)
    spec = f"local 127.0.0.1:{fwd.port} -> 127.0.0.1:{echo.port} host={conn.host!r}"
    assert repr(fwd) == f"<Forward {spec} active>"
    fwd.cancel()
    assert repr(fwd) == f"<Forward {spec} cancelled>" and fwd.cancelled
    socks = conn.forward_dynamic()
    socks.deactivate()  # as when a restarted master could not take it back
    assert (
        repr(socks)
        == f"<Forward dynamic 127.0.0.1:{socks.port} -> socks host={conn.host!r} inactive>"
    )
