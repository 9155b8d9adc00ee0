"""Where a session channel's data comes from and goes to: ``Source`` and ``Sink``, and the fd
work of moving bytes between them and the pump (:mod:`sshwrap.io.pump`).

Only the pump thread writes sinks and reads selectable sources, so none of this takes a lock.
Pipes the library made (``Popen``'s ``PIPE``) are non-blocking and polled: what a pipe does
not take now waits in ``Sink.pending`` and the channel's window is granted again only for
bytes actually written, so a slow reader throttles the remote writer, never the pump.
Descriptors a caller hands over as they are (``stdout=some_file``, or ``None`` for this
process's own stdout) are written with blocking writes, as a child process would: a pipe there
that nobody reads stalls every channel of the connection.

A sink may have a :class:`StreamFilter` (sudo's stderr: the prompt cut out, the password sent
when it shows): it sees every byte first, in the pump thread, and only what it passes on is
delivered; the window is granted for what it cut out and for what was delivered.  A source
may be *held* (``Source(held=True)``): no input and no end yet, until :meth:`Source.release`
gives it bytes (under the pump's lock), the last time with its end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from typing import Protocol

__all__ = [
    "Sink",
    "Source",
    "StreamFilter",
    "close_fds",
    "deliver",
    "finish_sink",
    "flush_sink",
    "read_ready",
    "signal_name",
    "signal_number",
]


def signal_name(sig: int) -> str:
    """The RFC 4254 name of a signal number (``signal.SIGINT`` -> ``"INT"``)."""
    return signal.Signals(sig).name.removeprefix("SIG")


def signal_number(name: str) -> int | None:
    """The local number of an RFC 4254 signal name (``"KILL"`` -> 9), None if unknown."""
    try:
        return int(signal.Signals["SIG" + name.split("@", 1)[0]])
    except KeyError:
        return None


def close_fds(*fds: int) -> None:
    """Close each descriptor, ignoring errors."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def read_ready(fd: int, size: int) -> bytes | None:
    """One read of a non-blocking ``fd``: None when nothing is there yet; ``b""`` at its end,
    or when it failed (a read error ends the stream as its EOF would)."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _selectable(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


class StreamFilter(Protocol):
    """What a :class:`Sink`'s ``filter`` does (called in the pump thread, lock not held)."""

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """The bytes to deliver of ``data``, and how many of it are done with besides."""
        ...

    def end(self) -> bytes:
        """The stream ended: the bytes still held back (to deliver now)."""
        ...


class Sink:
    """Where one stream of channel data goes: collected in ``buf``, written to ``fd``, or
    (neither) discarded; through ``filter`` first when there is one."""

    __slots__ = (
        "broken",
        "buf",
        "closed",
        "collect",
        "fd",
        "filter",
        "nonblocking",
        "own",
        "pending",
    )

    def __init__(
        self,
        *,
        collect: bool = False,
        fd: int | None = None,
        own: bool = False,
        nonblocking: bool = False,
        filter: StreamFilter | None = None,
    ) -> None:
        self.collect = collect  # append to ``buf``
        self.buf = bytearray()
        self.fd = fd  # write to this fd (None and not collect: discard)
        self.own = own  # close ``fd`` when done
        self.nonblocking = nonblocking  # a pipe we made: non-blocking writes, polled
        self.pending = bytearray()
        self.broken = False  # the reader went away: discard the rest
        self.closed = False
        self.filter = filter  # sees every byte first (see StreamFilter)


class Source:
    """Where a channel's input comes from: bytes in memory, a descriptor, or nothing (EOF at
    once); ``held``: nothing yet and no end either, until :meth:`release`."""

    __slots__ = ("_eof", "data", "fd", "held", "own", "pos", "selectable")

    def __init__(
        self,
        *,
        data: bytes | None = None,
        fd: int | None = None,
        own: bool = False,
        held: bool = False,
    ) -> None:
        self.data = memoryview(data) if data is not None else None
        self.pos = 0
        self.fd = fd
        self.own = own
        self.selectable = fd is not None and _selectable(fd)
        self.held = held
        self._eof = data is None and fd is None and not held  # nothing to send: EOF at once

    @property
    def eof(self) -> bool:
        """No more input will come (a held source has not ended, even with its bytes sent)."""
        return self._eof

    @eof.setter
    def eof(self, value: bool) -> None:
        if value and self.held:
            return  # all sent so far, but more is to come: release() says when it ends
        self._eof = value

    def release(self, data: bytes, *, last: bool) -> None:
        """(under the pump's lock) ``data`` to send after what is left unsent; ``last``: the
        input ends after it.  The pump sends it once told to service the source."""
        if self._eof:
            return
        rest = bytes(self.data[self.pos :]) if self.data is not None else b""
        self.data = memoryview(rest + data)
        self.pos = 0
        self.held = not last

    def close(self) -> None:
        """No more input: drop the data, close an owned descriptor."""
        self.held = False
        self.eof = True
        self.data = None
        if self.fd is not None:
            if self.own:
                close_fds(self.fd)
            self.fd = None


def _write(sink: Sink, data: bytes | bytearray) -> int:
    assert sink.fd is not None
    try:
        return os.write(sink.fd, data)
    except BlockingIOError:
        return 0
    except OSError:
        sink.broken = True
        sink.pending.clear()
        return 0


def deliver(sink: Sink, data: bytes) -> int:
    """Hand ``data`` to ``sink`` (through its filter); returns how many bytes are done with
    (written, collected, discarded or cut out by the filter), which is what the channel's
    window may grant again.  The rest waits in ``sink.pending`` for :func:`flush_sink`."""
    if sink.filter is not None:
        passed, done = sink.filter.feed(data)
        return done + (_deliver(sink, passed) if passed else 0)
    return _deliver(sink, data)


def _deliver(sink: Sink, data: bytes) -> int:
    if sink.closed or sink.broken or sink.collect or sink.fd is None:
        if sink.collect and not (sink.closed or sink.broken):
            sink.buf += data
        return len(data)
    if sink.nonblocking:
        if sink.pending:
            sink.pending += data
            return 0
        n = _write(sink, data)
        if sink.broken:
            return len(data)
        if n < len(data):
            sink.pending += data[n:]
        return n
    # A descriptor the caller gave us (a file, a terminal): written as is, blocking.
    mv = memoryview(data)
    try:
        while mv:
            mv = mv[os.write(sink.fd, mv) :]
    except OSError:
        sink.broken = True
    return len(data)


def flush_sink(sink: Sink) -> int:
    """Write what ``sink.pending`` holds (the fd is writable); returns the bytes done with."""
    if not sink.pending:
        return 0
    n = _write(sink, sink.pending)
    if sink.broken:
        n = len(sink.pending)
        sink.pending.clear()
    else:
        del sink.pending[:n]
    return n


def finish_sink(sink: Sink) -> None:
    """The stream ended: what its filter held back is delivered; the sink's descriptor is
    closed once everything pending is written."""
    if sink.filter is not None and not sink.closed:
        tail = sink.filter.end()
        if tail:
            _deliver(sink, tail)
    if sink.closed or sink.pending:
        return
    sink.closed = True
    if sink.own and sink.fd is not None:
        close_fds(sink.fd)
