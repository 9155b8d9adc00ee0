"""A started ``ssh -tt`` in a local pty, written once for the process faces.

``sshwrap.aio.create_process(..., tty=True)`` starts and serves its terminal with these steps,
the same steps ``sshwrap.Popen(tty=True)`` and ``sshwrap.run(tty=True)`` take:

- :func:`start_in_terminal`: ssh spawned by ``subprocess.Popen`` (exec-only, safe with
  threads) on a new pty of ``size`` that is its controlling terminal; the pty master is the
  caller's (reading it to EIO is the terminal's end; closing it hangs ssh up);
- :func:`terminal_sink`: what is done with each chunk of the terminal's output: ssh's own
  early words (printed before its ``-E`` log opens) are kept for the error message, then the
  chunk is collected (``stdout=PIPE``) or written where ``stdout`` goes;
- :class:`CookedUndo`: through a ControlMaster (``ssh -S``) the master writes the remote
  output into the pty itself, and the passenger makes the pty raw only once the master has
  answered it, so on a loaded machine output can come while the pty is still cooked and its
  ``ONLCR`` turns each ``\n`` into ``\r\n`` (``\r\r\n`` at the remote terminal's line ends).
  A chunk read while the pty still maps newlines and before ssh has logged its session was
  written cooked: the mapping is undone on it.  (A chunk written cooked but read only after
  ssh went raw keeps it: that window is a few instructions wide.)  Without a master ssh goes
  raw before any remote output, and a chunk read after ssh left raw mode again at its exit
  is never touched: the undo ends for good at the first sign of raw mode or of the session;
- :func:`until_raw`: the wait before the first byte is typed into the terminal, until ssh
  has put it in raw mode (before that it is cooked: it would echo the bytes and eat
  ``^D``/``^C``/``^U``), as a procedure for either driver;
- for the asyncio face, :class:`LoopTerminal` reads the pty master through the running loop
  (``add_reader``; EIO is the end, pitfall 1: read to the end, then reap) into an
  :class:`asyncio.StreamReader` with its flow control, and :class:`TerminalWriter` types into
  it without blocking the loop (the first byte after :func:`until_raw`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..io.flags import Flag
from ..io.pty import RAW_WAIT, PtyReader
from ..io.ssh_child import start_in_pty, terminal_is_raw, write_to
from ..terminal.modes import maps_newlines
from .child_steps import GATE_RECHECK
from .invocation import Invocation
from .waiting import Procedure, Sleep, WaitFd, run_async

__all__ = [
    "MUX_SESSION",
    "CookedUndo",
    "LoopTerminal",
    "TerminalWriter",
    "start_in_terminal",
    "terminal_sink",
    "until_raw",
]

_CHUNK = 65536

MUX_SESSION = "mux_client_request_session: master session id"
"""What a ``ssh -S`` passenger logs (DEBUG1) once the master has opened its session: it makes
the pty raw right after."""
MUX_HELLO = "mux_client_hello_exchange: master version"
"""What ssh logs (DEBUG2) when it talks to a master: it runs as its passenger."""
NO_MASTER = "Control socket "
"""The start of what ssh logs when the ControlPath has no master: it connects on its own."""


class CookedUndo:
    """Output of a pty that a master may have written while it was cooked, made as if raw
    (see the module docstring): ``undo(chunk)`` for each chunk as it is read.

    ``fd`` is the pty master (-1: no pty, nothing to undo) and ``log`` reads ssh's ``-E`` log
    (DEBUG2) so far: it says whether ssh is a passenger of a master (the ``ControlPath`` of
    sshwrap's Connection or of the user's own config) and when its session opened."""

    def __init__(self, fd: int, log: Callable[[], str]) -> None:
        self._fd = fd
        self._log = log
        self._done = fd < 0

    def __call__(self, chunk: bytes) -> bytes:
        if self._done or b"\r\n" not in chunk:
            return chunk
        if maps_newlines(self._fd):
            log = self._log()
            if MUX_SESSION not in log:
                if MUX_HELLO in log and NO_MASTER not in log:
                    return chunk.replace(b"\r\n", b"\n")
                return chunk  # ssh's own words before it knows: cooked as ssh meant them
        self._done = True
        return chunk


def start_in_terminal(
    call: Invocation, size: tuple[int, int] | None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``call``'s ssh (its argv has ``-tt``) in a new pty of ``size`` (rows, cols;
    None: 24 x 80): ``(process, pty master)``."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], **kw: Any) -> None:
        started.append(subprocess.Popen(argv, **kw))

    master = start_in_pty(spawn, call.argv, size)
    return started[0], master


def terminal_sink(
    call: Invocation, stdout: Any, collect: Callable[[bytes], None] | None, master: int = -1
) -> Callable[[bytes], None]:
    """The function for each chunk of the terminal's output (the pty ``master``'s): noted as
    ssh's stderr (its early words arrive there), made raw if a master wrote it cooked
    (:class:`CookedUndo`), then given to ``collect`` or, without it, written where ``stdout``
    goes (None: this process's stdout)."""
    undo = CookedUndo(master, call.log.read)

    def sink(chunk: bytes) -> None:
        call.stderr.feed(chunk)
        chunk = undo(chunk)
        if collect is not None:
            collect(chunk)
        else:
            write_to(stdout, chunk, default_fd=1)

    return sink


def until_raw(
    master: int, exited: Callable[[], bool], timeout: float = RAW_WAIT
) -> Procedure[bool]:
    """Until ssh has put the terminal of ``master`` in raw mode (True), or ssh ``exited()``
    or ``timeout`` s passed (False).  A terminal's modes raise no event: it is checked every
    :data:`~sshwrap.core.child_steps.GATE_RECHECK` s."""
    deadline = time.monotonic() + timeout
    while not terminal_is_raw(master):
        if exited() or time.monotonic() > deadline:
            return False
        yield Sleep(GATE_RECHECK)
    return True


class LoopTerminal(asyncio.ReadTransport):
    """The pty master read through the loop (``add_reader``): each chunk to ``sink``,
    paused and resumed by the ``stream`` it feeds (its flow control); EIO is the end: then
    the master is closed, the stream gets its EOF and ``ended`` is set."""

    def __init__(
        self, master: int, sink: Callable[[bytes], None], stream: asyncio.StreamReader | None
    ) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._reader = PtyReader(master)
        self._master = master
        self._sink = sink
        self._stream = stream
        self._reading = False
        self.ended = Flag()
        os.set_blocking(master, False)
        if stream is not None:
            stream.set_transport(self)
        self.resume_reading()

    @property
    def master(self) -> int:
        """The pty master, -1 once the terminal ended."""
        return -1 if self._reader.closed else self._master

    def _ready(self) -> None:
        try:
            chunk = self._reader.read_ready()
        except OSError:
            chunk = b""
        if chunk is None:
            return
        if chunk:
            self._sink(chunk)
        else:
            self.close()

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._master)

    def resume_reading(self) -> None:
        if not self._reading and not self._reader.closed:
            self._reading = True
            self._loop.add_reader(self._master, self._ready)

    def is_reading(self) -> bool:
        return self._reading

    def is_closing(self) -> bool:
        return self._reader.closed

    def close(self) -> None:
        if self._reader.closed:
            return
        with contextlib.suppress(Exception):  # the loop may be closed already
            self.pause_reading()
        self._reader.close()
        if self._stream is not None:
            self._stream.feed_eof()
        self.ended.set()


