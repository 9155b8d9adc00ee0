"""Many readable fds behind one registration with the event loop.

A fan-out watches four fds per host in flight (stdout, stderr, ssh's log, the pidfd).
Registered one by one with ``loop.add_reader``, each costs asyncio's pure-Python selector
bookkeeping at every add and remove, and every ready fd is one more event the loop's
selector returns and dispatches.  :class:`FdWatcher` keeps them in an epoll set of its own
(Linux) that the loop watches as one fd: adding and removing an fd is one C call, and one
loop wakeup serves every fd that is ready.  Where there is no epoll it is a thin layer over
``loop.add_reader``.  The fds are level-triggered: a callback that does not read its fd
empty is called again.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable, Iterable

__all__ = ["FdWatcher"]


class FdWatcher:
    """Call ``callback(fd)`` whenever ``fd`` is readable (or hung up), from the loop's thread.

    Make one per run on the running loop, and :meth:`close` it at the end (it does not close
    the fds it watches: their owners remove and close them).  ``epoll=False`` registers each
    fd with the loop instead (what happens where there is no epoll).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, epoll: bool = True) -> None:
        self.loop = loop
        self._callbacks: dict[int, Callable[[int], object]] = {}
        self._later: list[Callable[[], object]] | None = None
        self._epoll: select.epoll | None = None
        if epoll and hasattr(select, "epoll"):
            self._epoll = select.epoll()
            loop.add_reader(self._epoll.fileno(), self._dispatch)

    def add(self, fd: int, callback: Callable[[int], object]) -> None:
        """Watch ``fd``: ``callback(fd)`` runs each time it is readable."""
        self._callbacks[fd] = callback
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)
        else:
            self.loop.add_reader(fd, callback, fd)

    def add_each(self, fds: Iterable[int], callback: Callable[[int], object]) -> None:
        """:meth:`add` each of ``fds`` with the same ``callback``."""
        ep = self._epoll
        if ep is None:
            for fd in fds:
                self.add(fd, callback)
            return
        callbacks = self._callbacks
        for fd in fds:
            callbacks[fd] = callback
            ep.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed); nothing if it is not watched."""
        if self._callbacks.pop(fd, None) is None:
            return
        if self._epoll is not None:
            self._epoll.unregister(fd)
        else:
            self.loop.remove_reader(fd)

    def call_after(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once the callbacks of the fds ready now have run: at the end of
        this batch when called from one of them (no loop turn, no handle), else soon."""
        if self._later is not None:
            self._later.append(callback)
        else:
            self.loop.call_soon(callback)

    def _dispatch(self) -> None:
        assert self._epoll is not None
        callbacks = self._callbacks
        later: list[Callable[[], object]] = []
        self._later = later
        try:
            # (maxevents: what is watched, not 1023, the buffer poll allocates each time)
            for fd, _ in self._epoll.poll(0, len(callbacks) or 1):
                # An fd that an earlier callback of this batch removed is skipped; one that
                # was closed and reused since gets a call for nothing (its reads would block).
                callback = callbacks.get(fd)
                if callback is not None:
                    callback(fd)
        finally:
            self._later = None
            for after in later:
                after()

    def close(self) -> None:
        """Stop watching everything (idempotent)."""
        for fd in list(self._callbacks):
            self.remove(fd)
        if self._epoll is not None:
            self.loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
