"""Fleet copy: ``put_many`` of a 10 MB file to 50 host aliases (4 with ``--quick``), against
``xargs -P`` + ``scp`` and parallel-ssh's ``copy_file``.

Every contender starts cold (a new connection per host: sshwrap starts a ControlMaster per
host and sends SFTP over it, scp makes its own connection, parallel-ssh its libssh2 one) at
the same concurrency (every host at once) and on the same key exchange (``curve25519-sha256``,
what parallel-ssh negotiates).  Each host writes its own remote file (``%h``; scp's and
parallel-ssh's per-host names likewise).  parallel-ssh runs in a child process of its own
(gevent), timed there around the call only; sshwrap and xargs are timed here.  The runs
alternate and the table shows each one's best wall time of ``SSHWRAP_BENCH_COPY_REPS``
(default 3; 1 with ``--quick``): other work on a shared machine only ever adds time.  A last
row: sshwrap over warm masters (``Connection`` objects already up) against the same cold
``xargs``.  Goal (issue 12): fastest.  Client CPU, where wall is noisy: as root, this process
goes into a cpuacct cgroup of its own for the run, so every process it starts counts (the
masters that ``ssh -f`` leaves to init included; sshd, started before, does not);
parallel-ssh's from its own rusage around the call.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_fanout import KEX, Farm, make_farm  # noqa: E402
from common import CpuGroup, Row, fmt_s  # noqa: E402

from sshwrap.connection import Connection, connect  # noqa: E402
from sshwrap.fleet import put_many  # noqa: E402
from sshwrap.testing import LocalSSHD  # noqa: E402

MB = 1_000_000

PSSH_CHILD = """
import json, sys, time
from pssh.clients import ParallelSSHClient
from gevent import joinall
spec = json.loads(sys.argv[1])
client = ParallelSSHClient(
    [a for a, _ in spec["targets"]], port=spec["targets"][0][1], user=spec["user"],
    pkey=spec["identity"], pool_size=len(spec["targets"]), num_retries=1, timeout=120,
)
args = [{"h": a} for a in spec["aliases"]]
import resource
c0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
greenlets = client.copy_file(spec["src"], spec["remote"] + "/%(h)s.bin", copy_args=args)
joinall(greenlets, raise_error=True)
wall = time.perf_counter() - t0
c1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
"""


def _have_pssh() -> bool:
    try:
        import pssh  # noqa: F401
    except ImportError:
        return False
    return True


def _remote_dir(user: str) -> str:
    d = tempfile.mkdtemp(prefix="sshwrap-bfc-")
    os.chmod(d, 0o755)
    if os.geteuid() == 0:
        import pwd

        e = pwd.getpwnam(user)
        os.chown(d, e.pw_uid, e.pw_gid)
    return d


def _clear(d: str) -> None:
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))


def _check(d: str, farm: Farm, size: int) -> int:
    """How many hosts' files arrived whole."""
    return sum(
        os.path.exists(p := os.path.join(d, f"{a}.bin")) and os.path.getsize(p) == size
        for a in farm.aliases
    )


Sample = tuple[float, float | None]  # wall seconds, CPU seconds (None: the group's count)


