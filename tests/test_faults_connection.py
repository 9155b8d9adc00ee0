"""Faults under a Connection: its master killed under load, a host that hangs while a dead
master is restarted, a frozen session, Ctrl-C and cancellation, oversized commands, spawn()
over a lost connection (issue 9, items 3, 5, 6, 9, 10).  Real sshds, namespaces, processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faults import (
    ChildProc,
    InProcessLeaks,
    cmdline,
    describe,
    frozen,
    known_hosts_with_other_key,
    leftovers,
    netns_sshd,
    ssh_descendants,
    start_child,
)
from waiting import wait_until

import sshwrap
from sshwrap.aio.connection import AsyncConnection
from sshwrap.connection import Connection, connect
from sshwrap.core.invocation import MASTER_GONE, STOP_MARGIN, MasterGoneError
from sshwrap.core.session import open_session
from sshwrap.core.waiting import run_sync
from sshwrap.errors import UNKNOWN_SIGNAL, CommandLostError, SSHConnectionError, TimeoutExpired
from sshwrap.io.deadline import deadline_after
from sshwrap.io.master import NO_DIRECT_LOGIN
from sshwrap.io.mux_control import pack_string
from sshwrap.io.pump import MAX_COMMAND
from sshwrap.testing import LocalSSHD, descendants, is_running, wait_exited

MARGIN = 1.0  # what a bound may be overrun by (the documented margin)


@pytest.fixture
def sshd(local_sshd_factory: Callable[..., LocalSSHD]) -> LocalSSHD:
    """A LocalSSHD of this test's own (these tests stop, freeze and kill its parts)."""
    return local_sshd_factory()


@pytest.fixture
def conn(sshd: LocalSSHD) -> Iterator[Connection]:
    with connect(sshd.host, config=sshd.config) as c:
        yield c


def _kill_master(c: Connection) -> int:
    pid = c.master_pid
    os.kill(pid, signal.SIGKILL)
    assert wait_exited([pid], 10) == []
    return pid


def _no_ssh_left() -> None:
    """No ssh below this process (the starting ssh was killed *and* reaped)."""
    left = ssh_descendants()
    assert left == [], f"ssh processes left: {describe(left)}"


# -- item 3: nothing lost when the master dies ------------------------------------------------
def test_status_before_the_end_of_output_then_master_lost_is_an_error(conn: Connection) -> None:
    """Deterministic: sshd sends exit-status while output still waits for window (nobody
    reads the pipe), then the master dies.  Before: wait() returned 0 with the output cut."""
    n = 3 * 1024 * 1024 + 64 * 1024
    p = conn.Popen(f"head -c {n} /dev/zero", stdout=subprocess.PIPE)
    ch = p.channel
    wait_until(lambda: ch.exit_status is not None, 30, "the exit status to arrive")
    assert not ch.remote_eof  # the output is not all here: the race, held open
    _kill_master(conn)
    assert p.stdout is not None
    got = p.stdout.read()
    assert len(got) < n
    with pytest.raises(SSHConnectionError) as info:
        p.wait(10)
    assert isinstance(info.value, CommandLostError)
    assert info.value.exit_status == 0
    assert p.returncode == 255 and p.ssh_error is info.value
    p.stdout.close()


def _check_results(results: list[object], kills: int) -> None:
    ok = sum(1 for r in results if r == "ok")
    lost = [r for r in results if isinstance(r, SSHConnectionError)]
    bad = [r for r in results if r != "ok" and not isinstance(r, SSHConnectionError)]
    assert bad == [], f"{len(bad)} calls returned something else: {bad[:5]}"
    assert ok > kills  # the load went on over the restarted masters
    for e in lost:
        if isinstance(e, CommandLostError) and isinstance(e.stdout, bytes):
            assert b"ok\n".startswith(e.stdout)  # what arrived, attached


def _oks(results: list[object]) -> int:
    return sum(1 for r in results if r == "ok")


def _outcome(call: Callable[[], Any]) -> object:
    try:
        r = call()
    except SSHConnectionError as e:
        return e
    except Exception as e:  # anything else is a wrong answer, reported by _check_results
        return e
    if r.returncode == 0 and r.stdout == b"ok\n" and r.stderr == b"":
        return "ok"
    return r  # a returncode without its full output


