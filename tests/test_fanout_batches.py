"""Rolling batches (issue 12): ``batch``, ``max_fail``, ``canary`` and the ``skipped`` status,
in ``run_many`` (both faces), ``put_many``, ``sshwrap-many`` and through a gateway.

Real sshd, real ssh.  Every host alias of the ``LocalSSHD`` is reached on its own 127.0.0.N,
so a remote command knows which host it is from ``$SSH_CONNECTION`` (no per-host command
needed): it appends ``start N`` and ``end N`` to a log file the test reads (all the hosts are
this machine), and fails (``exit 1``) on the hosts a test picks.  Which hosts ever started,
and whether a wave started before the one before had ended, is read from that log.

A test that checks the order of waves makes the first wave's hosts wait (at most a few
seconds) for a start line of a later wave's host: without batches that line comes at once and
the order is broken; with them it never comes (the wait runs out, the wave ends, the next
starts), so the test cannot pass by luck.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from test_fanout_hosts import run_many
from waiting import wait_until

import sshwrap
import sshwrap.aio
from sshwrap.core.gateway_agent import serve
from sshwrap.core.gateway_wire import decode_event, decode_request, encode_request, encode_stop
from sshwrap.errors import SkippedError
from sshwrap.fanout import HostResult
from sshwrap.testing import LocalSSHD, wait_exited

EXE = str(Path(sys.executable).with_name("sshwrap-many"))
FACES = ("sync", "async")
HOLD = 3.0  # seconds a first-wave host waits for a later wave's start line (never, when right)


@pytest.fixture(scope="module")
def sshd() -> Iterator[LocalSSHD]:
    # As root, sessions log in as root: they can write the test's log and run the agent.
    with LocalSSHD(hosts=8, user="root" if os.geteuid() == 0 else None) as s:
        yield s


@pytest.fixture
def log(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o777)  # (a non-root login writes it too)
    return tmp_path / "log"


def command(
    log: Path,
    fail: Collection[int] = (),
    hold: Collection[int] = (),
    until: str = "",
    *,
    waits: Mapping[int, str] | None = None,
    bound: float = HOLD,
) -> str:
    """Log ``start N`` / ``end N`` (N: the host's number); ``exit 1`` on the hosts ``fail``.
    Between the two lines the hosts ``hold`` wait for a log line matching ``until`` (an
    extended regex), and each host of ``waits`` for its shell condition; at most ``bound`` s."""
    conds = dict(waits or {})
    conds.update({n: f"grep -qE '{until}' {log}" for n in hold})
    polls = int(bound / 0.05)
    cases = "".join(
        f"{n}) i=0; while [ $i -lt {polls} ] && ! {cond}; do sleep 0.05; i=$((i+1)); done;; "
        for n, cond in conds.items()
    )
    fails = "|".join(str(n) for n in fail) or "none"
    return (
        "a=$(echo $SSH_CONNECTION | cut -d' ' -f3); n=${a##*.}; "
        f"echo start $n >> {log}; "
        + (f"case $n in {cases}esac; " if cases else "")
        + f"echo end $n >> {log}; "
        f"case $n in {fails}) exit 1;; esac"
    )


def later_start(hosts: Collection[int]) -> str:
    """The regex of a start line of one of ``hosts``."""
    return "^start (" + "|".join(str(n) for n in hosts) + ")$"


def events(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    return [(k, int(n)) for k, n in (line.split() for line in log.read_text().splitlines())]


def started(log: Path) -> list[int]:
    return sorted(n for k, n in events(log) if k == "start")


def assert_waves(log: Path, waves: Sequence[Sequence[int]]) -> None:
    """Every host of each wave started, and only after every host of the wave before ended."""
    ev = events(log)
    where = {e: i for i, e in enumerate(ev)}
    for w in waves:
        for n in w:
            assert ("start", n) in where and ("end", n) in where, (n, ev)
    for before, after in itertools.pairwise(waves):
        last_end = max(where["end", n] for n in before)
        first_start = min(where["start", n] for n in after)
        assert last_end < first_start, (
            f"wave {list(after)} started before {list(before)} ended: {ev}"
        )


def statuses(results: Sequence[HostResult | sshwrap.CopyResult]) -> list[str]:
    return [r.status for r in results]


def assert_skipped(r: HostResult | sshwrap.CopyResult, why: str) -> None:
    assert r.status == "skipped" and r.started is None, r
    assert isinstance(r.error, SkippedError) and r.error.host == r.host
    assert r.error.message == why
    if isinstance(r, HostResult):
        assert r.returncode is None and r.stdout == r.stderr == b""


# -- run_many ---------------------------------------------------------------------------------


@pytest.mark.parametrize("face", FACES)
def test_batches_run_in_order(face: str, sshd: LocalSSHD, log: Path) -> None:
    cmd = command(log, hold=[1, 2], until=later_start(range(3, 7)))
    results = run_many(face, sshd.hosts[:6], cmd, config=sshd.config, batch=2, concurrency=6)
    assert statuses(results) == ["ok"] * 6
    assert_waves(log, [[1, 2], [3, 4], [5, 6]])


def test_batch_percentage_with_a_canary(sshd: LocalSSHD, log: Path) -> None:
    # 8 hosts: the canary host1, then 25% = 2 at a time (the last wave is the one left).
    cmd = command(log, hold=[1], until=later_start(range(2, 9)))
    results = sshwrap.run_many(sshd.hosts, cmd, config=sshd.config, batch="25%", canary=1)
    assert statuses(results) == ["ok"] * 8
    assert_waves(log, [[1], [2, 3], [4, 5], [6, 7], [8]])


def test_a_percentage_rounds_up(sshd: LocalSSHD, log: Path) -> None:
    # 5 hosts at 30%: 1.5, so waves of 2.
    cmd = command(log, hold=[1, 2], until=later_start(range(3, 6)))
    results = sshwrap.run_many(sshd.hosts[:5], cmd, config=sshd.config, batch="30%")
    assert statuses(results) == ["ok"] * 5
    assert_waves(log, [[1, 2], [3, 4], [5]])


@pytest.mark.parametrize("face", FACES)
def test_max_fail_stops_new_starts(face: str, sshd: LocalSSHD, log: Path) -> None:
    cmd = command(log, fail=[2, 4])
    hosts = sshd.hosts[:6]
    results = run_many(face, hosts, cmd, config=sshd.config, concurrency=1, max_fail=1)
    assert started(log) == [1, 2, 3, 4]  # the second failure (host4) was one too many
    assert statuses(results) == ["ok", "failed", "ok", "failed", "skipped", "skipped"]
    for r in results[4:]:
        assert_skipped(r, "max_fail exceeded: 2 hosts failed (max_fail 1)")


def test_hosts_in_flight_finish_when_max_fail_is_exceeded(sshd: LocalSSHD, log: Path) -> None:
    # host1..3 start together; host1 fails at once (10% of 6 allows none), host2 and host3
    # wait for its end line, then finish normally.  Nothing else starts.
    cmd = command(log, fail=[1], hold=[2, 3], until="^end 1$")
    results = sshwrap.run_many(
        sshd.hosts[:6], cmd, config=sshd.config, concurrency=3, max_fail="10%"
    )
    assert statuses(results) == ["failed", "ok", "ok", "skipped", "skipped", "skipped"]
    assert started(log) == [1, 2, 3]
    why = "max_fail exceeded: 1 host failed (max_fail 10% of 6 hosts: 0)"
    for r in results[3:]:
        assert_skipped(r, why)


def test_timeouts_and_ssh_errors_count_as_failures(sshd: LocalSSHD, log: Path) -> None:
    hosts = [sshd.hosts[0], "no-such-host.invalid", *sshd.hosts[1:3]]
    results = sshwrap.run_many(hosts, command(log), config=sshd.config, concurrency=1, max_fail=0)
    assert statuses(results) == ["ok", "ssh_error", "skipped", "skipped"]
    assert started(log) == [1]


@pytest.mark.parametrize("face", FACES)
def test_a_failed_canary_skips_the_rest(face: str, sshd: LocalSSHD, log: Path) -> None:
    cmd = command(log, fail=[2])
    results = run_many(face, sshd.hosts[:6], cmd, config=sshd.config, canary=2, batch=2)
    assert started(log) == [1, 2]
    assert statuses(results) == ["ok", "failed"] + ["skipped"] * 4
    for r in results[2:]:
        assert_skipped(r, "the canary host2 did not succeed (failed)")


def test_canaries_that_succeed_let_the_rest_run(sshd: LocalSSHD, log: Path) -> None:
    cmd = command(log, hold=[1, 2], until=later_start(range(3, 7)))
    results = sshwrap.run_many(sshd.hosts[:6], cmd, config=sshd.config, canary=2)
    assert statuses(results) == ["ok"] * 6
    assert_waves(log, [[1, 2], [3, 4, 5, 6]])


@pytest.mark.parametrize(
    "bad",
    [
        {"batch": 0},
        {"batch": -1},
        {"batch": "150%"},
        {"batch": "abc"},
        {"max_fail": -1},
        {"max_fail": "x%"},
        {"canary": 0},
    ],
)
@pytest.mark.parametrize("face", FACES)
def test_bad_values_raise_before_any_ssh(
    face: str, bad: dict[str, Any], sshd: LocalSSHD, log: Path
) -> None:
    starts: list[str] = []
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
        run_many(
            face, sshd.hosts[:2], command(log), config=sshd.config, on_start=starts.append, **bad
        )
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
        sshwrap.put_many(sshd.hosts[:2], __file__, str(log), config=sshd.config, **bad)
    assert starts == [] and not log.exists()


def test_a_canary_over_the_host_count_makes_every_host_one(sshd: LocalSSHD, log: Path) -> None:
    cmd = command(log, fail=[1])
    results = sshwrap.run_many(sshd.hosts[:3], cmd, config=sshd.config, canary=10)
    assert statuses(results) == ["failed", "ok", "ok"]  # one wave: all of them ran


# -- the command ------------------------------------------------------------------------------


def many(sshd: LocalSSHD, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [EXE, "-F", sshd.config, *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def test_cli_max_fail_exit_bit_summary_and_json(sshd: LocalSSHD, log: Path) -> None:
    cmd = command(log, fail=[2])
    done = many(sshd, "-H", "host[1-5]", "-p", "1", "--max-fail", "0", "--json", "--", cmd)
    assert done.returncode == 1 + 8, done.stderr  # a command failed, hosts were skipped
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    assert [(o["host"], o["status"]) for o in lines] == [
        ("host1", "ok"),
        ("host2", "failed"),
        ("host3", "skipped"),
        ("host4", "skipped"),
        ("host5", "skipped"),
    ]
    why = "max_fail exceeded: 1 host failed (max_fail 0)"
    assert lines[2]["returncode"] is None
    assert lines[2]["error"] == {"type": "SkippedError", "message": why}
    assert (
        "5 hosts in" in done.stderr
        and "1 ok, 1 failed, 0 timed out, 0 ssh errors, 3 skipped" in done.stderr
    )
    assert f"  skipped: host[3-5] (skipped: {why})" in done.stderr
    assert started(log) == [1, 2]


def test_cli_live_lines_batches_and_canary(sshd: LocalSSHD, log: Path) -> None:
    cmd = command(log, fail=[1])
    done = many(sshd, "-H", "host[1-3]", "--canary", "1", "--batch", "50%", "--", cmd)
    assert done.returncode == 1 + 8
    assert "host2 | [skipped: the canary host1 did not succeed (failed)]" in done.stderr
    assert started(log) == [1]
    log.unlink()
    cmd = command(log, hold=[1, 2], until=later_start([3, 4]))
    done = many(sshd, "-H", "host[1-4]", "--batch", "2", "--", cmd)
    assert done.returncode == 0, done.stderr
    assert "skipped" not in done.stderr
    assert_waves(log, [[1, 2], [3, 4]])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--batch", "0"], "--batch must be a count of at least 1"),
        (["--batch", "150%"], "--batch must be a count of at least 1 or a percentage"),
        (["--batch", "abc"], "not 'abc'"),
        (["--max-fail", "-1"], "--max-fail must be a count of at least 0"),
        (["--max-fail", "101%"], "--max-fail must be"),
        (["--canary", "0"], "--canary must be an int of at least 1"),
        (["--canary", "x"], "argument --canary: invalid int value: 'x'"),
        (["--put", __file__, "/tmp/x", "--batch", "0%"], "--batch must be"),
    ],
)
def test_cli_bad_values_exit_64(sshd: LocalSSHD, log: Path, args: list[str], says: str) -> None:
    extra = [] if "--put" in args else ["--", command(log)]
    done = many(sshd, "-H", "host[1-2]", *args, *extra)
    assert done.returncode == 64, done.stderr
    assert says in done.stderr
    assert not log.exists()


def test_cli_help_documents_the_skipped_bit() -> None:
    out = subprocess.run([EXE, "--help"], capture_output=True, text=True, check=True).stdout
    assert "+8 hosts skipped" in " ".join(out.split())
    for flag in ("--batch N|P%", "--max-fail N|P%", "--canary N"):
        assert flag in out


def test_cli_put_with_max_fail(sshd: LocalSSHD, tmp_path: Path) -> None:
    src = tmp_path / "payload"
    src.write_bytes(b"x" * 1000)
    for n in (1, 3, 4):  # host2's directory is missing: its copy fails
        (tmp_path / f"host{n}").mkdir()
    target = f"{tmp_path}/%h/payload"
    done = many(sshd, "-H", "host[1-4]", "-p", "1", "--max-fail", "0", "--put", str(src), target)
    assert done.returncode == 1 + 8, done.stderr
    assert "0 ssh errors, 2 skipped" in done.stderr
    assert "host3 | put " in done.stderr and "skipped: max_fail exceeded" in done.stderr
    assert (tmp_path / "host1" / "payload").exists()
    assert not (tmp_path / "host3" / "payload").exists()


# -- the fleet copy ---------------------------------------------------------------------------


def put(sshd: LocalSSHD, n: int, src: Path, target: str, **kw: Any) -> list[sshwrap.CopyResult]:
    """``put_many`` of ``src`` to ``target`` on the first ``n`` hosts."""
    return sshwrap.put_many(sshd.hosts[:n], str(src), target, config=sshd.config, **kw)


def test_put_many_max_fail_skips_the_rest(sshd: LocalSSHD, tmp_path: Path) -> None:
    src = tmp_path / "payload"
    src.write_bytes(os.urandom(5000))
    for n in (1, 3, 4, 5):
        (tmp_path / f"host{n}").mkdir()
    results = put(sshd, 5, src, f"{tmp_path}/%h/payload", concurrency=1, max_fail=0)
    assert statuses(results) == ["ok", "failed", "skipped", "skipped", "skipped"]
    for r in results[2:]:
        assert_skipped(r, "max_fail exceeded: 1 host failed (max_fail 0)")
        assert r.target == f"{tmp_path}/{r.host}/payload"
    assert [n for n in (1, 3, 4, 5) if (tmp_path / f"host{n}" / "payload").exists()] == [1]


def test_put_many_batches_run_in_order(sshd: LocalSSHD, tmp_path: Path) -> None:
    src = tmp_path / "payload"
    src.write_bytes(os.urandom(200_000))
    order: list[tuple[str, str]] = []
    lock = threading.Lock()
    later = threading.Event()  # a host of a later wave moved bytes
    first = {"host1", "host2"}

    def on_progress(host: str, done: int, total: int) -> None:
        with lock:
            if ("bytes", host) not in order:
                order.append(("bytes", host))
        if host not in first:
            later.set()
        else:
            later.wait(HOLD)  # never set when the batches hold (see the module docstring)

    def on_result(r: sshwrap.CopyResult) -> None:
        with lock:
            order.append(("end", r.host))

    target = f"{tmp_path}/%h.payload"
    kw: dict[str, Any] = {"on_progress": on_progress, "on_result": on_result}
    results = put(sshd, 4, src, target, batch=2, concurrency=4, **kw)
    assert statuses(results) == ["ok"] * 4
    where = {e: i for i, e in enumerate(order)}
    assert max(where["end", h] for h in first) < min(where["bytes", h] for h in ("host3", "host4"))


@pytest.mark.parametrize("face", FACES)
def test_get_many_with_a_canary(face: str, sshd: LocalSSHD, tmp_path: Path) -> None:
    (tmp_path / "host1.src").write_text("one")  # only host1's file exists: the canary fails
    kw: dict[str, Any] = {"config": sshd.config, "canary": 1}
    src, dst = f"{tmp_path}/%h.src", str(tmp_path / "got")
    if face == "sync":
        results = sshwrap.get_many(sshd.hosts[1:4], src, dst, **kw)
    else:
        results = asyncio.run(sshwrap.aio.get_many(sshd.hosts[1:4], src, dst, **kw))
    assert statuses(results) == ["failed", "skipped", "skipped"]
    assert_skipped(results[1], "the canary host2 did not succeed (failed)")


# -- through gateways -------------------------------------------------------------------------


def test_batches_hold_across_the_tree(sshd: LocalSSHD, log: Path) -> None:
    # host1 is the gateway of host[4-7]; host2 and host3 run flat; each wave mixes both.
    hosts = ["host2", "host4", "host3", "host5", "host6", "host7"]
    cmd = command(log, hold=[2, 4], until=later_start([3, 5, 6, 7]))
    results = sshwrap.run_many(hosts, cmd, config=sshd.config, via={"host1": "host[4-7]"}, batch=2)
    assert statuses(results) == ["ok"] * 6
    assert [r.host for r in results] == hosts and [r.index for r in results] == list(range(6))
    assert_waves(log, [[2, 4], [3, 5], [6, 7]])


def test_max_fail_stops_a_gateways_new_starts(sshd: LocalSSHD, log: Path) -> None:
    cmd = command(log, fail=[3, 4])
    results = sshwrap.run_many(
        sshd.hosts[1:6],
        cmd,
        config=sshd.config,
        via={"host1": "host[2-6]"},
        concurrency=1,
        max_fail="20%",  # of the 5 hosts: 1 allowed
    )
    assert statuses(results) == ["ok", "failed", "failed", "skipped", "skipped"]
    assert started(log) == [2, 3, 4]
    for r in results[3:]:
        assert_skipped(r, "max_fail exceeded: 2 hosts failed (max_fail 20% of 5 hosts: 1)")


def test_a_flat_failure_stops_the_gateways(sshd: LocalSSHD, log: Path) -> None:
    """max_fail across the tree: a flat host's failure tells the gateway's agent (a stop line)
    to start no new host; its host in flight finishes, the rest are skipped."""
    go = log.with_name("go")
    # host2 (flat) fails once host3 (behind host1) has started; host3 waits for the go file,
    # which comes once host2's result is out (the control node has halted the tree) and the
    # control node has seen host3's start (the gateway's agent was sent the stop line).
    waits = {2: f"grep -q '^start 3$' {log}", 3: f"[ -e {go} ]"}
    cmd = command(log, fail=[2], waits=waits, bound=30)
    order: list[str] = []

    async def main() -> list[HostResult]:
        seen = asyncio.Event()

        def on_start(host: str) -> None:
            if host == "host3":
                seen.set()

        out = []
        async for r in sshwrap.aio.run_many(
            ["host2", "host3", "host4", "host5"],
            cmd,
            config=sshd.config,
            via={"host1": "host[3-5]"},
            concurrency=1,
            max_fail=0,
            on_start=on_start,
        ):
            order.append(r.host)
            if r.host == "host2":
                await asyncio.wait_for(seen.wait(), 30)
                go.touch()
            out.append(r)
        return sorted(out, key=lambda r: r.index)

    results = asyncio.run(main())
    assert statuses(results) == ["failed", "ok", "skipped", "skipped"], results
    assert order[0] == "host2"
    assert started(log) == [2, 3]
    for r in results[2:]:
        assert_skipped(r, "max_fail exceeded: 1 host failed (max_fail 0)")


def test_the_agent_obeys_a_stop_line(sshd: LocalSSHD, log: Path) -> None:
    """The agent itself (in this process, its stdin a pipe): a stop line while host1 runs
    leaves host2 and host3 unstarted, reported ``skipped`` with the line's reason."""
    go = log.with_name("go")
    cmd = f"until [ -e {go} ]; do sleep 0.05; done; " + command(log)
    kw = {"concurrency": 1, "timeout": None, "connect_timeout": 30.0, "deadline": None}
    req = decode_request(encode_request(sshd.hosts[:3], cmd, {**kw, "config": sshd.config}))
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    lines: list[bytes] = []

    def control() -> None:
        with os.fdopen(out_r, "rb") as answers:
            for line in answers:
                lines.append(line)
                ev = decode_event(line, req.hosts)
                if ev.kind == "start" and ev.index == 0:
                    os.write(in_w, encode_stop("told to stop"))
                    go.touch()

    reader = threading.Thread(target=control)
    reader.start()
    try:
        with os.fdopen(out_w, "wb") as out:
            asyncio.run(serve(req, out, stdin_fd=in_r))
    finally:
        reader.join(30)
        os.close(in_r)
        os.close(in_w)
    evs = [decode_event(x, req.hosts) for x in lines]
    got = {e.index: e.result for e in evs if e.kind == "result" and e.result is not None}
    assert [got[i].status for i in range(3)] == ["ok", "skipped", "skipped"]
    for i in (1, 2):
        assert_skipped(got[i], "told to stop")
    assert [e.index for e in evs if e.kind == "start"] == [0]
    assert started(log) == [1]


def test_ctrl_c_in_a_later_wave_of_the_tree(sshd: LocalSSHD, tmp_path: Path) -> None:
    """Ctrl-C while the second wave runs (one host flat, one behind the gateway): the first
    wave keeps its results, the second is ``cancelled``, and every ssh and agent ends."""
    hold = tmp_path / "hold"
    hold.touch()
    code = (
        "import json, sys, sshwrap\n"
        "try:\n"
        "    sshwrap.run_many(sys.argv[3:], sys.argv[2], config=sys.argv[1],"
        " via={'host1': 'host[3-4]'}, batch=2)\n"
        "except sshwrap.FanoutInterrupted as e:\n"
        "    print(json.dumps([[r.status, r.started is not None] for r in e.results]))\n"
    )
    # The second wave's hosts (host4 behind host1, host5 flat) wait while the hold file is.
    waits = {n: f"[ ! -e {hold} ]" for n in (4, 5)}
    os.chmod(tmp_path, 0o777)
    cmd = command(tmp_path / "log", waits=waits, bound=60)
    hosts = ["host2", "host3", "host4", "host5"]
    child = subprocess.Popen(
        [sys.executable, "-c", code, sshd.config, cmd, *hosts], stdout=subprocess.PIPE
    )
    kids: list[int] = []
    try:
        wait_until(lambda: started(tmp_path / "log") == [2, 3, 4, 5], 60, "the second wave")
        for task in Path(f"/proc/{child.pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
        assert kids  # the flat host's ssh and the gateway's
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=30)
    finally:
        hold.unlink()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert json.loads(out) == [
        ["ok", True],
        ["ok", True],
        ["cancelled", False],
        ["cancelled", True],
    ]
    assert wait_exited(kids, 10) == []
