"""Fan-out under faults: every bound kept, nothing left running (issue 9, items 4, 5, 11).

Real hosts only: healthy ones (one ``LocalSSHD`` with 19 aliases), one behind a veth link the
test cuts (``netns_sshd``) and one whose sshd and sessions the test freezes (SIGSTOP).  The
bad hosts are broken *after* their session is up (they print ``UP-NOW`` first), so the
fan-out's timeout path (local stop plus the remote stop, a second ssh) is what is measured.

Each face is checked: ``run_many`` (sync), ``sshwrap.aio.run_many`` (async) and
``sshwrap-many`` in a child process.  A call must return within its bound + 1 s (the margin the
fan-out documents), with the healthy hosts' full results; afterwards no ssh of the call is
left (in this process: no child, thread or fd; for a child program: no marked process after
it exited).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faults import (
    InProcessLeaks,
    NetnsSSHD,
    cmdline,
    describe,
    freeze,
    leftovers,
    ssh_descendants,
    start_child,
    thaw,
)
from faults import cut_sshd as cut_sshd  # a fixture
from test_fanout_helpers import ALIAS_ENV, write_config
from waiting import wait_until

import sshwrap
from sshwrap.errors import SSHConnectionError
from sshwrap.fanout import FanoutInterrupted, HostResult, run_many, run_many_async
from sshwrap.testing import LocalSSHD, wait_exited

MARGIN = 1.0  # what the fan-out promises on top of every bound
UP = "UP-NOW"
# The bad hosts print UP-NOW and hang on; the healthy ones answer at once.
CMD = f'case "${ALIAS_ENV}" in cut|frozen) echo {UP}; sleep 30;; esac; echo "ok ${ALIAS_ENV}"'

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
EACH_FACE = pytest.mark.parametrize("face", ["sync", "async"])  # run_many, aio.run_many


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSSHD]:
    with LocalSSHD(hosts=19) as sshd:
        # The first fan-out of a process opens what every later one shares (the /dev/null
        # its children get as stdin): done here, so the leak checks see only the call's own.
        cfg = write_config(sshd, 1, tmp_path_factory.mktemp("warm"))
        assert run_many(cfg.hosts, "true", config=cfg.config)[0].ok
        yield sshd


@pytest.fixture
def frozen_host() -> Iterator[LocalSSHD]:
    with LocalSSHD() as sshd:
        try:
            yield sshd
        finally:
            thaw(sshd)


@dataclass
class Fleet:
    """One ssh config: 19 healthy aliases, and the bad ones (``cut``, ``frozen``) first."""

    config: str
    good: list[str]
    bad: dict[str, Callable[[], object]]  # alias -> the fault to apply once it is up
    up_at: dict[str, float] = field(default_factory=dict)  # alias -> when UP-NOW arrived
    broken: threading.Event = field(default_factory=threading.Event)
    done: set[str] = field(default_factory=set)  # healthy hosts that printed their line
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def hosts(self) -> list[str]:
        return [*self.bad, *self.good]

    def on_output(self, host: str, stream: int, data: bytes) -> None:
        """Break a bad host as soon as it is up (in a thread: ``ip`` must not stall the loop)."""
        if host not in self.bad:
            if data == f"ok {host}\n".encode():
                self.done.add(host)
        elif host not in self.up_at and UP.encode() in data:
            self.up_at[host] = time.monotonic()
            self._start_fault(host)

    def _start_fault(self, host: str) -> None:
        def apply() -> None:
            self.bad[host]()
            if len(self.up_at) == len(self.bad):
                self.broken.set()

        t = threading.Thread(target=apply)
        t.start()
        self._threads.append(t)

    def join(self) -> None:
        for t in self._threads:
            t.join(30)
        self._threads.clear()


def _fleet(
    tmp: Path,
    healthy: LocalSSHD,
    cut: NetnsSSHD | None = None,
    frozen: LocalSSHD | None = None,
) -> Fleet:
    hosts = write_config(healthy, 19, tmp)
    lines: list[str] = []
    bad: dict[str, Callable[[], object]] = {}
    bads: list[tuple[str, LocalSSHD, Callable[[], object]]] = []
    if cut is not None:
        bads.append(("cut", cut.sshd, cut.cut))
    if frozen is not None:
        bads.append(("frozen", frozen, lambda: freeze(frozen)))
    for alias, sshd, fault in bads:
        bad[alias] = fault
        lines += [
            f"Host {alias}",
            f"    HostName {sshd.addresses[0]}",
            f"    Port {sshd.port}",
            f"    IdentityFile {sshd.identity}",
            f"    UserKnownHostsFile {sshd.known_hosts}",
            f"    SetEnv {ALIAS_ENV}={alias}",
        ]
    cfg = Path(hosts.config)
    cfg.write_text("\n".join(lines) + "\n" + cfg.read_text())
    return Fleet(str(cfg), hosts.hosts, bad)


def _check(fleet: Fleet, results: list[HostResult], bad_status: str = "timeout") -> None:
    """Healthy hosts: their full result; bad ones: a typed outcome, their output so far."""
    assert [r.host for r in results] == fleet.hosts
    for r in results:
        if r.host in fleet.bad:
            assert r.status == bad_status, r
            assert r.returncode is None
            assert r.stdout == f"{UP}\n".encode(), r
        else:
            assert r.status == "ok", r
            assert r.stdout == f"ok {r.host}\n".encode() and r.stderr == b""


def _many(face: str, hosts: list[Any], cmd: str, **kw: Any) -> list[HostResult]:
    """``run_many`` (sync) or all that ``run_many_async`` yields (async), in input order."""
    if face == "sync":
        return run_many(hosts, cmd, **kw)

    async def main() -> list[HostResult]:
        return sorted([r async for r in run_many_async(hosts, cmd, **kw)], key=lambda r: r.index)

    return asyncio.run(main())


def _run(face: str, fleet: Fleet, **kw: Any) -> tuple[list[HostResult], float]:
    """One call of the sync or async face; (results, seconds it took)."""
    t0 = time.monotonic()
    results = _many(face, fleet.hosts, CMD, config=fleet.config, on_output=fleet.on_output, **kw)
    return results, time.monotonic() - t0


def _ssh_children() -> list[int]:
    return ssh_descendants()


def _clean_after(leaks: InProcessLeaks) -> None:
    assert _ssh_children() == [], describe(_ssh_children())
    leaks.assert_clean(2)


# -- run_many and aio.run_many: deadline, timeout, connect_timeout ----------------------------


def _deadline_kept(face: str, fleet: Fleet, deadline: float, **kw: Any) -> None:
    """A call with ``deadline``, its bad hosts broken once up: back within the deadline +
    MARGIN, with the healthy hosts' full results and nothing of the call left."""
    with InProcessLeaks() as leaks:
        results, took = _run(face, fleet, deadline=deadline, **kw)
        fleet.join()
        assert fleet.broken.is_set()
        assert took <= deadline + MARGIN, took
        _check(fleet, results)
        _clean_after(leaks)