def _contenders(farm: Farm, src: str, rdir: str) -> dict[str, Callable[[], Sample]]:
    n = len(farm.aliases)
    opts = {"KexAlgorithms": KEX}

    def sshwrap() -> Sample:
        t0 = time.perf_counter()
        results = put_many(
            farm.aliases, src, f"{rdir}/%h.bin", config=farm.config, concurrency=n, options=opts
        )
        wall = time.perf_counter() - t0
        assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
        return wall, None

    def xargs() -> Sample:
        argv = ["xargs", "-P", str(n), "-I{}", "scp", "-q", "-F", farm.config]
        argv += ["-o", f"KexAlgorithms={KEX}", "-o", "BatchMode=yes", src, f"{{}}:{rdir}/{{}}.bin"]
        t0 = time.perf_counter()
        subprocess.run(argv, input="\n".join(farm.aliases).encode(), check=True, timeout=600)
        return time.perf_counter() - t0, None

    def pssh() -> Sample:
        spec = {
            "targets": farm.targets,
            "aliases": farm.aliases,
            "user": farm.user,
            "identity": farm.identity,
            "src": src,
            "remote": rdir,
        }
        out = subprocess.run(
            [sys.executable, "-c", PSSH_CHILD, json.dumps(spec)],
            capture_output=True,
            check=True,
            timeout=600,
        )
        got = json.loads(out.stdout.decode().strip().splitlines()[-1])
        return float(got["wall"]), float(got["cpu"])

    cases = {"sshwrap": sshwrap, "xargs -P + scp": xargs}
    if _have_pssh():
        cases["parallel-ssh copy_file"] = pssh
    return cases


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """The fleet-copy rows (starts its own 16-address sshd)."""
    n = 4 if quick else int(os.environ.get("SSHWRAP_BENCH_COPY_HOSTS", "50"))
    size = 10 * MB
    reps = max(1, int(os.environ.get("SSHWRAP_BENCH_COPY_REPS", "1" if quick else "3")))
    with (
        LocalSSHD(hosts=16) as farm_sshd,
        tempfile.TemporaryDirectory() as d,
        contextlib.ExitStack() as stack,
    ):
        farm = make_farm(farm_sshd, n, d)
        src = os.path.join(d, "payload.bin")
        with open(src, "wb") as f:
            f.write(os.urandom(size))
        rdir = _remote_dir(farm.user)
        stack.callback(shutil.rmtree, rdir, ignore_errors=True)
        # This process and what it starts (sshd is already running: it stays out).
        group = stack.enter_context(CpuGroup("copy")) if CpuGroup.available() else None
        if group is not None:
            group.add([os.getpid()])
        cases = _contenders(farm, src, rdir)
        times: dict[str, list[float]] = {k: [] for k in cases}
        cpus: dict[str, list[float]] = {k: [] for k in cases}
        order = list(cases)
        for _ in range(reps):
            for name in order:
                _clear(rdir)
                g0 = group.usage() if group is not None else 0.0
                wall, cpu = cases[name]()
                g1 = group.usage() if group is not None else 0.0
                times[name].append(wall)
                if cpu is not None or group is not None:
                    cpus[name].append(cpu if cpu is not None else g1 - g0)
                got = _check(rdir, farm, size)
                if got != n:
                    raise RuntimeError(f"{name}: only {got}/{n} hosts got the file")
            order.reverse()
        rows = _rows(times, cpus, n, reps)
        if not _have_pssh():
            rows.append(Row("put_many vs parallel-ssh", "", "", note="pssh not installed"))
        warm = _warm(farm, src, rdir, n, reps)
        base = min(times["xargs -P + scp"])
        rows.append(
            Row(
                f"put_many 10 MB to {n} hosts over warm masters: vs cold xargs -P + scp",
                fmt_s(warm),
                fmt_s(base),
                warm / base,
                "fastest (<1.0x)",
                warm < base,
            )
        )
        return rows


def _rows(
    times: dict[str, list[float]], cpus: dict[str, list[float]], n: int, reps: int
) -> list[Row]:
    best = {k: min(v) for k, v in times.items()}
    rows = []
    me = best["sshwrap"]
    for peer in [k for k in times if k != "sshwrap"]:
        ratio = me / best[peer]
        rows.append(
            Row(
                f"put_many 10 MB to {n} hosts cold: vs {peer}",
                fmt_s(me),
                fmt_s(best[peer]),
                ratio,
                "fastest (<1.0x)",
                ratio < 1.0,
                f"best of {reps}: sshwrap {_samples(times['sshwrap'])} s, "
                f"{peer} {_samples(times[peer])} s",
            )
        )
        if cpus["sshwrap"] and cpus[peer]:
            mine, theirs = min(cpus["sshwrap"]), min(cpus[peer])
            rows.append(
                Row(
                    f"put_many 10 MB to {n} hosts cold: client CPU vs {peer}",
                    f"{1000 * mine / n:.1f} ms/host",
                    f"{1000 * theirs / n:.1f} ms/host",
                    mine / theirs,
                    "",
                    None,
                    f"least of {reps}, the client side (ssh and scp processes, masters "
                    f"included; sshd not): sshwrap {_samples(cpus['sshwrap'])} s, "
                    f"{peer} {_samples(cpus[peer])} s"
                    + (" (its own process, by rusage)" if peer.startswith("parallel") else ""),
                )
            )
    return rows


def _warm(farm: Farm, src: str, rdir: str, n: int, reps: int) -> float:
    conns: list[Connection] = []
    try:
        for alias in farm.aliases:
            conns.append(connect(alias, config=farm.config, options={"KexAlgorithms": KEX}))
        best = float("inf")
        for _ in range(reps):
            _clear(rdir)
            t0 = time.perf_counter()
            results = put_many(conns, src, f"{rdir}/%h.bin", concurrency=n)
            best = min(best, time.perf_counter() - t0)
            assert all(r.ok for r in results)
        return best
    finally:
        for c in conns:
            c.close()


def _samples(xs: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in xs)
