"""Fan-out (``sshwrap.run_many`` / ``sshwrap.aio.run_many``) against real sshds."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_fanout_helpers import (
    ALIAS_ENV,
    Hosts,
    alive,
    comm,
    descendants,
    mixed_config,
    wait_until,
    write_config,
)

import sshwrap
from sshwrap.errors import AuthenticationError, SSHConnectionError
from sshwrap.fanout import (
    FDS_PER_HOST,
    FanoutInterrupted,
    FdBudgetError,
    HostResult,
    check_fd_budget,
    run_many,
    run_many_async,
)
from sshwrap.testing import LocalSSHD

N = 24  # aliases, over the 8 addresses of one sshd


@pytest.fixture(scope="module")
def server() -> Iterator[LocalSSHD]:
    with LocalSSHD(hosts=8) as sshd:
        yield sshd


@pytest.fixture(scope="module")
def many(server: LocalSSHD, tmp_path_factory: pytest.TempPathFactory) -> Hosts:
    return write_config(server, N, tmp_path_factory.mktemp("fanout"))


@pytest.fixture
def mixed(server: LocalSSHD, tmp_path: Path) -> Iterator[Hosts]:
    with LocalSSHD() as hang, mixed_config(server, hang, 20, tmp_path) as m:
        hang.suspend()
        try:
            yield m
        finally:
            hang.resume()


def _ssh_children() -> list[int]:
    return [p for p in descendants(os.getpid()) if comm(p) == "ssh"]


def _destination(pid: int) -> str:
    """The last argument but one of an ``ssh ... destination command`` process."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return ""
    return args[-2].decode() if len(args) >= 2 else ""


def _by_host(results: list[HostResult]) -> dict[str, HostResult]:
    return {r.host: r for r in results}


def test_mixed_hosts_each_get_their_own_result(mixed: Hosts) -> None:
    """20 good hosts + refused + hanging + wrong key: each right, run bounded by the timeout."""
    good = mixed.hosts
    hosts = [mixed.hang, *good[:10], mixed.refused, *good[10:], mixed.badkey]
    connect_timeout = 4.0
    t0 = time.monotonic()
    results = run_many(
        hosts,
        f'echo "${ALIAS_ENV}"',
        config=mixed.config,
        concurrency=8,  # fewer slots than hosts: the hanging one must not hold the others up
        connect_timeout=connect_timeout,
        timeout=30,
    )
    elapsed = time.monotonic() - t0
    assert [r.host for r in results] == hosts  # input order
    by = _by_host(results)
    for alias in good:
        r = by[alias]
        assert r.status == "ok", (alias, r)
        assert r.returncode == 0 and r.error is None
        # Each host's output is its own (the alias its ssh config sent along).
        assert r.stdout == f"{alias}\n".encode()
        assert r.stderr == b""
        assert r.duration < connect_timeout, (alias, r.duration)
        assert r.connect_time is not None and r.connect_time <= r.duration
    refused = by[mixed.refused]
    assert refused.status == "ssh_error" and isinstance(refused.error, SSHConnectionError)
    assert "refused" in refused.error.message
    assert refused.returncode is None
    assert refused.duration < connect_timeout
    bad = by[mixed.badkey]
    assert bad.status == "ssh_error" and isinstance(bad.error, AuthenticationError)
    assert "Permission denied" in bad.error.message
    hang = by[mixed.hang]
    assert hang.status == "ssh_error" and isinstance(hang.error, SSHConnectionError)
    assert "timed out" in str(hang.error).lower() or "connect_timeout" in str(hang.error)
    assert connect_timeout - 0.5 <= hang.duration <= connect_timeout + 2.0
    # The whole run: the hanging host's own timeout plus a small margin.
    assert elapsed < connect_timeout + 3.0
    assert _ssh_children() == []


