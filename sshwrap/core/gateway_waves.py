"""Rolling batches through gateways: the control node keeps the policy (:mod:`.batches`).

:class:`TreeWaves` is a :class:`~sshwrap.core.gateway_run.TreeRun` with ``batch``,
``max_fail`` or ``canary``: each wave (:meth:`~sshwrap.core.batches.Rollout.waves`) is a
``TreeRun`` of that wave's hosts, started only once every host of the wave before has ended
(flat or behind any gateway), so the waves hold across the whole tree.  Every result feeds the
run's one :class:`~sshwrap.core.batches.Gate`; once it stops (``max_fail`` exceeded, a canary
not ``ok``) the current wave is halted (:meth:`TreeRun.halt`: no new flat host, a ``stop`` line
to every gateway agent) and the hosts of every later wave come back ``skipped``.

Each wave's flat hosts and each agent also get the run's ``max_fail`` as a count, so a gateway
stops its own starts at once when its own failures exceed it; failures elsewhere reach it with
the stop line, in the time one line takes to travel (a host the gateway starts meanwhile runs).
Each wave starts its own ssh to each gateway it uses.  The ``deadline`` covers all the waves:
each starts with what is left of it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from typing import Any

from .batches import Gate, Spec, rollout
from .fanout_run import ControlPathHost
from .gateway_run import TreeRun
from .host_result import HostResult, skipped_result, unfinished_result
from .per_host import HostCommand, PerHostCommands

__all__ = ["TreeWaves"]


class TreeWaves:
    """One command on many hosts, some through gateways, in waves (the keywords are
    ``run_many``'s); :meth:`results` and :meth:`complete` as :class:`TreeRun`'s."""

    def __init__(
        self,
        hosts: Sequence[str | ControlPathHost],
        command: HostCommand | PerHostCommands,
        via: Mapping[str, Collection[str]],
        *,
        deadline: float | None,
        batch: Spec = None,
        max_fail: Spec = None,
        canary: int | None = None,
        **options: Any,
    ) -> None:
        policy = rollout(len(hosts), batch, max_fail, canary)
        self.gate = Gate(policy, len(hosts))
        self.names = [h if isinstance(h, str) else h.destination for h in hosts]
        self.deadline = deadline
        spans = policy.waves() if policy is not None else [range(len(hosts))]

        def wave(span: range, left: float | None) -> TreeRun:
            limit = None if policy is None else policy.max_fail
            part = [hosts[i] for i in span]
            return TreeRun(part, command, via, deadline=left, max_fail=limit, **options)

        self._wave = wave
        # Every wave planned now: whatever would refuse a host does so before anything runs.
        self.waves = [(span, wave(span, deadline)) for span in spans]
        self._current: tuple[range, TreeRun] | None = None

    @property
    def hosts(self) -> list[str]:
        """Every host's name, in input order."""
        return list(self.names)

    def complete(self, results: Mapping[int, HostResult]) -> list[HostResult]:
        """One result per host in input order: ``results`` (by index), else what a host of
        the wave in flight had when the run was left, else ``cancelled``."""
        stopped: dict[int, HostResult] = {}
        if self._current is not None:
            span, run = self._current
            for r in run.complete({}):
                stopped[span[r.index]] = dataclasses.replace(r, index=span[r.index])
        return [
            results.get(i) or stopped.get(i) or unfinished_result(h, i, "cancelled")
            for i, h in enumerate(self.names)
        ]

    async def results(self) -> AsyncGenerator[HostResult, None]:
        """Yield each host's result as it ends, wave after wave; the hosts of the waves the
        gate stopped come back ``skipped``, those the deadline left no time for ``timeout``."""
        t0 = time.monotonic()
        gate = self.gate
        for span, run in self.waves:
            left = None if self.deadline is None else self.deadline - (time.monotonic() - t0)
            if gate.stopped is not None or (left is not None and left <= 0):
                for i in span:
                    if gate.stopped is not None:
                        yield skipped_result(self.names[i], i, gate.stopped)
                    else:
                        yield unfinished_result(self.names[i], i, "timeout")
                continue
            if left is not None and run is not self.waves[0][1]:
                run = self._wave(span, left)
            self._current = span, run
            gen = run.results()
            try:
                async for r in gen:
                    i = span[r.index]
                    r = dataclasses.replace(r, index=i)
                    if r.status != "skipped":
                        gate.ended(i, r.status, r.host)
                        if gate.stopped is not None:
                            run.halt(gate.stopped)
                    elif gate.stopped is not None:  # the run's reason, not a part's count
                        r = skipped_result(r.host, i, gate.stopped)
                    yield r
            finally:
                await gen.aclose()
            self._current = None