def test_master_killed_20_times_under_20_threads(conn: Connection) -> None:
    kills = 20
    results: list[object] = []
    lock = threading.Lock()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            got = _outcome(lambda: conn.run("echo ok", capture_output=True, timeout=60))
            with lock:
                results.append(got)

    threads = [threading.Thread(target=loop) for _ in range(20)]
    for t in threads:
        t.start()
    try:
        for i in range(kills + 1):  # after the last kill too: the load goes on
            before = _oks(results)

            def busy_on_new_master(b: int = before) -> bool:
                return is_running(conn.master_pid) and _oks(results) > b + 20

            wait_until(busy_on_new_master, 60, "calls to succeed on the (new) master")
            if i < kills:
                _kill_master(conn)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert conn.restarts >= kills
    _check_results(results, kills)


def test_master_killed_20_times_under_20_asyncio_tasks(conn: Connection) -> None:
    kills = 20
    results: list[object] = []

    async def main() -> None:
        ac = AsyncConnection(conn)
        stop = asyncio.Event()

        async def loop() -> None:
            while not stop.is_set():
                try:
                    r = await ac.run("echo ok", capture_output=True, timeout=60)
                except Exception as e:
                    results.append(e)
                    continue
                results.append(_outcome(lambda: r))  # noqa: B023 (called at once)

        tasks = [asyncio.ensure_future(loop()) for _ in range(20)]
        try:
            for i in range(kills + 1):  # after the last kill too: the load goes on
                before = _oks(results)
                t_end = time.monotonic() + 60
                while not (is_running(conn.master_pid) and _oks(results) > before + 20):
                    assert time.monotonic() < t_end, "no calls succeeded on the new master"
                    await asyncio.sleep(0.01)  # the re-check interval
                if i == kills:
                    break
                pid = conn.master_pid
                os.kill(pid, signal.SIGKILL)
                assert await asyncio.to_thread(wait_exited, [pid], 10) == []
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 120)

    asyncio.run(main())
    assert conn.restarts >= kills
    _check_results(results, kills)


# -- item 9: one oversized command disturbs nothing -------------------------------------------
def test_oversized_command_is_refused_before_anything_is_sent(conn: Connection) -> None:
    stop = threading.Event()
    results: list[object] = []
    pid, core = conn.master_pid, conn.master.ready()

    def loop() -> None:
        while not stop.is_set():
            results.append(_outcome(lambda: conn.run("echo ok", capture_output=True)))

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) > 8, 30, "calls in flight")
        for _ in range(3):
            with pytest.raises(ValueError, match=str(MAX_COMMAND)) as info:
                conn.run(["echo", "y" * 300_000], capture_output=True)
            assert isinstance(info.value, sshwrap.SSHWrapError)  # CommandTooLongError
            assert getattr(info.value, "limit", None) == MAX_COMMAND
        with pytest.raises(ValueError, match=str(MAX_COMMAND)):
            conn.Popen(["echo", "y" * 300_000])
        with pytest.raises(ValueError, match=str(MAX_COMMAND)):
            asyncio.run(AsyncConnection(conn).run(["echo", "y" * 300_000]))
        n = len(results)
        wait_until(lambda: len(results) > n + 8, 30, "more calls after the refusals")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert all(r == "ok" for r in results), [r for r in results if r != "ok"][:3]
    assert conn.master_pid == pid and conn.master.ready() is core and conn.restarts == 0


@pytest.mark.parametrize("cipher", ["chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com"])
def test_command_size_limit_both_sides(sshd: LocalSSHD, cipher: str) -> None:
    """MAX_COMMAND bytes reach the server and its answer comes back on that channel alone;
    one byte more is refused locally.  (A Linux server cannot exec a ``sh -c`` string that
    long, MAX_ARG_STRLEN: its answer is its own error, on that channel only.)"""
    with connect(sshd.host, config=sshd.config, options={"Ciphers": cipher}) as c:
        pid, core = c.master_pid, c.master.ready()
        at_limit = "echo ok; #" + "y" * (MAX_COMMAND - 10)
        assert len(at_limit) == MAX_COMMAND
        r = c.run(at_limit, capture_output=True, timeout=60)
        assert r.returncode == 1 and b"Argument list too long" in r.stderr  # the server's word
        assert c.run("echo ok", capture_output=True).stdout == b"ok\n"
        assert c.master_pid == pid and c.master.ready() is core and c.restarts == 0  # nothing broke
        with pytest.raises(ValueError, match=f"at most {MAX_COMMAND} bytes"):
            c.run(at_limit + "y", capture_output=True)
        # under the shell's own limit the long command runs
        long_ok = "echo ok; #" + "y" * 120_000
        assert c.run(long_ok, capture_output=True).stdout == b"ok\n"


