"""The timers of a fan-out's hosts behind one timer of the loop (:class:`HostTimers`)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Protocol

__all__ = ["HostTimers", "TimedHost"]


class TimedHost(Protocol):
    """What :class:`HostTimers` calls: a host's run (``sshwrap.core.fanout_host.HostRun``)."""

    @property
    def timer_at(self) -> float | None:
        """When its timer is armed for (None: not armed)."""
        ...  # pragma: no cover - protocol

    def on_timer(self) -> None:
        """The time armed has come."""
        ...  # pragma: no cover - protocol


class HostTimers:
    """The timers of a run's hosts behind one timer of the loop.

    A host arms a time (:meth:`arm`); when it has come, ``run.on_timer()`` is called if that
    is still the time the host is armed for (``run.timer_at``): a host that moved on or
    armed another time leaves a stale entry, skipped.  One heap of plain tuples, compared in
    C: the loop's own heap of timer handles compares them in Python, a dozen calls a host.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, TimedHost]] = []
        self._seq = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at: float | None = None

    def arm(self, run: TimedHost, when: float) -> None:
        """Call ``run.on_timer()`` at ``when`` (``loop.time()``) unless it re-armed since."""
        heapq.heappush(self._heap, (when, next(self._seq), run))
        if self._handle_at is None or when < self._handle_at:
            self._set(when)

    def _set(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self.loop.call_at(when, self._fire)
        self._handle_at = when

    def _fire(self) -> None:
        self._handle = None
        self._handle_at = None
        heap = self._heap
        now = self.loop.time()
        while heap and (heap[0][0] <= now or heap[0][2].timer_at != heap[0][0]):
            when, _, run = heapq.heappop(heap)
            if run.timer_at == when:
                run.on_timer()
        if heap:
            self._set(heap[0][0])

    def close(self) -> None:
        """Forget every timer (idempotent)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._handle_at = None
        self._heap.clear()
