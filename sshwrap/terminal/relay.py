"""The interactive relay: one poll loop between the user's terminal and a pty master.

``relay()`` copies keyboard bytes to the pty master and pty output to stdout as soon as they
arrive (no buffering beyond what a full pty forces), forwards window-size changes, and returns
when the program in the pty has gone and every byte it wrote has reached stdout.

Design points (each one a bug that relays like this one have had):

- Signals wake the loop through ``signal.set_wakeup_fd`` on a socketpair (a flag-only handler
  would not interrupt ``poll``); previous handlers and wakeup fd are restored afterwards.  Off
  the main thread no handler can be installed: the loop then polls the window size instead.
- SIGWINCH: the outer terminal's size is set on the pty (TIOCSWINSZ), the kernel signals the
  program, ssh tells the remote side: no keypress needed.
- SIGTERM / SIGHUP / SIGINT / SIGQUIT sent to us are passed to the program (ssh quits cleanly
  on each); we keep draining its output until it is gone.
- Writes into the pty are non-blocking: input waits in a queue while the pty is full and the
  loop keeps reading output meanwhile (a 1 MB paste cannot deadlock against the echo).
- End: on Linux the master reads EIO once the last slave fd is closed; that is EOF.  Should some
  stray process keep the slave open after the program has exited, the drain stops after a
  short quiet period instead of waiting forever.  The keyboard is no longer read once the
  program has gone, so keys typed afterwards reach the next program.
- Recording (``tap=``, :class:`RelayTap`, e.g. :class:`sshwrap.io.recording.Recorder`): the
  tap sees the output chunks once they are written (one call per burst of reads), each
  typed chunk (if it records input) and each resize; the loop gives it a poll timeout and a
  ``tick()`` so its events are written in time without a thread.  Without a tap the bulk
  path has one list truth test per burst more than without recording at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Protocol

from ..io.channel_io import read_ready
from ..io.recording import Recorder, RecordSpec
from .modes import get_size, raw_mode, set_size

__all__ = ["RelayResult", "RelayTap", "relay", "relay_terminal"]

_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
_READ = 65536
_BURST = 16  # reads in a row before looking at the keyboard again (<= ~64 KiB of output)
_SMALL = 1024  # a read shorter than this means the program is not streaming
_QUEUE_LIMIT = 1 << 20  # stop reading the keyboard while this much waits for the pty
_DRAIN_QUIET = 0.3  # seconds of silence after the program exited before we stop draining
_IN = select.POLLIN | select.POLLPRI
_ERR = select.POLLERR | select.POLLHUP | select.POLLNVAL


@dataclass
class RelayResult:
    """Why the relay ended, and how the program did.

    ``returncode`` is the program's exit status once it ended (``eof``), as the caller that
    knows it fills it in (``Spawned.interact``, ``Connection.interact``: the remote shell's
    status, ``-128`` for a signal death); None when the user escaped (the program may run
    on) or from ``relay()`` itself, which knows no status.
    """

    eof: bool = False  # the pty reached EOF (the program and its children are gone)
    escaped: bool = False  # the user typed the hand-back key (``escape``)
    signals: tuple[int, ...] = ()  # terminating signals we received and forwarded
    returncode: int | None = None  # the program's exit status (see above)
    record_path: str | None = None  # the recording's file (``record=``)
    record_error: OSError | None = None  # why the recording stopped early, if it did


class RelayTap(Protocol):
    """What the relay tells a recorder (:class:`sshwrap.io.recording.Recorder`)."""

    records_input: bool  # whether :meth:`input` wants the typed chunks

    def output(self, chunks: Sequence[bytes]) -> None:
        """Output just written to the user's terminal: the chunks of one burst of reads (the
        list is the relay's, reused after the call)."""

    def input(self, data: bytes) -> None:
        """Keys just typed (sent on to the program)."""

    def resize(self, rows: int, cols: int) -> None:
        """The terminal's new size, just applied."""

    def timeout(self) -> float | None:
        """Seconds until :meth:`tick` is due (None: nothing waits)."""

    def tick(self) -> None:
        """Called when that time has passed, or when the loop woke for something else."""


