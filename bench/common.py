"""Shared pieces of the benchmarks: the table row type, timing helpers, a CPU-counting cgroup."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Row:
    """One line of the benchmark table.

    ``ratio`` is sshwrap's value divided by the baseline's (for times: < 1 means sshwrap is
    faster).  ``goal`` says what the issue asks for, ``ok`` whether it was met.
    """

    bench: str
    sshwrap: str
    baseline: str
    ratio: float | None = None
    goal: str = ""
    ok: bool | None = None
    note: str = ""


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    """Median of a list of numbers."""
    return statistics.median(xs)


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (0..100) of a list of numbers, nearest rank."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


def fmt_s(x: float) -> str:
    """Seconds, human-scaled."""
    if x < 1e-3:
        return f"{x * 1e6:.0f} us"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


class CpuGroup:
    """A cpuacct cgroup (v1) of our own: every process forked by one put in it stays in it,
    so its CPU counts even when its parent left it unreaped (an orphan)."""

    ROOT = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self, name: str) -> None:
        self.path = self.ROOT / f"sshwrap-bench-{name}-{os.getpid()}"
        self.home: dict[int, Path] = {}  # where each process added was before

    @classmethod
    def available(cls) -> bool:
        """Whether this machine has a cpuacct hierarchy we can write (root)."""
        return (cls.ROOT / "cgroup.procs").exists() and os.access(cls.ROOT, os.W_OK)

    def __enter__(self) -> CpuGroup:
        self.path.mkdir()
        return self

    def add(self, pids: list[int]) -> None:
        """Move these processes (and so their future children) into the group."""
        for pid in pids:
            for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
                _, controllers, where = line.split(":", 2)
                if "cpuacct" in controllers.split(","):
                    self.home[pid] = self.ROOT / where.lstrip("/")
            (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def usage(self) -> float:
        """CPU seconds of every process that ever ran in the group."""
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def __exit__(self, *exc: object) -> None:
        """Every process still in the group goes back where it was (else to the root)."""
        for pid in map(int, (self.path / "cgroup.procs").read_text().split()):
            with contextlib.suppress(OSError):  # it exited meanwhile
                (self.home.get(pid, self.ROOT) / "cgroup.procs").write_text(f"{pid}\n")
        self.path.rmdir()
