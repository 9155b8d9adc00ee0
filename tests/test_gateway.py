"""Fan-out through gateways (``via=``, issue 13 step 1), against real sshds on this machine.

One alias of a ``LocalSSHD`` is the gateway, others are its leaves: the gateway's own ssh
reaches them with the same client config (``config=``), whose path exists there too (all on
one machine).  As root, sessions log in as root, so the gateway can read that config.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

import sshwrap
from sshwrap.core.gateway_wire import WireError, decode_event, encode_result
from sshwrap.errors import AuthenticationError, GatewayError, SSHConnectionError
from sshwrap.fanout import HostResult
from sshwrap.io.bundle import AGENT_MARK
from sshwrap.testing import LocalSSHD, comm, proc_stat, wait_exited

Factory = Callable[..., LocalSSHD]


def _sshd(factory: Factory, hosts: int, **kw: object) -> LocalSSHD:
    return factory(hosts=hosts, user="root" if os.geteuid() == 0 else None, **kw)


def _key(r: HostResult) -> tuple[object, ...]:
    return (r.host, r.status, r.returncode, r.signalled, r.stdout, r.stderr, r.index)


def _waiting_command(d: Path) -> str:
    """A leaf command that marks its start, then waits for the test's go file."""
    return f"touch {d}/started.$$; while [ ! -e {d}/go ]; do sleep 0.05; done; echo done"


def _started(d: Path) -> int:
    return len(list(d.glob("started.*")))


