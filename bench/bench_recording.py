"""Issue 14: what recording costs the interactive relay (``sshwrap --record``).

Bulk output through the drop-in command's relay (remote output under ``-tt``, an outer pty
drained as fast as it comes), recording on against off, the same command and the same bytes
(checked), over one ControlMaster, in pairs whose order alternates.  The measure is the relay
process's CPU seconds per GB of output: utime + stime of the sshwrap process (which runs the
relay and the recorder), all its threads, read from /proc while it is a zombie; its page
faults too.  Its children (the job-control supervisor and the ssh
client, reaped by then: ``cutime + cstime``) are reported apart, as is the load.  The goal
is <= 1.05x.  Two payloads: base64 text lines (terminal output as it usually is) and NUL
bytes (the worst case for JSON: six bytes each in the file).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import Row, fmt_s
from ptyprocess import PtyProcess

from sshwrap.testing import LocalSSHD

SSHWRAP = str(Path(sys.executable).with_name("sshwrap"))
CLOCK = os.sysconf("SC_CLK_TCK")


@dataclass
class _Run:
    wall: float
    user: float  # sshwrap's own CPU seconds (all its threads)
    system: float
    children: float  # its reaped children's CPU seconds (supervisor + ssh client)
    faults: int  # sshwrap's minor page faults
    got: int  # bytes of output

    @property
    def cpu(self) -> float:
        return self.user + self.system

    def per_gb(self, seconds: float) -> float:
        return seconds / (self.got / 1e9)


def _cpu_of_zombie(pid: int) -> tuple[float, float, float, int]:
    """(utime, stime, children's utime + stime, minor faults) of ``pid``, exited and not yet
    reaped."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    f = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    cpu = int(f[11]) / CLOCK, int(f[12]) / CLOCK, (int(f[13]) + int(f[14])) / CLOCK
    return (*cpu, int(f[7]))


def _session(argv: list[str]) -> _Run:
    """Run ``argv`` in an outer pty and read all it prints."""
    start = time.perf_counter()
    proc = PtyProcess.spawn(argv, dimensions=(24, 80))
    got = 0
    while True:
        try:
            chunk = os.read(proc.fd, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        got += len(chunk)
    wall = time.perf_counter() - start
    user, system, children, faults = _cpu_of_zombie(proc.pid)
    proc.wait()
    proc.close()
    return _Run(wall, user, system, children, faults, got)


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """Recording on against off; return the table rows."""
    rows: list[Row] = []
    work = tempfile.mkdtemp(prefix="sw-rec-")
    base = [*sshd.ssh_args, "-o", f"ControlPath={work}/s"]
    subprocess.run(
        ["ssh", *base, "-M", "-N", "-f", "-o", "ControlPersist=yes", sshd.host],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    size = (64 if quick else 256) << 20
    payloads = {
        "text": f"head -c {size * 3 // 4} /dev/urandom | base64 -w 76",
        "NUL bytes": f"head -c {size} /dev/zero",
    }
    reps = 2 if quick else 4
    try:
        for name, cmd in payloads.items():
            off: list[_Run] = []
            on: list[_Run] = []
            cast_size = 0
            load = os.getloadavg()[0]
            for i in range(reps):
                cast = os.path.join(work, f"{i}.cast")
                plain = [SSHWRAP, *base, "-tt", sshd.host, cmd]
                recorded = [SSHWRAP, "--record", cast, *base, "-tt", sshd.host, cmd]
                for argv in (plain, recorded) if i % 2 == 0 else (recorded, plain):
                    (on if argv is recorded else off).append(_session(argv))
                if on[-1].got != off[-1].got:
                    raise RuntimeError(f"recorded {on[-1].got} bytes, not {off[-1].got}")
                cast_size = os.path.getsize(cast)
                os.unlink(cast)
            load = max(load, os.getloadavg()[0])
            best_on = min(on, key=lambda r: r.per_gb(r.cpu))
            best_off = min(off, key=lambda r: r.per_gb(r.cpu))
            on_gb, off_gb = best_on.per_gb(best_on.cpu), best_off.per_gb(best_off.cpu)
            ratio = on_gb / off_gb
            paired = statistics.median(a.cpu / b.cpu for a, b in zip(on, off, strict=True))
            got = best_on.got

            def split(r: _Run) -> str:
                return f"user {r.per_gb(r.user):.2f} + sys {r.per_gb(r.system):.2f}"

            rows.append(
                Row(
                    f"relay bulk recorded, {name} {size >> 20} MiB: CPU/GB",
                    f"{on_gb:.2f} s/GB",
                    f"not recorded {off_gb:.2f} s/GB",
                    ratio,
                    "<= 1.05x",
                    ratio <= 1.05,
                    note=(
                        f"CPU of the relay process (sshwrap, all its threads), best of {reps} "
                        "alternating pairs; "
                        f"recorded {split(best_on)}, not {split(best_off)} s/GB; median of "
                        f"the pairs {paired:.2f}x; added {on_gb - off_gb:.2f} s/GB; "
                        f"its children (ssh) apart: {min(r.per_gb(r.children) for r in on):.2f} "
                        f"recorded, {min(r.per_gb(r.children) for r in off):.2f} not; wall "
                        f"recorded {fmt_s(min(r.wall for r in on))}, not "
                        f"{fmt_s(min(r.wall for r in off))}; relay page faults per MB "
                        f"{best_on.faults / (got / 1e6):.0f} recorded, "
                        f"{best_off.faults / (got / 1e6):.0f} not; "
                        f"file {cast_size / got:.2f} bytes per byte; "
                        f"load average up to {load:.1f} on {os.cpu_count()} CPUs"
                    ),
                )
            )
    finally:
        subprocess.run(["ssh", *base, "-O", "exit", sshd.host], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return rows