def test_limit_measured_against_the_real_master(sshd: LocalSSHD) -> None:
    """The measurement behind MAX_COMMAND (8-byte-block cipher): 15 bytes over it still fit
    in one packet, 16 over make sshd drop the connection ("Bad packet length")."""
    with connect(
        sshd.host, config=sshd.config, options={"Ciphers": "chacha20-poly1305@openssh.com"}
    ) as c:
        core = c.master.ready()
        assert core is not None

        def raw_exec(size: int) -> Any:
            ch = run_sync(open_session(core, deadline_after(30)))
            cmd = "exit 7; #" + "y" * (size - 9)
            ch.setup_io(*_discard())
            ch.request("exec", pack_string(cmd), want_reply=True)  # no size check: raw
            ch.closed.wait(30)
            return ch

        ch = raw_exec(MAX_COMMAND + 15)
        assert not ch.lost and c.restarts == 0
        pid = c.master_pid
        ch = raw_exec(MAX_COMMAND + 16)
        assert ch.lost
        assert wait_exited([pid], 10) == []  # the server dropped the whole connection


def _discard() -> tuple[Any, Any, Any]:
    from sshwrap.io.pump import Sink, Source

    return Source(), Sink(), Sink()


# -- items 5/6: bounds with a dead master and a hung host -------------------------------------
def _timed(call: Callable[[], object]) -> tuple[float, BaseException | None]:
    t0 = time.monotonic()
    try:
        call()
    except BaseException as e:
        return time.monotonic() - t0, e
    return time.monotonic() - t0, None


def test_restart_against_a_hung_host_keeps_the_timeout(conn: Connection, sshd: LocalSSHD) -> None:
    _kill_master(conn)
    conn.run("true", timeout=60)  # restarted: the dead core's thread and socket are gone now
    _kill_master(conn)
    sshd.suspend()
    try:
        with InProcessLeaks() as leaks:
            took, err = _timed(lambda: conn.run("true", timeout=3))
            assert isinstance(err, SSHConnectionError), err
            assert took < 3 + MARGIN, took
            _no_ssh_left()
            # again: the second restart is bounded the same way
            took, err = _timed(lambda: conn.run("true", timeout=2))
            assert isinstance(err, SSHConnectionError) and took < 2 + MARGIN, (err, took)
            _no_ssh_left()
            # the first call closed the dead master's socket and pump: nothing else is left
            leaks.assert_clean(2)
    finally:
        sshd.resume()
    assert conn.run("echo back", capture_output=True, timeout=60).stdout == b"back\n"


def test_fallback_restart_against_a_hung_host_keeps_the_timeout(sshd: LocalSSHD) -> None:
    """The ``ssh -S`` fallback (``proxy=False``) restarts its master under the same bound."""
    with connect(sshd.host, config=sshd.config, proxy=False) as c:
        assert not c.uses_proxy
        assert c.run("echo ok", capture_output=True).stdout == b"ok\n"
        _kill_master(c)
        sshd.suspend()
        try:
            took, err = _timed(lambda: c.run("true", timeout=3))
            assert isinstance(err, SSHConnectionError), err
            assert took < 3 + MARGIN, took
            _no_ssh_left()
        finally:
            sshd.resume()


def test_restart_over_a_cut_link_keeps_the_timeout_sync_and_async() -> None:
    with netns_sshd() as box:
        c = connect(box.sshd.host, config=box.sshd.config)
        try:
            _kill_master(c)
            box.cut()
            took, err = _timed(lambda: c.run("true", timeout=3))
            assert isinstance(err, SSHConnectionError) and took < 3 + MARGIN, (err, took)
            _no_ssh_left()
            took, err = _timed(lambda: asyncio.run(AsyncConnection(c).run("true", timeout=3)))
            assert isinstance(err, SSHConnectionError) and took < 3 + MARGIN, (err, took)
            _no_ssh_left()
        finally:
            c.close()


