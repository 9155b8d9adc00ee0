"""Fan-out through gateways over a real network topology (issue 13): network namespaces and
veth pairs this test creates (as root; skipped with the reason otherwise) and removes.

::

    ctl --- gw1 --- leaf1 (l1-1, l1-2)       gw2-nopy: gw2, without python3 on its PATH
     |       `----- gw3 --- leaf3 (l3-1)        gw3 is behind gw1 (depth 2)
     `----- gw2 --- leaf2 (l2-1, l2-2)        leaf2 is behind gw1 too (a second link)

Each link is a veth pair with a /24 of its own (addresses inside these namespaces only;
nothing routes between links: no namespace forwards).  Each gateway's and leaf's sshd is a
:class:`LocalSSHD` run inside its namespace; the client config names every alias, so each
namespace reaches only its neighbours.  The control side runs in ``ctl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from waiting import wait_until

from sshwrap.testing import LocalSSHD, comm, wait_exited

LINKS = {  # (near, far) -> third octet of the link's 10.252.N.0/24
    ("ctl", "gw1"): 1,
    ("ctl", "gw2"): 2,
    ("gw1", "leaf1"): 11,
    ("gw2", "leaf2"): 12,
    ("gw1", "gw3"): 13,
    ("gw3", "leaf3"): 33,
    ("gw1", "leaf2"): 14,  # leaf2 is behind gw2 and gw1 (through gw1: a route, below)
}
ALIASES = {"gw1": ["gw1"], "gw2": ["gw2", "gw2-nopy"], "gw3": ["gw3"]}
ALIASES |= {"leaf1": ["l1-1", "l1-2"], "leaf2": ["l2-1", "l2-2"], "leaf3": ["l3-1"]}
TOPOLOGY = "gw1: gw3,l1-[1-2]\ngw2: l2-[1-2]\ngw3: l3-1\n"
NO_PYTHON = "10.252.2.3"  # gw2-nopy: gw2's sshd on its second address, where a session's PATH
# holds no python3 (a Match block's SetEnv, which also drops LocalSSHD's session mark there)
LEAVES = "l1-[1-2],l2-[1-2],l3-1"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Topology:
    """The namespaces (role -> name), the sshds (role -> LocalSSHD), the client config."""

    ns: dict[str, str]
    dir: Path
    sshd: dict[str, LocalSSHD] = field(default_factory=dict)
    config: str = ""

    def run_in(self, role: str, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """``argv`` inside namespace ``role``."""
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            ["ip", "netns", "exec", self.ns[role], *argv], capture_output=True, text=True, **kw
        )

    def many(self, *args: str) -> list[str]:
        """``sshwrap-many -F CONFIG ARGS`` (for :meth:`run_in`)."""
        return [sys.executable, "-m", "sshwrap.many_cli", "-F", self.config, *args]

    def inode(self, role: str) -> int:
        return os.stat(f"/run/netns/{self.ns[role]}").st_ino

    def leftovers(self, roles: list[str]) -> list[int]:
        """ssh and python processes (not sshd) whose network namespace is one of ``roles``'."""
        want = {f"net:[{self.inode(r)}]" for r in roles}
        out = []
        for e in os.listdir("/proc"):
            if not e.isdigit():
                continue
            with contextlib.suppress(OSError):
                name = comm(int(e))
                if (name == "ssh" or name.startswith("python")) and os.readlink(
                    f"/proc/{e}/ns/net"
                ) in want:
                    out.append(int(e))
        return out


def _address(role: str, i: int = 0) -> str:
    """The address of ``role``'s i-th alias on the link to its gateway (the far end)."""
    third = next(n for (_, far), n in LINKS.items() if far == role)
    return f"10.252.{third}.{2 + i}"