@EACH_FACE
def test_deadline_with_a_cut_link(
    face: str, healthy: LocalSSHD, cut_sshd: NetnsSSHD, tmp_path: Path
) -> None:
    """deadline=8, connect_timeout=4, one link cut mid-session: 23 s before the fix."""
    _deadline_kept(face, _fleet(tmp_path, healthy, cut=cut_sshd), 8, connect_timeout=4)


@EACH_FACE
def test_timeout_with_a_cut_link(
    face: str, healthy: LocalSSHD, cut_sshd: NetnsSSHD, tmp_path: Path
) -> None:
    """timeout=6 (from the session being up), one link cut mid-session: 22 s before."""
    fleet = _fleet(tmp_path, healthy, cut=cut_sshd)
    with InProcessLeaks() as leaks:
        t0 = time.monotonic()
        results, took = _run(face, fleet, timeout=6)
        end = t0 + took
        fleet.join()
        # The command's timeout runs from its session being up: UP-NOW came after that.
        assert end - fleet.up_at["cut"] <= 6 + MARGIN, end - fleet.up_at["cut"]
        _check(fleet, results)
        _clean_after(leaks)


@EACH_FACE
def test_deadline_with_a_frozen_sshd(
    face: str, healthy: LocalSSHD, frozen_host: LocalSSHD, tmp_path: Path
) -> None:
    """deadline=6, the host's sshd and session SIGSTOPped once up: 21 s before."""
    _deadline_kept(face, _fleet(tmp_path, healthy, frozen=frozen_host), 6)


