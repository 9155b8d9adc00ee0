"""Rolling batches, written once: ``batch``, ``max_fail`` and ``canary`` as one pure policy.

Every fleet call (``run_many`` flat or through gateways, ``put_many``/``get_many``,
``sshwrap-many``) takes the same three settings; :func:`rollout` checks them against the host
count (a ``ValueError`` before anything runs) and a :class:`Gate` applies them: the scheduler
asks :meth:`Gate.may_start` before it starts the host at a position (hosts start in input
order) and tells :meth:`Gate.ended` each host's status as it ends.  No IO, no clock.

What the settings mean:

- **waves**: the first ``canary`` hosts form the first wave, then every ``batch`` hosts the
  next (without ``batch``, all the rest are one wave).  A wave's hosts start only once every
  host of the wave before has ended; inside a wave ``concurrency`` still applies.
  ``batch`` is a count (>= 1; larger than the host count: one wave) or a percentage of the
  host count (``"25%"``, over 0 and at most 100, rounded up, at least 1 host).
- **failed**: a host whose status is anything but ``ok`` (``failed``, ``timeout``,
  ``ssh_error``; ``cancelled`` too).  ``skipped`` hosts never ran and never count.
- **max_fail exceeded**: MORE than ``max_fail`` hosts have failed.  ``max_fail=0``: the first
  failure stops; ``max_fail=1``: the second.  A percentage ``"P%"`` (0 to 100) allows
  ``floor(P * hosts / 100)`` failures, so it is exceeded when the failed hosts are more than
  P percent of all the hosts (Ansible's ``max_fail_percentage`` reading).  Once exceeded no
  new host starts; hosts in flight finish normally; every host never started is ``skipped``.
- **canary**: an int >= 1; when one canary host is not ``ok``, the rest are ``skipped``
  (a canary larger than the host count is allowed: every host is a canary).

:meth:`Gate.halt` stops new starts for a reason from outside (a gateway agent told by its
control node that the tree's ``max_fail`` was exceeded).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ROLLOUT_KEYWORDS", "Gate", "Rollout", "Spec", "gate_of", "rollout"]

Spec = int | str | None
"""A ``batch`` or ``max_fail`` setting: a count, a percentage (``"25%"``), or None (unset)."""

ROLLOUT_KEYWORDS = ("batch", "max_fail", "canary")
"""The keywords of the policy, as the API spells them."""

_PERCENT = re.compile(r"\s*(\d{1,3}(?:\.\d{1,6})?)\s*%\s*")
_COUNT = re.compile(r"\s*\d{1,18}\s*")


def _parse(value: object, name: str, least: int) -> int | tuple[int, int]:
    """A count (an int, or a str of digits) of at least ``least``, or a percentage as the
    fraction (numerator, denominator) of 1: ``"12.5%"`` -> (125, 1000)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= least:
            return value
    elif isinstance(value, str):
        if _COUNT.fullmatch(value) and int(value) >= least:
            return int(value)
        m = _PERCENT.fullmatch(value)
        if m is not None:
            whole, _, decimals = m.group(1).partition(".")
            num, den = int(whole + decimals), 100 * 10 ** len(decimals)
            if (num > 0 or not least) and num <= den:
                return num, den
    share = "over 0% and up to 100%" if least else "from 0% to 100%"
    raise ValueError(
        f"{name} must be a count of at least {least} or a percentage {share} (such as 25%), "
        f"not {value!r}"
    )


@dataclass(frozen=True)
class Rollout:
    """The settings, checked and turned into counts for ``total`` hosts.

    ``batch``: hosts per wave after the canaries (None: all the rest at once); ``max_fail``:
    the failures allowed (None: no limit); ``canary``: the canary hosts (0: none).  ``specs``
    keeps the settings as given, for the messages."""

    total: int
    batch: int | None
    max_fail: int | None
    canary: int
    specs: tuple[Spec, Spec, int | None]

    def waves(self) -> list[range]:
        """The positions of each wave, in order (none for no hosts)."""
        out: list[range] = []
        start = 0
        if self.canary and self.total:
            start = min(self.canary, self.total)
            out.append(range(0, start))
        step = self.batch or max(1, self.total - start)
        out += [range(i, min(i + step, self.total)) for i in range(start, self.total, step)]
        return out


