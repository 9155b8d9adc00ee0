"""Issue 14: what recording costs the interactive relay (``sshwrap --record``).

Bulk output through the drop-in command's relay (remote output under ``-tt``, an outer pty
drained as fast as it comes), recording on against off, in interleaved runs over one
ControlMaster.  The measure is sshwrap's own CPU seconds (utime + stime of the sshwrap
process alone, read from /proc while it is a zombie: ssh's and the remote's CPU are out)
per GB of output; the goal is <= 1.05x.  Two payloads: base64 text lines (terminal output
as it usually is) and NUL bytes (the worst case for JSON: six bytes each in the file).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Row, fmt_s
from ptyprocess import PtyProcess

from sshwrap.testing import LocalSSHD

SSHWRAP = str(Path(sys.executable).with_name("sshwrap"))
CLOCK = os.sysconf("SC_CLK_TCK")


def _cpu_of_zombie(pid: int) -> float:
    """CPU seconds of ``pid`` itself, once it has exited and before it is reaped."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    after_comm = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(after_comm[11]) + int(after_comm[12])) / CLOCK


def _session(argv: list[str]) -> tuple[float, float, int]:
    """Run ``argv`` in an outer pty, read all it prints: (wall s, its own CPU s, bytes)."""
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
    cpu = _cpu_of_zombie(proc.pid)
    proc.wait()
    proc.close()
    return wall, cpu, got


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
    reps = 2 if quick else 3
    try:
        for name, cmd in payloads.items():
            off: list[float] = []
            on: list[float] = []
            walls: list[float] = []
            cast_size = 0
            for i in range(reps):
                _, cpu, got = _session([SSHWRAP, *base, "-tt", sshd.host, cmd])
                off.append(cpu / (got / 1e9))
                cast = os.path.join(work, f"{i}.cast")
                wall, cpu, got = _session([SSHWRAP, "--record", cast, *base, "-tt", sshd.host, cmd])
                on.append(cpu / (got / 1e9))
                walls.append(wall)
                cast_size = os.path.getsize(cast)
                os.unlink(cast)
            ratio = min(on) / min(off)
            rows.append(
                Row(
                    f"relay bulk recorded, {name} {size >> 20} MiB: CPU/GB",
                    f"{min(on):.2f} s/GB",
                    f"not recorded {min(off):.2f} s/GB",
                    ratio,
                    "<= 1.05x",
                    ratio <= 1.05,
                    note=(
                        f"sshwrap's own CPU, best of {reps} interleaved; wall recorded "
                        f"{fmt_s(min(walls))}; file {cast_size / got:.2f} bytes per byte"
                    ),
                )
            )
    finally:
        subprocess.run(["ssh", *base, "-O", "exit", sshd.host], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return rows