def ssh_children(pid: int) -> list[int]:
    """The running ssh processes that ``pid`` started itself (from any of its threads)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return [k for k in kids if comm(k) == "ssh"]


def marked(pid: int) -> bool:
    """Whether ``pid``'s command line is the gateway bootstrap's (an agent or its watchdog)."""
    try:
        return AGENT_MARK.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def agents(sshd: LocalSSHD) -> list[int]:
    """The agents running in ``sshd``'s sessions: each the child of its watchdog (whose own
    parent is no agent: a child the agent forks before its exec is not one)."""
    out = []
    for p in sshd.session_pids():
        st = proc_stat(p)
        if st is None or not marked(p) or not marked(ppid := int(st[1])):
            continue
        up = proc_stat(ppid)
        if up is not None and not marked(int(up[1])):
            out.append(p)
    return out


def test_results_equal_a_flat_run(local_sshd_factory: Factory) -> None:
    sshd = _sshd(local_sshd_factory, 5)
    leaves = sshd.hosts[1:]
    cmd = "echo out; echo err >&2; printf '\\377\\000'; exit 3"
    flat = sshwrap.run_many(leaves, cmd, config=sshd.config)
    tree = sshwrap.run_many(leaves, cmd, config=sshd.config, via={sshd.hosts[0]: "host[2-4]"})
    assert [_key(r) for r in tree] == [_key(r) for r in flat]
    assert all(r.status == "failed" and r.returncode == 3 for r in tree)
    assert all(r.started is not None and r.duration > 0 for r in tree)
    assert all(r.connect_time is not None for r in tree)
    # A signal death keeps flat mode's -signum reading.
    flat = sshwrap.run_many(leaves, "kill -TERM $$", config=sshd.config)
    tree = sshwrap.run_many(leaves, "kill -TERM $$", config=sshd.config, via={"host1": "host2"})
    assert [_key(r) for r in tree] == [_key(r) for r in flat]
    assert tree[0].signalled and tree[0].returncode is not None and tree[0].returncode < 0


def test_on_output_and_on_start_through_a_gateway(local_sshd_factory: Factory) -> None:
    sshd = _sshd(local_sshd_factory, 3)
    seen: dict[tuple[str, int], bytes] = {}
    starts: list[str] = []

    def on_output(host: str, stream: int, data: bytes) -> None:
        seen[host, stream] = seen.get((host, stream), b"") + data

    results = sshwrap.run_many(
        sshd.hosts[1:],
        "echo out; echo err >&2",
        config=sshd.config,
        via={"host1": "host[2-3]"},
        on_output=on_output,
        on_start=starts.append,
    )
    assert sorted(starts) == ["host2", "host3"]
    for r in results:
        assert r.status == "ok"
        assert seen[r.host, 1] == r.stdout == b"out\n"
        assert seen[r.host, 2] == r.stderr == b"err\n"


def test_one_ssh_per_gateway(local_sshd_factory: Factory, tmp_path: Path) -> None:
    sshd = _sshd(local_sshd_factory, 6)
    via = {"host1": "host[3-4]", "host2": "host[5-6]"}
    results: list[HostResult] = []

    def run() -> None:
        results.extend(
            sshwrap.run_many(
                sshd.hosts[2:], _waiting_command(tmp_path), config=sshd.config, via=via
            )
        )

    # (ssh children of earlier tests may live on, e.g. a cached filesystem's SFTP sessions)
    before = set(ssh_children(os.getpid()))
    t = threading.Thread(target=run)
    t.start()
    try:
        wait_until(lambda: _started(tmp_path) == 4, 60, "every leaf started")
        assert len(set(ssh_children(os.getpid())) - before) == 2
    finally:
        (tmp_path / "go").touch()
        t.join(60)
    assert [(r.host, r.status, r.stdout) for r in results] == [
        (h, "ok", b"done\n") for h in sshd.hosts[2:]
    ]


def test_gateway_without_python3(local_sshd_factory: Factory) -> None:
    # The test user's /bin/sh, with a PATH on the gateway's address that holds no python3.
    sshd = local_sshd_factory(
        hosts=3, extra_sshd_config=["Match LocalAddress 127.0.0.1", "SetEnv PATH=/nonexistent"]
    )
    results = sshwrap.run_many(
        sshd.hosts[1:], "echo hi", config=sshd.config, via={"host1": "host2"}
    )
    bad, good = results
    assert (good.host, good.status, good.stdout) == ("host3", "ok", b"hi\n")
    assert bad.status == "ssh_error" and bad.returncode is None
    assert isinstance(bad.error, SSHConnectionError)
    assert bad.error.host == "host2"
    assert "gateway host1" in bad.error.message and "python3" in bad.error.message


def test_unreachable_gateway_fails_only_its_hosts(local_sshd_factory: Factory) -> None:
    sshd = _sshd(local_sshd_factory, 3)
    results = sshwrap.run_many(
        sshd.hosts[1:], "echo hi", config=sshd.config, via={"no-such-gw.invalid": "host2"}
    )
    assert results[1].status == "ok"
    assert results[0].status == "ssh_error" and isinstance(results[0].error, SSHConnectionError)
    assert "gateway no-such-gw.invalid" in results[0].error.message


def test_gateway_killed_mid_run(local_sshd_factory: Factory, tmp_path: Path) -> None:
    sshd = _sshd(local_sshd_factory, 5)
    # host3 answers at once; host4 (also behind host1) and host5 (behind host2) wait.
    wait = _waiting_command(tmp_path)
    cmd = f'case "$SSH_CONNECTION" in *" 127.0.0.3 "*) echo fast;; *) {wait};; esac'
    via = {"host1": "host[3-4]", "host2": "host5"}
    got: list[HostResult] = []

    def kill_host1() -> None:
        try:
            wait_until(lambda: _started(tmp_path) == 2, 60, "host4 and host5 started")
            gw1 = [
                p for p in agents(sshd) if b" 127.0.0.1 " in Path(f"/proc/{p}/environ").read_bytes()
            ]
            assert len(gw1) == 1
            os.kill(gw1[0], signal.SIGKILL)
        finally:
            (tmp_path / "go").touch()

    async def main() -> None:
        killer = None
        async for r in sshwrap.aio.run_many(sshd.hosts[2:], cmd, config=sshd.config, via=via):
            got.append(r)
            if r.host == "host3":
                killer = asyncio.ensure_future(asyncio.to_thread(kill_host1))
        assert killer is not None
        await killer

    try:
        asyncio.run(main())
    finally:
        (tmp_path / "go").touch()
    by_host = {r.host: r for r in got}
    assert got[0].host == "host3" and got[0].stdout == b"fast\n"
    assert by_host["host5"].status == "ok" and by_host["host5"].stdout == b"done\n"
    lost = by_host["host4"]
    assert lost.status == "ssh_error" and isinstance(lost.error, SSHConnectionError)
    assert "gateway host1" in lost.error.message


def test_ctrl_c_leaves_no_ssh_or_python(local_sshd_factory: Factory, tmp_path: Path) -> None:
    sshd = _sshd(local_sshd_factory, 3)
    code = (
        "import json, sys, sshwrap\\n"
        "try:\\n"
        "    sshwrap.run_many(sys.argv[3:], sys.argv[2], config=sys.argv[1],"
        " via={'host1': 'host[2-3]'})\\n"
        "except sshwrap.FanoutInterrupted as e:\\n"
        "    print(json.dumps([r.status for r in e.results]))\\n"
    )
    cmd = f"touch {tmp_path}/started.$$; exec sleep 600"
    child = subprocess.Popen(
        [sys.executable, "-c", code.replace("\\n", "\n"), sshd.config, cmd, *sshd.hosts[1:]],
        stdout=subprocess.PIPE,
    )
    try:
        wait_until(lambda: _started(tmp_path) == 2, 60, "both leaves started")
        control = ssh_children(child.pid)
        gw_agents = agents(sshd)
        leaf_ssh = [p for a in gw_agents for p in ssh_children(a)]
        assert len(control) == 1 and len(gw_agents) == 1 and len(leaf_ssh) == 2
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert out.strip() == b'["cancelled", "cancelled"]'
    assert wait_exited([*control, *gw_agents, *leaf_ssh], 10) == []


def test_timeout_and_concurrency_reach_the_gateway(local_sshd_factory: Factory) -> None:
    sshd = _sshd(local_sshd_factory, 3)
    via = {"host1": "host[2-3]"}
    results = sshwrap.run_many(
        sshd.hosts[1:], "sleep 60", config=sshd.config, via=via, timeout=1, concurrency=1
    )
    assert [r.status for r in results] == ["timeout", "timeout"]
    assert all(r.returncode is None and r.duration < 10 for r in results)
    # concurrency=1 on the gateway: the second host started after the first ended.
    first, second = sorted(results, key=lambda r: r.started or 0)
    assert first.started is not None and second.started is not None
    assert second.started >= first.started + first.duration - 0.05


def test_deadline_holds_through_the_gateway(local_sshd_factory: Factory) -> None:
    sshd = _sshd(local_sshd_factory, 3)
    t0 = time.monotonic()
    results = sshwrap.run_many(
        sshd.hosts[1:], "sleep 60", config=sshd.config, via={"host1": "host[2-3]"}, deadline=3
    )
    elapsed = time.monotonic() - t0
    assert [r.status for r in results] == ["timeout", "timeout"]
    # The agent gets what was left of the deadline when it was ready; each bound holds within
    # 1 s of it, cleanup included (the control side's own cut would come 1 s later still).
    assert elapsed < 3 + 1.5


def test_input_env_and_cwd_equal_a_flat_run(local_sshd_factory: Factory) -> None:
    sshd = _sshd(local_sshd_factory, 3)
    kw: dict[str, Any] = {"input": b"in\x00put", "env": {"FOO": "b a r"}, "cwd": "/"}
    cmd = 'cat; echo "$FOO"; pwd'
    flat = sshwrap.run_many(sshd.hosts[1:], cmd, config=sshd.config, **kw)
    tree = sshwrap.run_many(sshd.hosts[1:], cmd, config=sshd.config, via={"host1": "host3"}, **kw)
    assert [_key(r) for r in tree] == [_key(r) for r in flat]
    assert tree[1].stdout == b"in\x00putb a r\n/\n"


def test_wire_rebuilds_the_error_class() -> None:
    err = AuthenticationError("web1", "Permission denied (publickey)", "log text", 255)
    r = HostResult("web1", None, b"\xff", b"", err, 1.5, 0.25, "ssh_error", 0.125, False, "log", 7)
    ev = decode_event(encode_result(0, r), ["web1"])
    assert ev.kind == "result" and ev.result is not None
    back = ev.result
    assert type(back.error) is AuthenticationError
    assert (back.error.host, back.error.message, back.error.stderr) == (
        "web1",
        "Permission denied (publickey)",
        "log text",
    )
    assert (back.stdout, back.status, back.started, back.connect_time) == (
        b"\xff",
        "ssh_error",
        1.5,
        0.125,
    )
    with pytest.raises(WireError):
        decode_event(b'{"t": "result", "i": 3}\n', ["web1"])


def test_wire_carries_the_attempts() -> None:
    r = HostResult("web1", 0, b"", b"", None, 1.0, 0.5, "ok", 0.1, False, "", 0, attempts=3)
    back = decode_event(encode_result(0, r), ["web1"]).result
    assert back is not None and back.attempts == 3
    bad = encode_result(0, r).replace(b'"attempts":3', b'"attempts":0')
    with pytest.raises(WireError, match="attempts"):
        decode_event(bad, ["web1"])


def test_a_host_under_two_gateways_tries_the_second(local_sshd_factory: Factory) -> None:
    sshd = _sshd(local_sshd_factory, 3)
    via = {"no-such-gw.invalid": "host[2-3]", "host1": "host2"}
    results = sshwrap.run_many(sshd.hosts[1:], "echo hi", config=sshd.config, via=via)
    assert (results[0].status, results[0].stdout) == ("ok", b"hi\n")
    bad = results[1]  # only the unreachable gateway names host3
    assert isinstance(bad.error, GatewayError) and bad.error.gateway == "no-such-gw.invalid"


def test_sshwrap_many_via_and_topology(local_sshd_factory: Factory, tmp_path: Path) -> None:
    """``sshwrap-many --via GW:PATTERN`` and ``--topology FILE`` run the leaves through the
    gateway: the same lines and exit status as a flat run; through a gateway that cannot be
    reached, each of its hosts fails naming it (so the route was taken)."""
    sshd = _sshd(local_sshd_factory, 4)
    gw = sshd.hosts[0]
    base = [sys.executable, "-m", "sshwrap.many_cli", "-F", sshd.config, "-H", "host[2-4]"]
    cmd = ["--", "echo $SSH_CONNECTION | cut -d' ' -f1; exit 2"]
    flat = subprocess.run([*base, *cmd], capture_output=True, text=True, timeout=60)
    topology = tmp_path / "topology.txt"
    topology.write_text(f"# gateway: the hosts behind it\n{gw}: host[2-4]\n")
    for how in (["--via", f"{gw}:host[2-4]"], ["--topology", str(topology)]):
        tree = subprocess.run([*base, *how, *cmd], capture_output=True, text=True, timeout=60)
        assert (tree.returncode, sorted(tree.stdout.splitlines())) == (
            flat.returncode,
            sorted(flat.stdout.splitlines()),
        ), (how, tree.stderr)
        assert flat.returncode == 1  # every command exited 2: "some command failed"
    # the route is taken: through a gateway that cannot be reached, every host fails alone
    gone = subprocess.run(
        [*base, "--via", "nosuch.gateway.invalid:host[2-4]", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 4 and gone.stdout == "", gone
    assert gone.stderr.count("nosuch.gateway.invalid") >= 3, gone.stderr
    bad = subprocess.run([*base, "--via", "nogateway", *cmd], capture_output=True, text=True)
    assert bad.returncode == 64 and "--via nogateway: give GATEWAY:PATTERN" in bad.stderr
