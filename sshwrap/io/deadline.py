"""Deadlines: every bound of a call in one clock, ``time.monotonic()`` (clock arithmetic
only; it sits in the lowest layer that keeps time so that io and core share one copy).

A call's ``timeout`` becomes a deadline once, when the call starts; every step after it
(restarting a master, opening a channel, waiting for the command, stopping it) takes what is
left of that one deadline instead of a fresh timeout of its own, so the steps together never
overrun the call's bound.  ``None`` means "no deadline" throughout.
"""

from __future__ import annotations

import time

LOCAL_FLOOR = 0.5
"""Seconds a step with a local peer (the master's socket, ``ssh -G``) gets at least: they
take milliseconds, and one cut short would leave a started master unused."""


def deadline_after(timeout: float | None) -> float | None:
    """The deadline ``timeout`` seconds from now (None: none)."""
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (negative once it passed; None: no deadline)."""
    return None if deadline is None else deadline - time.monotonic()


def time_left(deadline: float | None) -> float | None:
    """A timeout for what is left before ``deadline``: at least 10 ms (None: no deadline)."""
    left = remaining(deadline)
    return None if left is None else max(0.01, left)


def capped(limit: float | None, deadline: float | None) -> float | None:
    """``limit`` seconds, cut to what is left before ``deadline`` (never negative)."""
    left = remaining(deadline)
    if left is not None:
        left = max(0.0, left)
    if limit is None:
        return left
    return limit if left is None else min(limit, left)


def local_step(limit: float, deadline: float | None) -> float:
    """``limit`` seconds for a local step, cut to what is left but not below ``LOCAL_FLOOR``."""
    left = remaining(deadline)
    return limit if left is None else min(limit, max(LOCAL_FLOOR, left))


def earliest(deadline: float | None, timeout: float | None) -> float | None:
    """The sooner of ``deadline`` and ``timeout`` seconds from now (``connect_timeout`` within
    a call's deadline, for example)."""
    if timeout is None:
        return deadline
    t = time.monotonic() + timeout
    return t if deadline is None else min(t, deadline)