def test_async_restart_against_a_hung_host_timeout_and_cancel(
    conn: Connection, sshd: LocalSSHD
) -> None:
    _kill_master(conn)
    sshd.suspend()

    async def main() -> None:
        ac = AsyncConnection(conn)
        t0 = time.monotonic()
        with pytest.raises(SSHConnectionError):
            await ac.run("true", timeout=3)
        assert time.monotonic() - t0 < 3 + MARGIN
        _no_ssh_left()
        # cancellation while the master's ssh hangs (no timeout at all)
        task = asyncio.ensure_future(ac.run("true"))
        t_end = time.monotonic() + 30
        while not (found := _starting_masters(os.getpid())):
            assert time.monotonic() < t_end, "the master's ssh never started"
            await asyncio.sleep(0.01)  # the re-check interval
        [starting] = found
        assert b"ConnectTimeout=60" in cmdline(starting).split(b"\0")  # from start_timeout
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < MARGIN
        assert not os.path.exists(f"/proc/{starting}")  # killed and reaped
        _no_ssh_left()

    try:
        asyncio.run(main())
    finally:
        sshd.resume()


def test_run_many_over_dead_masters_of_a_hung_host_keeps_its_deadline(
    sshd: LocalSSHD,
) -> None:
    conns = [connect(sshd.host, config=sshd.config) for _ in range(3)]
    try:
        for c in conns:
            _kill_master(c)
        sshd.suspend()
        t0 = time.monotonic()
        results = sshwrap.run_many(conns, "true", deadline=5)
        took = time.monotonic() - t0
        assert took < 5 + MARGIN, took
        assert [r.status for r in results] in (["ssh_error"] * 3, ["timeout"] * 3), results
        _no_ssh_left()
    finally:
        sshd.resume()
        for c in conns:
            c.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_frozen_session_timeout_includes_the_stop(
    conn: Connection, sshd: LocalSSHD, face: str
) -> None:
    """TERM, KILL and close come out of the margin: before, 15 s past a 3 s timeout."""
    outcome: list[tuple[float, BaseException | None]] = []

    def call() -> None:
        if face == "sync":
            conn.run("echo hi; sleep 30", timeout=3, capture_output=True)
        else:
            asyncio.run(AsyncConnection(conn).run("echo hi; sleep 30", timeout=3))

    t = threading.Thread(target=lambda: outcome.append(_timed(call)))
    t.start()
    try:
        wait_until(
            lambda: any(cmdline(p).startswith(b"sleep\x0030") for p in sshd.session_pids()),
            30,
            "the remote sleep",
        )
        with frozen(sshd):
            t.join(3 + MARGIN + 5)
            assert outcome, "run() did not return"
            took, err = outcome[0]
            assert isinstance(err, TimeoutExpired), err
            assert took < 3 + MARGIN, took
    finally:
        t.join(60)


_CHILD_PRELUDE = """
import os, select, sys
import sshwrap
c = sshwrap.connect({host!r}, config={config!r})
pid = c.master_pid
print("master", pid, flush=True)
fd = os.pidfd_open(pid)
select.select([fd], [], [], 60)  # the test kills the master
print("running", flush=True)
"""


def _starting_masters(pid: int) -> list[int]:
    """The ``ssh -M`` processes below ``pid`` (a master being started)."""
    return [p for p in descendants(pid) if b"-M" in cmdline(p).split(b"\0") and is_running(p)]


def _ctrl_c_while_masters_restart(child: ChildProc, sshd: LocalSSHD, masters: list[int]) -> float:
    """With ``sshd`` hung (its listeners stopped), SIGKILL the child's ``masters``; once the
    child says "running" and is restarting them all, SIGINT it: seconds until it exited."""
    sshd.suspend()
    try:
        for pid in masters:
            os.kill(pid, signal.SIGKILL)
        child.wait_line("running")
        wait_until(
            lambda: len(_starting_masters(child.proc.pid)) >= len(masters),
            30,
            "the masters' ssh to start",
        )
        t0 = time.monotonic()
        child.send_signal(signal.SIGINT)
        child.wait(MARGIN + 5)
        return time.monotonic() - t0
    finally:
        sshd.resume()


def test_ctrl_c_during_restart_against_a_hung_host(sshd: LocalSSHD) -> None:
    code = textwrap.dedent(_CHILD_PRELUDE.format(host=sshd.host, config=str(sshd.config)))
    code += "c.run('true')\n"
    with start_child(code) as child:
        child.wait_line("master ")
        pid = int(child.stdout.split("master ")[1].split()[0])
        took = _ctrl_c_while_masters_restart(child, sshd, [pid])
        assert "KeyboardInterrupt" in child.stderr, child.stderr
        assert took < MARGIN + 1.5, took  # ~1 s, plus the interpreter's exit
        assert leftovers(child.mark) == []


