"""The mux protocol layer against a master started by plain ``ssh -M`` (not by sshwrap)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from sshwrap.io.mux_control import MUX_FWD_LOCAL, MUX_FWD_REMOTE, MuxControl, MuxError, MuxRefused
from sshwrap.io.pump import ChannelError, ProxyCore, Sink, Source, signal_name, signal_number
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
            port = mux.open_forward(MUX_FWD_REMOTE, "127.0.0.1", 0, "127.0.0.1", target)
            assert port is not None and 0 < port < 65536
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                listener.settimeout(10)
                conn, _ = listener.accept()  # the connection came back through the master
                conn.close()
            mux.close_forward(MUX_FWD_REMOTE, "127.0.0.1", 0, "127.0.0.1", target)
            with pytest.raises(MuxRefused, match="not forwarded"):
                mux.close_forward(MUX_FWD_REMOTE, "127.0.0.1", 0, "127.0.0.1", target)
            with pytest.raises(MuxRefused):
                mux.open_forward(MUX_FWD_LOCAL, "127.0.0.1", 1, "127.0.0.1", 0)  # bad target


@pytest.mark.parametrize("prestart", [True, False])
def test_proxy_mode_channels(master: str, prestart: bool) -> None:
    with MuxControl(master) as mux:
        core = ProxyCore(mux.enter_proxy(), prestart=prestart)
    try:
        ch = core.open_session(30)
        out, err = Sink(collect=True), Sink(collect=True)
        ch.setup_io(Source(data=b"abc"), out, err)
        ch.exec("cat; echo e >&2; exit 7")
        assert ch.closed.wait(30)
        assert (ch.returncode, bytes(out.buf), bytes(err.buf)) == (7, b"abc", b"e\n")
        ch = core.open_session(30)
        ch.setup_io(Source(), Sink(), Sink())
        ch.exec("kill -HUP $$")
        assert ch.closed.wait(30)
        assert ch.exit_signal == "HUP" and ch.returncode == -signal.SIGHUP
    finally:
        core.close()
    assert not core.alive
    with pytest.raises(ChannelError):
        core.open_session(5)


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