@EACH_FACE
def test_connect_timeout_with_a_cut_link_names_the_host(
    face: str, healthy: LocalSSHD, cut_sshd: NetnsSSHD, tmp_path: Path
) -> None:
    """A link cut before the run: SSHConnectionError naming the host, within the bound."""
    fleet = _fleet(tmp_path, healthy, cut=cut_sshd)
    cut_sshd.cut()
    with InProcessLeaks() as leaks:
        results, took = _run(face, fleet, connect_timeout=4, deadline=8)
        assert took <= 4 + MARGIN, took
        bad = results[0]
        assert bad.host == "cut" and bad.status == "ssh_error" and bad.stdout == b""
        assert isinstance(bad.error, SSHConnectionError) and "cut" in str(bad.error)
        assert all(r.ok and r.stdout == f"ok {r.host}\n".encode() for r in results[1:])
        _clean_after(leaks)


@EACH_FACE
def test_deadline_on_a_healthy_host_is_kept(face: str, healthy: LocalSSHD, tmp_path: Path) -> None:
    """deadline=1 on ``sleep 30``: ~1 s (the remote stop used to add ~2 s on top)."""
    hosts = write_config(healthy, 3, tmp_path)
    with InProcessLeaks() as leaks:
        t0 = time.monotonic()
        results = _many(face, hosts.hosts, "sleep 30", config=hosts.config, deadline=1)
        took = time.monotonic() - t0
        assert took <= 1 + MARGIN, took
        assert [r.status for r in results] == ["timeout"] * 3
        _clean_after(leaks)
    # The remote sleeps were stopped too.
    wait_until(lambda: healthy.session_pids() == [], 10, "remote sessions to end")


# -- Ctrl-C and cancellation with a frozen host and a cut host --------------------------------


STOP_SCRIPT = b"/proc/[0-9]*/environ"  # in the remote stop's script (not in the command's)


def _remote_stops() -> list[int]:
    """This process's helper ssh children that stop a remote command (the signal script)."""
    return [pid for pid in _ssh_children() if STOP_SCRIPT in cmdline(pid)]


def _second_stop_seen(stops: Callable[[], list[int]]) -> Callable[[], bool]:
    """A condition: the remote stops of two hosts have started, the latter still running."""
    seen: set[int] = set()

    def cond() -> bool:
        now = set(stops())
        new = now - seen
        seen.update(now)
        return len(seen) >= 2 and bool(new)

    return cond


# ``when(act)`` runs in a thread: it waits for the moment to interrupt, then calls ``act()``.
When = Callable[[Callable[[], None]], None]


