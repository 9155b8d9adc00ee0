"""Fleet copy (issue 12): ``put_many``/``get_many`` and their async twins against a real sshd.

The sshd is local: every "host" is this machine seen through its own 127.0.0.x alias, so each
host writes its own ``%h`` path and the tests look at the remote files directly (as root).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faults import freeze, leftovers, start_child, thaw
from waiting import wait_until

from sshwrap import fleet
from sshwrap.connection import Connection, connect
from sshwrap.errors import AuthenticationError, SSHConnectionError
from sshwrap.fleet import CopyResult, expand_host, get_many, put_many
from sshwrap.testing import LocalSSHD, is_running
from sshwrap.transfer import RemoteFileNotFoundError

MB = 1_000_000

Factory = Callable[..., LocalSSHD]


@pytest.fixture
def remote_dir(local_sshd: LocalSSHD) -> Iterator[Path]:
    """A directory the remote user owns (on this machine), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="sshwrap-fleet-"))
    os.chmod(d, 0o755)
    e = pwd.getpwnam(local_sshd.user)
    os.chown(d, e.pw_uid, e.pw_gid)
    yield d
    subprocess.run(["rm", "-rf", "--", str(d)], check=False, timeout=60)


def _tree(root: Path, files: int) -> dict[str, str]:
    """``files`` files of random sizes (0 to 300 kB) under ``root`` (two levels); their
    sha256 by relative path."""
    sums = {}
    for i in range(files):
        rel = f"d{i % 3}/f{i:02d}.bin" if i % 2 else f"f{i:02d}.bin"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom((i * 15_013) % 300_000)
        path.write_bytes(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def _sums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _masters(sshd: LocalSSHD) -> list[int]:
    """Live ssh ControlMasters this test's sshwrap started for ``sshd`` (``-M`` with its
    config in their argv: they leave the process tree when they go to the background)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-M" in args and sshd.config.encode() in args and is_running(int(entry)):
            out.append(int(entry))
    return out


def _statuses(results: list[CopyResult]) -> list[tuple[str, str]]:
    return [(r.host, r.status) for r in results]


# -- per-host values --------------------------------------------------------------------------
def test_host_token_is_replaced_and_escapable() -> None:
    assert expand_host("/var/log/%h.log", "web1") == "/var/log/web1.log"
    # only %h and %%h are special: every other % stays as it is
    assert expand_host("100%%/%h/%%h", "db") == "100%%/db/%h"
    assert expand_host("plain", "x") == "plain"
    assert expand_host("50%", "x") == "50%"
    assert expand_host("%d/x/%s", "x") == "%d/x/%s"
    assert expand_host("a%hb%", "x") == "axb%"


def test_bad_input_is_refused_before_any_host_starts(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    # (the shared sshd may serve other tests' masters, kept open: only new ones count)
    before = set(_masters(local_sshd))
    src = tmp_path / "f"
    src.write_bytes(b"x")
    cfg = local_sshd.config
    with pytest.raises(FileNotFoundError):
        put_many([local_sshd.host], tmp_path / "missing", "/tmp/x", config=cfg)
    with pytest.raises(ValueError, match="both write"):
        get_many([local_sshd.host, local_sshd.host], "/etc/hostname", tmp_path, config=cfg)
    with pytest.raises(ValueError, match="cannot name a local"):
        get_many(["ssh://a/b"], "/etc/hostname", tmp_path, config=cfg)
    with pytest.raises(TypeError, match=r"hosts\[1\]"):
        put_many([local_sshd.host, 3], src, "/tmp/x", config=cfg)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="unexpected keyword"):
        put_many([local_sshd.host], src, "/tmp/x", bogus=1, config=cfg)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="concurrency"):
        put_many([local_sshd.host], src, "/tmp/x", concurrency=0, config=cfg)
    assert set(_masters(local_sshd)) <= before  # no master was started


# -- the acceptance: 20 files on 8 hosts, both ways -----------------------------------
def test_put_and_get_20_files_on_8_hosts_round_trip(
    local_sshd_factory: Factory, local_sshd: LocalSSHD, remote_dir: Path, tmp_path: Path
) -> None:
    sshd = local_sshd_factory(hosts=8)
    src = tmp_path / "src"
    sums = _tree(src, 20)
    assert len(sums) == 20
    reused = connect(sshd.hosts[0], config=sshd.config)  # a Connection: reused, left open
    try:
        pid = reused.master_pid
        hosts: list[str | Connection] = [reused, *sshd.hosts[1:]]
        seen: dict[str, int] = {}

        def progress(host: str, done: int, total: int) -> None:
            seen[host] = done

        results = put_many(hosts, src, f"{remote_dir}/%h", config=sshd.config, on_progress=progress)
        assert _statuses(results) == [(h, "ok") for h in sshd.hosts], results
        total = sum((i * 15_013) % 300_000 for i in range(20))
        for r in results:
            assert r.error is None and r.transferred == r.total == total == seen[r.host]
            assert r.connect_time is not None and r.started is not None
            assert r.target == f"{remote_dir}/{r.host}"
            assert _sums(remote_dir / r.host) == sums, r.host
        out = tmp_path / "out"
        back = get_many(hosts, f"{remote_dir}/%h", out, config=sshd.config)
        assert _statuses(back) == [(h, "ok") for h in sshd.hosts], back
        for r in back:
            assert r.target == str(out / r.host)
            assert _sums(out / r.host / r.host) == sums, r.host
        assert reused.alive and reused.master_pid == pid
        assert _masters(sshd) == [pid]  # every master started here is gone
    finally:
        reused.close()


def test_a_percent_h_local_path_is_each_hosts_exact_destination(
    local_sshd_factory: Factory, remote_dir: Path, tmp_path: Path
) -> None:
    sshd = local_sshd_factory(hosts=3)
    for h in sshd.hosts:
        (tmp_path / f"{h}.conf").write_text(f"config of {h}\n")
    results = put_many(
        sshd.hosts, tmp_path / "%h.conf", f"{remote_dir}/%h.conf", config=sshd.config
    )
    assert all(r.ok for r in results), results
    for h in sshd.hosts:
        assert (remote_dir / f"{h}.conf").read_text() == f"config of {h}\n"
    back = get_many(
        sshd.hosts, f"{remote_dir}/%h.conf", tmp_path / "got" / "%h.txt", config=sshd.config
    )
    assert all(r.ok for r in back), back
    assert sorted(os.listdir(tmp_path / "got")) == [f"{h}.txt" for h in sshd.hosts]
    for h in sshd.hosts:
        assert (tmp_path / "got" / f"{h}.txt").read_text() == f"config of {h}\n"


# -- one host fails, alone, with its typed error ----------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_refused_or_unauthorised_host_fails_alone(
    local_sshd_factory: Factory, remote_dir: Path, tmp_path: Path
) -> None:
    sshd = local_sshd_factory(hosts=2)
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host refused\n    HostName 127.0.0.1\n    Port {_free_port()}\n"
        "Host badauth\n    HostName 127.0.0.1\n    User nobody-sshwrap-x\n"
        f"Host *\n    Include {sshd.config}\n"
    )
    src = tmp_path / "f.txt"
    src.write_bytes(b"payload\n" * 1000)
    hosts = [sshd.hosts[0], "refused", "badauth", sshd.hosts[1]]
    results = put_many(hosts, src, f"{remote_dir}/%h.txt", config=str(config))
    assert _statuses(results) == [
        (sshd.hosts[0], "ok"),
        ("refused", "ssh_error"),
        ("badauth", "ssh_error"),
        (sshd.hosts[1], "ok"),
    ], results
    assert type(results[1].error) is SSHConnectionError, repr(results[1].error)
    assert "refused" in str(results[1].error)
    assert isinstance(results[2].error, AuthenticationError), repr(results[2].error)
    assert sorted(os.listdir(remote_dir)) == [f"{h}.txt" for h in sshd.hosts]
    # a transfer error is "failed", typed as the transfer raised it
    back = get_many(sshd.hosts, f"{remote_dir}/no-such-%h", tmp_path / "out", config=sshd.config)
    assert [r.status for r in back] == ["failed", "failed"]
    assert all(isinstance(r.error, RemoteFileNotFoundError) for r in back)
    assert not (tmp_path / "out" / sshd.hosts[0]).exists()  # no empty directory left
    assert not _masters(sshd)


# -- faults: a master killed mid-transfer, the deadline, cancellation -------------------------
def _kill_master_of(sshd: LocalSSHD, host: str) -> None:
    pids = [
        p
        for p in _masters(sshd)
        if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[-2] == host.encode()
    ]
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)


@pytest.mark.parametrize("direction", ["put", "get"])
def test_a_master_killed_mid_transfer_leaves_no_partial_file(
    local_sshd_factory: Factory, remote_dir: Path, tmp_path: Path, direction: str
) -> None:
    sshd = local_sshd_factory(hosts=2)
    victim, other = sshd.hosts
    killed = False

    def kill_once(host: str, done: int, total: int) -> None:
        nonlocal killed
        if host == victim and done and not killed:
            killed = True
            _kill_master_of(sshd, victim)

    big = os.urandom(40 * MB)
    if direction == "put":
        src = tmp_path / "big.bin"
        src.write_bytes(big)
        results = put_many(
            sshd.hosts, src, f"{remote_dir}/%h.bin", config=sshd.config, on_progress=kill_once
        )
        finals = [n for n in os.listdir(remote_dir) if ".sshwrap-" not in n]
        assert finals == [f"{other}.bin"]  # (the victim's remote temporary file may remain)
    else:
        for h in sshd.hosts:
            (remote_dir / f"{h}.bin").write_bytes(big)
            os.chmod(remote_dir / f"{h}.bin", 0o644)
        out = tmp_path / "out"
        results = get_many(
            sshd.hosts, f"{remote_dir}/%h.bin", out, config=sshd.config, on_progress=kill_once
        )
        assert os.listdir(out) == [other]  # the victim's directory (empty) is gone
        assert (out / other / f"{other}.bin").read_bytes() == big
    assert killed
    assert _statuses(results) == [(victim, "ssh_error"), (other, "ok")], results
    assert type(results[0].error) is SSHConnectionError, repr(results[0].error)
    assert not _masters(sshd)


def _sparse(path: Path, size: int) -> None:
    """A sparse file: quick to make and to read, still ``size`` bytes to send."""
    with open(path, "wb") as f:
        f.truncate(size)


def test_a_host_frozen_mid_transfer_times_out_alone(
    local_sshd_factory: Factory, remote_dir: Path, tmp_path: Path
) -> None:
    sshd = local_sshd_factory(hosts=1)
    healthy = local_sshd_factory(hosts=1)  # another server, that keeps answering
    _sparse(tmp_path / "frozen.bin", 400 * MB)
    (tmp_path / f"{healthy.host}.bin").write_bytes(b"small\n")
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host frozen\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
        f"    IdentityFile {sshd.identity}\n    UserKnownHostsFile {sshd.known_hosts}\n"
        f"Host *\n    Include {healthy.config}\n"
    )
    frozen: list[int] = []

    def freeze_once(host: str, done: int, total: int) -> None:
        if host == "frozen" and done and not frozen:
            frozen.extend(freeze(sshd))

    try:
        results = put_many(
            ["frozen", healthy.host],
            tmp_path / "%h.bin",
            f"{remote_dir}/%h.bin",
            config=str(config),
            timeout=4,
            on_progress=freeze_once,
        )
    finally:
        thaw(sshd, frozen)
    assert frozen
    assert _statuses(results) == [("frozen", "timeout"), (healthy.host, "ok")], results
    r = results[0]
    assert r.connect_time is not None and r.error is None and 0 < r.transferred < 400 * MB
    assert 4 <= r.duration - r.connect_time < 4 + 1.5, r
    assert [n for n in os.listdir(remote_dir) if ".sshwrap-" not in n] == [f"{healthy.host}.bin"]
    assert not _masters(sshd) and not _masters(healthy)


def test_the_deadline_bounds_the_whole_call(local_sshd_factory: Factory, tmp_path: Path) -> None:
    sshd = local_sshd_factory(hosts=3)
    src = tmp_path / "f"
    src.write_bytes(b"x")
    pids = freeze(sshd)  # every host hangs before its banner
    try:
        t0 = time.monotonic()
        results = put_many(
            sshd.hosts, src, "/tmp/never-%h", config=sshd.config, deadline=1.5, concurrency=2
        )
        elapsed = time.monotonic() - t0
    finally:
        thaw(sshd, pids)
    assert elapsed < 1.5 + 1.0, elapsed
    assert _statuses(results) == [(h, "timeout") for h in sshd.hosts], results
    assert results[2].started is None  # (concurrency 2: never started)
    wait_until(lambda: not _masters(sshd), 2, "no master left")


def test_cancelling_put_many_async_stops_every_host_and_leaves_nothing(
    local_sshd_factory: Factory, remote_dir: Path, tmp_path: Path
) -> None:
    sshd = local_sshd_factory(hosts=3)
    src = tmp_path / "big.bin"
    _sparse(src, 400 * MB)
    cancelled_at: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        moving: set[str] = set()
        task: asyncio.Task[list[CopyResult]] | None = None

        def cancel() -> None:  # once every host's bytes are moving
            assert task is not None
            cancelled_at.append(time.monotonic())
            loop.call_soon_threadsafe(task.cancel)

        all_moving = threading.Barrier(len(sshd.hosts), action=cancel)

        def progress(host: str, done: int, total: int) -> None:
            if done and host not in moving:
                moving.add(host)
                all_moving.wait(60)  # (holds the fast hosts until the last one moves)

        task = asyncio.ensure_future(
            fleet.put_many_async(
                sshd.hosts, src, f"{remote_dir}/%h.bin", config=sshd.config, on_progress=progress
            )
        )
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    elapsed = time.monotonic() - cancelled_at[0]
    assert elapsed < 1.5, elapsed  # (every stop, its cleanup and its master's close)
    # every transfer stopped at a chunk and removed its temporary file: nothing remains
    assert os.listdir(remote_dir) == []
    assert not _masters(sshd)


CTRL_C_CHILD = """
import sys, threading, time
from sshwrap import fleet
hosts, config, op, src, dst = sys.argv[1:]
moving = set()
all_moving = threading.Barrier(len(hosts), action=lambda: print("MOVING", flush=True))
def progress(host, done, total):
    if done and host not in moving:
        moving.add(host)
        all_moving.wait(60)
try:
    getattr(fleet, op)(hosts, src, dst, config=config, on_progress=progress)
    print("COMPLETED", flush=True)
except fleet.CopyInterrupted as e:
    print("KI", time.monotonic(), ",".join(r.status for r in e.results), flush=True)
print("EXITED", flush=True)
"""


@pytest.mark.parametrize("op", ["put_many", "get_many"])
def test_ctrl_c_stops_every_host_and_raises_with_the_results(
    local_sshd_factory: Factory, remote_dir: Path, tmp_path: Path, op: str
) -> None:
    sshd = local_sshd_factory(hosts=3)
    out_dir = tmp_path / "out"
    if op == "put_many":
        _sparse(tmp_path / "big.bin", 400 * MB)
        paths = [str(tmp_path / "big.bin"), f"{remote_dir}/%h.bin"]
    else:
        for h in sshd.hosts:
            _sparse(remote_dir / f"{h}.bin", 400 * MB)
            os.chmod(remote_dir / f"{h}.bin", 0o644)
        paths = [f"{remote_dir}/%h.bin", str(out_dir)]
    before = sorted(os.listdir(remote_dir))
    args = [sshd.hosts, sshd.config, op, *paths]
    with start_child(CTRL_C_CHILD.replace("sys.argv[1:]", repr(args))) as child:
        child.wait_line("MOVING", 60)
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        child.wait(30)
        out = child.stdout
        ki = [ln.split() for ln in out.splitlines() if ln.startswith("KI ")]
        assert ki, out + child.stderr
        assert float(ki[0][1]) - sent < 1.5, f"{float(ki[0][1]) - sent:.2f} s after SIGINT"
        assert ki[0][2] == "cancelled,cancelled,cancelled"
        assert "EXITED" in out
        assert leftovers(child.mark) == []
    # nothing partial, and no temporary file, on either side
    assert sorted(os.listdir(remote_dir)) == before
    assert not out_dir.exists() or list(out_dir.rglob("*")) == []
    assert not _masters(sshd)


# -- a stopped upload keeps its bound and removes its temporary file (H20) --------------------
@pytest.mark.parametrize("bound", ["timeout", "deadline"])
def test_a_stopped_big_upload_keeps_its_bound_and_leaves_no_temporary_file(
    local_sshd_factory: Factory, remote_dir: Path, tmp_path: Path, bound: str
) -> None:
    """A 40 GB upload stopped by ``timeout``/``deadline`` (2 s) on two hosts: each host is done
    within about 1 s of the bound, and removes its remote temporary file."""
    sshd = local_sshd_factory(hosts=2)
    src = tmp_path / "huge.bin"
    _sparse(src, 40_000 * MB)
    timeout, deadline = (2.0, None) if bound == "timeout" else (None, 2.0)
    t0 = time.monotonic()
    results = put_many(
        sshd.hosts,
        src,
        f"{remote_dir}/%h.bin",
        config=sshd.config,
        timeout=timeout,
        deadline=deadline,
    )
    elapsed = time.monotonic() - t0
    assert _statuses(results) == [(h, "timeout") for h in sshd.hosts], results
    assert os.listdir(remote_dir) == []  # no final file, no temporary file
    for r in results:
        assert r.connect_time is not None and 0 < r.transferred < 40_000 * MB, r
        if bound == "timeout":
            assert 2 <= r.duration - r.connect_time < 2 + 1.2, r
    if bound == "deadline":
        assert elapsed < 2 + 1.2, elapsed
    assert not _masters(sshd)


def _ssh_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == "ssh":
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _sftp_sessions(sshd: LocalSSHD) -> set[int]:
    """Live ``ssh ... -s -- HOST sftp`` clients of this test (over a master of ``sshd``)."""
    out = set()
    for pid in _ssh_pids():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = any(sshd.config.encode() in a for a in args)
        if ours and args[-2:-1] == [b"sftp"] and b"-s" in args and is_running(pid):
            out.add(pid)
    return out


def test_a_host_stalled_through_the_stop_still_removes_its_temporary_file(
    local_sshd_factory: Factory, remote_dir: Path, tmp_path: Path
) -> None:
    """The stop of a host that stalls mid-upload (frozen: its acks stop coming) cannot end at
    a chunk boundary: the stream is cut, and once the host answers again (thawed as soon as
    the upload's fresh cleanup session starts: an ``ssh -s`` client, where the upload's own
    session is the master's, with no process) the temporary file is removed all the same,
    within the bound."""
    sshd = local_sshd_factory(hosts=1)
    src = tmp_path / "huge.bin"
    _sparse(src, 40_000 * MB)
    frozen: list[int] = []
    first: set[int] = set()
    thawed = threading.Event()

    def freeze_once(host: str, done: int, total: int) -> None:
        if done and not frozen:
            first.update(_sftp_sessions(sshd))
            frozen.extend(freeze(sshd))

    def thaw_at_the_fresh_session() -> None:
        wait_until(lambda: frozen and _sftp_sessions(sshd) - first, 30, "a fresh sftp session")
        thaw(sshd, frozen)
        thawed.set()

    watcher = threading.Thread(target=thaw_at_the_fresh_session, daemon=True)
    watcher.start()
    try:
        results = put_many(
            sshd.hosts,
            src,
            f"{remote_dir}/%h.bin",
            config=sshd.config,
            timeout=2,
            on_progress=freeze_once,
        )
    finally:
        thaw(sshd, frozen)
    assert frozen and not first  # the upload's session ran in the master: no ssh of its own
    assert thawed.is_set(), "the stop opened no fresh session to remove the temporary file"
    watcher.join(5)
    assert _statuses(results) == [(sshd.host, "timeout")], results
    r = results[0]
    assert r.connect_time is not None and 2 <= r.duration - r.connect_time < 2 + 1.5, r
    assert os.listdir(remote_dir) == []  # no final file, no temporary file
    assert not _masters(sshd)
