"""Masters that outlive a run: ``sshwrap-many --persist`` on 200 hosts (20 with ``--quick``).

Each run is the whole ``sshwrap-many`` command (its start-up included), as a user runs it
one invocation after another: the first (cold) run without ``--persist``, the first run with
``--persist 5m`` (cold too: it leaves every host's master up) and the second run with
``--persist 5m``, which finds those masters and makes no new connection.  The goal (issue
12): the second run at most 0.2x the cold one, and at most 0.2x parallel-ssh's cold run
(``ParallelSSHClient``, timed by ``bench_fanout.measure`` in a child of its own from a "go"
line to its last result: its start-up is not counted, sshwrap's is).

Every alias has an address of its own (one sshd per 16 loopback addresses), so each host
gets a master of its own: ssh names a master by ``%C``, a hash of the host, port, user and
jump host, and aliases of one address would share one (and that server's ``MaxSessions``).
Same key exchange as ``bench_fanout`` (``curve25519-sha256``), same concurrency (50).  Cold
runs are CPU bound on a small machine: each case runs ``SSHWRAP_BENCH_PERSIST_REPS`` times
(default 3, 1 with ``--quick``) and the table shows the best wall time.  The masters live in
a private directory of the benchmark's (``XDG_RUNTIME_DIR``) and are closed with
``sshwrap-many --close`` after every round (also timed).
"""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_fanout import KEX, Result, make_farm, measure  # noqa: E402
from common import Row, fmt_s  # noqa: E402

from sshwrap.core.hostset import fold  # noqa: E402
from sshwrap.testing import LocalSSHD  # noqa: E402

EXE = str(Path(sys.executable).with_name("sshwrap-many"))
CONC = 50


def _cli(
    config: str, hosts: list[str], env: dict[str, str], *args: str
) -> tuple[float, float, int]:
    """Wall and CPU seconds of one ``sshwrap-many`` run (CPU: its own and its reaped
    children's, the ssh clients; not the masters it leaves up), and its exit status."""
    argv = [EXE, "-F", config, "-o", f"KexAlgorithms={KEX}", "-p", str(CONC), *args]
    if "--close" not in args:
        argv[1:1] = ["-H", fold(hosts)]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    if p.returncode != 0:
        print(p.stderr.decode(errors="replace")[-2000:], file=sys.stderr)
    return wall, cpu, p.returncode


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """The persisted masters' rows (starts its own sshds: one address per host)."""
    del sshd  # one address per host: a farm of its own
    n = 20 if quick else 200
    reps = 1 if quick else max(1, int(os.environ.get("SSHWRAP_BENCH_PERSIST_REPS", "3")))
    cmd = "true"
    runtime = tempfile.mkdtemp(prefix="bp-", dir="/tmp")
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime}
    samples: dict[str, list[float]] = {"cold": [], "first": [], "warm": [], "close": []}
    cpus: dict[str, list[float]] = {"cold": [], "first": [], "warm": [], "close": []}
    failures: list[str] = []
    pssh: list[Result] = []
    has_pssh = importlib.util.find_spec("pssh") is not None
    try:
        with LocalSSHD(hosts=n) as farm_sshd, tempfile.TemporaryDirectory() as d:
            farm = make_farm(farm_sshd, n, d)
            for _ in range(reps):
                for case, args in (
                    ("cold", ["--", cmd]),
                    ("first", ["--persist", "5m", "--", cmd]),
                    ("warm", ["--persist", "5m", "--", cmd]),
                    ("close", ["--close"]),
                ):
                    logins = farm_sshd.read_log().count("Accepted publickey")
                    wall, cpu, rc = _cli(farm.config, farm.aliases, env, *args)
                    samples[case].append(wall)
                    cpus[case].append(cpu)
                    if rc != 0:
                        failures.append(f"{case} exited {rc}")
                    new = farm_sshd.read_log().count("Accepted publickey") - logins
                    if case == "warm" and new:
                        failures.append(f"warm run logged in {new} times")
                if has_pssh:
                    pssh.append(measure("pssh", farm, cmd, CONC, KEX, False))
    finally:
        subprocess.run([EXE, "--close"], env=env, capture_output=True)
        shutil.rmtree(runtime, ignore_errors=True)
    best = {k: min(v) for k, v in samples.items()}
    every = "; ".join(f"{k} {'/'.join(f'{x:.2f}' for x in v)} s" for k, v in samples.items())
    note = f"best of {reps}: {every}" + (f"; FAILED: {', '.join(failures)}" if failures else "")
    ok = not failures

    def against(what: str, name: str, goal: str, note: str) -> Row:
        base = best["cold"]
        ratio = best[name] / base
        met = (ok and ratio <= 0.2) if goal else None
        title = f"persist {n}x '{cmd}' -p{CONC}: {what} vs cold run (CLI)"
        return Row(title, fmt_s(best[name]), fmt_s(base), ratio, goal, met, note)

    close = f"what leaving the masters up costs the first run; --close of {n}: "
    cpu_best = {k: min(v) for k, v in cpus.items()}
    cpu_note = "CPU (rusage of sshwrap-many and the ssh it reaps; not the masters): " + "; ".join(
        f"{k} {'/'.join(f'{x:.2f}' for x in v)} s" for k, v in cpus.items()
    )
    rows = [
        Row(
            f"persist {n}x '{cmd}' -p{CONC}: 2nd --persist run vs cold run, CPU (CLI)",
            fmt_s(cpu_best["warm"]),
            fmt_s(cpu_best["cold"]),
            cpu_best["warm"] / cpu_best["cold"],
            "<= 0.2x",
            ok and cpu_best["warm"] <= 0.2 * cpu_best["cold"],
            cpu_note,
        ),
        against("2nd --persist run", "warm", "<= 0.2x", note),
        against("1st --persist run", "first", "", close + fmt_s(best["close"])),
    ]
    if pssh:
        other = min(pssh, key=lambda r: r.wall)
        rows.append(
            Row(
                f"persist {n}x '{cmd}' -p{CONC}: 2nd --persist run vs pssh cold",
                fmt_s(best["warm"]),
                fmt_s(other.wall),
                best["warm"] / other.wall,
                "<= 0.2x",
                ok and other.ok == n and best["warm"] <= 0.2 * other.wall,
                "sshwrap-many's start-up counted, parallel-ssh's not; pssh "
                + "/".join(f"{r.wall:.2f}" for r in pssh)
                + " s"
                + ("" if other.ok == n else f"; pssh: only {other.ok}/{n} ok"),
            )
        )
    return rows


if __name__ == "__main__":
    from run import _table

    print(_table(run(LocalSSHD(), "--quick" in sys.argv)))