def _noop(signum: int, frame: FrameType | None) -> None:
    """Handler whose only job is to let the wakeup fd see the signal."""


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def relay(
    master_fd: int,
    *,
    stdin_fd: int | None = 0,
    stdout_fd: int = 1,
    is_alive: Callable[[], bool] | None = None,
    on_signal: Callable[[int], None] | None = None,
    resize: Callable[[int, int], None] | None = None,
    escape: bytes | None = None,
    pending_output: bytes = b"",
    on_child: Callable[[], None] | None = None,
    tap: RelayTap | None = None,
) -> RelayResult:
    """Relay between the user's terminal and ``master_fd`` until the pty program is gone.

    - ``stdin_fd``: where keystrokes come from (None: nothing to send).
    - ``is_alive()``: whether the program still runs (checked on SIGCHLD and when idle).
    - ``on_signal(signum)``: called for SIGTERM/SIGHUP/SIGINT/SIGQUIT received meanwhile
      (usually: pass it on to the program).
    - ``resize(rows, cols)``: apply the outer terminal's new size; the default sets it on
      ``master_fd``.
    - ``escape``: a byte that, typed by the user, ends the relay and hands control back.
    - ``pending_output``: bytes already read from the pty, written to stdout first.
    - ``on_child()``: called on SIGCHLD (and when idle without signals) before ``is_alive``,
      e.g. to notice that the program has stopped (``~^Z``) and suspend the caller too.
    - ``tap``: sees output, input and resizes (recording; see :class:`RelayTap`).
    """
    result = RelayResult()
    tap_out = tap.output if tap is not None else None
    tap_in = tap.input if tap is not None and tap.records_input else None
    if pending_output:
        _write_all(stdout_fd, pending_output)
        if tap_out is not None:
            tap_out([pending_output])

    def default_resize(rows: int, cols: int) -> None:
        set_size(master_fd, rows, cols)

    apply_size = resize or default_resize
    size_fd = stdin_fd if stdin_fd is not None else stdout_fd
    last_size = get_size(size_fd)

    def check_size() -> None:
        nonlocal last_size
        size = get_size(size_fd)
        if size is not None and size != last_size and size[0] > 0 and size[1] > 0:
            last_size = size
            with contextlib.suppress(OSError):
                apply_size(*size)
            if tap is not None:
                tap.resize(*size)

    # -- signals through a wakeup fd (main thread only) --------------------------------
    in_main = threading.current_thread() is threading.main_thread()
    rsock: socket.socket | None = None
    wsock: socket.socket | None = None
    old_handlers: dict[signal.Signals, signal._HANDLER] = {}
    old_wakeup = -1
    if in_main:
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGWINCH, signal.SIGCHLD, *_FORWARDED):
            old_handlers[sig] = signal.signal(sig, _noop)

    was_blocking = os.get_blocking(master_fd)
    os.set_blocking(master_fd, False)
    poller = select.poll()
    poller.register(master_fd, _IN)
    reading_stdin = stdin_fd is not None
    if stdin_fd is not None:
        poller.register(stdin_fd, _IN)
    if rsock is not None:
        poller.register(rsock.fileno(), select.POLLIN)
    queue = bytearray()  # keyboard input the pty has not taken yet
    burst: list[bytes] = []  # output of this burst for the tap (filled only with a tap)
    stdout_ok = True
    child_gone = False
    received: list[int] = []
    master_events = _IN

    def set_master_events(ev: int) -> None:
        nonlocal master_events
        if ev != master_events:
            master_events = ev
            poller.modify(master_fd, ev)

    def stop_stdin() -> None:
        nonlocal reading_stdin
        if reading_stdin and stdin_fd is not None:
            reading_stdin = False
            poller.unregister(stdin_fd)

    try:
        while True:
            if child_gone:
                timeout_ms: int | None = int(_DRAIN_QUIET * 1000)
            elif rsock is None:
                timeout_ms = 250  # no signals here: look at the size and the child now and then
            else:
                timeout_ms = None
            if tap is not None and not child_gone:
                due = tap.timeout()
                if due is not None and (timeout_ms is None or due * 1000 < timeout_ms):
                    timeout_ms = int(due * 1000) + 1
            events = poller.poll(timeout_ms)
            if not events:
                if tap is not None:
                    tap.tick()
                if child_gone:
                    break  # the program is gone and nothing more came: a stray holds the slave
                check_size()
                if on_child is not None:
                    on_child()
                if is_alive is not None and not is_alive():
                    child_gone = True
                    stop_stdin()
                continue
            for fd, ev in events:
                if fd == master_fd:
                    if ev & _IN or ev & _ERR:
                        # Bulk output: while the pty has more, keep reading without going
                        # back to poll (a read gives at most ~4 KiB, the tty layer's buffer).
                        for _ in range(_BURST):
                            try:
                                data = os.read(master_fd, _READ)
                            except BlockingIOError:
                                break
                            except OSError as e:
                                if e.errno != errno.EIO:
                                    raise
                                data = b""
                            if not data:
                                result.eof = True
                                break
                            if stdout_ok:
                                try:
                                    _write_all(stdout_fd, data)
                                except OSError:
                                    stdout_ok = False  # the terminal hung up: keep draining
                            if tap_out is not None:
                                burst.append(data)
                            if len(data) < _SMALL:
                                break  # interactive output: back to the keyboard at once
                        if burst and tap_out is not None:
                            tap_out(burst)
                            burst.clear()
                        if result.eof:
                            return result
                    if ev & select.POLLOUT and queue:
                        try:
                            n = os.write(master_fd, queue)
                        except BlockingIOError:
                            n = 0
                        except OSError:
                            queue.clear()
                            n = 0
                        del queue[:n]
                        if not queue:
                            set_master_events(_IN)
                        if len(queue) < _QUEUE_LIMIT and not reading_stdin and not child_gone:
                            reading_stdin = stdin_fd is not None
                            if stdin_fd is not None:
                                poller.register(stdin_fd, _IN)
                elif fd == stdin_fd and reading_stdin:
                    got = read_ready(fd, _READ)
                    if got is None:
                        continue
                    data = got
                    if not data:
                        stop_stdin()  # the terminal went away
                        continue
                    if escape is not None and escape in data:
                        data = data[: data.index(escape)]
                        result.escaped = True
                    if tap_in is not None and data:
                        tap_in(data)
                    elif tap is not None:
                        tap.tick()
                    if data:
                        if not queue:
                            try:
                                n = os.write(master_fd, data)
                            except BlockingIOError:
                                n = 0
                            data = data[n:]
                        if data:
                            queue += data
                            set_master_events(_IN | select.POLLOUT)
                            if len(queue) >= _QUEUE_LIMIT:
                                stop_stdin()
                    if result.escaped:
                        if queue:
                            os.set_blocking(master_fd, True)
                            with contextlib.suppress(OSError):
                                _write_all(master_fd, queue)
                            os.set_blocking(master_fd, False)
                        return result
                elif rsock is not None and fd == rsock.fileno():
                    try:
                        sigs = rsock.recv(512)
                    except BlockingIOError:
                        sigs = b""
                    if tap is not None:
                        tap.tick()
                    for signum in sigs:
                        if signum == signal.SIGWINCH:
                            check_size()
                        elif signum == signal.SIGCHLD:
                            if on_child is not None:
                                on_child()
                            if is_alive is not None and not is_alive():
                                child_gone = True
                                stop_stdin()
                        elif signum in _FORWARDED:
                            received.append(signum)
                            if on_signal is not None:
                                on_signal(signum)
    finally:
        result.signals = tuple(received)
        with contextlib.suppress(OSError):
            os.set_blocking(master_fd, was_blocking)
        if in_main:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_wakeup)
        if rsock is not None:
            rsock.close()
        if wsock is not None:
            wsock.close()
    return result


