"""Attach to ControlMasters sshwrap does not own (the user's own ``ssh -M``), and detach its own.

A master started by plain ``ssh -M -S path -fN`` serves ``sshwrap.attach(path)`` and outlives
its ``close()``; a lost attached master is an error and no master starts in its place;
``connect(host, attach="auto")`` finds the master the user's config names; a master detached
in one process is attached in another and stops only when finally asked, nothing left running.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import sshwrap
from sshwrap import SSHConnectionError
from sshwrap.aio import attach as aio_attach
from sshwrap.aio import connect as aio_connect
from sshwrap.io.mux_control import MuxControl
from sshwrap.testing import LocalSSHD, is_running, wait_exited

_REPO = str(Path(sshwrap.__file__).resolve().parent.parent)  # the sshwrap under test


def _master_pid(path: str) -> int:
    with MuxControl(path, timeout=5) as m:
        return m.alive_check()


def _stop(path: str, pid: int) -> None:
    """Stop a master this test started (``-O exit``; by its pid if it does not go)."""
    subprocess.run(["ssh", "-S", path, "-O", "exit", "x"], capture_output=True, timeout=10)
    if wait_exited([pid], 5):
        os.kill(pid, 9)
    assert not wait_exited([pid], 5)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short private directory for control sockets (``sun_path``)."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="h16-") as d:
        yield d


@pytest.fixture
def user_master(local_sshd: LocalSSHD, sock_dir: str) -> Iterator[tuple[str, int]]:
    """A master the user started: plain ``ssh -M -S path -fN`` with the LocalSSHD config."""
    path = os.path.join(sock_dir, "cm")
    subprocess.run(
        ["ssh", "-F", local_sshd.config, "-M", "-S", path, "-fN", local_sshd.host],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    pid = _master_pid(path)
    try:
        yield path, pid
    finally:
        if is_running(pid):
            _stop(path, pid)


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": _REPO}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )


def test_attach_user_master_runs_on_channels_and_survives_close(
    user_master: tuple[str, int],
) -> None:
    path, pid = user_master
    c = sshwrap.attach(path)
    assert c.attached and c.master_pid == pid and c.uses_proxy
    r = c.run("echo out; echo err >&2; exit 3", capture_output=True)
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    assert c.run("kill -TERM $$").returncode == -15  # a channel's exit-signal
    c.close()
    assert c.closed and is_running(pid) and _master_pid(path) == pid
    with sshwrap.attach(path) as again:  # the master still serves
        assert again.run("true").returncode == 0
    assert _master_pid(path) == pid


@pytest.mark.parametrize("proxy", [True, False], ids=["proxy", "fallback"])
def test_lost_attached_master_is_an_error_and_none_starts(
    user_master: tuple[str, int], local_sshd: LocalSSHD, proxy: bool
) -> None:
    path, pid = user_master
    with sshwrap.attach(path, local_sshd.host, config=local_sshd.config, proxy=proxy) as c:
        assert c.uses_proxy is proxy
        assert c.run("true").returncode == 0
        _stop(path, pid)
        before = set(local_sshd.session_pids())
        with pytest.raises(SSHConnectionError, match="gone"):
            c.run("true")
        assert c.restarts == 0 and c.control_path == path
        assert not os.path.exists(path)  # no master of ours listens there
        assert set(local_sshd.session_pids()) <= before  # and none logged in
    with pytest.raises(SSHConnectionError, match="no control master answers"):
        sshwrap.attach(path)


def test_async_attach_and_detach(user_master: tuple[str, int], local_sshd: LocalSSHD) -> None:
    path, pid = user_master

    async def main() -> sshwrap.Detached:
        c = await aio_attach(path)
        assert c.attached and c.master_pid == pid
        r = await c.run("echo async", capture_output=True)
        assert r.stdout == b"async\n"
        await c.close()
        assert is_running(pid)
        own = await aio_connect(local_sshd.host, config=local_sshd.config)
        return await own.detach()

    d = asyncio.run(main())
    try:
        assert is_running(d.pid)

        async def finally_stop() -> None:
            c = await aio_attach(d)
            assert (await c.run("true")).returncode == 0
            await c.close(stop=True)

        asyncio.run(finally_stop())
        assert not wait_exited([d.pid], 5)
        assert not os.path.exists(d.directory or "")
    finally:
        if is_running(d.pid):
            _stop(d.control_path, d.pid)


def test_reconnect_true_replaces_a_lost_attached_master_with_sshwraps_own(
    user_master: tuple[str, int], local_sshd: LocalSSHD
) -> None:
    path, pid = user_master
    c = sshwrap.attach(path, local_sshd.host, config=local_sshd.config, reconnect=True)
    try:
        _stop(path, pid)
        assert c.run("echo back", capture_output=True).stdout == b"back\n"
        assert c.restarts == 1 and not c.attached and c.control_path != path
        new = c.master_pid
        assert new != pid and is_running(new)
    finally:
        c.close()
    assert not wait_exited([new], 5)  # now sshwrap's own: close() stopped it


def test_attached_close_cancels_its_forwards_only(
    user_master: tuple[str, int], local_sshd: LocalSSHD
) -> None:
    path, pid = user_master
    c = sshwrap.attach(path)
    fwd = c.forward_local(0, "127.0.0.1", local_sshd.port)
    with socket.create_connection(("127.0.0.1", fwd.port), timeout=10) as s:
        assert s.recv(4).startswith(b"SSH-")  # through the user's master to sshd
    c.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fwd.port), timeout=10).close()
    assert _master_pid(path) == pid


def test_attach_stop_true_stops_the_users_master(user_master: tuple[str, int]) -> None:
    path, pid = user_master
    c = sshwrap.attach(path)
    c.close(stop=True)
    assert not wait_exited([pid], 5)


def test_connect_attach_auto_finds_the_configured_master(
    local_sshd: LocalSSHD, sock_dir: str
) -> None:
    config = os.path.join(sock_dir, "config")  # the user's: ControlPath with %C
    Path(config).write_text(
        f"Host *\n  ControlPath {sock_dir}/cm-%C\nInclude {local_sshd.config}\n"
    )
    with pytest.raises(SSHConnectionError, match="attach=True"):
        sshwrap.connect(local_sshd.host, config=config, attach=True)
    with sshwrap.connect(local_sshd.host, config=config, attach="auto") as own:
        assert not own.attached  # nothing answered: sshwrap's own master
        assert not own.control_path.startswith(sock_dir)
    subprocess.run(
        ["ssh", "-F", config, "-M", "-fN", local_sshd.host],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    (path,) = (str(p) for p in Path(sock_dir).glob("cm-*"))
    pid = _master_pid(path)
    try:
        c = sshwrap.connect(local_sshd.host, config=config, attach="auto")
        assert c.attached and c.master_pid == pid and c.control_path == path
        assert c.run("echo hi", capture_output=True).stdout == b"hi\n"
        c.close()
        assert is_running(pid)
        with sshwrap.connect(local_sshd.host, config=config) as default:  # as before
            assert not default.attached and default.master_pid != pid
        assert is_running(pid)
    finally:
        _stop(path, pid)


_DETACH = """\
import sshwrap, sys
c = sshwrap.connect(sys.argv[1], config=sys.argv[2])
assert c.run("true").returncode == 0
print(c.detach())
"""

_ATTACH = """\
import sshwrap, sys
c = sshwrap.attach(sys.argv[1])
print(c.run("echo $((6 * 7))", capture_output=True, text=True).stdout, end="")
c.close()
"""


def test_detach_in_one_process_attach_in_another(local_sshd: LocalSSHD) -> None:
    text = _python(_DETACH, local_sshd.host, local_sshd.config).stdout.strip()
    d = sshwrap.Detached.parse(text)
    assert pickle.loads(pickle.dumps(d)) == d and str(d) == text
    try:
        assert d.destination == local_sshd.host and is_running(d.pid)  # outlived its process
        assert Path(d.control_path).parent == Path(d.directory or "")
        assert oct(os.stat(d.directory or "").st_mode & 0o777) == "0o700"
        assert _python(_ATTACH, text).stdout == "42\n"
        assert is_running(d.pid)  # the attached close() left it up
        c = sshwrap.attach(d, own=True)  # finally: it is ours to stop
        assert c.master_pid == d.pid and not c.attached
        assert c.run("true").returncode == 0
        c.close()
        assert not wait_exited([d.pid], 5)
        assert not os.path.exists(d.directory or "")
    finally:
        if is_running(d.pid):
            _stop(d.control_path, d.pid)


def test_detach_in_process_then_close_stop(local_sshd: LocalSSHD) -> None:
    c = sshwrap.connect(local_sshd.host, config=local_sshd.config)
    d = c.detach()
    assert c.closed
    with pytest.raises(ValueError):
        c.run("true")
    del c  # its finalizer no longer stops the master
    try:
        assert is_running(d.pid)
        with sshwrap.attach(d) as a:
            assert a.attached and a.run("true").returncode == 0
        assert is_running(d.pid)
        sshwrap.attach(str(d)).close(stop=True)
        assert not wait_exited([d.pid], 5)
        assert not os.path.exists(d.directory or "")
    finally:
        if is_running(d.pid):
            _stop(d.control_path, d.pid)


def test_attach_bad_targets() -> None:
    with pytest.raises(ValueError):
        sshwrap.attach("")
    with pytest.raises(ValueError, match="detached"):
        sshwrap.attach('{"not": "ours"}')
    with pytest.raises(SSHConnectionError, match="no control master answers"):
        sshwrap.attach("/nonexistent/cm")