@pytest.mark.parametrize("face", ["sync", "async"])
def test_ctrl_c_during_a_frozen_session(sshd: LocalSSHD, face: str) -> None:
    """The master is up, the session frozen: Ctrl-C in run() (or the asyncio face) comes at
    once, and leaving the program stops the master (nothing of the child's is left)."""
    run = (
        "c.run('echo started; sleep 1011')"
        if face == "sync"
        else "import asyncio\n"
        "from sshwrap.aio.connection import AsyncConnection\n"
        "asyncio.run(AsyncConnection(c).run('echo started; sleep 1011'))"
    )
    code = (
        textwrap.dedent(f"""
        import sshwrap
        c = sshwrap.connect({sshd.host!r}, config={str(sshd.config)!r})
        print("up", flush=True)
    """)
        + run
        + "\n"
    )
    with start_child(code) as child:
        child.wait_line("up")
        wait_until(
            lambda: any(cmdline(p).startswith(b"sleep\x001011") for p in sshd.session_pids()),
            30,
            "the remote sleep",
        )
        with frozen(sshd):
            t0 = time.monotonic()
            child.send_signal(signal.SIGINT)
            child.wait(MARGIN + 8)
            took = time.monotonic() - t0
            assert "KeyboardInterrupt" in child.stderr, child.stderr
            assert took < MARGIN + 2.5, took  # ~1 s, plus the exit's bounded master stop
            assert leftovers(child.mark) == []


def test_ctrl_c_during_run_many_over_dead_masters_of_a_hung_host(sshd: LocalSSHD) -> None:
    """Item 5: Ctrl-C came only after the 60 s start_timeout of a thread nobody could stop."""
    code = textwrap.dedent(f"""
        import os, select
        import sshwrap
        conns = [sshwrap.connect({sshd.host!r}, config={str(sshd.config)!r}) for _ in range(2)]
        print("masters", *[c.master_pid for c in conns], flush=True)
        for c in conns:
            select.select([os.pidfd_open(c.master_pid)], [], [], 60)  # the test kills them
        print("running", flush=True)
        try:
            sshwrap.run_many(conns, "true")
        except sshwrap.FanoutInterrupted as e:
            print("interrupted", [r.status for r in e.results], flush=True)
            raise
    """)
    with start_child(code) as child:
        child.wait_line("masters ")
        pids = [int(p) for p in child.stdout.split("masters ")[1].split("\n")[0].split()]
        took = _ctrl_c_while_masters_restart(child, sshd, pids)
        assert "interrupted ['cancelled', 'cancelled']" in child.stdout, (
            child.stdout,
            child.stderr,
        )
        assert "FanoutInterrupted" in child.stderr
        assert took < MARGIN + 1.5, took
        assert leftovers(child.mark) == []


@pytest.mark.parametrize("hang", ["frozen", "cut"])
def test_connect_timeout_against_a_hung_host(sshd: LocalSSHD, hang: str) -> None:
    def attempt(host: str, config: str) -> None:
        with InProcessLeaks() as leaks:
            c = Connection(host, config=config, connect_timeout=3)
            took, err = _timed(c.open)
            assert isinstance(err, SSHConnectionError), err
            assert took < 3 + MARGIN, took
            _no_ssh_left()
            leaks.assert_clean(2)
        used = c.master.directory  # the socket directory the failed start made
        assert used and not os.path.exists(used)

    if hang == "frozen":
        with frozen(sshd):
            attempt(sshd.host, str(sshd.config))
    else:
        with netns_sshd() as box:
            box.cut()
            attempt(box.sshd.host, str(box.sshd.config))


# -- item 10: spawn() over a lost connection --------------------------------------------------
def _session_sshd(sshd: LocalSSHD) -> int:
    """The sshd process that serves the master's connection (``sshd: user@...``)."""
    found = [p for p in sshd.session_pids() if b"@" in cmdline(p).split(b"\0")[0]]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("kill", ["master", "sshd", "program"])
