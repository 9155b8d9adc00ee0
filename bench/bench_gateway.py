"""Gateways (issue 13): one command on 400 leaf aliases behind 4 gateways (40 behind 2 with
``--quick``), against a flat run of the same leaves and against ClusterShell's tree mode.

Everything runs on this machine: the leaves are aliases of one ``LocalSSHD`` (16 addresses, its
quiet test user), the gateways aliases of another that logs in as root (as tests/test_gateway.py
does, so a gateway reads the same client config and key, whose paths exist there too).  Each
contender runs in a child process of its own (imports and start-up not timed), from a "go"
line to its last result, all at the same key exchange (``curve25519-sha256``):

- ``flat``: ``sshwrap.run_many`` from here to every leaf, ``concurrency`` = gateways x
  per-gateway concurrency (so as many ssh processes are in flight as in the trees);
- ``tree``: the same through the gateways (``via=``), ``concurrency`` per gateway;
- ``clush``: ClusterShell's ``task.shell(..., tree=True)`` with a ``topology.conf`` for the
  same tree (root: this host's short name), ``fanout`` = the same per-gateway concurrency,
  ``ssh_options`` giving the same ``-F`` config (ClusterShell sends its task info to the
  gateways, so their ssh gets it too), the gateway started with this venv's python
  (``CLUSTERSHELL_GW_PYTHON_EXECUTABLE``).

Control-node CPU: the child's own CPU and its reaped children's (the ssh to each gateway; in
the flat run, every leaf's ssh), by rusage.  Gateway CPU: the gateway sshd's cumulative CPU
(its per-connection processes, which reap the agent and every ssh it ran to a leaf), read
once every session of the run has ended.  Rounds interleave the contenders and repeat
``SSHWRAP_BENCH_GATEWAY_REPS`` times (default 3, 1 with ``--quick``); the table shows each one's
least control CPU and best wall time (other work on a shared machine only ever adds).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_fanout import KEX, Farm, make_farm, sshd_cpu  # noqa: E402
from common import CpuGroup, Row, fmt_s  # noqa: E402

from sshwrap import hosts as expand  # noqa: E402
from sshwrap.testing import LocalSSHD  # noqa: E402

CONTENDERS = ("flat", "tree", "clush")
SITE = sysconfig.get_paths()["purelib"]  # ClusterShell's, for the gateways' python3


@dataclass
class Tree:
    """The leaves, the gateways (name -> leaf nodeset) and the config that names them all."""

    config: str
    leaves: list[str]
    via: dict[str, str]
    topology: str
    per_gateway: int


def _nodeset(first: int, last: int) -> str:
    return f"h[{first}-{last}]"


def make_tree(leaf_sshd: LocalSSHD, gw_sshd: LocalSSHD, n: int, g: int, d: str) -> Tree:
    """``n`` leaf aliases ``h1..hn`` over ``leaf_sshd`` and ``g`` gateway aliases ``gw1..``
    over ``gw_sshd`` in one client config; the leaves split evenly over the gateways."""
    farm: Farm = make_farm(leaf_sshd, n, d)
    known = Path(farm.known_hosts)
    known.write_text(known.read_text() + Path(gw_sshd.known_hosts).read_text())
    head: list[str] = []
    for i in range(g):
        addr = gw_sshd.addresses[i % len(gw_sshd.addresses)]
        head += [f"Host gw{i + 1}", f"    HostName {addr}", f"    Port {gw_sshd.port}"]
        head += [f"    User {gw_sshd.user}", f"    IdentityFile {gw_sshd.identity}"]
    cfg = Path(farm.config)
    cfg.write_text("\n".join(head) + "\n" + cfg.read_text())
    per = n // g
    last = [n if i == g - 1 else (i + 1) * per for i in range(g)]
    via = {f"gw{i + 1}": _nodeset(i * per + 1, last[i]) for i in range(g)}
    root = socket.gethostname().split(".")[0]
    topo = Path(d) / "topology.conf"
    gws = f"gw[1-{g}]"
    topo.write_text(
        "[routes]\n" + f"{root}: {gws}\n" + "".join(f"{k}: {v}\n" for k, v in via.items())
    )
    return Tree(str(cfg), farm.aliases, via, str(topo), 0)


# -- the contenders (each in a child process) -----------------------------------------------


def _cpu() -> tuple[float, float]:
    """(this process + its reaped children, this process alone) CPU seconds."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = me.ru_utime + me.ru_stime
    return own + kids.ru_utime + kids.ru_stime, own


