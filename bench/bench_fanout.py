"""Fan-out: one command on 200 host aliases (20 with ``--quick``), sshwrap against its peers.

Contenders, each in a child process of its own (so imports and start-up are not timed, and
its memory is its own): ``sshwrap.run_many``; parallel-ssh's ``ParallelSSHClient``;
asyncssh with ``asyncio.gather`` under a semaphore; ``xargs -P`` running plain ssh.  All
at the same concurrency and the same key exchange (``curve25519-sha256``: what the Python
libraries negotiate; OpenSSH's default sntrup761 costs ~85 ms more client CPU per
connection), plus sshwrap on ssh's default key exchange.

Wall time is measured in the child from a "go" line to the last result.  Memory: the parent
samples the child's whole process tree (Pss from ``/proc/PID/smaps_rollup``, so shared
pages of the many ssh processes count once overall) before "go" and every 50 ms during the
run; "per in-flight host" is (peak - idle) / concurrency.

Warm masters: sshwrap over ``sshwrap.connect`` Connections already up (commands go as
channels of each master) against the peers' cold runs, and against ``xargs -P`` + plain
``ssh`` over the same kind of warm masters.  50 ms RTT: the same through ``delayproxy.py``
(25 ms each way) in front of sshd, cold and with warm masters.

Cold runs are CPU bound on a small machine, so one sample says little: each cold case runs
``SSHWRAP_BENCH_FANOUT_REPS`` times (default 3, 1 with ``--quick``), the contenders
interleaved within each round, and the table shows each one's best wall time (other work on
a shared machine only ever adds time; the note gives every sample).

The aliases spread over the 16 loopback addresses one sshd can listen on.  Set
``SSHWRAP_BENCH_FANOUT_HOSTS=1000`` for the 1,000-host variant (it takes several minutes,
and the warm case then holds 1,000 masters).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import Row, fmt_s  # noqa: E402

from sshwrap.testing import LocalSSHD, proc_stat  # noqa: E402

KEX = "curve25519-sha256"
PEERS = ("pssh", "asyncssh", "xargs")


@dataclass
class Farm:
    """Simulated hosts: ssh aliases and, for the Python libraries, (address, port) pairs."""

    config: str
    aliases: list[str]
    targets: list[tuple[str, int]]
    known_hosts: str
    identity: str
    user: str


def make_farm(sshd: LocalSSHD, n: int, directory: str, port: int | None = None) -> Farm:
    """``n`` aliases over the sshd's addresses, at ``port`` (a proxy's) or the sshd's own."""
    port = port or sshd.port
    known = Path(directory) / f"known_hosts_{port}"
    lines = []
    for line in Path(sshd.known_hosts).read_text().splitlines():
        hostpart, rest = line.split(" ", 1)
        lines.append(line)
        if port != sshd.port:
            lines.append(hostpart.replace(f"]:{sshd.port}", f"]:{port}") + " " + rest)
    known.write_text("\n".join(lines) + "\n")
    aliases = [f"h{i + 1}" for i in range(n)]
    targets = [(sshd.addresses[i % len(sshd.addresses)], port) for i in range(n)]
    cfg: list[str] = []
    for alias, (addr, p) in zip(aliases, targets, strict=True):
        cfg += [f"Host {alias}", f"    HostName {addr}", f"    Port {p}"]
    cfg += [
        "Host *",
        f"    User {sshd.user}",
        f"    IdentityFile {sshd.identity}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {known}",
        "    GlobalKnownHostsFile /dev/null",
        "    StrictHostKeyChecking yes",
        "    UpdateHostKeys no",
        "    PasswordAuthentication no",
        "    KbdInteractiveAuthentication no",
    ]
    path = Path(directory) / f"ssh_config_{port}_{n}"
    path.write_text("\n".join(cfg) + "\n")
    os.chmod(path, 0o600)
    return Farm(str(path), aliases, targets, str(known), sshd.identity, sshd.user)


# -- the contenders (run in a child process) ------------------------------------------------


def _kex_opts(kex: str | None) -> dict[str, str]:
    return {"KexAlgorithms": kex} if kex else {}


