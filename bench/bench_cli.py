"""Issue 2: the drop-in command against plain ssh, under the same outer pty.

- bulk output through the interactive relay (remote ``head -c N /dev/zero`` under ``-tt``);
  also sshwrap's own CPU seconds per GB (read from /proc before it is reaped);
- keystroke echo round trip (one byte to a remote ``cat`` in a pty), interleaved samples;
- start-up: ``sshwrap -V`` against ``ssh -V``.

Both sides share one ControlMaster, so key exchange cost is out of the comparison.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

from common import Row, fmt_s, median, pct
from ptyprocess import PtyProcess

from sshwrap.testing import LocalSSHD

SSHWRAP = str(Path(sys.executable).with_name("sshwrap"))
TICK = os.sysconf("SC_CLK_TCK")


def _drain_to_eof(fd: int) -> int:
    n = 0
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return n
        if not data:
            return n
        n += len(data)


def _own_cpu(pid: int) -> float:
    """utime+stime of ``pid`` itself (not its children), read while it is a zombie."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _bulk(argv: list[str], nbytes: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    proc = PtyProcess.spawn(argv, dimensions=(24, 80))
    got = _drain_to_eof(proc.fd)
    wall = time.perf_counter() - t0
    cpu = _own_cpu(proc.pid)
    proc.wait()
    proc.close()
    return wall, cpu, got


def _echo_session(argv: list[str]) -> PtyProcess:
    proc = PtyProcess.spawn(argv, dimensions=(24, 80))
    deadline = time.monotonic() + 30
    # First the outer pty must be in raw mode (else its own local echo answers the probe) ...
    while termios.tcgetattr(proc.fd)[3] & termios.ECHO:
        if time.monotonic() > deadline:
            raise RuntimeError("outer terminal never left cooked mode")
        time.sleep(0.005)
    # ... then ready once a probe byte comes back as the remote pty's echo.
    buf = b""
    while True:
        os.write(proc.fd, b"r")
        r, _, _ = select.select([proc.fd], [], [], 0.5)
        if r:
            buf += os.read(proc.fd, 4096)
            if buf.endswith(b"r"):
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"echo session not ready: {buf!r}")
    return proc


def _round_trip(proc: PtyProcess) -> float:
    t = time.perf_counter()
    os.write(proc.fd, b"a")
    got = b""
    while not got.endswith(b"a"):
        got += os.read(proc.fd, 4096)
    return time.perf_counter() - t


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """Run the issue-2 benchmarks; return their table rows."""
    rows: list[Row] = []
    ctl_dir = tempfile.mkdtemp(prefix="sw-bench-")
    ctl = os.path.join(ctl_dir, "s")
    base = [*sshd.ssh_args, "-o", f"ControlPath={ctl}"]
    subprocess.run(
        ["ssh", *base, "-M", "-N", "-f", "-o", "ControlPersist=yes", sshd.host],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    try:
        # -- bulk output ---------------------------------------------------------------
        nbytes = (64 if quick else 1024) * 1024 * 1024
        cmd = f"head -c {nbytes} /dev/zero"
        reps = 1 if quick else 2
        ssh_walls, wrap_walls, wrap_cpus = [], [], []
        for _ in range(reps):
            w, _, got = _bulk(["ssh", *base, "-tt", sshd.host, cmd], nbytes)
            assert got >= nbytes, got
            ssh_walls.append(w)
            w, cpu, got = _bulk([SSHWRAP, *base, "-tt", sshd.host, cmd], nbytes)
            assert got >= nbytes, got
            wrap_walls.append(w)
            wrap_cpus.append(cpu)
        ws, ww = min(ssh_walls), min(wrap_walls)
        gb = nbytes / 1e9
        rows.append(
            Row(
                f"tty bulk output {nbytes >> 20} MiB",
                f"{fmt_s(ww)} ({nbytes / ww / 1e6:.0f} MB/s)",
                f"ssh -tt {fmt_s(ws)} ({nbytes / ws / 1e6:.0f} MB/s)",
                ww / ws,
                "<= 1.10x",
                ww / ws <= 1.10,
                note=f"sshwrap's own CPU: {min(wrap_cpus) / gb:.2f} s/GB (both under an outer pty)",
            )
        )
        # -- keystroke echo --------------------------------------------------------------
        n = 100 if quick else 500
        plain = _echo_session(["ssh", *base, "-tt", sshd.host, "cat"])
        wrapped = _echo_session([SSHWRAP, *base, "-tt", sshd.host, "cat"])
        a: list[float] = []
        b: list[float] = []
        try:
            for i in range(n):
                a.append(_round_trip(plain))
                b.append(_round_trip(wrapped))
                if i % 60 == 59:  # keep the remote line short: end it in both
                    os.write(plain.fd, b"\x15")
                    os.write(wrapped.fd, b"\x15")
        finally:
            for p in (plain, wrapped):
                p.kill(9)
                p.wait()
                p.close()
        added_med = median(b) - median(a)
        added_p99 = pct(b, 99) - pct(a, 99)
        rows.append(
            Row(
                f"keystroke echo x{n}: median added",
                f"{fmt_s(median(b))}",
                f"ssh -tt {fmt_s(median(a))}",
                median(b) / median(a),
                "added <= 0.1 ms",
                added_med <= 1e-4,
                note=f"added median {added_med * 1e6:.0f} us, added p99 {added_p99 * 1e6:.0f} us",
            )
        )
        rows.append(
            Row(
                f"keystroke echo x{n}: p99 added",
                f"{fmt_s(pct(b, 99))}",
                f"ssh -tt {fmt_s(pct(a, 99))}",
                pct(b, 99) / pct(a, 99),
                "added <= 1 ms",
                added_p99 <= 1e-3,
            )
        )
    finally:
        subprocess.run(["ssh", *base, "-O", "exit", sshd.host], capture_output=True)
        shutil.rmtree(ctl_dir, ignore_errors=True)
    # -- start-up -------------------------------------------------------------------------
    n = 10 if quick else 40
    ts: list[float] = []
    tw: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(["ssh", "-V"], capture_output=True, stdin=subprocess.DEVNULL)
        ts.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([SSHWRAP, "-V"], capture_output=True, stdin=subprocess.DEVNULL)
        tw.append(time.perf_counter() - t)
    added = median(tw) - median(ts)
    rows.append(
        Row(
            "start-up: sshwrap -V",
            fmt_s(median(tw)),
            f"ssh -V {fmt_s(median(ts))}",
            median(tw) / median(ts),
            "added <= 40 ms",
            added <= 0.040,
            note=f"added {added * 1e3:.1f} ms (Python interpreter start-up included)",
        )
    )
    return rows
