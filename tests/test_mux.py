"""The mux protocol layer against a master started by plain ``ssh -M`` (not by sshwrap)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from waiting import wait_until

from sshwrap.core.invocation import control_path
from sshwrap.io.mux_control import (
    MUX_FWD_LOCAL,
    MUX_FWD_REMOTE,
    MuxControl,
    MuxError,
    MuxRefused,
    master_answers,
)
from sshwrap.io.pump import (
    ChannelError,
    ChannelLost,
    ProxyCore,
    Session,
    Sink,
    Source,
    signal_name,
    signal_number,
)
from sshwrap.protocol import channel as proto
from sshwrap.protocol.channel import ChannelState
from sshwrap.protocol.wire import Reader, pack_string, pack_u32
from sshwrap.testing import LocalSSHD, wait_exited


@pytest.fixture
def master(local_sshd: LocalSSHD) -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="swmux-")
    path = os.path.join(d, "c")
    subprocess.run(
        local_sshd.ssh("-M", "-N", "-f", "-o", f"ControlPath={path}", local_sshd.host),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=60,
    )
    try:
        yield path
    finally:
        subprocess.run(
            local_sshd.ssh("-o", f"ControlPath={path}", "-O", "exit", local_sshd.host),
            capture_output=True,
            timeout=30,
        )
        shutil.rmtree(d, ignore_errors=True)  # the master may still be unlinking its socket


def test_alive_check_matches_ssh_O_check(local_sshd: LocalSSHD, master: str) -> None:
    out = subprocess.run(
        local_sshd.ssh("-o", f"ControlPath={master}", "-O", "check", local_sshd.host),
        capture_output=True,
        text=True,
        timeout=30,
    )
    m = re.search(r"pid=(\d+)", out.stderr)
    assert m, out.stderr
    with MuxControl(master) as mux:
        assert mux.alive_check() == int(m.group(1))
        assert mux.alive_check() == int(m.group(1))  # several requests on one connection


def test_no_master_is_a_mux_error(tmp_path: object) -> None:
    with pytest.raises(MuxError):
        MuxControl(os.path.join(str(tmp_path), "nothing-here"))


def test_forward_open_close_and_refusals(master: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        target = listener.getsockname()[1]
        with MuxControl(master) as mux:
            port = mux.open_forward((MUX_FWD_REMOTE, "127.0.0.1", 0, "127.0.0.1", target))
            assert port is not None and 0 < port < 65536
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                listener.settimeout(10)
                conn, _ = listener.accept()  # the connection came back through the master
                conn.close()
            mux.close_forward((MUX_FWD_REMOTE, "127.0.0.1", 0, "127.0.0.1", target))
            with pytest.raises(MuxRefused, match="not forwarded"):
                mux.close_forward((MUX_FWD_REMOTE, "127.0.0.1", 0, "127.0.0.1", target))
            with pytest.raises(MuxRefused):
                mux.open_forward((MUX_FWD_LOCAL, "127.0.0.1", 1, "127.0.0.1", 0))  # bad target


def _session(core: ProxyCore) -> Session:
    """A session channel, open (what the core's procedures do, without the MaxSessions wait)."""
    ch = core.start_session()
    assert ch.opened.wait(30)
    core.check_opened(ch)
    assert ch.state is ChannelState.OPEN
    return ch


@pytest.mark.parametrize("prestart", [True, False])
def test_proxy_mode_channels(master: str, prestart: bool) -> None:
    with MuxControl(master) as mux:
        core = ProxyCore(mux.enter_proxy(), prestart=prestart)
    try:
        ch = _session(core)
        out, err = Sink(collect=True), Sink(collect=True)
        ch.setup_io(Source(data=b"abc"), out, err)
        ch.exec("cat; echo e >&2; exit 7")
        assert ch.closed.wait(30)
        assert (ch.returncode, bytes(out.buf), bytes(err.buf)) == (7, b"abc", b"e\n")
        assert ch.state is ChannelState.CLOSED and ch.remote_eof
        ch = _session(core)
        ch.setup_io(Source(), Sink(), Sink())
        ch.exec("kill -HUP $$")
        assert ch.closed.wait(30)
        assert ch.exit_signal == "HUP" and ch.returncode == -signal.SIGHUP
    finally:
        core.close()
    assert not core.alive
    with pytest.raises(ChannelError):
        core.start_session()


def test_terminate_stops_the_master(master: str) -> None:
    with MuxControl(master) as mux:
        pid = mux.alive_check()
        mux.terminate()
    assert wait_exited([pid], 10) == []
    with pytest.raises(MuxError):
        MuxControl(master).alive_check()


def test_signal_names() -> None:
    assert signal_name(signal.SIGINT) == "INT"
    assert signal_number("KILL") == 9
    assert signal_number("NOPE") is None


# -- the pump over a scripted peer (a socketpair: no master) ---------------------------------
class Peer:
    """The master's end of a proxy socket, played by the test with whole packets."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(10)
        self.buf = b""

    def read(self) -> tuple[int, Reader]:
        while len(self.buf) < 4 or len(self.buf) < 4 + int.from_bytes(self.buf[:4], "big"):
            chunk = self.sock.recv(65536)
            assert chunk, "the pump closed the socket"
            self.buf += chunk
        n = int.from_bytes(self.buf[:4], "big")
        frame, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
        assert frame[0] == 0
        return frame[1], Reader(frame[2:])

    def expect(self, msg: int) -> Reader:
        got, r = self.read()
        assert got == msg, (got, r.rest())
        return r

    def send(self, msg: int, body: bytes) -> None:
        self.sock.sendall(pack_u32(len(body) + 2) + bytes((0, msg)) + body)

    def open(self, core: ProxyCore, window: int, max_packet: int) -> Session:
        ch = core.start_session()
        r = self.expect(proto.MSG_CHANNEL_OPEN)
        assert r.string() == b"session"
        local = r.u32()
        self.send(
            proto.MSG_CHANNEL_OPEN_CONFIRMATION,
            pack_u32(local) + pack_u32(100 + local) + pack_u32(window) + pack_u32(max_packet),
        )
        assert ch.opened.wait(10) and ch.local_id == local
        return ch


@pytest.fixture
def peer() -> Iterator[tuple[ProxyCore, Peer]]:
    ours, theirs = socket.socketpair()
    core = ProxyCore(ours, prestart=False)
    try:
        yield core, Peer(theirs)
    finally:
        core.close()
        theirs.close()


def test_pump_holds_input_until_the_window_opens(peer: tuple[ProxyCore, Peer]) -> None:
    core, p = peer
    ch = p.open(core, window=5, max_packet=4)
    out = Sink(collect=True)
    ch.setup_io(Source(data=b"0123456789"), out, Sink(collect=True))
    ch.exec("cat")
    r = p.expect(proto.MSG_CHANNEL_REQUEST)
    assert (r.u32(), r.string()) == (100 + ch.local_id, b"exec")
    assert [p.expect(proto.MSG_CHANNEL_DATA).rest()[4:] for _ in range(2)] == [
        pack_string(b"0123"),
        pack_string(b"4"),
    ]
    # The window is used up: the next thing the pump sends is its answer to this request.
    p.send(proto.MSG_GLOBAL_REQUEST, pack_string("keepalive@openssh.com") + b"\x01")
    p.expect(proto.MSG_REQUEST_FAILURE)
    p.send(proto.MSG_CHANNEL_WINDOW_ADJUST, pack_u32(ch.local_id) + pack_u32(100))
    assert [p.expect(proto.MSG_CHANNEL_DATA).rest()[4:] for _ in range(2)] == [
        pack_string(b"5678"),
        pack_string(b"9"),
    ]
    p.expect(proto.MSG_CHANNEL_EOF)  # all input sent
    seen = core.closes.value
    p.send(proto.MSG_CHANNEL_DATA, pack_u32(ch.local_id) + pack_string(b"out"))
    p.send(
        proto.MSG_CHANNEL_REQUEST,
        pack_u32(ch.local_id) + pack_string("exit-status") + b"\x00" + pack_u32(3),
    )
    p.send(proto.MSG_CHANNEL_EOF, pack_u32(ch.local_id))
    p.send(proto.MSG_CHANNEL_CLOSE, pack_u32(ch.local_id))
    assert ch.closed.wait(10)
    assert (bytes(out.buf), ch.returncode, ch.state) == (b"out", 3, ChannelState.CLOSED)
    assert p.expect(proto.MSG_CHANNEL_CLOSE).u32() == 100 + ch.local_id
    assert core.closes.wait_past(seen, 10) and core.open_channels == 0


def test_a_packet_that_breaks_the_protocol_ends_the_connection(
    peer: tuple[ProxyCore, Peer],
) -> None:
    core, p = peer
    ch = p.open(core, window=1000, max_packet=100)
    seen = core.closes.value
    p.send(proto.MSG_CHANNEL_DATA, pack_u32(ch.local_id) + pack_u32(50) + b"short")
    assert ch.closed.wait(10)
    assert ch.lost and ch.state is ChannelState.LOST and not core.alive
    assert "breaks the SSH connection protocol (truncated channel packet)" in core.dead_reason
    assert core.closes.wait_past(seen, 10)
    with pytest.raises(ChannelLost, match="breaks the SSH"):
        core.check_opened(ch)
    with pytest.raises(ChannelLost):
        core.start_session()


def test_master_gone_mid_channel_loses_it(peer: tuple[ProxyCore, Peer]) -> None:
    core, p = peer
    ch = p.open(core, window=1000, max_packet=100)
    out = Sink(collect=True)
    ch.setup_io(Source(), out, Sink())
    ch.exec("sleep 9")
    p.expect(proto.MSG_CHANNEL_REQUEST)
    p.expect(proto.MSG_CHANNEL_EOF)  # no input
    p.send(proto.MSG_CHANNEL_DATA, pack_u32(ch.local_id) + pack_string(b"partial"))
    p.sock.close()
    assert ch.closed.wait(10)
    assert ch.lost and bytes(out.buf) == b"partial" and ch.returncode is None
    assert "closed the connection" in core.dead_reason


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=64))
def test_garbage_from_the_peer_never_kills_the_pump_thread_with_a_traceback(junk: bytes) -> None:
    """Whatever the peer sends after an open, the pump either goes on or declares the
    connection dead with a reason; its channel ends either way once the socket does."""
    crashes: list[object] = []
    old_hook = threading.excepthook
    threading.excepthook = crashes.append
    ours, theirs = socket.socketpair()
    core = ProxyCore(ours, prestart=False)
    try:
        p = Peer(theirs)
        ch = p.open(core, window=1000, max_packet=100)
        theirs.sendall(junk)
        theirs.close()
        assert ch.closed.wait(10)
        wait_until(lambda: not core.alive, 10, "the pump to see the socket end")
        assert core.dead_reason.startswith(("the control master", "control master"))
    finally:
        core.close()
        threading.excepthook = old_hook
    assert crashes == []


def test_master_answers_tells_a_live_master_from_its_leftover_socket(master: str) -> None:
    """A master answers its alive check; once killed (SIGKILL leaves the socket file behind)
    nothing does: what tells a master lost under an ``ssh -S`` session from a remote signal
    death (ssh's mux client logs the same words for both)."""
    assert master_answers(master, 5.0)
    with MuxControl(master) as m:
        pid = m.alive_check()
    os.kill(pid, signal.SIGKILL)
    assert wait_exited([pid], 10) == []
    assert os.path.exists(master)
    assert not master_answers(master, 5.0)


def test_control_path_of_ssh_options() -> None:
    """The ControlPath an ssh -S call goes through, read from its option arguments as ssh
    reads them (the first wins; ``none`` and ``%`` tokens: not known)."""
    args = ["-F", "/c", "-o", "ControlPath=/tmp/a b/m", "-o", "controlpath=/x"]
    assert control_path(args) == "/tmp/a b/m"
    assert control_path(["-o", "ControlPath=none"]) is None
    assert control_path(["-o", "ControlPath=~/.ssh/%C"]) is None
    assert control_path(["-p", "22", "-o", "ControlMaster=no"]) is None