class TerminalWriter:
    """``stdin`` of a ``tty=True`` process: the :class:`asyncio.StreamWriter` calls
    (``write``, ``writelines``, ``drain``, ``close``, ``is_closing``, ``wait_closed``) typing
    into the terminal without blocking the loop.

    The first bytes wait until ssh has put the terminal in raw mode
    (:func:`~sshwrap.core.tty_process.until_raw`), as ``sshwrap.Popen``'s stdin does.  Once
    the terminal is gone, ``drain()`` raises :class:`BrokenPipeError`."""

    def __init__(self, terminal: LoopTerminal, raw: Callable[[], Procedure[bool]]) -> None:
        self._terminal = terminal
        self._raw: Callable[[], Procedure[bool]] | None = raw
        self._pending = bytearray()
        self._typing: asyncio.Task[None] | None = None
        self._error: BrokenPipeError | None = None
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` to be typed (``drain()`` waits until it is)."""
        if self._closing:
            raise RuntimeError("write() on a closed stdin")
        if self._error is not None:
            return  # drain() reports it
        self._pending += data
        if self._pending and self._typing is None:
            loop = asyncio.get_running_loop()
            self._typing = loop.create_task(run_async(self._type()))

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        """:meth:`write` each of ``data``."""
        for chunk in data:
            self.write(chunk)

    def _type(self) -> Procedure[None]:
        try:
            if self._raw is not None:
                raw, self._raw = self._raw, None
                yield from raw()
            while self._pending:
                fd = self._terminal.master
                if fd < 0:
                    raise BrokenPipeError(errno.EPIPE, "the terminal has ended")
                try:
                    n = os.write(fd, self._pending[:_CHUNK])
                except BlockingIOError:
                    yield WaitFd(fd, write=True)
                    continue
                del self._pending[:n]
        except OSError as e:
            self._pending.clear()
            self._error = BrokenPipeError(errno.EPIPE, f"the terminal is gone ({e.strerror})")
        finally:
            self._typing = None

    async def drain(self) -> None:
        """Wait until what was written is typed; BrokenPipeError once the terminal ended."""
        typing = self._typing
        if typing is not None:
            await asyncio.shield(typing)
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """No more writes (what was written is still typed; the terminal stays open)."""
        self._closing = True

    def is_closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    async def wait_closed(self) -> None:
        """Wait until what was written before :meth:`close` is typed (or could not be)."""
        typing = self._typing
        if typing is not None:
            await asyncio.shield(typing)