def _ctrl_c(when: When, hosts: list[Any], cmd: str, **kw: Any) -> tuple[FanoutInterrupted, float]:
    """``run_many`` with ``when`` sending this process SIGINT: what it raised, and when."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    t = threading.Thread(target=when, args=(lambda: os.kill(os.getpid(), signal.SIGINT),))
    t.start()
    try:
        with pytest.raises(FanoutInterrupted) as info:
            run_many(hosts, cmd, **kw)
        stopped = time.monotonic()
    finally:
        t.join(60)
        signal.signal(signal.SIGINT, old)
    return info.value, stopped


def _cancel(when: When, hosts: list[Any], cmd: str, **kw: Any) -> float:
    """``run_many_async`` in a task that ``when`` cancels: when ``asyncio.run`` returned."""

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def consume() -> None:
            async for _ in run_many_async(hosts, cmd, **kw):
                pass

        task = asyncio.ensure_future(consume())
        t = threading.Thread(target=when, args=(lambda: loop.call_soon_threadsafe(task.cancel),))
        t.start()
        try:
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await asyncio.to_thread(t.join, 60)

    asyncio.run(main())
    # The cancel itself, and leaving the loop (no worker thread left to wait for).
    return time.monotonic()


# Two hosts at a time, the bad ones first: when their remote stops are under way, the healthy
# hosts are still running or waiting (the run is in full swing, not in its final cleanup).
KW: dict[str, Any] = {"timeout": 2, "concurrency": 2}


@EACH_FACE
def test_interrupt_with_frozen_and_cut_sshds(
    face: str,
    healthy: LocalSSHD,
    cut_sshd: NetnsSSHD,
    frozen_host: LocalSSHD,
    tmp_path: Path,
) -> None:
    """Ctrl-C (sync) / task cancel (async) while the bad hosts' remote stops hang: <~1 s."""
    fleet = _fleet(tmp_path, healthy, cut=cut_sshd, frozen=frozen_host)
    sent: list[float] = []

    def when_stops_hang(act: Callable[[], None]) -> None:
        # Both bad hosts timed out and their remote stops are under way (they cannot
        # connect): interrupt now.
        if fleet.broken.wait(60):
            wait_until(_second_stop_seen(_remote_stops), 30, "both remote stops to start")
            sent.append(time.monotonic())
            act()

    kw: dict[str, Any] = {"config": fleet.config, "on_output": fleet.on_output, **KW}
    with InProcessLeaks() as leaks:
        if face == "sync":
            caught, stopped = _ctrl_c(when_stops_hang, fleet.hosts, CMD, **kw)
            assert isinstance(caught, KeyboardInterrupt)
            results = caught.results
            # The bad hosts timed out (or, still being stopped, were cancelled); of the
            # healthy ones, those still running or waiting were cancelled.
            for r in results:
                allowed = ("ok", "cancelled") if r.host in fleet.good else ("timeout", "cancelled")
                assert r.status in allowed, r
            assert any(r.status == "cancelled" for r in results)
        else:
            stopped = _cancel(when_stops_hang, fleet.hosts, CMD, **kw)
        fleet.join()
        assert sent, "never interrupted"
        assert stopped - sent[0] <= MARGIN, stopped - sent[0]
        _clean_after(leaks)


