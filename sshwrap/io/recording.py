"""Recording a terminal session to an asciicast v2 file as it goes (see docs/recording.md).

:class:`Recorder` is the relay's tap (:class:`sshwrap.terminal.relay.RelayTap`): the relay
hands it every output chunk, every typed chunk (only when input is recorded) and every
resize; the events' lines come from :mod:`sshwrap.protocol.asciicast`.

- The file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600 (set with ``fchmod``
  whatever the umask): an existing file or a symlink there is refused
  (``FileExistsError``), unless ``overwrite=True``: then a new 0600 file is made beside it
  and renamed over the name (a symlink there is replaced, never followed).
- The header is written at once.  Output goes into one ``"o"`` event per 50 ms (or 64 KiB of
  JSON): each read is escaped as it comes (decoded, then
  :data:`sshwrap.protocol.asciicast.json_quoted`, i.e. orjson, its quotes cut off) and
  appended to the event's open line in the log's buffer, no join of reads (a joined burst
  and its escaped copies made malloc grow and trim its heap: fresh pages, page faults); a
  UTF-8 sequence cut at a read's end waits for the next read.  The path of a read that is
  valid UTF-8 into an open event is kept to a few calls: it runs some 400,000 times per GB.
  One event per pty read would cost a relay GBs of JSON lines.  An event's time is that of
  its first read; its bytes came within the next 50 ms (the timing precision of a recording;
  a keystroke or a resize ends an event early, so they stay in order with the output).
  Lines go to an
  :class:`sshwrap.io.appendlog.AppendLog` (one aligned buffer, written with ``O_DIRECT``
  where the filesystem allows it), which writes only complete lines (an open event's line
  waits), when a second has passed since the first of them came (on the next event, or on
  :meth:`Recorder.tick`, which the relay calls when it has waited as long as
  :meth:`Recorder.timeout` said), and whenever the 1 MiB buffer fills.  No thread: a quiet
  session has nothing unwritten.  Each event is one line, so after a crash of sshwrap the
  file is valid up to its last write.  :meth:`Recorder.close` writes the rest and fsyncs.
- Input events only with ``Record(input=True)``, and then only what the remote side echoed
  (:class:`sshwrap.protocol.asciicast.EchoGate`): a password typed at a prompt that does not
  echo is never written.
- A write that fails (disk full) stops the recording, not the session: the error is kept in
  :attr:`Recorder.error`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..protocol.asciicast import (
    EVENT_END,
    EchoGate,
    event_head,
    event_parts,
    header_line,
    json_content,
    json_quoted,
    resize_data,
    utf8_cut,
)
from .appendlog import AppendLog

__all__ = ["Record", "RecordSpec", "Recorder", "as_record"]

_OUT_AGE = 0.05  # seconds of output gathered into one "o" event at most
_OUT_MAX = 64 * 1024  # bytes of JSON in one "o" event, about (checked after each burst;
# an event's line must stay well below the log's buffer, which it waits in until it ends)
_FLUSH_AGE = 1.0  # seconds an event may wait in memory at most
_LOG_SIZE = 1 << 20  # the write buffer: written in blocks of this size as it fills


@dataclass(frozen=True)
class Record:
    """What to record and where: ``record=`` of ``Spawned.interact``/``Connection.interact``.

    - ``path``: the asciicast v2 file to create (0600; an existing one is refused unless
      ``overwrite``).
    - ``input``: also record typed keys (``"i"`` events), only those the remote echoed.
    - ``title``: the header's title (default: set by the caller, e.g. ``ssh HOST``).
    """

    path: str | os.PathLike[str]
    input: bool = False
    overwrite: bool = False
    title: str | None = None


RecordSpec = str | os.PathLike[str] | Record
"""A path (output only, no overwrite) or a :class:`Record`."""


def as_record(spec: RecordSpec) -> Record:
    """``spec`` as a :class:`Record` (``TypeError`` for anything else)."""
    if isinstance(spec, Record):
        return spec
    if isinstance(spec, str | os.PathLike):
        if not os.fspath(spec):
            raise ValueError("record= needs a file name")
        return Record(spec)
    raise TypeError(f"record= takes a path or sshwrap.io.recording.Record, not {spec!r}")


def _create(path: str, overwrite: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    if not overwrite:
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise FileExistsError(
                f"recording file {path!r} exists (or is a symlink): not overwritten"
            ) from None
    else:
        head, tail = os.path.split(path)
        for n in range(100):
            tmp = os.path.join(head, f".{tail}.{os.getpid()}.{n}.tmp")
            try:
                fd = os.open(tmp, flags, 0o600)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"cannot create a temporary file beside {path!r}")
        try:
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Recorder:
    """An asciicast v2 file being written; the relay's tap (see the module docstring).

    ``size`` is the terminal's ``(rows, cols)`` at the start; ``env`` the header's
    environment (default: ``TERM`` and ``SHELL`` of this process, those set).
    """

    def __init__(
        self,
        record: RecordSpec,
        size: tuple[int, int],
        *,
        title: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        rec = as_record(record)
        rows, cols = size
        if env is None:
            env = {k: os.environ[k] for k in ("TERM", "SHELL") if k in os.environ}
        head = header_line(cols, rows, int(time.time()), env=env, title=rec.title or title)
        self.path: str = os.fspath(rec.path)
        self.records_input: bool = rec.input
        self.error: OSError | None = None
        self._fd = _create(self.path, rec.overwrite)
        try:
            self._log: AppendLog | None = AppendLog(self._fd, _LOG_SIZE)
        except BaseException:
            os.close(self._fd)
            raise
        self._start = self._last = time.monotonic()
        self._due: float | None = None  # when the oldest line not yet written must be
        self._gate = EchoGate() if rec.input else None
        self._open = False  # whether an "o" event's line is open (its data goes on)
        self._open_at = 0  # where its line starts (``AppendLog.end`` then)
        self._out_time = 0.0  # when it was opened
        self._carry = b""  # a UTF-8 sequence cut at the end of the last read
        self._add(head)
        self._write()

    # -- the relay's calls ----------------------------------------------------------------
    def output(self, chunks: Sequence[bytes]) -> None:
        """Output that reached the user's terminal: the chunks of one burst of reads."""
        log = self._log
        if log is None:
            return  # the recording stopped (see :attr:`error`)
        now = time.monotonic()
        gate = self._gate
        add = log.add
        fast = self._open and not self._carry and (gate is None or not gate.waiting)
        try:
            for data in chunks:
                if fast:
                    # The common case, kept short (it runs for every pty read): valid UTF-8
                    # that ends with a whole character, into the open event's line.
                    try:
                        text = data.decode()
                    except UnicodeDecodeError:
                        pass
                    else:
                        add(json_quoted(text)[1:-1])
                        continue
                if gate is not None and gate.waiting:
                    released = gate.output(data)
                    if released:  # the key's event goes before the echo that released it
                        self._end_output()
                        self._inputs(released)
                self._add_output(data, now)
                if self._log is None:
                    return  # that failed
                fast = self._open and not self._carry and (gate is None or not gate.waiting)
        except OSError as e:  # a full buffer's write failed
            self._fail(e)
            return
        if self._open and (now - self._out_time >= _OUT_AGE or log.end - self._open_at >= _OUT_MAX):
            self._end_output()
            self._check(now)

    def input(self, data: bytes) -> None:
        """Keys the user typed (recorded only as far as the remote echoes them)."""
        if self._gate is None:
            return
        now = time.monotonic()
        self._end_output()  # the output before the key comes first
        self._inputs(self._gate.typed(data, now))
        self._check(now)

    def resize(self, rows: int, cols: int) -> None:
        """The terminal took a new size."""
        now = time.monotonic()
        self._end_output()
        self._event(now, "r", resize_data(rows, cols))
        self._check(now)

    def timeout(self) -> float | None:
        """Seconds until :meth:`tick` should be called (None: nothing waits)."""
        if self._open or self._carry:
            return max(0.0, self._out_time + _OUT_AGE - time.monotonic())
        if self._due is not None:
            return max(0.0, self._due - time.monotonic())
        return None

    def tick(self) -> None:
        """Make gathered output an event and write what is due."""
        now = time.monotonic()
        if (self._open or self._carry) and now - self._out_time >= _OUT_AGE:
            # final: a UTF-8 sequence still cut after a quiet 50 ms is broken, not split
            self._end_output(final=True)
        self._check(now)

    def close(self) -> None:
        """Write everything, fsync, close (keeps the first error in :attr:`error`)."""
        if self._fd < 0:
            return
        if self._gate is not None:
            self._gate.close()
        self._end_output(final=True)
        log, self._log = self._log, None
        if log is not None:
            try:
                log.flush(final=True)
            except OSError as e:
                self.error = e
            finally:
                log.close()
        if self.error is None:
            try:
                os.fsync(self._fd)
            except OSError as e:
                self.error = e
        os.close(self._fd)
        self._fd = -1

    # -- inside -------------------------------------------------------------------------
    def _inputs(self, chunks: list[tuple[float, bytes]]) -> None:
        for t, chunk in chunks:
            self._event(max(t, self._last), "i", chunk)

    def _add_output(self, data: bytes, now: float) -> None:
        """Escape ``data`` into the open ``"o"`` event (opened at ``now`` if none is)."""
        if self._carry:  # the start of a UTF-8 sequence the last read cut
            data = self._carry + data
            self._carry = b""
        if not data.isascii():
            cut = utf8_cut(data)
            if cut < len(data):
                self._carry = data[cut:]
                data = data[:cut]
                if not self._open:
                    self._out_time = now  # the carry waits at most _OUT_AGE (tick)
        if not data:
            return
        if not self._open:
            self._open = True
            self._open_at = self._log.end if self._log is not None else 0
            self._out_time = now
            self._last = max(now, self._last)  # times never go back
            self._add(event_head(self._last - self._start, "o"))
        self._add(json_content(data))

    def _end_output(self, final: bool = False) -> None:
        """End the open ``"o"`` event (``final``: a cut UTF-8 sequence goes in, broken)."""
        if final and self._carry:
            carry, self._carry = self._carry, b""
            self._add_output(carry.decode("utf-8", "replace").encode(), time.monotonic())
        if not self._open:
            return
        self._open = False
        self._add(EVENT_END)
        if self._due is None:
            self._due = time.monotonic() + _FLUSH_AGE

    def _event(self, t: float, code: str, data: bytes) -> None:
        self._last = t
        for part in event_parts(t - self._start, code, data):
            self._add(part)
        if self._due is None:
            self._due = time.monotonic() + _FLUSH_AGE

    def _add(self, part: bytes) -> None:
        if self._log is None:
            return
        try:
            self._log.add(part)  # a full buffer's complete lines are written on the way
        except OSError as e:
            self._fail(e)

    def _check(self, now: float) -> None:
        if self._due is not None and now >= self._due:
            self._write()

    def _write(self) -> None:
        self._due = None
        if self._log is None:
            return
        try:
            self._log.flush()
        except OSError as e:
            self._fail(e)

    def _fail(self, e: OSError) -> None:
        """A write failed (a full disk): the session goes on unrecorded."""
        self.error = e
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
