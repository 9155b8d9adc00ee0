"""The rolling-batch policy (``sshwrap.core.batches``), pure: waves, ``max_fail``, canaries.

A simulated scheduler drives :class:`Gate` as the fan-out does (start in input order while
the gate allows and a slot is free, end any host in flight with any status), and the
properties say what every run of it must keep, whatever the order the hosts end in.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sshwrap.core.batches import Gate, Rollout, Spec, gate_of, rollout

STATUSES = ("ok", "failed", "timeout", "ssh_error")

counts = st.integers(min_value=1, max_value=300)
percents = st.integers(min_value=1, max_value=100).map(lambda p: f"{p}%")
batches = st.none() | counts | percents
fail_limits = st.none() | st.integers(min_value=0, max_value=300) | percents | st.just("0%")
canaries = st.none() | counts


def _policy(total: int, batch: Spec, max_fail: Spec, canary: int | None) -> Rollout:
    """The policy (with nothing set, one that stops nothing: a max_fail of 100%)."""
    if batch is None and max_fail is None and canary is None:
        max_fail = "100%"
    p = rollout(total, batch, max_fail, canary)
    assert p is not None
    return p


@given(st.integers(0, 400), batches, canaries)
def test_waves_split_the_hosts_in_input_order(total: int, batch: Spec, canary: int | None) -> None:
    p = _policy(total, batch, None, canary)
    waves = p.waves()
    assert [i for w in waves for i in w] == list(range(total))
    assert all(len(w) > 0 for w in waves)
    rest = waves
    if canary and total:
        assert waves[0] == range(min(canary, total))
        rest = waves[1:]
    if batch is None:
        assert len(rest) <= 1
    else:
        assert p.batch is not None
        assert all(len(w) == p.batch for w in rest[:-1])
        assert all(len(w) <= p.batch for w in rest[-1:])


@given(st.integers(0, 1000), st.integers(1, 100))
def test_a_batch_percentage_rounds_up_to_at_least_one(total: int, percent: int) -> None:
    p = _policy(total, f"{percent}%", None, None)
    assert p.batch == max(1, math.ceil(Fraction(percent * total, 100)))


@given(st.integers(0, 1000), st.integers(0, 100))
def test_max_fail_percentage_is_exceeded_past_that_share_of_the_hosts(
    total: int, percent: int
) -> None:
    p = _policy(total, None, f"{percent}%", None)
    assert p.max_fail is not None
    for failed in range(total + 1):
        assert (failed > p.max_fail) == (failed * 100 > percent * total)


def test_decimal_percentages_and_counts_as_text() -> None:
    assert _policy(8, "12.5%", "12.5%", None).batch == 1
    assert _policy(9, "12.5%", "12.5%", None).max_fail == 1  # 1.125 hosts allowed: 1
    assert _policy(10, " 3 ", "2", 2).batch == 3
    assert _policy(10, None, "2", None).max_fail == 2
    assert _policy(4, "100%", "100%", 9).waves() == [range(4)]  # canary over the count: all


@pytest.mark.parametrize(
    ("batch", "max_fail", "canary", "what"),
    [
        (0, None, None, "batch"),
        (-1, None, None, "batch"),
        ("0%", None, None, "batch"),
        ("150%", None, None, "batch"),
        ("abc", None, None, "batch"),
        (True, None, None, "batch"),
        (2.5, None, None, "batch"),
        ("", None, None, "batch"),
        (None, -1, None, "max_fail"),
        (None, "101%", None, "max_fail"),
        (None, "-5%", None, "max_fail"),
        (None, "1e3", None, "max_fail"),
        (None, None, 0, "canary"),
        (None, None, -2, "canary"),
        (None, None, "1", "canary"),
        (None, None, False, "canary"),
    ],
)
def test_bad_values_are_a_value_error_naming_the_setting(
    batch: object, max_fail: object, canary: object, what: str
) -> None:
    with pytest.raises(ValueError, match=f"^{what} must be") as e:
        rollout(10, batch, max_fail, canary)  # type: ignore[arg-type]
    assert repr(batch if what == "batch" else max_fail if what == "max_fail" else canary) in str(
        e.value
    )
    with pytest.raises(ValueError, match=r"^--x must be"):
        rollout(10, batch, max_fail, canary, labels=("--x", "--x", "--x"))  # type: ignore[arg-type]


def test_no_setting_no_policy() -> None:
    assert rollout(5) is None
    assert gate_of(5, {"concurrency": 3}) is None
    g = gate_of(5, {"batch": 2})
    assert g is not None and g.may_start(1) and not g.may_start(2)


@given(
    total=st.integers(0, 40),
    batch=st.none() | st.integers(1, 12) | percents,
    max_fail=st.none() | st.integers(0, 6) | percents | st.just("0%"),
    canary=st.none() | st.integers(1, 8),
    concurrency=st.integers(1, 10),
    data=st.data(),
)
def test_a_simulated_run_keeps_every_rule(
    total: int,
    batch: Spec,
    max_fail: Spec,
    canary: int | None,
    concurrency: int,
    data: st.DataObject,
) -> None:
    p = _policy(total, batch, max_fail, canary)
    gate = Gate(p)
    wave_of = {i: k for k, w in enumerate(p.waves()) for i in w}
    started: list[int] = []
    ended: set[int] = set()
    in_flight: list[int] = []
    failed = 0
    canary_failed = False
    while True:
        while len(started) < total and len(in_flight) < concurrency:
            nxt = len(started)
            if not gate.may_start(nxt):
                break
            # Every host of the waves before has ended; nothing stopped the run.
            assert all(i in ended for i in range(nxt) if wave_of[i] < wave_of[nxt])
            assert gate.stopped is None
            started.append(nxt)
            in_flight.append(nxt)
        if not in_flight:
            break
        i = in_flight.pop(data.draw(st.integers(0, len(in_flight) - 1)))
        status = data.draw(st.sampled_from(STATUSES))
        was_stopped = gate.stopped
        gate.ended(i, status, f"h{i}")
        ended.add(i)
        if status != "ok":
            failed += 1
            canary_failed = canary_failed or i < p.canary
        should_stop = canary_failed or (p.max_fail is not None and failed > p.max_fail)
        assert (gate.stopped is not None) == should_stop
        if was_stopped is not None:
            assert gate.stopped == was_stopped  # the first reason stays
    assert started == list(range(len(started)))  # in input order
    if gate.stopped is None:
        assert len(started) == total  # nothing stopped: every host ran, no wave stuck
    else:
        assert ("canary h" in gate.stopped) or gate.stopped.startswith("max_fail exceeded")


def test_the_reasons_say_why() -> None:
    g = Gate(_policy(8, None, "25%", None))
    for i in range(3):
        g.ended(i, "failed", f"h{i}")
    assert g.stopped == "max_fail exceeded: 3 hosts failed (max_fail 25% of 8 hosts: 2)"
    g = Gate(_policy(8, None, 0, None))
    g.ended(0, "timeout")
    assert g.stopped == "max_fail exceeded: 1 host failed (max_fail 0)"
    g = Gate(_policy(8, None, 5, 2))
    g.ended(1, "ssh_error", "web2")
    assert g.stopped == "the canary web2 did not succeed (ssh_error)"
    g = Gate(total=3)  # no policy: only halt() stops it
    assert g.may_start(2)
    g.halt("told so")
    g.halt("again")
    assert g.stopped == "told so" and not g.may_start(0)