def _child(spec: dict[str, Any]) -> None:
    tree = Tree(**spec["tree"])
    name: str = spec["name"]
    opts = {"KexAlgorithms": KEX}
    if name == "clush":
        from ClusterShell.Task import task_self  # type: ignore[import-untyped]

        # The gateway's python3 (the one sshwrap's agent runs) finds ClusterShell there.
        os.environ["PYTHONPATH"] = SITE
        task = task_self()
        task.load_topology(tree.topology)
        task.set_info("ssh_options", f"-F {tree.config} -oKexAlgorithms={KEX} -oBatchMode=yes")
        task.set_info("fanout", tree.per_gateway)
        task.set_info("connect_timeout", 60)

        def go() -> int:
            task.shell("true", nodes=",".join(tree.leaves), tree=True)
            task.run()
            return sum(len(nodes) for rc, nodes in task.iter_retcodes() if rc == 0)

    else:
        import sshwrap
        import sshwrap.fanout  # (loaded before the clock starts)
        from sshwrap.io.bundle import package_zip

        package_zip()  # built once per process, like the imports: not timed
        via = tree.via if name == "tree" else None
        conc = tree.per_gateway * (1 if via else len(tree.via))

        def go() -> int:
            rs = sshwrap.run_many(
                tree.leaves, "true", concurrency=conc, config=tree.config, options=opts, via=via
            )
            bad = [r for r in rs if not r.ok]
            if bad:
                print(f"{name}: {len(bad)} failed, e.g. {bad[0]!r}", file=sys.stderr)
            return len(rs) - len(bad)

    print("ready", flush=True)
    sys.stdin.readline()
    c0, d0 = _cpu()
    t0 = time.perf_counter()
    ok = go()
    wall = time.perf_counter() - t0
    c1, d1 = _cpu()
    print(json.dumps({"wall": wall, "ok": ok, "cpu": c1 - c0, "driver": d1 - d0}), flush=True)


@dataclass
class Result:
    """One contender's run: wall and CPU seconds."""

    wall: float
    ok: int
    cpu: float  # control node: the child and its reaped ssh children
    gateway_cpu: float  # the gateways' sshd, its sessions, the agents and their ssh


def _settled(sshds: list[LocalSSHD], bound: float = 30.0) -> None:
    """Wait (bounded) until no session of these sshds runs: their CPU is then all counted."""
    end = time.monotonic() + bound
    while any(s.session_pids() for s in sshds):
        if time.monotonic() > end:
            raise RuntimeError("sshd sessions still running after the run")
        time.sleep(0.02)  # polling /proc for the sessions' exit (no event to wait on)