# -- sshwrap-many in a child program ----------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as from an interactive shell
    from sshwrap.many_cli import main
    rc = main({argv!r})
    print("RETURNED", flush=True)
    sys.exit(rc)
    """
)


def _cli(fleet: Fleet, *args: str) -> str:
    return CHILD.format(argv=["-F", fleet.config, "-H", ",".join(fleet.hosts), *args, "--", CMD])


def _prefix(fleet: Fleet, host: str) -> str:
    return host.ljust(max(len(h) for h in fleet.hosts)) + " | "


def _summary_seconds(stderr: str) -> float:
    m = re.search(r"(\d+) hosts in ([0-9.]+) s", stderr)
    assert m, stderr
    return float(m.group(2))


@pytest.mark.parametrize(
    ("fault", "args", "bound"),
    [
        ("cut", ("--deadline", "8", "--connect-timeout", "4"), 8.0),
        ("cut", ("-t", "6"), 6.0),
        ("frozen", ("--deadline", "6"), 6.0),
    ],
)
def test_cli_bounds(
    fault: str,
    args: tuple[str, ...],
    bound: float,
    healthy: LocalSSHD,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    if fault == "cut":
        fleet = _fleet(tmp_path, healthy, cut=request.getfixturevalue("cut_sshd"))
    else:
        fleet = _fleet(tmp_path, healthy, frozen=request.getfixturevalue("frozen_host"))
    with start_child(_cli(fleet, *args)) as child:
        child.wait_line(_prefix(fleet, fault) + UP, 60)
        up = time.monotonic()
        fleet.bad[fault]()
        child.wait_line("RETURNED", 60)
        returned = time.monotonic()
        rc = child.wait(30)
        assert rc == 2, child.stderr  # the "timed out" bit only
        if args[0] == "-t":
            assert returned - up <= bound + MARGIN, returned - up  # from the session being up
        else:
            assert _summary_seconds(child.stderr) <= bound + MARGIN, child.stderr
        for h in fleet.good:
            assert f"{_prefix(fleet, h)}ok {h}\n" in child.stdout
        assert f"{_prefix(fleet, fault)}[timed out]" in child.stderr
        assert leftovers(child.mark) == [], describe(leftovers(child.mark))


def test_cli_timeout_on_a_healthy_host(healthy: LocalSSHD, tmp_path: Path) -> None:
    """``sshwrap-many -t 1`` on ``sleep 30``: ~1 s, not ~2.9 s."""
    hosts = write_config(healthy, 3, tmp_path)
    code = CHILD.format(
        argv=["-F", hosts.config, "-H", ",".join(hosts.hosts), "-t", "1", "--", "sleep 30"]
    )
    with start_child(code) as child:
        assert child.wait(30) == 2, child.stderr
        assert _summary_seconds(child.stderr) <= 1 + MARGIN, child.stderr
        assert leftovers(child.mark) == [], describe(leftovers(child.mark))


def test_cli_ctrl_c_with_frozen_and_cut_sshds(
    healthy: LocalSSHD, cut_sshd: NetnsSSHD, frozen_host: LocalSSHD, tmp_path: Path
) -> None:
    fleet = _fleet(tmp_path, healthy, cut=cut_sshd, frozen=frozen_host)
    with start_child(_cli(fleet, "-t", "2", "-p", "2")) as child:
        for host in fleet.bad:
            child.wait_line(_prefix(fleet, host) + UP, 60)
        for fault in fleet.bad.values():
            fault()

        def stops() -> list[int]:
            from sshwrap.testing import descendants

            return [p for p in descendants(child.proc.pid) if STOP_SCRIPT in cmdline(p)]

        wait_until(_second_stop_seen(stops), 30, "both remote stops to start")
        t0 = time.monotonic()
        child.send_signal(signal.SIGINT)
        rc = child.wait(30)
        took = time.monotonic() - t0
        assert rc == 130, child.stderr
        assert took <= MARGIN, took
        assert "interrupted: 21 hosts" in child.stderr
        assert leftovers(child.mark) == [], describe(leftovers(child.mark))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# -- hosts given as Connections whose master died and whose host hangs (item 5) ---------------


@contextlib.contextmanager
def _dead_master_on_a_hung_host(sshd: LocalSSHD) -> Iterator[sshwrap.Connection]:
    """A Connection that worked, whose master was then SIGKILLed, to a host that now hangs."""
    conn = sshwrap.connect(sshd.host, config=sshd.config)
    try:
        assert conn.run("true").returncode == 0
        pid = conn.master_pid
        os.kill(pid, signal.SIGKILL)
        assert wait_exited([pid], 10) == []
        pids = freeze(sshd)
        try:
            yield conn
        finally:
            thaw(sshd, pids)
    finally:
        conn.close()


def _restarting(conn: sshwrap.Connection) -> Callable[[], bool]:
    """A condition: an ssh of this process is (re)starting ``conn``'s master."""
    needle = conn.control_path.encode()
    return lambda: any(needle in cmdline(p) for p in _ssh_children())


