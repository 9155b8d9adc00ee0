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


class _Watched:
    """State under a condition, with one-shot callbacks run (outside the lock) on a change."""

    __slots__ = ("_callbacks", "_cond")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._callbacks: list[Callback] = []

    def _changed(self) -> None:
        """Called with the lock held after the state changed: wake the blocked waiters."""
        self._cond.notify_all()

    def _take_callbacks(self) -> list[Callback]:
        callbacks, self._callbacks = self._callbacks, []
        return callbacks

    def _subscribe(self, pending: bool, cb: Callback) -> Callback:
        """Keep ``cb`` for the next change when ``pending`` (lock held), else run it now."""
        if pending:
            self._callbacks.append(cb)
            return lambda: self._discard(cb)
        return _nothing

    def _discard(self, cb: Callback) -> None:
        with self._cond:
            if cb in self._callbacks:
                self._callbacks.remove(cb)


class Flag(_Watched):
    """A one-way event: :meth:`set` once; :meth:`wait` blocks, :meth:`add_callback` notifies."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        super().__init__()
        self._set = False

    def is_set(self) -> bool:
        """True once :meth:`set` was called."""
        return self._set

    def set(self) -> None:
        """Set the flag (again: nothing happens); wakes waiters and runs the callbacks once."""
        with self._cond:
            if self._set:
                return
            self._set = True
            self._changed()
            callbacks = self._take_callbacks()
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
            remove = self._subscribe(not self._set, cb)
        if remove is _nothing:
            cb()
        return remove

    def __repr__(self) -> str:
        return f"<Flag {'set' if self._set else 'clear'}>"


class Changes(_Watched):
    """A counter of occurrences that waiters wait to move past a value they read before."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        super().__init__()
        self.value = 0

    def bump(self) -> None:
        """One more occurrence: wakes waiters and runs (then forgets) the callbacks."""
        with self._cond:
            self.value += 1
            self._changed()
            callbacks = self._take_callbacks()
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
            remove = self._subscribe(self.value == seen, cb)
        if remove is _nothing:
            cb()
        return remove


def _nothing() -> None:
    return None