def test_returncodes_signal_and_exit_255(many: Hosts) -> None:
    cmd = (
        f'case "${ALIAS_ENV}" in h2) exit 255;; h3) kill -9 $$;;'
        " h4) echo out; echo err >&2; exit 0;; esac; exit 3"
    )
    results = run_many(many.hosts[:4], cmd, config=many.config)
    r1, r2, r3, r4 = results
    assert (r1.status, r1.returncode, r1.error) == ("failed", 3, None)
    assert (r2.status, r2.returncode, r2.error) == ("failed", 255, None)
    assert r3.status == "failed" and r3.returncode is not None and r3.returncode < 0
    assert r3.signalled and r3.error is None
    assert (r4.status, r4.returncode, r4.stdout, r4.stderr) == ("ok", 0, b"out\n", b"err\n")
    assert not r1.signalled and not r2.signalled


def test_list_commands_are_quoted_and_bytes_are_exact(many: Hosts) -> None:
    results = run_many(
        many.hosts[:3],
        ["printf", "%s|", "a b", "$HOME", "", "it's"],
        config=many.config,
    )
    assert all(r.stdout == b"a b|$HOME||it's|" for r in results)
    big = run_many(
        many.hosts[:3],
        "head -c 3000000 /dev/zero | tr '\\0' '\\377'; printf '\\000x' >&2",
        config=many.config,
    )
    for r in big:
        assert r.ok
        assert r.stdout == b"\xff" * 3_000_000
        assert r.stderr == b"\x00x"


def test_input_goes_to_every_host(many: Hosts) -> None:
    data = bytes(range(256)) * 1000
    results = run_many(many.hosts[:5], ["cat"], config=many.config, input=data)
    assert all(r.ok and r.stdout == data for r in results)
    # Without input, stdin is /dev/null: a reading command sees EOF at once.
    results = run_many(many.hosts[:2], "wc -c", config=many.config)
    assert [r.stdout.strip() for r in results] == [b"0", b"0"]


def test_command_timeout_stops_local_and_remote(
    local_sshd_factory: Callable[..., LocalSSHD],
) -> None:
    sshd = local_sshd_factory(hosts=3)
    t0 = time.monotonic()
    results = run_many(sshd.hosts, ["sleep", "60"], config=sshd.config, timeout=1)
    elapsed = time.monotonic() - t0
    for r in results:
        assert r.status == "timeout" and r.timed_out and r.returncode is None
        assert r.connect_time is not None
        assert r.duration - r.connect_time < 1 + 1.5  # the timeout, then TERM's grace at most
    assert elapsed < 6
    assert _ssh_children() == []
    # The remote sleeps are gone too (the remote kill), within a few seconds.
    wait_until(lambda: sshd.session_pids() == [], 8, "remote sessions to end")


def test_deadline_bounds_the_whole_run(many: Hosts) -> None:
    t0 = time.monotonic()
    results = run_many(many.hosts[:3], "sleep 60", config=many.config, concurrency=1, deadline=2)
    elapsed = time.monotonic() - t0
    assert elapsed < 2 + 2.5
    assert [r.status for r in results] == ["timeout"] * 3
    assert results[0].started is not None
    assert results[1].started is None and results[2].started is None


def test_async_yields_as_hosts_finish(many: Hosts) -> None:
    cmd = f'case "${ALIAS_ENV}" in h1) sleep 2;; esac; echo done'

    async def main() -> list[str]:
        order = []
        async for r in sshwrap.aio.run_many(many.hosts[:4], cmd, config=many.config):
            assert r.ok and r.stdout == b"done\n"
            order.append(r.host)
        return order

    order = asyncio.run(main())
    assert sorted(order) == many.hosts[:4]
    assert order[-1] == many.hosts[0]


def test_aio_exposes_run_many() -> None:
    import sshwrap.aio

    assert sshwrap.aio.run_many is run_many_async


def test_sync_run_many_inside_a_loop_points_to_the_async_one(many: Hosts) -> None:
    async def main() -> None:
        run_many(many.hosts[:1], "true", config=many.config)

    with pytest.raises(RuntimeError, match=r"sshwrap\.aio\.run_many"):
        asyncio.run(main())
    assert run_many([], "true") == []