@contextlib.contextmanager
def _topology(tmp: Path) -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip"):
        pytest.skip("needs iproute2's ip")
    tag = secrets.token_hex(3)
    roles = ["ctl", "gw1", "gw2", "gw3", "leaf1", "leaf2", "leaf3"]
    topo = Topology({r: f"swgw-{tag}-{r}" for r in roles}, tmp)
    made: list[str] = []
    try:
        for name in topo.ns.values():
            _ip("netns", "add", name)
            made.append(name)
            _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        for k, ((near, far), third) in enumerate(LINKS.items()):
            a, b = f"swg{tag}{k}a", f"swg{tag}{k}b"
            _ip("link", "add", a, "netns", topo.ns[near], "type", "veth", "peer", "name", b,
                "netns", topo.ns[far])  # fmt: skip
            _ip("-n", topo.ns[near], "addr", "add", f"10.252.{third}.1/24", "dev", a)
            for i in range(len(ALIASES.get(far, [far]))):
                _ip("-n", topo.ns[far], "addr", "add", f"10.252.{third}.{2 + i}/24", "dev", b)
            _ip("-n", topo.ns[near], "link", "set", a, "up")
            _ip("-n", topo.ns[far], "link", "set", b, "up")
        # gw1 reaches leaf2's sshd (on its link to gw2) over its own link to leaf2.
        _ip("-n", topo.ns["gw1"], "route", "add", "10.252.12.0/24", "via", "10.252.14.2")
        lines = []
        with contextlib.ExitStack() as stack:
            for role, aliases in ALIASES.items():
                sshd = LocalSSHD(
                    len(aliases),
                    user="root",
                    addresses=[_address(role, i) for i in range(len(aliases))],
                    netns=topo.ns[role],
                    probe_in_netns=True,
                    extra_sshd_config=(
                        [f"Match LocalAddress {NO_PYTHON}", "SetEnv PATH=/nonexistent"]
                        if role == "gw2"
                        else []
                    ),
                )
                stack.enter_context(sshd)
                topo.sshd[role] = sshd
                for i, alias in enumerate(aliases):
                    lines += [
                        f"Host {alias}",
                        f"    HostName {sshd.addresses[i]}",
                        f"    Port {sshd.port}",
                        f"    IdentityFile {sshd.identity}",
                        f"    UserKnownHostsFile {sshd.known_hosts}",
                    ]
            lines += [
                "Host *",
                "    User root",
                "    IdentitiesOnly yes",
                "    GlobalKnownHostsFile /dev/null",
                "    StrictHostKeyChecking yes",
                "    UpdateHostKeys no",
            ]
            topo.config = str(tmp / "ssh_config")
            Path(topo.config).write_text("\n".join(lines) + "\n")
            os.chmod(topo.config, 0o600)
            (tmp / "topology.txt").write_text(TOPOLOGY)
            yield topo
    finally:
        for name in made:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", name)  # (its veth ends go with it)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not [n for n in made if n in listed], listed


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    with _topology(tmp_path_factory.mktemp("gwns")) as t:
        yield t


def _results(out: str) -> list[tuple[object, ...]]:
    rows = [json.loads(x) for x in out.splitlines()]
    return sorted((r["host"], r["status"], r["returncode"], r["stdout"]) for r in rows)


CMD = ["--", "echo $SSH_CONNECTION | cut -d' ' -f3; hostname; exit 3"]


def test_leaves_only_through_their_gateways(topo: Topology) -> None:
    # From the control namespace a leaf cannot be reached at all; its gateway can.
    for leaf in ("l1-1", "l2-1", "l3-1", "gw3"):
        direct = topo.run_in(
            "ctl", ["ssh", "-F", topo.config, "-o", "ConnectTimeout=5", leaf, "true"], timeout=30
        )
        assert direct.returncode == 255 and "unreachable" in direct.stderr, direct
    # The tree run reaches every leaf, depth 2 included (l3-1: ctl -> gw1 -> gw3 -> l3-1).
    topology = str(topo.dir / "topology.txt")
    tree = topo.run_in("ctl", topo.many("--json", "--topology", topology, "-H", LEAVES, *CMD))
    # The same run done flat from each gateway itself, inside its namespace.
    flat = []
    for gw, leaves in (("gw1", "l1-[1-2]"), ("gw2", "l2-[1-2]"), ("gw3", "l3-1")):
        r = topo.run_in(gw, topo.many("--json", "-H", leaves, *CMD), timeout=120)
        assert r.returncode == 1, r.stderr
        flat += _results(r.stdout)
    assert tree.returncode == 1, tree.stderr
    assert _results(tree.stdout) == sorted(flat)
    assert [x[3] for x in sorted(flat)] == [
        f"{_address('leaf1', 0)}\n{os.uname().nodename}\n",
        f"{_address('leaf1', 1)}\n{os.uname().nodename}\n",
        f"{_address('leaf2', 0)}\n{os.uname().nodename}\n",
        f"{_address('leaf2', 1)}\n{os.uname().nodename}\n",
        f"{_address('leaf3', 0)}\n{os.uname().nodename}\n",
    ]


