"""Bounded waits for tests.

Process exits are waited on with pidfds (``sshwrap.testing.wait_exited``).  What has no file
descriptor to wait on (a /proc entry appearing, a port refusing, a banner) is re-checked by
``wait_until`` at a short fixed interval until it holds or the bound runs out: the condition,
not the interval, ends the wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def wait_until(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    """Re-check ``cond`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # the re-check interval; the condition ends the wait


def blocked_signals(tid: int) -> set[int]:
    """Signal numbers a thread of this process blocks, from the kernel's ``SigBlk`` mask."""
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    raise AssertionError(f"no SigBlk for thread {tid}")