def test_spawn_lost_connection_is_not_a_signal_death(
    conn: Connection, sshd: LocalSSHD, kill: str
) -> None:
    with conn.spawn("echo ready; exec sleep 1007", timeout=30) as s:
        s.expect("ready")
        if kill == "master":
            _kill_master(conn)
        elif kill == "sshd":
            os.kill(_session_sshd(sshd), signal.SIGKILL)
        else:
            wait_until(
                lambda: any(cmdline(p).startswith(b"sleep\x001007") for p in sshd.session_pids()),
                30,
                "the remote sleep",
            )
            for p in sshd.session_pids():
                if cmdline(p).startswith(b"sleep\x001007"):
                    os.kill(p, signal.SIGKILL)
        if kill == "program":
            assert s.expect_eof() == UNKNOWN_SIGNAL and s.ssh_error is None  # a real kill
            return
        with pytest.raises(SSHConnectionError):
            s.expect_eof()
        assert s.returncode == 255 and isinstance(s.ssh_error, SSHConnectionError)
        with pytest.raises(SSHConnectionError):
            s.wait(5)


# -- item 11: ssh's own words from connect() ------------------------------------------------
def test_connect_changed_host_key_gives_the_line_that_says_so(
    local_sshd: LocalSSHD, tmp_path: Any
) -> None:
    known = known_hosts_with_other_key(local_sshd, tmp_path)
    for proxy in (True, False):
        with pytest.raises(sshwrap.HostKeyError) as info:
            connect(
                local_sshd.host,
                config=local_sshd.config,
                options={"UserKnownHostsFile": str(known)},
                proxy=proxy,
            )
        e = info.value
        assert not e.message.startswith("@"), e.message
        assert (
            "REMOTE HOST IDENTIFICATION HAS CHANGED" in e.message
            or "Host key verification failed." in e.message
        ), e.message
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in e.stderr
    _no_ssh_left()


def test_connect_refuses_option_like_destinations_before_any_ssh(local_sshd: LocalSSHD) -> None:
    evil = "-oProxyCommand=touch /nonexistent"
    for kw in (
        {"destination": evil},
        {"destination": f"user@{evil}"},
        {"user": evil},
        {"jump": evil},
        {"jump": f"{local_sshd.host},{evil}"},
    ):
        dest = kw.pop("destination", local_sshd.host)
        with pytest.raises(ValueError, match="-oProxyCommand"):
            connect(dest, config=local_sshd.config, **kw)  # type: ignore[arg-type]


def test_program_exit_with_an_open_connection_to_a_frozen_host_leaves_nothing(
    sshd: LocalSSHD,
) -> None:
    """The finalizer at interpreter exit stops the master, bounded, even when the host hangs."""
    code = textwrap.dedent(f"""
        import signal, sys
        import sshwrap
        c = sshwrap.connect({sshd.host!r}, config={str(sshd.config)!r})
        c.run("true")
        signal.signal(signal.SIGUSR1, lambda *a: sys.exit(0))  # a normal exit: finalizers run
        print("up", c.master_pid, flush=True)
        signal.pause()
    """)
    with start_child(code) as child:
        child.wait_line("up ")
        master = int(child.stdout.split("up ")[1].split()[0])
        with frozen(sshd):
            t0 = time.monotonic()
            child.send_signal(signal.SIGUSR1)
            assert child.wait(10) == 0, child.stderr
            took = time.monotonic() - t0
            assert wait_exited([master], 5) == []
            assert leftovers(child.mark) == []
        assert took < 5, took


def test_a_master_that_starts_but_does_not_answer_is_not_left_running(
    sshd: LocalSSHD, tmp_path: Any
) -> None:
    """The ssh starting the master exits 0 (the master forked off), but the master is stopped
    before it answers: connect() fails, and the master it forked is killed, not left behind."""
    wrapper = tmp_path / "ssh"
    wrapper.write_text(
        textwrap.dedent(
            """\
            #!/bin/sh
            ssh "$@" || exit $?
            for a in "$@"; do
              case "$a" in ControlPath=*) path="${a#ControlPath=}";; esac
            done
            pid=$(ssh -S "$path" -O check x 2>&1 | sed -n 's/.*pid=\\([0-9]*\\).*/\\1/p')
            echo "$pid" > "$0.pid"
            kill -STOP "$pid"
            """
        )
    )
    wrapper.chmod(0o755)
    with pytest.raises(SSHConnectionError, match="does not answer"):
        connect(sshd.host, config=sshd.config, ssh=str(wrapper), connect_timeout=3)
    pid = int((tmp_path / "ssh.pid").read_text())
    try:
        assert wait_exited([pid], 5) == [], describe([pid])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- the MaxSessions wait of the ssh -S fallback is bounded as the channel path's ------------------