def measure(
    name: str, tree: Tree, gw_sshd: LocalSSHD, leaf_sshd: LocalSSHD, group: CpuGroup | None
) -> Result:
    """Run one contender in a child process; ``group``: the cgroup the gateway sshd is in."""

    def gw_cpu() -> float:
        return group.usage() if group is not None else sshd_cpu(gw_sshd.pids)

    env = dict(os.environ, CLUSTERSHELL_GW_PYTHON_EXECUTABLE="python3")
    spec = {"name": name, "tree": asdict(tree)}
    p = subprocess.Popen(
        [sys.executable, __file__, "child", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdin is not None and p.stdout is not None
    try:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{name}: child failed during setup")
        _settled([gw_sshd, leaf_sshd])
        g0 = gw_cpu()
        p.stdin.write("go\n")
        p.stdin.flush()
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"{name}: child died during the run")
        p.stdin.close()
        p.wait(60)
        _settled([gw_sshd, leaf_sshd])
        g1 = gw_cpu()
    finally:
        if p.returncode is None:
            p.kill()
            p.wait()
    res = json.loads(line)
    return Result(res["wall"], res["ok"], res["cpu"], g1 - g0)


# -- the table ----------------------------------------------------------------------------


def _ms(x: float, n: int) -> str:
    return f"{1000 * x / n:.2f} ms"


def _samples(rs: list[Result], n: int) -> str:
    return "/".join(f"{r.wall:.2f}s,{1000 * r.cpu / n:.2f}ms" for r in rs)


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """The gateway rows (starts its own two sshds: the leaves', the gateways')."""
    if os.geteuid() != 0:
        return [Row("gateway tree", "", "", note="skipped: needs root (sessions log in as root)")]
    n, g = (40, 2) if quick else (400, 4)
    n = int(os.environ.get("SSHWRAP_BENCH_GATEWAY_HOSTS", n))
    per = 20 if quick else 25
    reps = max(1, int(os.environ.get("SSHWRAP_BENCH_GATEWAY_REPS", "1" if quick else "3")))
    with (
        LocalSSHD(hosts=16) as leaf_sshd,
        LocalSSHD(hosts=g, user="root") as gw_sshd,
        tempfile.TemporaryDirectory() as d,
        contextlib.ExitStack() as stack,
    ):
        group = stack.enter_context(CpuGroup("gw")) if CpuGroup.available() else None
        if group is not None:
            group.add(gw_sshd.pids)
        tree = make_tree(leaf_sshd, gw_sshd, n, g, d)
        tree.per_gateway = per
        assert sorted(tree.leaves) == sorted(expand(",".join(tree.via.values())))
        runs: dict[str, list[Result]] = {k: [] for k in CONTENDERS}
        order = list(CONTENDERS)
        for _ in range(reps):
            for name in order:
                r = measure(name, tree, gw_sshd, leaf_sshd, group)
                if r.ok != n:
                    raise RuntimeError(f"{name}: only {r.ok}/{n} hosts ok")
                runs[name].append(r)
            order.reverse()
        return _rows(runs, n, g, per, reps)


def _rows(runs: dict[str, list[Result]], n: int, g: int, per: int, reps: int) -> list[Row]:
    cpu = {k: min(r.cpu for r in v) for k, v in runs.items()}
    wall = {k: min(r.wall for r in v) for k, v in runs.items()}
    gw = {k: min(r.gateway_cpu for r in v) for k, v in runs.items()}
    where = f"gateway tree {n} leaves / {g} gateways, -p{per} per gateway"
    notes = {k: f"{k} {_samples(v, n)}" for k, v in runs.items()}

    def per_host(x: float) -> str:
        return _ms(x, n)

    def row(
        what: str,
        val: dict[str, float],
        other: str,
        show: Callable[[float], str],
        goal: str = "",
        limit: float | None = None,
        note: str = "",
    ) -> Row:
        ratio = val["tree"] / val[other]
        ok = None if limit is None else ratio < limit
        return Row(f"{where}: {what}", show(val["tree"]), show(val[other]), ratio, goal, ok, note)

    least = f"least of {reps} (wall,CPU/host): {notes['tree']}; {notes['flat']}"
    return [
        row("control CPU per host vs flat", cpu, "flat", per_host, "<= 0.05x", 0.05001, least),
        row("wall vs flat (one box: overhead)", wall, "flat", fmt_s, note="all on one machine"),
        row(
            "per-host CPU on each gateway vs clush's",
            gw,
            "clush",
            per_host,
            note="the gateways' sshd sessions, agents and their ssh to the leaves",
        ),
        row(
            "wall vs ClusterShell tree", wall, "clush", fmt_s, "ahead (<1.0x)", 1.0, notes["clush"]
        ),
        row("control CPU vs ClusterShell tree", cpu, "clush", per_host, "ahead (<1.0x)", 1.0),
    ]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "child":
    _child(json.loads(sys.argv[2]))
