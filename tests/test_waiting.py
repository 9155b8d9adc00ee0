"""The two drivers of the core's procedures: one generator, the same outcome in both faces."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from sshwrap.core.waiting import (
    Blocking,
    Procedure,
    Sleep,
    WaitChange,
    WaitFd,
    WaitFlag,
    run_async,
    run_sync,
)
from sshwrap.io.flags import Changes, Flag

Driver = Callable[[Procedure[Any]], Any]


def _sync(proc: Procedure[Any]) -> Any:
    return run_sync(proc)


def _async(proc: Procedure[Any]) -> Any:
    return asyncio.run(run_async(proc))


DRIVERS = pytest.mark.parametrize("drive", [_sync, _async], ids=["sync", "async"])


def _later(seconds: float, fn: Callable[[], None]) -> threading.Timer:
    t = threading.Timer(seconds, fn)
    t.start()
    return t


@DRIVERS
def test_flag_set_by_another_thread_and_timeouts(drive: Driver) -> None:
    flag = Flag()

    def proc() -> Procedure[tuple[bool, bool, bool]]:
        early = yield WaitFlag(flag, 0.0)
        _later(0.05, flag.set)
        got = yield WaitFlag(flag, 30.0)
        again = yield WaitFlag(flag, None)  # already set: at once
        return early, got, again

    assert drive(proc()) == (False, True, True)


@DRIVERS
def test_change_counter_is_waited_past_the_value_read_before(drive: Driver) -> None:
    changes = Changes()

    def proc() -> Procedure[tuple[bool, bool, bool]]:
        seen = changes.value
        changes.bump()  # between reading and waiting: not lost
        first = yield WaitChange(changes, seen, 0.0)
        seen = changes.value
        quiet = yield WaitChange(changes, seen, 0.05)
        _later(0.05, changes.bump)
        moved = yield WaitChange(changes, seen, 30.0)
        return first, quiet, moved

    assert drive(proc()) == (True, False, True)


def _write(fd: int, data: bytes) -> None:
    os.write(fd, data)


@DRIVERS
def test_fd_readiness(drive: Driver) -> None:
    r, w = os.pipe()
    try:

        def proc() -> Procedure[tuple[bool, bool, bool]]:
            idle = yield WaitFd(r, timeout=0.05)
            writable = yield WaitFd(w, write=True, timeout=1.0)
            _later(0.05, lambda: _write(w, b"x"))
            readable = yield WaitFd(r, timeout=30.0)
            return idle, writable, readable

        assert drive(proc()) == (False, True, True)
    finally:
        os.close(r)
        os.close(w)


@DRIVERS
def test_blocking_step_result_and_error_reach_the_procedure(drive: Driver) -> None:
    def fails(abort: Flag) -> int:
        raise LookupError("from the step")

    def proc() -> Procedure[tuple[int, str]]:
        value = yield Blocking(lambda abort: 42)
        try:
            yield Blocking(fails)
        except LookupError as e:
            return value, str(e)
        return value, ""

    assert drive(proc()) == (42, "from the step")


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt (which asyncio would re-raise out of its loop)."""


@DRIVERS
def test_an_interruption_is_thrown_in_and_the_cleanup_may_still_wait(drive: Driver) -> None:
    """A BaseException raised while waiting (KeyboardInterrupt in the sync face) reaches the
    procedure at its yield; its cleanup's own waits are served, then it propagates."""
    cleaned: list[str] = []

    def interrupted(abort: Flag) -> None:
        raise Interrupt

    def proc() -> Procedure[None]:
        try:
            yield Blocking(interrupted)
        except Interrupt:
            yield Sleep(0.01)
            cleaned.append("stopped")
            raise

    with pytest.raises(Interrupt):
        drive(proc())
    assert cleaned == ["stopped"]


def test_cancel_is_thrown_in_aborts_a_blocking_step_and_cleans_up() -> None:
    started, aborted = threading.Event(), threading.Event()
    cleaned: list[str] = []

    def step(abort: Flag) -> None:
        started.set()
        if abort.wait(30.0):
            aborted.set()

    def proc() -> Procedure[None]:
        try:
            yield Blocking(step, abort_wait=5.0)
        except asyncio.CancelledError:
            yield Sleep(0.01)  # the cleanup's own wait runs after the cancel
            cleaned.append("stopped")
            raise

    async def main() -> None:
        task = asyncio.ensure_future(run_async(proc()))
        while not started.is_set():
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 5.0

    asyncio.run(main())
    assert aborted.is_set() and cleaned == ["stopped"]


def test_flag_callbacks_run_once_and_can_be_removed() -> None:
    flag = Flag()
    calls: list[str] = []
    remove = flag.add_callback(lambda: calls.append("removed"))
    flag.add_callback(lambda: calls.append("kept"))
    remove()
    flag.set()
    flag.set()
    flag.add_callback(lambda: calls.append("late"))  # already set: at once
    assert calls == ["kept", "late"]