def rollout(
    total: int,
    batch: Spec = None,
    max_fail: Spec = None,
    canary: int | None = None,
    *,
    labels: tuple[str, str, str] = ROLLOUT_KEYWORDS,
) -> Rollout | None:
    """The policy for ``total`` hosts, or None when no setting is given.

    A bad value raises ``ValueError`` naming it by ``labels`` (the command says ``--batch``):
    a ``batch`` of 0, a negative count, ``"150%"``, ``"abc"``, a bool, a ``canary`` of 0."""
    if batch is None and max_fail is None and canary is None:
        return None
    size = None
    if batch is not None:
        b = _parse(batch, labels[0], 1)
        size = b if isinstance(b, int) else max(1, -(-b[0] * total // b[1]))  # rounded up
    limit = None
    if max_fail is not None:
        m = _parse(max_fail, labels[1], 0)
        limit = m if isinstance(m, int) else m[0] * total // m[1]  # rounded down
    if canary is not None and (
        isinstance(canary, bool) or not isinstance(canary, int) or canary < 1
    ):
        raise ValueError(f"{labels[2]} must be an int of at least 1, not {canary!r}")
    return Rollout(total, size, limit, canary or 0, (batch, max_fail, canary))


class Gate:
    """The policy in motion: which host may start now, and why the rest are skipped.

    Positions are the hosts' places in input order; the scheduler starts them in that order,
    asks :meth:`may_start` first, and reports each one that ends to :meth:`ended` (once).
    ``stopped`` is None while hosts may still start, else the reason the rest are skipped."""

    def __init__(self, policy: Rollout | None = None, total: int = 0) -> None:
        self.policy = policy
        total = policy.total if policy is not None else total
        self._ends = [w.stop for w in policy.waves()] if policy is not None else [total]
        self._wave = 0
        self.limit = self._ends[0] if self._ends else total
        """Positions below this may start (the end of the current wave)."""
        self.done = 0
        self.failed = 0
        self.stopped: str | None = None

    def may_start(self, position: int) -> bool:
        """True when the host at ``position`` may start now: nothing stopped the run and
        its wave is the current one."""
        return self.stopped is None and position < self.limit

    def halt(self, reason: str) -> None:
        """Start no more hosts; those never started are skipped for ``reason``."""
        if self.stopped is None:
            self.stopped = reason

    def ended(self, position: int, status: str, host: str = "") -> None:
        """Host ``position`` (named ``host``) ended with ``status``: count it, stop when
        ``max_fail`` is exceeded or a canary did not succeed, and open the next wave once
        every host of this one has ended."""
        self.done += 1
        p = self.policy
        if status != "ok" and status != "skipped":
            self.failed += 1
            if p is not None and position < p.canary:
                self.halt(f"the canary {host or f'host {position}'} did not succeed ({status})")
            elif p is not None and p.max_fail is not None and self.failed > p.max_fail:
                self.halt(self._over(p))
        if self.done >= self.limit and self._wave + 1 < len(self._ends):
            self._wave += 1
            self.limit = self._ends[self._wave]

    def _over(self, p: Rollout) -> str:
        spec = str(p.specs[1]).strip()
        allowed = f"{spec} of {p.total} hosts: {p.max_fail}" if "%" in spec else spec
        n = self.failed
        return f"max_fail exceeded: {n} host{'s' if n != 1 else ''} failed (max_fail {allowed})"


def gate_of(total: int, keywords: Mapping[str, Any]) -> Gate | None:
    """The gate of a call's ``batch``/``max_fail``/``canary`` keywords for ``total`` hosts
    (None when none is given); ``ValueError`` for a bad one (see :func:`rollout`)."""
    policy = rollout(total, *(keywords.get(k) for k in ROLLOUT_KEYWORDS))
    return None if policy is None else Gate(policy)
