"""put/get of 100 MB over one ControlMaster: sshwrap.transfer against plain scp and sftp.

All tools go through the same master (``-o ControlPath=...``), so the comparison is the client
side only: sshwrap speaking SFTP from Python against OpenSSH's own scp (SFTP protocol too,
since OpenSSH 9.0) and ``sftp -b -``.  Runs are interleaved (the order alternating) and the
median is reported.
Goal (issue 4): at least 0.95x their speed, i.e. a time ratio of at most 1.05.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable

from common import Row, fmt_s, median, timed

from sshwrap.testing import LocalSSHD
from sshwrap.transfer import get, put

GOAL = 1 / 0.95


def _ssh(args: list[str], host: str, command: str) -> str:
    out = subprocess.run(
        ["ssh", *args, host, command],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    return out.stdout.decode()


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """Rows for put and get against scp and sftp."""
    mb = 16 if quick else 100
    reps = 2 if quick else 7
    local_dir = tempfile.mkdtemp(prefix="sshwrap-bx-")
    args = [*sshd.ssh_args, "-o", f"ControlPath={local_dir}/s"]
    host = sshd.host
    subprocess.run(
        ["ssh", *args, "-M", "-N", "-f", "-o", "ControlPersist=yes", host],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    remote_dir = ""
    try:
        remote_dir = _ssh(args, host, "mktemp -d /tmp/sshwrap-bx.XXXXXX").strip()
        src = os.path.join(local_dir, "src.bin")
        with open(src, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
        rsrc = f"{remote_dir}/src.bin"
        put(src, rsrc, destination=host, ssh_args=args)
        back = os.path.join(local_dir, "back.bin")
        rdst = f"{remote_dir}/dst.bin"

        def sftp(batch: str) -> None:
            subprocess.run(
                ["sftp", "-q", *args, "-b", "-", host],
                input=batch.encode(),
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=600,
            )

        def scp(a: str, b: str) -> None:
            subprocess.run(["scp", "-q", *args, a, b], check=True, timeout=600)

        cases: dict[str, Callable[[], None]] = {
            "put sshwrap": lambda: put(src, rdst, destination=host, ssh_args=args),
            "put scp": lambda: scp(src, f"{host}:{rdst}"),
            "put sftp": lambda: sftp(f"put {src} {rdst}\n"),
            "get sshwrap": lambda: get(rsrc, back, destination=host, ssh_args=args),
            "get scp": lambda: scp(f"{host}:{rsrc}", back),
            "get sftp": lambda: sftp(f"get {rsrc} {back}\n"),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        order = list(cases)
        for _ in range(reps):
            for name in order:
                times[name].append(timed(cases[name]))
            order.reverse()  # alternate the order: no tool always runs right after another
        med = {k: median(v) for k, v in times.items()}
        rows = []
        for op in ("put", "get"):
            ours = med[f"{op} sshwrap"]
            for tool in ("scp", "sftp"):
                base = med[f"{op} {tool}"]
                ratio = ours / base
                rows.append(
                    Row(
                        f"{op} {mb} MB over a master vs {tool}",
                        f"{fmt_s(ours)} ({mb / ours:.0f} MB/s)",
                        f"{fmt_s(base)} ({mb / base:.0f} MB/s)",
                        ratio,
                        "time <= 1.05x (>= 0.95x speed)",
                        ratio <= GOAL,
                        f"median of {reps}, interleaved" if op == "put" and tool == "scp" else "",
                    )
                )
        return rows
    finally:
        if remote_dir:
            _ssh(args, host, f"rm -rf {remote_dir}")
        subprocess.run(["ssh", *args, "-O", "exit", host], capture_output=True, timeout=30)
        shutil.rmtree(local_dir, ignore_errors=True)