def test_a_gateway_without_python3(topo: Topology) -> None:
    """gw2-nopy is reachable, but its sessions' PATH holds no python3: its host fails
    with a GatewayError that names it and python3, the other gateway's host runs, and nothing
    of the run is left in gw2's namespace."""
    assert _address("gw2", 1) == NO_PYTHON
    # (root's shell rc may put a python3 shim on the PATH: it cannot run there either)
    for gw, want in (("gw2", (0, "ran\n")), ("gw2-nopy", (127, ""))):
        probe = ["ssh", "-F", topo.config, gw, "python3 -c 'print(\"ran\")'"]
        p = topo.run_in("ctl", probe, timeout=60)
        assert (p.returncode, p.stdout) == want, p
    via = ["--via", "gw2-nopy:l2-1", "--via", "gw1:l1-1"]
    r = topo.run_in(
        "ctl", topo.many("--json", *via, "-H", "l1-1,l2-1", "--", "echo hi"), timeout=120
    )
    rows = {x["host"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert (rows["l1-1"]["status"], rows["l1-1"]["stdout"]) == ("ok", "hi\n"), rows
    bad = rows["l2-1"]
    assert (bad["status"], bad["returncode"], bad["error"]["type"]) == (
        "ssh_error",
        None,
        "GatewayError",
    ), bad
    assert bad["error"]["message"].startswith("gateway gw2-nopy: no python3 there"), bad
    assert r.returncode != 0
    assert topo.leftovers(["gw2"]) == []


def test_ctrl_c_leaves_nothing_in_any_gateway_namespace(topo: Topology, tmp_path: Path) -> None:
    cmd = f"touch {tmp_path}/started.$$; exec sleep 600"
    argv = topo.many("--json", "--topology", str(topo.dir / "topology.txt"), "-H", LEAVES)
    child = subprocess.Popen(
        ["ip", "netns", "exec", topo.ns["ctl"], *argv, "--", cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    gateways = ["gw1", "gw2", "gw3"]
    try:
        wait_until(lambda: len(list(tmp_path.glob("started.*"))) == 5, 90, "every leaf started")
        running = topo.leftovers(gateways)
        # each gateway: its agent, its watchdog, and an ssh per host it serves
        assert len([p for p in running if comm(p) == "ssh"]) == 6  # gw1: 3, gw2: 2, gw3: 1
        child.send_signal(signal.SIGINT)  # (ip netns exec execs the program: this is it)
        child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130
    assert wait_exited(running, 10) == []
    assert topo.leftovers(gateways) == []


def test_a_hung_leaf_keeps_the_timeout(topo: Topology) -> None:
    leaf = topo.sshd["leaf2"]
    leaf.suspend()  # the leaf's sshd (started here), SIGSTOPped by pid: connections hang
    try:
        topology = str(topo.dir / "topology.txt")
        bounds = ["--connect-timeout", "3", "--deadline", "30"]
        args = ["--json", "--topology", topology, *bounds, "-H", "l1-1,l2-1", "--", "echo hi"]
        # (a bound past the deadline: a run the leaf's timeout did not end fails below)
        r = topo.run_in("ctl", topo.many(*args), timeout=90)
    finally:
        leaf.resume()
    rows = {x["host"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert rows["l1-1"]["status"] == "ok", rows
    # The hung leaf ends by its connect timeout (the error names the bound that fired: no
    # wall-clock margin to miss on a loaded machine), not by the far deadline nor too early.
    hung = rows["l2-1"]
    assert hung["status"] == "ssh_error", hung
    assert "after 3 s (connect_timeout)" in hung["error"]["message"], hung
    assert 3 - 0.5 <= hung["duration"] < 30, hung


def test_a_gateway_killed_mid_run_fails_over(topo: Topology, tmp_path: Path) -> None:
    """gw2's side of the run dies (its sshd processes of this connection, SIGKILLed by pid):
    its hosts, listed under gw1 too, run through gw1; gw1's own hosts are untouched, and
    nothing of the run is left in gw2's namespace (its agent saw the connection go)."""
    gw2 = topo.sshd["gw2"]
    cmd = f"touch {tmp_path}/started.$$; while [ ! -e {tmp_path}/go ]; do sleep 0.05; done; echo ok"
    via = ["--via", "gw2:l2-[1-2]", "--via", "gw1:l1-1,l2-[1-2]"]
    argv = [
        "ip",
        "netns",
        "exec",
        topo.ns["ctl"],
        *topo.many("--json", *via, "-H", "l1-1,l2-[1-2]"),
    ]
    child = subprocess.Popen([*argv, "--", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(list(tmp_path.glob("started.*"))) == 3, 90, "every leaf started")
        before = set(gw2.session_pids())
        conn = [p for p in before if comm(p) == "sshd"]
        assert conn
        for p in conn:
            os.kill(p, signal.SIGKILL)
        (tmp_path / "go").touch()
        out, err = child.communicate(timeout=60)
    finally:
        (tmp_path / "go").touch()
        if child.poll() is None:
            child.kill()
            child.wait()
    rows = {x["host"]: x for x in map(json.loads, out.splitlines())}
    assert {h: (x["status"], x["stdout"]) for h, x in rows.items()} == {
        h: ("ok", "ok\n") for h in ("l1-1", "l2-1", "l2-2")
    }, err
    assert wait_exited(list(before), 10) == []
    assert topo.leftovers(["gw2"]) == []