def relay_terminal(
    master_fd: int,
    pid: int,
    *,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    is_alive: Callable[[], bool] | None = None,
    escape: bytes | None = None,
    pending_output: bytes = b"",
    record: RecordSpec | None = None,
    title: str | None = None,
) -> RelayResult:
    """:func:`relay` with the user's terminal: the pty first takes the size of the terminal
    on ``stdin_fd`` (else ``stdout_fd``), that terminal is in raw mode for the relay (restored
    on every exit path), and the signals :func:`relay` receives are sent to ``pid``.

    ``record``: record the session to an asciicast v2 file (a path, or a
    :class:`sshwrap.io.recording.Record`; ``title`` its default title), created before the
    terminal goes raw (an existing file: ``FileExistsError``), written and fsynced by the end;
    a recording that failed midway leaves the session alone and says why in the result's
    ``record_error``."""
    size = get_size(stdin_fd) or get_size(stdout_fd)
    if size is not None and size[0] > 0 and size[1] > 0:
        with contextlib.suppress(OSError):
            set_size(master_fd, *size)
    else:
        size = get_size(master_fd) or (24, 80)

    def forward(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    recorder = Recorder(record, size, title=title) if record is not None else None
    try:
        with raw_mode(stdin_fd):
            result = relay(
                master_fd,
                stdin_fd=stdin_fd,
                stdout_fd=stdout_fd,
                is_alive=is_alive,
                on_signal=forward,
                escape=escape,
                pending_output=pending_output,
                tap=recorder,
            )
    finally:
        if recorder is not None:
            recorder.close()
    if recorder is not None:
        result.record_path, result.record_error = recorder.path, recorder.error
    return result