def _child(spec: dict[str, Any]) -> None:
    farm = Farm(**spec["farm"])
    name: str = spec["name"]
    cmd: str = spec["cmd"]
    conc: int = spec["concurrency"]
    kex: str | None = spec["kex"]
    setup, go, teardown = _contender(name, farm, cmd, conc, kex)
    setup()
    print("ready", flush=True)
    sys.stdin.readline()
    c0, d0 = _cpu_self_and_children(), _cpu_self()
    t0 = time.perf_counter()
    ok = go()
    wall = time.perf_counter() - t0
    cpu, driver = _cpu_self_and_children() - c0, _cpu_self() - d0
    print(json.dumps({"wall": wall, "ok": ok, "cpu": cpu, "driver": driver}), flush=True)
    teardown()


def _nothing() -> None:
    pass


def _cpu_self() -> float:
    """CPU seconds of this process alone: the driver, without its ssh children."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def _cpu_self_and_children() -> float:
    """CPU seconds of this process and its reaped descendants (the ssh children, xargs)."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def sshd_cpu(pids: list[int]) -> float:
    """CPU seconds of the sshd listeners and their reaped per-connection children."""
    total = 0
    for pid in pids:
        fields = proc_stat(pid)
        if fields is not None:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def _contender(
    name: str, farm: Farm, cmd: str, conc: int, kex: str | None
) -> tuple[Callable[[], None], Callable[[], int], Callable[[], None]]:
    if name == "sshwrap":
        import sshwrap

        def go() -> int:
            rs = sshwrap.run_many(
                farm.aliases, cmd, concurrency=conc, config=farm.config, options=_kex_opts(kex)
            )
            return sum(r.ok for r in rs)

        def load() -> None:
            import sshwrap.fanout  # noqa: F401  (its code loaded before the clock starts, as the peers' are)

        return load, go, _nothing
    if name == "sshwrap-warm":
        import sshwrap

        conns: list[Any] = []

        def setup() -> None:
            def one(alias: str) -> Any:
                return sshwrap.connect(alias, config=farm.config, options=_kex_opts(kex))

            with ThreadPoolExecutor(16) as ex:
                conns.extend(ex.map(one, farm.aliases))

        def go() -> int:
            rs = sshwrap.run_many(conns, cmd, concurrency=conc)
            return sum(r.ok for r in rs)

        def teardown() -> None:
            with ThreadPoolExecutor(16) as ex:
                list(ex.map(lambda c: c.close(), conns))

        return setup, go, teardown
    if name in ("xargs", "xargs-warm"):
        ctl = tempfile.mkdtemp(prefix="bfx-")
        base = ["ssh", "-F", farm.config, "-o", "BatchMode=yes"]
        for k, v in _kex_opts(kex).items():
            base += ["-o", f"{k}={v}"]
        mux = ["-o", f"ControlPath={ctl}/%n"]
        hosts = "\n".join(farm.aliases) + "\n"

        def xargs(p: int, argv: list[str]) -> int:
            return subprocess.run(
                ["xargs", "-P", str(p), "-I{}", *argv],
                input=hosts.encode(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ).returncode

        def setup() -> None:
            if name == "xargs-warm":
                master = ["-o", "ControlMaster=yes", "-o", "ControlPersist=300", "-N", "-f"]
                xargs(32, [*base, *mux, *master, "{}"])

        def go() -> int:
            argv = [*base, *mux, "-o", "ControlMaster=no"] if name == "xargs-warm" else base
            rc = xargs(conc, [*argv, "{}", cmd])
            return len(farm.aliases) if rc == 0 else 0

        def teardown() -> None:
            if name == "xargs-warm":
                xargs(32, [*base, *mux, "-O", "exit", "{}"])
            shutil.rmtree(ctl, ignore_errors=True)

        return setup, go, teardown
    if name == "pssh":
        from pssh.clients import ParallelSSHClient

        def go() -> int:
            client = ParallelSSHClient(
                [a for a, _ in farm.targets],
                port=farm.targets[0][1],
                user=farm.user,
                pkey=farm.identity,
                pool_size=conc,
                num_retries=1,
                timeout=60,
            )
            output = client.run_command(cmd)
            client.join(output)
            ok = 0
            for o in output:
                list(o.stdout or ())
                ok += o.exit_code == 0
            return ok

        return _nothing, go, _nothing
    if name == "asyncssh":
        import asyncssh

        async def main() -> int:
            sem = asyncio.Semaphore(conc)

            async def one(addr: str, port: int) -> bool:
                async with (
                    sem,
                    asyncssh.connect(
                        addr,
                        port=port,
                        username=farm.user,
                        client_keys=[farm.identity],
                        known_hosts=farm.known_hosts,
                        kex_algs=[kex or KEX],
                        config=[],
                    ) as conn,
                ):
                    r = await conn.run(cmd)
                    return r.exit_status == 0

            rs = await asyncio.gather(*(one(a, p) for a, p in farm.targets))
            return sum(rs)

        return _nothing, lambda: asyncio.run(main()), _nothing
    raise ValueError(name)


# -- measuring (parent) ---------------------------------------------------------------------


_PF_FORKNOEXEC = 0x40  # task flag: forked, has not exec'd yet


def _tree(pid: int) -> list[int]:
    """A process and its descendants, minus children caught between (v)fork and exec.

    A vfork child shares its parent's whole address space until it execs, and
    ``smaps_rollup`` would count that space once more for it: a sample taken while the
    driver starts an ssh would add the driver's own size again.  Such a child (same name
    as its parent, ``PF_FORKNOEXEC``) is left out; it is an ssh a moment later.
    """
    kids: dict[int, list[int]] = {}
    comm: dict[int, bytes] = {}
    fresh: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            p = int(entry)
            end = stat.rindex(b")")
            fields = stat[end + 2 :].split()
            kids.setdefault(int(fields[1]), []).append(p)
            comm[p] = stat[stat.index(b"(") + 1 : end]
            if int(fields[6]) & _PF_FORKNOEXEC:
                fresh.add(p)
    out, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        for c in kids.get(parent, []):
            if c in fresh and comm.get(c) == comm.get(parent):
                continue
            out.append(c)
            todo.append(c)
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and all its descendants, in MB."""
    return sum(_pss_kb(p) for p in _tree(pid)) / 1024


@dataclass
class Result:
    """One contender's run."""

    wall: float
    ok: int
    peak_mb: float = 0.0
    idle_mb: float = 0.0
    maxrss_mb: float = 0.0
    cpu: float = 0.0  # the contender's own CPU seconds during the run, ssh children included
    sshd_cpu: float = 0.0  # sshd's CPU seconds during the run
    driver_cpu: float = 0.0  # the contender's own process alone (its ssh children not counted)

    def per_host_ms(self, n: int) -> str:
        """CPU per host: the client side (driver and ssh) + sshd, in ms."""
        return f"{1000 * self.cpu / n:.1f}+{1000 * self.sshd_cpu / n:.1f}"


def measure(
    name: str,
    farm: Farm,
    cmd: str,
    conc: int,
    kex: str | None,
    mem: bool,
    sshd_pids: list[int] | None = None,
) -> Result:
    """Run one contender in a child process; time it (and sample its memory if ``mem``).

    With ``sshd_pids``, sshd's CPU during the run is recorded too.
    """
    spec = {"name": name, "farm": asdict(farm), "cmd": cmd, "concurrency": conc, "kex": kex}
    p = subprocess.Popen(
        [sys.executable, __file__, "child", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdin is not None and p.stdout is not None
    try:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{name}: child failed during setup")
        idle = tree_pss_mb(p.pid) if mem else 0.0
        peak = idle
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.05):
                peak = max(peak, tree_pss_mb(p.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        if mem:
            sampler.start()
        s0 = sshd_cpu(sshd_pids or [])
        p.stdin.write("go\n")
        p.stdin.flush()
        line = p.stdout.readline()
        s1 = sshd_cpu(sshd_pids or [])
        stop.set()
        if mem:
            sampler.join()
        if not line:
            raise RuntimeError(f"{name}: child died during the run")
        res = json.loads(line)
        p.stdin.close()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if p.returncode is None:
            p.kill()
            p.wait()
    return Result(
        res["wall"],
        res["ok"],
        peak,
        idle,
        usage.ru_maxrss / 1024,
        res["cpu"],
        s1 - s0,
        res["driver"],
    )


# -- the table ----------------------------------------------------------------------------


def _start_proxy(sshd: LocalSSHD, delay: float) -> tuple[subprocess.Popen[str], int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "delayproxy.py"),
            "--delay",
            str(delay),
            "--port",
            str(port),
            "--target-port",
            str(sshd.port),
            *sshd.addresses,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proxy.stdout is not None
    if proxy.stdout.readline().strip() != "ready":
        proxy.kill()
        proxy.wait()
        raise RuntimeError("delay proxy did not start")
    return proxy, port


def _best(rs: list[Result]) -> Result:
    """The run with the shortest wall time (the least disturbed by other work)."""
    return min(rs, key=lambda r: r.wall)


def _samples(rs: list[Result]) -> str:
    return "/".join(f"{r.wall:.2f}" for r in rs)


def _mb(r: Result, conc: int) -> str:
    per = (r.peak_mb - r.idle_mb) / conc
    return f"{r.peak_mb:.0f} MB ({per:.2f} MB/host)"


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """The fan-out rows of the benchmark table (starts its own 16-address sshd)."""
    n = 20 if quick else int(os.environ.get("SSHWRAP_BENCH_FANOUT_HOSTS", "200"))
    concs = (10, 20) if quick else (50, 100)
    cmds = ("true",) if quick else ("true", "uname -a")
    reps = 1 if quick else max(1, int(os.environ.get("SSHWRAP_BENCH_FANOUT_REPS", "3")))
    rows: list[Row] = []
    with LocalSSHD(hosts=16) as farm_sshd, tempfile.TemporaryDirectory() as d:
        farm = make_farm(farm_sshd, n, d)
        cold: dict[tuple[str, str, int], Result] = {}
        for cmd in cmds:
            for conc in concs:
                runs: dict[str, list[Result]] = {}
                for _ in range(reps):
                    for name in ("sshwrap", *PEERS):
                        r = measure(name, farm, cmd, conc, KEX, False, farm_sshd.pids)
                        runs.setdefault(name, []).append(r)
                for name, rs in runs.items():
                    cold[(name, cmd, conc)] = _best(rs)
                cold[("sshwrap-default", cmd, conc)] = measure(
                    "sshwrap", farm, cmd, conc, None, False
                )
                me = cold[("sshwrap", cmd, conc)]
                for peer in PEERS:
                    other = cold[(peer, cmd, conc)]
                    ratio = me.wall / other.wall
                    rows.append(
                        Row(
                            f"fanout cold {n}x '{cmd}' -p{conc}: vs {peer}",
                            fmt_s(me.wall),
                            fmt_s(other.wall),
                            ratio,
                            "fastest (<1.0x)",
                            ratio < 1.0 and me.ok == n and other.ok == n,
                            (
                                f"best of {reps}: sshwrap {_samples(runs['sshwrap'])} s, "
                                f"{peer} {_samples(runs[peer])} s; "
                                if reps > 1
                                else ""
                            )
                            + f"CPU ms/host client+sshd: sshwrap {me.per_host_ms(n)}, "
                            f"{peer} {other.per_host_ms(n)}"
                            + ("" if other.ok == n else f"; {peer}: only {other.ok}/{n} ok"),
                        )
                    )
                # The least disturbed sample of sshwrap's own CPU (other work on a shared
                # machine only ever adds to it: cache misses, context switches).
                least = min(runs["sshwrap"], key=lambda r: r.driver_cpu)
                driver_ms = 1000 * least.driver_cpu / n
                ssh_ms = 1000 * (least.cpu - least.driver_cpu) / n
                driver_samples = "/".join(f"{1000 * r.driver_cpu / n:.2f}" for r in runs["sshwrap"])
                rows.append(
                    Row(
                        f"fanout driver CPU {n}x '{cmd}' -p{conc}: per host vs its ssh",
                        f"{driver_ms:.2f} ms",
                        f"{ssh_ms:.2f} ms",
                        driver_ms / ssh_ms if ssh_ms else None,
                        "driver <= 0.35 ms/host",
                        driver_ms <= 0.35,
                        "sshwrap's own process (scheduling, pipes, logs, results) against the "
                        f"OpenSSH client it runs per host; least of {reps}: {driver_samples} ms",
                    )
                )
                dflt = cold[("sshwrap-default", cmd, conc)]
                rows.append(
                    Row(
                        f"fanout cold {n}x '{cmd}' -p{conc}: default kex vs curve25519",
                        fmt_s(dflt.wall),
                        fmt_s(me.wall),
                        dflt.wall / me.wall,
                        "",
                        None,
                        "sshwrap on ssh's default kex (sntrup761) against itself on curve25519",
                    )
                )
        # Memory, at the largest concurrency.
        conc = concs[-1]
        cmd = cmds[-1]
        mem = {name: measure(name, farm, cmd, conc, KEX, True) for name in ("sshwrap", *PEERS)}
        for peer in PEERS:
            rows.append(
                Row(
                    f"fanout memory '{cmd}' -p{conc}: vs {peer}",
                    _mb(mem["sshwrap"], conc),
                    _mb(mem[peer], conc),
                    mem["sshwrap"].peak_mb / mem[peer].peak_mb,
                    "",
                    None,
                    "peak Pss of the whole process tree (ssh children included); "
                    f"driver ru_maxrss sshwrap {mem['sshwrap'].maxrss_mb:.0f} MB, "
                    f"{peer} {mem[peer].maxrss_mb:.0f} MB",
                )
            )
        # Warm masters.
        for cmd in cmds:
            warm = measure("sshwrap-warm", farm, cmd, conc, KEX, False)
            xwarm = measure("xargs-warm", farm, cmd, conc, KEX, False)
            for peer in PEERS:
                other = cold[(peer, cmd, conc)]
                ratio = warm.wall / other.wall
                rows.append(
                    Row(
                        f"fanout warm masters {n}x '{cmd}' -p{conc}: vs {peer} (cold)",
                        fmt_s(warm.wall),
                        fmt_s(other.wall),
                        ratio,
                        ">=2.5x faster (<=0.40x)",
                        ratio <= 0.40 and warm.ok == n,
                    )
                )
            rows.append(
                Row(
                    f"fanout warm masters {n}x '{cmd}' -p{conc}: vs xargs+ssh over masters",
                    fmt_s(warm.wall),
                    fmt_s(xwarm.wall),
                    warm.wall / xwarm.wall,
                    "faster (<1.0x)",
                    warm.wall < xwarm.wall and warm.ok == n,
                )
            )
        # 50 ms of round trip.
        proxy, pport = _start_proxy(farm_sshd, 0.025)
        try:
            wan = make_farm(farm_sshd, n, d, pport)
            cmd = "true"
            wcold = {
                name: measure(name, wan, cmd, conc, KEX, False) for name in ("sshwrap", *PEERS)
            }
            wwarm = measure("sshwrap-warm", wan, cmd, conc, KEX, False)
            wx = measure("xargs-warm", wan, cmd, conc, KEX, False)
        finally:
            proxy.terminate()
            proxy.wait()
        me = wcold["sshwrap"]
        for peer in PEERS:
            other = wcold[peer]
            rows.append(
                Row(
                    f"fanout 50ms RTT cold {n}x '{cmd}' -p{conc}: vs {peer}",
                    fmt_s(me.wall),
                    fmt_s(other.wall),
                    me.wall / other.wall,
                    "fastest (<1.0x)",
                    me.wall < other.wall and me.ok == n and other.ok == n,
                )
            )
            rows.append(
                Row(
                    f"fanout 50ms RTT warm masters {n}x '{cmd}' -p{conc}: vs {peer} (cold)",
                    fmt_s(wwarm.wall),
                    fmt_s(other.wall),
                    wwarm.wall / other.wall,
                    ">=2.5x faster (<=0.40x)",
                    wwarm.wall / other.wall <= 0.40 and wwarm.ok == n,
                )
            )
        rows.append(
            Row(
                f"fanout 50ms RTT warm masters {n}x '{cmd}' -p{conc}: vs xargs+ssh over masters",
                fmt_s(wwarm.wall),
                fmt_s(wx.wall),
                wwarm.wall / wx.wall,
                "faster (<1.0x)",
                wwarm.wall < wx.wall and wwarm.ok == n,
            )
        )
    return rows


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "child":
        _child(json.loads(sys.argv[2]))
    else:
        quick = "--quick" in sys.argv
        with LocalSSHD() as s:
            from run import _table

            print(_table(run(s, quick)))