@pytest.mark.parametrize("proxy", [True, False], ids=["proxy", "fallback"])
def test_the_wait_for_a_session_slot_keeps_its_bound(
    local_sshd_factory: Callable[..., LocalSSHD],
    monkeypatch: pytest.MonkeyPatch,
    proxy: bool,
) -> None:
    """The only session is held for good: a call with a timeout ends in TimeoutExpired at
    its timeout, one without ends at ``OPEN_TIMEOUT`` with the channel path's message, and
    without a new login (ssh -S is kept off a connection of its own); a ``kill()`` of the
    holder still reaches it, and the slot serves the next command."""
    sshd = local_sshd_factory(extra_sshd_config=["MaxSessions 1"])
    monkeypatch.setattr(sshwrap.core.session, "OPEN_TIMEOUT", 2.0)
    with connect(sshd.host, config=sshd.config, proxy=proxy) as c:
        holder = c.Popen("echo held; exec sleep 1009", stdout=subprocess.PIPE)
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        took, err = _timed(lambda: c.run("echo no", capture_output=True, timeout=1.5))
        assert isinstance(err, TimeoutExpired) and err.timeout == 1.5, err
        assert 1.5 <= took < 1.5 + STOP_MARGIN + MARGIN, took  # ssh -S: its stop's margin
        # (ssh -S: the timeout's remote stop may log in: it cannot know that nothing ran)
        logins = sshd.read_log().count("Accepted publickey")
        took, err = _timed(lambda: c.run("echo no", capture_output=True))
        assert isinstance(err, sshwrap.SSHError), err
        assert str(err) == f"{sshd.host}: timed out waiting for the server to allow another session"
        assert 2.0 <= took < 2.0 + 2 * MARGIN, took  # ssh -S: an attempt may be in flight
        assert sshd.read_log().count("Accepted publickey") == logins
        holder.kill()
        with contextlib.suppress(sshwrap.SSHError):
            holder.wait(30)
        r = c.run("echo yes", capture_output=True, timeout=30)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"yes\n", b"")


@pytest.mark.parametrize("given", [None, b"big" * 100_000], ids=["no-input", "input"])
def test_fallback_timeout_before_the_session_opened_never_runs_the_command(
    sshd: LocalSSHD, given: bytes | None
) -> None:
    """ssh -S, the host hangs before it opened the session: the call times out; once the
    host answers the master opens the session and sends exec (its client gone or not), and
    the start guard keeps the command from running (its token was taken back)."""
    marker = f"/tmp/sshwrap-h4-{os.getpid()}-{time.monotonic_ns()}"  # the remote user's too
    try:
        with connect(sshd.host, config=sshd.config, proxy=False) as c:
            assert c.run("echo warm", capture_output=True).stdout == b"warm\n"
            with frozen(sshd):
                took, err = _timed(lambda: c.run(f"touch {marker}", input=given, timeout=1.0))
                assert isinstance(err, TimeoutExpired), err
                assert took < 1.0 + MARGIN, took
            r = c.run("echo after", capture_output=True, timeout=30)
            assert (r.returncode, r.stdout, r.stderr) == (0, b"after\n", b"")
            assert not os.path.exists(marker), "the timed-out command ran once the host answered"
            if given is not None:  # the guarded input arrives whole when nothing interrupts
                assert c.run("wc -c", input=given, capture_output=True).stdout.strip() == b"300000"
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)


def test_ssh_s_kept_off_its_own_login_names_a_gone_master(
    local_sshd: LocalSSHD, tmp_path: Any
) -> None:
    """ssh -S with a Connection's fallback settings (no login of its own) and nothing on the
    socket: MasterGoneError (the Connection then starts a new master and tries once more),
    not ssh's words about the ProxyCommand that kept it off."""
    stale = str(tmp_path / "m")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(stale)  # a socket file nobody listens on: what a killed master leaves
    for path in (str(tmp_path / "none"), stale):
        opts = {"ControlPath": path, "ControlMaster": "no", "ProxyCommand": NO_DIRECT_LOGIN}
        with pytest.raises(MasterGoneError) as got:
            sshwrap.run(local_sshd.host, "true", config=local_sshd.config, options=opts)
        assert str(got.value) == f"{local_sshd.host}: {MASTER_GONE}"
