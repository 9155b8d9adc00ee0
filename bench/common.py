"""Shared pieces of the benchmarks: the table row type, timing helpers, the test sshd."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


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