def test_cancelling_the_task_ends_every_ssh(
    many: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the FIFO dir goes
    hosts = many.hosts[:10]

    async def main() -> tuple[list[int], float]:
        up: set[str] = set()
        all_up = asyncio.Event()
        pids: list[int] = []

        def on_output(host: str, stream: int, data: bytes) -> None:
            up.add(host)
            if len(up) == len(hosts):
                all_up.set()

        async def consume() -> None:
            async for _ in run_many_async(
                hosts, "echo up; sleep 60", config=many.config, on_output=on_output
            ):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(all_up.wait(), 30)
        pids += _ssh_children()
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pids, time.monotonic() - t0

    pids, took = asyncio.run(main())
    assert len(pids) == len(hosts)
    assert took < 3
    assert not any(alive(p) for p in pids)
    assert _ssh_children() == []
    assert os.listdir(tmp_path) == []  # the FIFO directory is gone


def test_ctrl_c_in_sync_run_many_returns_partial_results(many: Hosts) -> None:
    hosts = many.hosts[:6]
    cmd = f'case "${ALIAS_ENV}" in h1) echo quick; exit 0;; esac; echo up; sleep 60'
    seen: set[str] = set()
    ready = threading.Event()

    def on_output(host: str, stream: int, data: bytes) -> None:
        seen.add(host)
        if len(seen) == len(hosts):
            ready.set()

    sent: list[float] = []

    def h1_running() -> bool:
        return any(_destination(p) == hosts[0] for p in _ssh_children())

    def interrupt() -> None:
        # Every host has printed, and h1's ssh has exited (the loop may not have seen it yet:
        # it must still count as done, not cancelled).
        if ready.wait(30):
            wait_until(lambda: not h1_running(), what="h1's ssh to exit")
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    # Ctrl-C must reach Python as KeyboardInterrupt (a runner started in the background by
    # a shell without job control inherits SIGINT ignored).
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    t = threading.Thread(target=interrupt)
    t.start()
    try:
        with pytest.raises(FanoutInterrupted) as info:
            run_many(hosts, cmd, config=many.config, on_output=on_output)
        stopped = time.monotonic()
    finally:
        t.join()
        signal.signal(signal.SIGINT, old)
    # Promptly: not when the remote `sleep 60` ends (the SIGINT may reach another thread).
    assert stopped - sent[0] < 15
    results = info.value.results
    assert isinstance(info.value, KeyboardInterrupt)
    assert [r.host for r in results] == hosts
    assert results[0].status == "ok" and results[0].stdout == b"quick\n"
    for r in results[1:]:
        assert r.status == "cancelled" and r.stdout == b"up\n"
    assert _ssh_children() == []


def test_host_done_before_the_interrupt_keeps_its_result(many: Hosts) -> None:
    """A host whose ssh exited just before Ctrl-C (unseen by the loop) is done, not cancelled."""
    shared = tempfile.mkdtemp(prefix="sshwrap-go-")  # the remote user must see it
    os.chmod(shared, 0o755)
    go = Path(shared) / "go"
    try:
        _interrupt_after_h1_exits(many, go)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _interrupt_after_h1_exits(many: Hosts, go: Path) -> None:
    hosts = many.hosts[:3]
    cmd = (
        f'case "${ALIAS_ENV}" in h1) while [ ! -e {go} ]; do sleep 0.05; done; echo quick; '
        "exit 0;; esac; echo up; sleep 60"
    )
    seen: set[str] = set()

    def h1_running() -> bool:
        return any(_destination(p) == hosts[0] for p in _ssh_children())

    def on_output(host: str, stream: int, data: bytes) -> None:
        if host != hosts[0]:
            seen.add(host)
            if len(seen) == len(hosts) - 1:
                go.touch()  # the others run: now h1 may finish
            return
        # h1's output, inside the loop: wait for its ssh to exit, then Ctrl-C before the
        # loop can see that exit.
        wait_until(lambda: not h1_running(), what="h1's ssh to exit")
        raise KeyboardInterrupt

    with pytest.raises(FanoutInterrupted) as info:
        run_many(hosts, cmd, config=many.config, on_output=on_output, deadline=60)
    results = info.value.results
    assert results[0].status == "ok" and results[0].stdout == b"quick\n", results[0]
    assert results[0].returncode == 0
    for r in results[1:]:
        assert r.status == "cancelled" and r.stdout == b"up\n"
    assert _ssh_children() == []


@dataclass
class _Conn:
    destination: str
    control_path: str


def test_reuses_a_control_master(many: Hosts) -> None:
    d = tempfile.mkdtemp(prefix="sshwrap-t-")
    path = os.path.join(d, "m")
    base = ["ssh", "-F", many.config, "-o", f"ControlPath={path}"]
    subprocess.run(
        [*base, "-M", "-N", "-f", many.hosts[1]],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    try:
        results = run_many(
            [_Conn(many.hosts[1], path), many.hosts[2]],
            ["echo", "hi"],
            config=many.config,
        )
        assert [r.stdout for r in results] == [b"hi\n", b"hi\n"]
        assert "master session id" in results[0].ssh_log  # went through the master
        assert "master session id" not in results[1].ssh_log
    finally:
        subprocess.run([*base, "-O", "exit", many.hosts[1]], capture_output=True, timeout=30)
        shutil.rmtree(d, ignore_errors=True)  # the master may not have unlinked its socket yet


def test_exit_255_and_signal_through_a_control_master(many: Hosts) -> None:
    """Through a master, the mux client learns the status at DEBUG2 only: the short log
    (``LogVerbose`` on the mux client's session) still tells 255 and a signal from a failure."""
    d = tempfile.mkdtemp(prefix="sshwrap-t-")
    path = os.path.join(d, "m")
    base = ["ssh", "-F", many.config, "-o", f"ControlPath={path}"]
    subprocess.run(
        [*base, "-M", "-N", "-f", many.hosts[1]],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    try:
        conn = _Conn(many.hosts[1], path)
        (r255,) = run_many([conn], "exit 255", config=many.config)
        assert "master session id" in r255.ssh_log  # went through the master
        assert (r255.status, r255.returncode, r255.error) == ("failed", 255, None)
        (sig,) = run_many([conn], "kill -9 $$", config=many.config)
        assert sig.status == "failed" and sig.signalled and sig.error is None
        assert sig.returncode is not None and sig.returncode < 0
    finally:
        subprocess.run([*base, "-O", "exit", many.hosts[1]], capture_output=True, timeout=30)
        shutil.rmtree(d, ignore_errors=True)


def test_ssh_log_is_the_short_log(many: Hosts) -> None:
    """OpenSSH 8.5+: ``LogLevel=VERBOSE`` with ``LogVerbose`` for the lines read (tagged)."""
    (r,) = run_many(many.hosts[:1], "echo hi", config=many.config)
    assert r.ok and r.stdout == b"hi\n" and r.connect_time is not None
    lines = r.ssh_log.splitlines()
    assert any("(pid=" in ln and "Sending command: " in ln for ln in lines)
    assert any("rtype exit-status" in ln for ln in lines)
    assert "Reading configuration data" not in r.ssh_log  # no plain DEBUG1 line
    assert len(lines) < 15, r.ssh_log


def test_reuses_masters_from_the_users_ssh_config(many: Hosts) -> None:
    """ControlMaster=auto + ControlPersist: the forked master keeps ssh's log open; the run
    must not wait on it, and the next run goes through the masters."""
    d = tempfile.mkdtemp(prefix="sshwrap-t-")
    opts = {"ControlMaster": "auto", "ControlPath": f"{d}/%C", "ControlPersist": "60"}
    hosts = many.hosts[:3]
    try:
        first = run_many(hosts, "echo hi", config=many.config, options=opts)
        assert [r.stdout for r in first] == [b"hi\n"] * 3
        assert all(r.duration < 2 for r in first)  # no wait for the master's log to close
        assert sorted(os.listdir(d)) and len(os.listdir(d)) == 3  # three masters up
        again = run_many(hosts, "echo hi", config=many.config, options=opts)
        assert all(r.ok and "master session id" in r.ssh_log for r in again)
    finally:
        for h in hosts:
            subprocess.run(
                ["ssh", "-F", many.config, "-o", f"ControlPath={d}/%C", "-O", "exit", h],
                capture_output=True,
                timeout=30,
            )
    wait_until(lambda: not os.listdir(d), 10, "the masters to exit")
    os.rmdir(d)


def test_runs_over_sshwrap_connections(many: Hosts) -> None:
    conns = [sshwrap.connect(h, config=many.config) for h in many.hosts[:3]]
    try:
        results = run_many([*conns, many.hosts[3]], "echo hi; kill -9 $$", config=many.config)
        for conn, r in zip(conns, results[:3], strict=False):
            assert r.host == conn.destination and r.stdout == b"hi\n"
            assert r.returncode == -9 and r.signalled  # exact over a Connection
            assert r.ssh_log == ""  # no ssh process of its own
        assert results[3].signalled and results[3].returncode is not None
        timed = run_many(conns, "sleep 30", timeout=1)
        assert [r.status for r in timed] == ["timeout"] * 3
        assert all(r.duration < 3 for r in timed)
    finally:
        for c in conns:
            c.close()
    assert _ssh_children() == []


def test_runs_over_async_connections_through_the_core(many: Hosts) -> None:
    """An AsyncConnection host is a channel of its master too (no ssh of its own, the exact
    -signum), and the fan-out never starts a process for it."""
    import sshwrap.aio

    async def main() -> list[HostResult]:
        conns = [await sshwrap.aio.connect(h, config=many.config) for h in many.hosts[:2]]
        try:
            started = len(_ssh_children())
            out = [r async for r in run_many_async(conns, "echo hi; kill -TERM $$")]
            assert len(_ssh_children()) == started  # only the two masters
            return out
        finally:
            for c in conns:
                await c.close()

    results = asyncio.run(main())
    assert sorted(r.host for r in results) == sorted(many.hosts[:2])
    for r in results:
        assert r.stdout == b"hi\n" and r.returncode == -signal.SIGTERM and r.signalled
        assert r.ssh_log == "" and r.status == "failed"
    assert _ssh_children() == []


def test_fd_budget_refuses_what_the_limit_cannot_hold() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    too_many = hard // FDS_PER_HOST + 100
    with pytest.raises(FdBudgetError) as info:
        check_fd_budget(too_many)
    e = info.value
    assert isinstance(e, sshwrap.SSHWrapError) and isinstance(e, ValueError)
    assert e.max_concurrency < too_many
    assert "open-files limit" in str(e) and str(e.max_concurrency) in str(e)
    try:
        # The largest concurrency it names does fit.
        check_fd_budget(max(1, e.max_concurrency))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_fd_budget_refusal_happens_before_any_ssh(many: Hosts) -> None:
    code = (
        "import resource, sshwrap\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        f"hosts = {many.hosts!r}\n"
        "try:\n"
        f"    sshwrap.run_many(hosts, 'true', config={many.config!r}, concurrency=20)\n"
        "except sshwrap.FdBudgetError as e:\n"
        "    print('refused', e.max_concurrency)\n"
        "r = sshwrap.run_many(hosts, 'true', config="
        f"{many.config!r}, concurrency=5)\n"
        "print(sum(x.ok for x in r))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    lines = out.stdout.split("\n")
    assert lines[0].startswith("refused ")
    assert 0 < int(lines[0].split()[1]) < 20
    assert lines[1] == str(N)


def test_fd_budget_raises_the_soft_limit_when_the_hard_one_allows() -> None:
    code = (
        "import resource\n"
        "from sshwrap.fanout import check_fd_budget\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))\n"
        "check_fd_budget(100)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert int(out.stdout) >= 100 * FDS_PER_HOST


def test_concurrency_caps_processes_and_fds(many: Hosts) -> None:
    base_fds = len(os.listdir("/proc/self/fd"))
    seen_ssh: list[int] = []
    seen_fds: list[int] = []

    def on_start(host: str) -> None:  # just before each new ssh starts
        seen_ssh.append(len(_ssh_children()))
        seen_fds.append(len(os.listdir("/proc/self/fd")))

    results = run_many(
        many.hosts[:12], "sleep 0.3", config=many.config, concurrency=3, on_start=on_start
    )
    assert all(r.ok for r in results)
    assert len(seen_ssh) == 12
    assert max(seen_ssh) <= 2  # never more than 3 at once, counting the one starting
    assert max(seen_ssh) >= 1  # and the run did overlap them
    assert max(seen_fds) <= base_fds + 3 * FDS_PER_HOST + 4


def test_no_fd_or_child_leak(many: Hosts) -> None:
    run_many(many.hosts[:1], "true", config=many.config)  # opens the shared /dev/null once
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        results = run_many(many.hosts, "true", config=many.config, concurrency=N)
        assert all(r.ok for r in results)
    assert set(os.listdir("/proc/self/fd")) - before == set()
    assert _ssh_children() == []


def test_log_through_a_fifo_where_proc_fd_cannot_be_reopened(
    many: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The non-Linux path: ssh's DEBUG1 log through a FIFO still tells 255 from a signal."""
    from sshwrap.io.host_process import HostProcess

    monkeypatch.setattr(HostProcess, "log_through_proc_fd", False)
    made: list[str] = []
    real_mkfifo = os.mkfifo

    def mkfifo(path: str, mode: int = 0o666) -> None:
        made.append(path)
        real_mkfifo(path, mode)

    monkeypatch.setattr(os, "mkfifo", mkfifo)
    cmd = f'case "${ALIAS_ENV}" in h2) exit 255;; h3) kill -9 $$;; esac; echo up; exit 3'
    r1, r2, r3 = run_many(many.hosts[:3], cmd, config=many.config)
    assert len(made) == 3
    assert not any(os.path.exists(p) for p in made)  # removed with their directory
    assert (r1.status, r1.returncode, r1.stdout) == ("failed", 3, b"up\n")
    assert r1.connect_time is not None and "Sending command" in r1.ssh_log
    assert (r2.returncode, r2.error, r2.signalled) == (255, None, False)
    assert r3.signalled and r3.returncode is not None and r3.returncode < 0
    assert _ssh_children() == []


def test_remote_command_untagged_without_timeout(many: Hosts) -> None:
    """No timeout/deadline: the remote shell gets the command exactly as plain ssh sends it."""
    cmd = "cat /proc/$$/cmdline"
    plain, timed = (
        run_many(many.hosts[:1], cmd, config=many.config, timeout=t)[0] for t in (None, 30.0)
    )
    assert plain.ok and timed.ok
    # The session's shell ran as ``$SHELL -c <what ssh sent>``.
    assert plain.stdout.split(b"\0")[1:3] == [b"-c", cmd.encode()]
    sent = timed.stdout.split(b"\0")[2]
    assert sent.startswith(b"export SSHWRAP_SESSION=") and sent.endswith(b"\n" + cmd.encode())


@pytest.mark.parametrize("epoll", [True, False], ids=["epoll", "loop"])
def test_fd_watcher_calls_back_while_readable_and_forgets_removed_fds(epoll: bool) -> None:
    """The hosts' fds behind one loop registration (and the per-fd fallback): a callback per
    readable fd, level-triggered, none after ``remove``; ``close`` leaves the loop clean."""
    from sshwrap.io.fd_watcher import FdWatcher

    async def main() -> list[tuple[int, bytes]]:
        loop = asyncio.get_running_loop()
        watcher = FdWatcher(loop, epoll=epoll)
        pipes = [os.pipe() for _ in range(3)]
        got: list[tuple[int, bytes]] = []
        done = asyncio.Event()

        def readable(fd: int) -> None:
            got.append((fd, os.read(fd, 1)))  # one byte a call: level-triggered brings the rest
            if len(got) == 4:
                done.set()

        try:
            for r, _ in pipes:
                watcher.add(r, readable)
            watcher.remove(pipes[2][0])
            watcher.remove(pipes[2][0])  # twice: nothing
            os.write(pipes[0][1], b"ab")
            os.write(pipes[1][1], b"cd")
            os.write(pipes[2][1], b"never read")
            await asyncio.wait_for(done.wait(), 5)
            watcher.close()
            os.write(pipes[0][1], b"e")
            await asyncio.sleep(0)  # a loop turn: nothing is called any more
            await asyncio.sleep(0)
        finally:
            watcher.close()  # idempotent
            for r, w in pipes:
                os.close(r)
                os.close(w)
        return sorted(got)

    got = asyncio.run(main())
    assert [data for _, data in got] == [b"a", b"b", b"c", b"d"]


def test_ssh_starts_without_popen_with_the_env_and_inherits_no_fd(
    many: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ssh starts without ``subprocess.Popen`` (vfork + exec through subprocess's own C
    part on Linux CPython 3.11-3.13, else ``os.posix_spawn``: about half the parent's CPU
    per host) with the caller's environment, and, as with Popen's ``close_fds``, no fd the
    caller left inheritable reaches it, however many there are."""
    real_ssh = shutil.which("ssh")
    assert real_ssh is not None
    out = tmp_path / "seen"
    wrapper = tmp_path / "ssh-wrapper"
    wrapper.write_text(
        f'#!/bin/sh\ncase "$1" in -V) exec {real_ssh} -V;; esac\n'  # (the version, asked once)
        'ls /proc/$$/fd > "$SSHWRAP_T_OUT.$$.fds"\n'
        'echo "$SSHWRAP_T_VAR" > "$SSHWRAP_T_OUT.$$.env"\n'
        f'exec {real_ssh} "$@"\n'
    )
    wrapper.chmod(0o700)
    monkeypatch.setenv("SSHWRAP_T_OUT", str(out))
    monkeypatch.setenv("SSHWRAP_T_VAR", "from-the-caller")
    popens: list[list[str]] = []
    real_popen = subprocess.Popen

    class CountingPopen(real_popen):  # type: ignore[misc,valid-type]
        def __init__(self, args: list[str], *a: object, **kw: object) -> None:
            if args[1:] != ["-V"]:
                popens.append(list(args))
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", CountingPopen)

    def run(inheritable: int) -> None:
        r, w = os.pipe()
        extra = [os.dup2(r, 300 + i) for i in range(inheritable)]  # dup2: inheritable
        try:
            results = run_many(many.hosts[:3], "true", config=many.config, ssh=str(wrapper))
        finally:
            for fd in (r, w, *extra):
                os.close(fd)
        assert all(x.ok for x in results), results

    run(1)
    assert popens == []
    envs = sorted(tmp_path.glob("seen.*.env"))
    assert [p.read_text() for p in envs] == ["from-the-caller\n"] * 3
    run(70)
    if sys.version_info[:2] <= (3, 13) and sys.platform.startswith("linux"):
        assert popens == []  # (posix_spawn elsewhere: past a few such fds, Popen)
    fds = sorted(tmp_path.glob("seen.*.fds"))
    assert len(fds) == 6
    for p in fds:
        assert not [n for n in p.read_text().split() if int(n) >= 300], p.read_text()


def test_an_ssh_that_cannot_start_is_each_hosts_ssh_error(tmp_path: Path) -> None:
    """The exec's own error (no such file, not executable) comes back for every host."""
    not_exec = tmp_path / "ssh"
    not_exec.write_text("#!/bin/sh\n")
    not_exec.chmod(0o644)
    for ssh, words in ((str(tmp_path / "missing"), "No such file"), (str(not_exec), "denied")):
        results = run_many(["h1", "h2"], "true", ssh=ssh)
        for r in results:
            assert r.status == "ssh_error" and "cannot run ssh" in str(r.error), r
            assert words in str(r.error) and ssh in str(r.error)
