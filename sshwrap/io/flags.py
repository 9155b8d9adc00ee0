"""Thread-side events that both drivers can wait on: a blocking thread, or an asyncio loop.

The pump thread (:mod:`sshwrap.io.pump`) learns that a channel opened, closed or was lost;
the procedures of :mod:`sshwrap.core` wait for that.  The sync driver blocks its own thread on
the event with a timeout (so Ctrl-C keeps working in the main thread, and no event loop runs
behind the sync API); the async driver registers a callback that wakes its loop with
``loop.call_soon_threadsafe``.  These two classes give both ways over one state:

- :class:`Flag`: set once, never cleared (``opened``, ``closed``);
- :class:`Changes`: a counter that moves on every occurrence (``a channel of ours closed``),
  waited past a value read earlier, so an occurrence between reading and waiting is not lost.

Callbacks run in the thread that sets or bumps, possibly with its locks held: they must only
schedule work (``call_soon_threadsafe``), never block or take locks of their own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Callback = Callable[[], None]


class Flag:
    """A one-way event: :meth:`set` once; :meth:`wait` blocks, :meth:`add_callback` notifies."""

    __slots__ = ("_callbacks", "_cond", "_set")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._set = False
        self._callbacks: list[Callback] = []

    def is_set(self) -> bool:
        """True once :meth:`set` was called."""
        return self._set

    def set(self) -> None:
        """Set the flag (again: nothing happens); wakes waiters and runs the callbacks once."""
        with self._cond:
            if self._set:
                return
            self._set = True
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for cb in callbacks:
            cb()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or ``timeout`` seconds (None: no limit); True if set."""
        with self._cond:
            if not self._set:
                self._cond.wait_for(lambda: self._set, timeout)
            return self._set

    def add_callback(self, cb: Callback) -> Callback:
        """Call ``cb`` when the flag is set (at once, here, if it already is).

        Returns a function that removes ``cb`` if it has not run yet."""
        with self._cond:
            if not self._set:
                self._callbacks.append(cb)
                return lambda: self._discard(cb)
        cb()
        return _nothing

    def _discard(self, cb: Callback) -> None:
        with self._cond:
            if cb in self._callbacks:
                self._callbacks.remove(cb)

    def __repr__(self) -> str:
        return f"<Flag {'set' if self._set else 'clear'}>"


class Changes:
    """A counter of occurrences that waiters wait to move past a value they read before."""

    __slots__ = ("_callbacks", "_cond", "value")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.value = 0
        self._callbacks: list[Callback] = []

    def bump(self) -> None:
        """One more occurrence: wakes waiters and runs (then forgets) the callbacks."""
        with self._cond:
            self.value += 1
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for cb in callbacks:
            cb()

    def wait_past(self, seen: int, timeout: float | None = None) -> bool:
        """Block until :attr:`value` is no longer ``seen`` or ``timeout`` s; True if it moved."""
        with self._cond:
            return self._cond.wait_for(lambda: self.value != seen, timeout)

    def add_callback(self, seen: int, cb: Callback) -> Callback:
        """Call ``cb`` once, when :attr:`value` moves past ``seen`` (at once if it has).

        Returns a function that removes ``cb`` if it has not run yet."""
        with self._cond:
            if self.value == seen:
                self._callbacks.append(cb)
                return lambda: self._discard(cb)
        cb()
        return _nothing

    def _discard(self, cb: Callback) -> None:
        with self._cond:
            if cb in self._callbacks:
                self._callbacks.remove(cb)


def _nothing() -> None:
    return None
