"""Procedures over a local child's pipes and exit (:class:`~sshwrap.io.ssh_child.ChildPipes`).

:func:`exchange` serves a child's pipes until they are done and the child is reaped, waiting
on them as one fd (``WaitFd``), so the sync and the async driver run the same steps;
:func:`reap_killed` waits for a child that was just sent SIGKILL.
"""

from __future__ import annotations

import time

from ..io.deadline import remaining
from ..io.ssh_child import ChildPipes
from .waiting import Procedure, WaitFd

__all__ = ["GATE_RECHECK", "Expired", "exchange", "reap_killed"]

GATE_RECHECK = 0.005
"""Seconds between checks of a state that raises no event (a terminal's raw mode)."""


class Expired(Exception):
    """The deadline of :func:`exchange` passed first (the child and its pipes are as they
    were: the caller decides)."""


def exchange(pipes: ChildPipes, deadline: float | None, grace: float = 0.0) -> Procedure[None]:
    """Serve ``pipes`` until no required reader is open, no input is left and the child is
    reaped; optional readers then get up to ``grace`` s more to reach EOF.

    Raises :class:`Expired` when ``deadline`` passes first.
    """
    follow_until: float | None = None
    while pipes.busy or pipes.following:
        now = time.monotonic()
        wait = remaining(deadline)
        if not pipes.busy:
            if follow_until is None:
                follow_until = now + grace
            if now >= follow_until:
                return
            wait = follow_until - now if wait is None else min(wait, follow_until - now)
        if wait is not None and wait <= 0:
            raise Expired
        if pipes.gated:
            wait = GATE_RECHECK if wait is None else min(wait, GATE_RECHECK)
        yield WaitFd(pipes.fileno(), timeout=wait)
        pipes.step()


def reap_killed(pipes: ChildPipes, bound: float = 5.0) -> Procedure[None]:
    """Wait (at most ``bound`` s, then block) until a child sent SIGKILL is reaped."""
    deadline = time.monotonic() + bound
    while not pipes.exited:
        left = deadline - time.monotonic()
        if left <= 0:
            pipes.proc.wait()
            return
        yield WaitFd(pipes.fileno(), timeout=left)
        pipes.step()