@EACH_FACE
def test_connection_with_a_dead_master_keeps_the_deadline(
    face: str, healthy: LocalSSHD, frozen_host: LocalSSHD, tmp_path: Path
) -> None:
    """deadline=5 over a Connection whose master died on a hung host: 60 s before."""
    cfg = write_config(healthy, 3, tmp_path)
    with _dead_master_on_a_hung_host(frozen_host) as conn, InProcessLeaks() as leaks:
        hosts: list[Any] = [conn, *cfg.hosts]
        t0 = time.monotonic()
        results = _many(face, hosts, "echo hi", config=cfg.config, deadline=5)
        took = time.monotonic() - t0
        assert took <= 5 + MARGIN, took
        bad = results[0]
        assert bad.host == conn.destination and bad.status in ("timeout", "ssh_error"), bad
        if bad.error is not None:
            assert isinstance(bad.error, SSHConnectionError) and conn.destination in str(bad.error)
        assert all(r.ok and r.stdout == b"hi\n" for r in results[1:]), results
        _clean_after(leaks)


@EACH_FACE
def test_connection_with_a_dead_master_interrupt(
    face: str, frozen_host: LocalSSHD, tmp_path: Path
) -> None:
    """Ctrl-C (sync) / cancel (async) while the master restarts on a hung host: 60 s before."""
    sent: list[float] = []
    with _dead_master_on_a_hung_host(frozen_host) as conn, InProcessLeaks() as leaks:

        def when_restarting(act: Callable[[], None]) -> None:
            wait_until(_restarting(conn), 30, "the master's restart")
            sent.append(time.monotonic())
            act()

        if face == "sync":
            caught, stopped = _ctrl_c(when_restarting, [conn], "true")
            assert [r.status for r in caught.results] == ["cancelled"]
        else:
            stopped = _cancel(when_restarting, [conn], "true")
        assert sent, "never interrupted"
        assert stopped - sent[0] <= MARGIN, stopped - sent[0]
        _clean_after(leaks)


# -- run_many and aio.run_many in a child program: nothing left after it exits ----------------

LIB_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from sshwrap.fanout import run_many, run_many_async
    from sshwrap.testing import comm, descendants

    hosts, cmd, config, face = {hosts!r}, {cmd!r}, {config!r}, {face!r}
    told = set()

    def on_output(host, stream, data):
        if host == "frozen" and b"{up}" in data and not told:
            told.add(host)
            print("FAULT-NOW", flush=True)

    kw = dict(config=config, on_output=on_output, deadline=6)
    t0 = time.monotonic()
    if face == "sync":
        results = run_many(hosts, cmd, **kw)
    else:
        async def main():
            return [r async for r in run_many_async(hosts, cmd, **kw)]
        results = asyncio.run(main())
    took = time.monotonic() - t0
    left = [p for p in descendants(os.getpid()) if comm(p) == "ssh"]
    ok = sum(r.ok for r in results)
    timeout = [r.host for r in results if r.status == "timeout"]
    print("RETURNED", took, len(left), ok, ",".join(timeout), flush=True)
    """
)


@EACH_FACE
def test_library_in_a_child_program_leaves_nothing(
    face: str, healthy: LocalSSHD, frozen_host: LocalSSHD, tmp_path: Path
) -> None:
    """deadline=6 with a frozen sshd: bounded, and no ssh left once the program has exited."""
    fleet = _fleet(tmp_path, healthy, frozen=frozen_host)
    code = LIB_CHILD.format(hosts=fleet.hosts, cmd=CMD, config=fleet.config, face=face, up=UP)
    with start_child(code) as child:
        child.wait_line("FAULT-NOW", 60)
        fleet.bad["frozen"]()
        child.wait_line("RETURNED", 60)
        assert child.wait(30) == 0, child.stderr
        line = child.stdout.split("RETURNED ", 1)[1].splitlines()[0].split()
        took, left, ok, timed_out = float(line[0]), int(line[1]), int(line[2]), line[3]
        assert took <= 6 + MARGIN, took
        assert left == 0  # after the call returned
        assert ok == len(fleet.good) and timed_out == "frozen"
        assert leftovers(child.mark) == [], describe(leftovers(child.mark))  # after the exit
