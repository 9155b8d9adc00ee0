"""Gateways behind gateways, a killed agent's ssh, agent forwarding (issue 13), against real
sshds on this machine (``LocalSSHD`` aliases: one machine, every alias reachable)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_gateway import agents, ssh_children
from waiting import wait_until

import sshwrap
from sshwrap.errors import GatewayError
from sshwrap.fanout import HostResult
from sshwrap.testing import LocalSSHD, comm, descendants, proc_stat, wait_exited

Factory = Callable[..., LocalSSHD]


def _key(r: HostResult) -> tuple[object, ...]:
    return (r.host, r.status, r.returncode, r.stdout, r.index)


def _sshd(factory: Factory, hosts: int) -> LocalSSHD:
    return factory(hosts=hosts, user="root" if os.geteuid() == 0 else None)


def test_depth_two_equals_a_flat_run(local_sshd_factory: Factory, tmp_path: Path) -> None:
    """host2 is behind host1 (host1's pattern names it): host4-5 go host1 -> host2 -> leaf,
    host3 host1 -> leaf; two agents run (one per gateway), the control runs one ssh."""
    sshd = _sshd(local_sshd_factory, 5)
    leaves = sshd.hosts[2:]
    via = {"host1": "host2,host3", "host2": "host[4-5]"}
    d = tmp_path
    cmd = f"touch {d}/started.$$; while [ ! -e {d}/go ]; do sleep 0.05; done; hostname"
    flat = sshwrap.run_many(leaves, "hostname", config=sshd.config)
    got: list[HostResult] = []
    t = threading.Thread(
        target=lambda: got.extend(sshwrap.run_many(leaves, cmd, config=sshd.config, via=via))
    )
    t.start()
    try:
        wait_until(lambda: len(list(tmp_path.glob("started.*"))) == 3, 60, "every leaf started")
        running = agents(sshd)
        assert len(running) == 2  # host1's and host2's (each in a session of its own)
        ssh_kids = [k for a in running for k in descendants(a) if comm(k) == "ssh" and proc_stat(k)]
        assert len(ssh_kids) == 4  # host1's: host2 and host3; host2's: host4 and host5
    finally:
        (tmp_path / "go").touch()
        t.join(60)
    assert [_key(r) for r in got] == [_key(r) for r in flat]
    assert all(r.status == "ok" for r in got)


def test_per_host_commands_through_an_inner_gateway(local_sshd_factory: Factory) -> None:
    """A per-host command mapping with ``%h`` (and ``%%h``, a list command): host4-5 through
    host1 -> host2 (each agent gets its own hosts' commands), host3 through host1 alone;
    the results equal a flat run's."""
    sshd = _sshd(local_sshd_factory, 5)
    leaves = sshd.hosts[2:]
    via = {"host1": "host2,host3", "host2": "host[4-5]"}
    commands: dict[str, str | list[str]] = {
        "host3": "echo three %h; exit 3",
        "host4": ["printf", "%s|", "four", "%h", "a b", "%%h"],
        "host5": "echo five %h %%h >&2; echo $SSH_CONNECTION | cut -d' ' -f3",
    }
    flat = sshwrap.run_many(leaves, commands, config=sshd.config)
    tree = sshwrap.run_many(leaves, commands, config=sshd.config, via=via)
    assert [(*_key(r), r.stderr) for r in tree] == [(*_key(r), r.stderr) for r in flat]
    assert [(r.stdout, r.stderr) for r in tree] == [
        (b"three host3\n", b""),
        (b"four|host4|a b|%h|", b""),
        (f"{sshd.addresses[4]}\n".encode(), b"five host5 %h\n"),
    ]
    assert [r.returncode for r in tree] == [3, 0, 0]


def test_depth_two_inner_gateway_fails_only_its_hosts(local_sshd_factory: Factory) -> None:
    sshd = _sshd(local_sshd_factory, 3)
    via = {"host1": "nosuch.gw.invalid,host2", "nosuch.gw.invalid": "host3"}
    r2, r3 = sshwrap.run_many(sshd.hosts[1:], "echo hi", config=sshd.config, via=via)
    assert (r2.status, r2.stdout) == ("ok", b"hi\n")
    assert r3.status == "ssh_error" and isinstance(r3.error, GatewayError)
    # the innermost gateway that failed, reported through host1's agent
    assert r3.error.gateway == "nosuch.gw.invalid" and r3.error.host == "host3"


def test_a_cycle_of_gateways_is_refused() -> None:
    with pytest.raises(ValueError, match="cycle: gw1 -> gw2 -> gw1"):
        sshwrap.run_many(["h1"], "true", via={"gw1": "gw2,h1", "gw2": "gw1"})


def test_a_killed_agent_leaves_nothing(
    local_sshd_factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL the agent mid-run: its watchdog ends every leaf ssh it started and removes the
    agent's temporary files (the fan-out's fifo directory), and the hosts fail with a
    GatewayError."""
    # The gateway's tmp, this test's own: the TMPDIR its sessions get (sent by ssh).
    gw_tmp = tmp_path / "gw_tmp"
    gw_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(gw_tmp))
    sshd = local_sshd_factory(
        hosts=3, user="root" if os.geteuid() == 0 else None, extra_sshd_config="AcceptEnv TMPDIR"
    )
    send = {"SendEnv": "TMPDIR"}
    cmd = f"touch {tmp_path}/started.$$; exec sleep 600"
    got: list[HostResult] = []
    t = threading.Thread(
        target=lambda: got.extend(
            sshwrap.run_many(
                sshd.hosts[1:], cmd, config=sshd.config, via={"host1": "host[2-3]"}, options=send
            )
        )
    )
    t.start()
    try:
        wait_until(lambda: len(list(tmp_path.glob("started.*"))) == 2, 60, "both leaves started")
        (agent,) = agents(sshd)
        leaf_ssh = [k for k in descendants(agent) if comm(k) == "ssh"]
        assert len(leaf_ssh) == 2
        assert list(gw_tmp.rglob("sshwrap-many-*"))  # the agent's fan-out uses that tmp
        os.kill(agent, signal.SIGKILL)
        assert wait_exited(leaf_ssh, 3) == []
    finally:
        t.join(60)
    # The watchdog removes them before it exits (and so before the gateway's ssh ends).
    wait_until(lambda: list(gw_tmp.iterdir()) == [], 10, "the gateway's tmp emptied")
    assert [r.status for r in got] == ["ssh_error", "ssh_error"]
    assert all(isinstance(r.error, GatewayError) and r.error.gateway == "host1" for r in got)


@contextlib.contextmanager
def _ssh_agent(key: str) -> Iterator[dict[str, str]]:
    """A real ssh-agent holding ``key``, stopped by pid afterwards."""
    sock = Path(key).parent / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, 10, "ssh-agent's socket")
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", key], env=env, check=True, capture_output=True)
        yield env
    finally:
        proc.terminate()
        proc.wait(10)


def test_agent_forwarding_only_when_asked(
    local_sshd_factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leaves' config forwards the agent (host2, host3); the gateway host1's does not:
    a leaf sees an agent only when the ssh to the gateway forwarded one (``forward_agent``
    or the user's ``ForwardAgent`` for the gateway), and never with ``forward_agent=False``."""
    sshd = _sshd(local_sshd_factory, 3)
    key = tmp_path / "agent_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    plain = tmp_path / "plain_config"
    plain.write_text(f"Host host2 host3\n    ForwardAgent yes\nHost *\nInclude {sshd.config}\n")
    asks = tmp_path / "asks_config"
    asks.write_text(f"Host host1\n    ForwardAgent yes\n{plain.read_text()}")
    for p in (plain, asks):
        p.chmod(0o600)
    cmd = "ssh-add -L 2>/dev/null | cut -d' ' -f2 || true"
    mine = key.with_suffix(".pub").read_text().split()[1].encode() + b"\n"
    with _ssh_agent(str(key)) as env:
        monkeypatch.setenv("SSH_AUTH_SOCK", env["SSH_AUTH_SOCK"])

        def leaves_see(config: Path, forward_agent: bool | None = None) -> list[bytes]:
            rs = sshwrap.run_many(
                sshd.hosts[1:],
                cmd,
                config=config,
                via={"host1": "host[2-3]"},
                forward_agent=forward_agent,
            )
            assert all(r.error is None for r in rs), rs
            return [r.stdout for r in rs]

        assert leaves_see(plain) == [b"", b""]
        assert leaves_see(plain, forward_agent=True) == [mine, mine]
        assert leaves_see(asks) == [mine, mine]
        assert leaves_see(asks, forward_agent=False) == [b"", b""]


def test_two_hundred_leaves_two_gateways_two_ssh(
    local_sshd_factory: Factory, tmp_path: Path
) -> None:
    """202 leaf aliases behind 2 gateways: the control node runs exactly 2 ssh processes."""
    sshd = _sshd(local_sshd_factory, 204)
    leaves = sshd.hosts[2:]
    via = {"host1": leaves[:101], "host2": leaves[101:]}
    d = tmp_path
    cmd = f"touch {d}/started.$$; while [ ! -e {d}/go ]; do sleep 0.1; done; echo ok"
    got: list[HostResult] = []
    before = set(ssh_children(os.getpid()))
    t = threading.Thread(
        target=lambda: got.extend(
            sshwrap.run_many(leaves, cmd, config=sshd.config, via=via, concurrency=16)
        )
    )
    t.start()

    def ssh() -> int:
        return len(set(ssh_children(os.getpid())) - before)

    def started() -> int:
        return len(list(d.glob("started.*")))

    try:
        # 16 at a time on each gateway: every one of them in flight (they wait for "go"),
        # or (the feature broken) more ssh than gateways here, seen as soon as they run
        wait_until(lambda: started() >= 32 or ssh() > 2, 120, "32 leaves started")
        assert ssh() == 2
        assert started() == 32
    finally:
        (d / "go").touch()
        t.join(300)
    assert len(got) == 202 and all((r.status, r.stdout) == ("ok", b"ok\n") for r in got)
