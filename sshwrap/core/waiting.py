"""Procedures written once, as generators that yield what they wait for; two drivers run them.

A procedure of the core (open a session, run a command on a channel, restart a master, talk
to ssh over its pipes) is a generator.  Where it must wait, it yields a :class:`Wait` (a flag
set by the pump thread, a change counter, a readable or writable fd, a blocking local step, a
pause) and gets the outcome back from the ``yield``.  It never blocks, sleeps or awaits
itself, so the same steps run under both faces:

- :func:`run_sync` blocks the calling thread on each wait (a plain script, any thread; Ctrl-C
  in the main thread interrupts the wait as it interrupts ``threading.Event.wait``); no event
  loop and no helper thread runs behind the sync API;
- :func:`run_async` awaits each wait on the running asyncio loop (flags and counters wake it
  through ``call_soon_threadsafe``, fds through ``add_reader``/``add_writer``, blocking steps run
  in a worker thread).

An exception raised while waiting (``KeyboardInterrupt`` in the sync face, ``CancelledError``
in the async one, or the blocking step's own error) is thrown into the procedure at its
``yield``, so one ``try``/``except``/``finally`` in the procedure is the cleanup for both
faces: the remote command is stopped and the channel closed the same way on Ctrl-C and on
cancel.  The cleanup may itself yield waits (bounded ones); the driver keeps serving them.

The pattern is psycopg 3's: its protocol steps are generators run by a blocking and an
asyncio "wait" function.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from ..io.flags import Changes, Flag

T = TypeVar("T")


class Wait:
    """What a procedure waits for; the driver sends back the outcome."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class WaitFlag(Wait):
    """Until ``flag`` is set, at most ``timeout`` s (None: no limit).  Outcome: whether it is."""

    flag: Flag
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class WaitChange(Wait):
    """Until ``changes.value`` moves past ``seen``, at most ``timeout`` s.  Outcome: it moved."""

    changes: Changes
    seen: int
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class WaitFd(Wait):
    """Until ``fd`` is readable (or writable with ``write``), at most ``timeout`` s.
    Outcome: True if ready (an error or hang-up on the fd counts as ready)."""

    fd: int
    write: bool = False
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Blocking(Wait, Generic[T]):
    """A local step that blocks (``ssh -O check``, starting a master): ``func(abort)``.

    The sync driver calls it in the caller's thread (Ctrl-C interrupts it there; ``abort`` is
    never set).  The async driver runs it in a worker thread; when the task is cancelled it
    sets ``abort`` (``func`` must then end promptly: kill what it started, reap it, return or
    raise) and waits up to ``abort_wait`` seconds for the thread before letting the cancel
    through.  Outcome: what ``func`` returns (what it raises is thrown into the procedure).
    """

    func: Callable[[Flag], T]
    abort_wait: float = 1.0


@dataclass(frozen=True, slots=True)
class Sleep(Wait):
    """A pause of ``seconds`` (a retry's back-off).  Outcome: None."""

    seconds: float


Procedure: TypeAlias = Generator[Wait, Any, T]
"""A procedure that returns a ``T``."""


class _Done(Exception):
    """The procedure returned ``value``."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _advance(proc: Procedure[Any], outcome: Any, error: BaseException | None) -> Wait:
    """Resume ``proc`` with a wait's outcome (or throw its ``error`` in); the next wait, or
    ``_Done`` with the result."""
    try:
        return proc.send(outcome) if error is None else proc.throw(error)
    except StopIteration as stop:
        raise _Done(stop.value) from None


def run_sync(proc: Procedure[T]) -> T:
    """Run ``proc`` to its end in this thread; its result, or what it raises."""
    outcome: Any = None
    error: BaseException | None = None
    try:
        while True:
            outcome, error = _settle(_advance(proc, outcome, error))
    except _Done as done:
        result: T = done.value
        return result


def _settle(wait: Wait) -> tuple[Any, BaseException | None]:
    """(outcome, None) of ``wait`` in this thread, or (None, what interrupted it:
    KeyboardInterrupt included, so that the procedure cleans up)."""
    try:
        return _wait_sync(wait), None
    except BaseException as exc:
        return None, exc


def _wait_sync(wait: Wait) -> Any:
    if isinstance(wait, WaitFlag):
        return wait.flag.wait(_timeout(wait.timeout))
    if isinstance(wait, WaitChange):
        return wait.changes.wait_past(wait.seen, _timeout(wait.timeout))
    if isinstance(wait, WaitFd):
        poll = select.poll()
        poll.register(wait.fd, select.POLLOUT if wait.write else select.POLLIN | select.POLLPRI)
        ms = None if wait.timeout is None else max(0, int(wait.timeout * 1000 + 0.999))
        return bool(poll.poll(ms))
    if isinstance(wait, Blocking):
        return wait.func(Flag())
    if isinstance(wait, Sleep):
        time.sleep(max(0.0, wait.seconds))
        return None
    raise TypeError(f"not a Wait: {wait!r}")


async def run_async(proc: Procedure[T]) -> T:
    """Run ``proc`` to its end on the running loop; its result, or what it raises."""
    outcome: Any = None
    error: BaseException | None = None
    try:
        while True:
            wait = _advance(proc, outcome, error)
            try:
                outcome, error = await _wait_async(wait), None
            except BaseException as exc:  # CancelledError included: the procedure cleans up
                outcome, error = None, exc
    except _Done as done:
        result: T = done.value
        return result


async def _wait_async(wait: Wait) -> Any:
    if isinstance(wait, WaitFlag):
        flag = wait.flag
        if not flag.is_set():
            await _woken(flag.add_callback, wait.timeout)
        return flag.is_set()
    if isinstance(wait, WaitChange):
        changes, seen = wait.changes, wait.seen
        if changes.value == seen:
            await _woken(lambda cb: changes.add_callback(seen, cb), wait.timeout)
        return changes.value != seen
    if isinstance(wait, WaitFd):
        return await _fd_ready(wait)
    if isinstance(wait, Blocking):
        return await _blocking(wait)
    if isinstance(wait, Sleep):
        await asyncio.sleep(max(0.0, wait.seconds))
        return None
    raise TypeError(f"not a Wait: {wait!r}")


def _timeout(timeout: float | None) -> float | None:
    return None if timeout is None else max(0.0, timeout)


async def _woken(
    subscribe: Callable[[Callable[[], None]], Callable[[], None]], timeout: float | None
) -> None:
    """Wait until the callback given to ``subscribe`` runs (from any thread) or ``timeout``."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not fut.done():
            fut.set_result(None)

    def wake() -> None:  # any thread, maybe with the pump's lock held: only schedule
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(done)

    remove = subscribe(wake)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, _timeout(timeout))
    finally:
        remove()


async def _fd_ready(wait: WaitFd) -> bool:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if wait.write:
        loop.add_writer(wait.fd, ready)
    else:
        loop.add_reader(wait.fd, ready)
    try:
        await asyncio.wait_for(fut, _timeout(wait.timeout))
    except TimeoutError:
        return False
    finally:
        if wait.write:
            loop.remove_writer(wait.fd)
        else:
            loop.remove_reader(wait.fd)
    return True


async def _blocking(wait: Blocking[Any]) -> Any:
    abort = Flag()
    work = asyncio.ensure_future(asyncio.to_thread(wait.func, abort))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        abort.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(work, wait.abort_wait)
        raise
