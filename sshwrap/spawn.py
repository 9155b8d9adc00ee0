"""Expect-style control of a remote program: ``Spawned``.

``Spawned`` runs ``ssh -tt -e none`` in a local pty, so the remote program sees a terminal
(sudo, passwd, REPLs, curses programs): wait for its text with ``expect()``, type with
``send()``/``sendline()``, hand the user's terminal to it with ``interact()`` (the relay and
raw-mode code of the ``sshwrap`` command).  The pty is ssh's controlling terminal (resizes,
ssh's own prompts, the hang-up on ``close()``) and no Python runs in the child, so spawning is
safe while a Connection's pump thread runs (:func:`sshwrap.io.pty.spawn_in_pty`).

A pty is not byte exact: output has ``\\r\\n`` line ends and stderr merged; what you send is
"typed" (echoed unless the program turns echo off, line-edited, ``\\x03`` interrupts, ``\\x04``
at a line start is end-of-file); ``-e none``: a ``~.`` in the data does not disconnect.
``tty=False`` runs ``ssh -T`` with pipes: byte exact, stderr still merged.  ``encoding=None``
is the bytes mode: patterns, ``before``/``after`` and what ``send`` takes are ``bytes``.

Over a master (``ssh -S``) the master writes the remote output into the pty itself, and ssh
makes the pty raw only once the master has answered it: on a loaded machine output can come
first, and the cooked pty ends its lines in ``\\r\\r\\n`` (undone if read before ssh has logged
its session) and would echo keys typed then (``\\r`` made ``\\n``), so ``send()`` waits for raw
mode (``timeout`` s at most, :data:`sshwrap.io.pty.RAW_WAIT` if None).  Without a master keys
go at once (ssh's own prompts read them) and raw mode comes before any output.

ssh logs to a private file (``-E``, DEBUG2), so ``returncode`` is the remote program's exit
status (``-128``, :data:`sshwrap.errors.UNKNOWN_SIGNAL`, for a signal death: ssh is not told
which signal), ssh's own failure is ``ssh_error`` (``returncode`` 255), and ssh's closing
``Connection to HOST closed.`` line is dropped.  Once ``expect`` has seen the end of the
output it reaps ssh before it returns, so ``returncode`` is set.

Over a master, a session that ends without an exit status is a signal death or a lost
connection, and a passenger is told neither: given the master's ``control_path``
(``Connection.spawn`` passes it), ``Spawned`` asks the master (an alive check, 1 s at most):
it answers, the program was killed by a signal (``-128``); it does not, ``wait()`` /
``expect_eof()`` raise ``SSHConnectionError`` (kept in ``ssh_error``; ``returncode`` 255).
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import io
import os
import re
import select
import signal
import subprocess
import time
import warnings
from collections.abc import Sequence
from typing import Any, AnyStr, Generic, Required, TypeAlias, TypedDict, Unpack, cast, overload

from .core.argv import SSHLog, check_destination, find_ssh
from .core.options import Command, CommandOptions, check_keywords, check_terminal
from .core.spawn_command import LOGIN_SHELL as LOGIN_SHELL  # re-exported (the docs)
from .core.spawn_command import spawn_command_line as spawn_command_line  # re-exported
from .core.tty_process import MUX_HELLO, MUX_SESSION, NO_MASTER, CookedUndo
from .errors import UNKNOWN_SIGNAL, SSHConnectionError, SSHError, SSHWrapError, interpret_exit
from .io.mux_control import MuxControl, MuxError
from .io.pty import RAW_WAIT, spawn_in_pty
from .io.recording import RecordSpec
from .terminal.modes import check_size, get_size, set_size, wait_for_raw
from .terminal.relay import RelayResult, relay_terminal

__all__ = [
    "ExpectEOF",
    "ExpectError",
    "ExpectTimeout",
    "InteractOptions",
    "SpawnOptions",
    "Spawned",
]

_READ = 65536
# ssh -tt's closing line, right after the program's last output (maybe no newline before it)
_QUIT = re.compile(r"(?:Shared c|C)onnection to [^\r\n]{1,300} closed\.\r*\n\Z")
_QUIT_BYTES = re.compile(_QUIT.pattern.encode())
_MUX_STATUS = "Received exit status from master"
_ALIVE_CHECK = 1.0  # seconds the master gets to answer after a session without exit status
_DIMENSIONS = "dimensions= is deprecated: use size=(rows, cols), as run() and Popen() take it"
_EXIT_WAIT = 5.0  # seconds ssh gets to exit after the end of its output (within the call's bound)


class SpawnOptions(CommandOptions, total=False):
    """``Connection.spawn``'s keywords besides the command and ``encoding`` (see Spawned)."""

    tty: bool
    size: tuple[int, int] | None
    dimensions: tuple[int, int] | None  # deprecated alias of size
    timeout: float | None
    errors: str


class InteractOptions(TypedDict, total=False):
    """The keywords of ``Spawned.interact``/``Connection.interact`` after ``escape``: the user's
    terminal (``stdin_fd`` 0, ``stdout_fd`` 1) and ``record`` (None; an asciicast v2 file)."""

    stdin_fd: int
    stdout_fd: int
    record: RecordSpec | None


class SpawnedOptions(SpawnOptions, total=False):
    """The keywords of :class:`Spawned` besides the command and ``encoding``."""

    destination: Required[str]
    ssh_args: Sequence[str]
    ssh: str | None
    control_path: str | None


def spawn_size(options: SpawnOptions, *, stacklevel: int = 2) -> SpawnOptions:
    """``options`` with the deprecated ``dimensions`` turned into ``size`` (with a
    ``DeprecationWarning``; both given: ``TypeError``), ``size`` checked (``ValueError``
    without ``tty=True`` or unless two positive ints)."""
    out: dict[str, Any] = dict(options)
    dimensions = out.pop("dimensions", None)
    if dimensions is not None:
        if out.get("size") is not None:
            raise TypeError("give size=(rows, cols) only: dimensions= is its deprecated alias")
        warnings.warn(_DIMENSIONS, DeprecationWarning, stacklevel=stacklevel + 1)
        out["size"] = dimensions
    check_terminal({"size": out.get("size"), "tty": out.get("tty", True)})
    if out.get("size") is not None:
        check_size(out["size"])
    return cast(SpawnOptions, out)


class ExpectError(SSHWrapError):
    """Base of the errors ``expect()`` raises; ``before`` holds the output that arrived."""

    def __init__(self, message: str, before: str | bytes = "") -> None:
        super().__init__(message)
        self.before = before


class ExpectTimeout(ExpectError, TimeoutError):
    """No pattern matched within the timeout."""


class ExpectEOF(ExpectError, EOFError):
    """The program's output ended before a pattern matched."""


Pattern: TypeAlias = AnyStr | re.Pattern[AnyStr] | type[ExpectError]


class Spawned(Generic[AnyStr]):
    """A remote program in a local pty (``ssh -tt -e none``), driven expect-style.

    ``Spawned(command, destination=host, ssh_args=[...])``: ``command`` is a str for the remote
    shell, a list (each item quoted), or None for a login shell.  ``ssh_args`` are ssh options
    before the destination (``-F``, ``-S``/``-o ControlPath=...`` to use a master).

    - ``encoding`` (default utf-8, ``errors`` "replace"): output is decoded; ``before``/
      ``after`` and patterns (regular expressions, maybe compiled) are str.  ``None``: bytes
      mode (``Spawned[bytes]``): all of them and ``send`` are bytes, output as it arrived.
    - ``timeout``: default for ``expect`` (seconds, None waits forever).
    - ``size``: the pty's ``(rows, cols)`` from the start (default 24 x 80; needs
      ``tty=True``); ``dimensions`` is its deprecated alias.
    - ``env``, ``cwd``: as for ``sshwrap.run``: the remote shell exports ``env`` and changes
      to ``cwd`` first (on ssh's command line, as there); a login shell (command None) is
      then :data:`LOGIN_SHELL`.
    - ``control_path``: the master's socket when ``ssh_args`` use one, so that a lost
      connection is told from a signal death (see the module docstring).

    A context manager: leaving it closes the program (SIGHUP, then SIGKILL) if still running.
    """

    before: AnyStr
    after: AnyStr
    match: re.Match[AnyStr] | None = None
    _lost = _closed = _eof = _raw = False  # _raw: seen ssh's raw mode (send() waits for it)

    @overload
    def __init__(
        self: Spawned[str],
        command: Command | None,
        *,
        encoding: str = "utf-8",
        **options: Unpack[SpawnedOptions],
    ) -> None: ...
    @overload
    def __init__(
        self: Spawned[bytes],
        command: Command | None,
        *,
        encoding: None,
        **options: Unpack[SpawnedOptions],
    ) -> None: ...
    def __init__(
        self,
        command: Command | None,
        *,
        encoding: str | None = "utf-8",
        **options: Unpack[SpawnedOptions],
    ) -> None:
        check_keywords("Spawned", options, SpawnedOptions)
        destination: str = options["destination"]
        check_destination(destination)  # ValueError before any ssh: ssh would read an option
        settings = spawn_size(options, stacklevel=2)
        env, cwd = settings.get("env"), settings.get("cwd")
        remote: str | None = spawn_command_line(command, env=env, cwd=cwd)
        self.command: Command | None = command
        self.destination: str = destination
        self.control_path: str | None = options.get("control_path")
        self.timeout: float | None = settings.get("timeout", 30.0)
        self.tty: bool = settings.get("tty", True)
        self.encoding: str | None = encoding
        self._decoder: codecs.IncrementalDecoder | None = (
            None
            if encoding is None
            else codecs.getincrementaldecoder(encoding)(settings.get("errors", "replace"))
        )
        self._empty: AnyStr = cast(AnyStr, b"" if encoding is None else "")
        self._quit: re.Pattern[AnyStr] = cast(Any, _QUIT_BYTES if encoding is None else _QUIT)
        self._buffer: AnyStr = self._empty
        self.before = self.after = self._empty
        self.returncode: int | None = None
        self.ssh_error: SSHError | None = None
        self._log: SSHLog = SSHLog()
        # DEBUG2 (not DEBUG1): over a master, only DEBUG2 logs whether the master sent an
        # exit status; a session that ended without one was killed by a signal.
        self.argv = [
            options.get("ssh") or find_ssh(),
            *(["-tt", "-e", "none"] if self.tty else ["-T"]),
            *("-E", self._log.path, "-o", "LogLevel=DEBUG2"),
            *options.get("ssh_args", ()),
            "--",
            destination,
            *([remote] if remote is not None else []),
        ]
        # tty mode: the pty master (a FileIO, so closing twice is safe and GC closes it)
        self._master: io.FileIO | None = None
        self._popen: subprocess.Popen[bytes]
        try:
            if self.tty:
                size = settings.get("size") or (24, 80)
                self._popen, master = spawn_in_pty(self.argv, size=size)
                self._master = io.FileIO(master, "rb+")
                self._rfd = self._wfd = master
            else:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    bufsize=0,
                    start_new_session=True,
                )
                assert self._popen.stdin is not None and self._popen.stdout is not None
                self._wfd = self._popen.stdin.fileno()
                self._rfd = self._popen.stdout.fileno()
        except BaseException:
            self._log.close()
            raise
        self._undo = CookedUndo(-1 if self._master is None else self._rfd, self._log.read)

    def __repr__(self) -> str:
        rc = self.returncode
        state = f"returncode={rc}" if rc is not None else "running" if self.isalive() else "exited"
        if self._closed:
            state = "closed" if rc is None else f"closed {state}"
        where = f"host={self.destination!r} command={self.command!r} pid={self._popen.pid}"
        return f"<Spawned {where} {state}>"

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> Spawned[AnyStr]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """The local ssh process's pid."""
        return self._popen.pid

    @property
    def fd(self) -> int:
        """The pty master (tty mode) or the output pipe (pipes mode)."""
        return self._rfd

    # -- reading -----------------------------------------------------------------------
    def _decode(self, data: bytes, final: bool = False) -> AnyStr:
        text: Any = data if self._decoder is None else self._decoder.decode(data, final)
        return cast(AnyStr, text)

    def _read_some(self, timeout: float | None) -> bool:
        """Read what arrives within ``timeout`` into the buffer; False at EOF."""
        if self._eof:
            return False
        r, _, _ = select.select([self._rfd], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self._rfd, _READ)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno != errno.EIO:  # Linux: EIO once the pty's slave side is closed
                raise
            data = b""
        if not data:
            self._eof = True
            # ssh's own closing line comes last: not the program's output
            self._buffer = self._quit.sub(self._empty, self._buffer + self._decode(b"", True))
            return False
        self._buffer += self._decode(self._undo(data))  # a cooked pty's \r\r\n (module doc)
        return True

    def _via_master(self) -> bool:
        """Whether ssh goes through a master (until it turns out to connect on its own)."""
        log = self._log.read()
        return (bool(self.control_path) or MUX_HELLO in log) and NO_MASTER not in log

    def _compile(self, pattern: AnyStr | re.Pattern[AnyStr]) -> re.Pattern[AnyStr]:
        text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
        if not isinstance(text, type(self._empty)):
            mode = "str (text mode)" if self._decoder else "bytes (encoding=None)"
            raise TypeError(f"patterns must be {mode}, not {pattern!r}")
        return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)

    def _reaped_at_eof(self, deadline: float | None) -> None:
        """The output has ended: ssh exits right after; reap it within the call's bound."""
        left = _EXIT_WAIT if deadline is None else deadline - time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(max(0.0, min(left, _EXIT_WAIT)))
        self._reap()

    def expect(
        self, pattern: Pattern[AnyStr] | Sequence[Pattern[AnyStr]], timeout: float | None = -1
    ) -> int:
        """Wait until one of the regular expressions matches the output; return its index.

        The earliest match in the output wins (ties: the first pattern).  ``before`` is the
        output before the match, ``after`` the matched text, ``match`` the ``re.Match``; the
        output up to the end of the match is consumed.  Raises ``ExpectTimeout`` after
        ``timeout`` seconds (-1, the default: the instance's ``timeout``; None: no limit)
        and ``ExpectEOF`` when the output ends first (``before`` then holds the rest) -
        unless the class ``ExpectEOF`` / ``ExpectTimeout`` is itself one of the patterns:
        then its index is returned instead (``s.expect(["[$#] ", ExpectEOF])``).  At the end
        of the output ssh is reaped first (within ``timeout``), so ``returncode`` is set.
        Patterns are str in text mode, bytes with ``encoding=None`` (else ``TypeError``).
        """
        single = isinstance(pattern, (str, bytes, re.Pattern, type))
        items = [pattern] if single else list(cast(Sequence[Pattern[AnyStr]], pattern))
        patterns: list[tuple[int, re.Pattern[AnyStr]]] = []
        on_eof = on_timeout = -1
        for i, p in enumerate(items):
            if isinstance(p, type):
                if issubclass(p, ExpectEOF):
                    on_eof = i
                elif issubclass(p, ExpectTimeout):
                    on_timeout = i
                else:
                    raise TypeError(f"not a pattern: {p!r}")
            else:
                patterns.append((i, self._compile(cast("AnyStr | re.Pattern[AnyStr]", p))))
        wanted = " | ".join(repr(rx.pattern) for _, rx in patterns) or "the end of the output"
        limit = self.timeout if timeout == -1 else timeout
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            best: tuple[int, int, re.Match[AnyStr]] | None = None
            for i, rx in patterns:
                m = rx.search(self._buffer)
                if m is not None and (best is None or m.start() < best[0]):
                    best = (m.start(), i, m)
            if best is not None:
                _, index, m = best
                self.before = self._buffer[: m.start()]
                self.after = self._buffer[m.start() : m.end()]
                self.match = m
                self._buffer = self._buffer[m.end() :]
                return index
            if self._eof:
                self.before, self._buffer = self._buffer, self._empty
                self.after = self._empty
                self.match = None
                self._reaped_at_eof(deadline)
                if on_eof >= 0:
                    return on_eof
                raise ExpectEOF(
                    f"{self.destination}: output ended before {wanted} matched", self.before
                )
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.before = self._buffer
                self.after = self._empty
                self.match = None
                if on_timeout >= 0:
                    return on_timeout
                raise ExpectTimeout(
                    f"{self.destination}: {wanted} not seen within {limit} s", self._buffer
                )
            self._read_some(left)

    def expect_eof(self, timeout: float | None = -1) -> int:
        """Wait until the output ends and the program exits; return ``returncode``.

        ``before`` gets all remaining output.  Raises ``ExpectTimeout`` if that takes longer
        than ``timeout``, ``SSHConnectionError`` if the connection was lost (``wait``).
        """
        limit = self.timeout if timeout == -1 else timeout
        deadline = None if limit is None else time.monotonic() + limit
        self.expect([ExpectEOF], limit)
        return self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def read_nonblocking(self) -> AnyStr:
        """Everything that has arrived and was not consumed yet (reads what is ready)."""
        while select.select([self._rfd], [], [], 0)[0] and self._read_some(0):
            pass
        out, self._buffer = self._buffer, self._empty
        return out

    # -- writing -----------------------------------------------------------------------
    def _wait_for_raw_mode(self) -> None:
        """Over a master: wait for ssh's raw mode, reading output (``timeout`` s at most)."""
        if not self._raw and self._master is not None and self._via_master():
            pump = lambda t: self._read_some(t) and self._via_master()  # noqa: E731
            wait_for_raw(self._rfd, RAW_WAIT if self.timeout is None else self.timeout, pump)
            self._raw = True

    def send(self, data: AnyStr | bytes) -> int:
        """Send ``data`` (typed into the remote pty in tty mode); return the bytes sent.

        Text mode: a str is encoded, bytes go as they are; bytes mode: bytes only."""
        if isinstance(data, str):
            if self.encoding is None:
                raise TypeError("send() takes bytes with encoding=None, not str")
            raw = data.encode(self.encoding)
        else:
            raw = bytes(data)
        self._wait_for_raw_mode()
        view = memoryview(raw)
        while view:
            try:
                n = os.write(self._wfd, view)
            except BlockingIOError:
                select.select([], [self._wfd], [])
                continue
            except BrokenPipeError:
                raise ExpectEOF(f"{self.destination}: the program has gone") from None
            view = view[n:]
        return len(raw)

    def sendline(self, line: AnyStr | bytes = b"") -> int:
        """Send ``line`` then Enter: ``\\r`` in tty mode (what a terminal sends), else ``\\n``."""
        end = "\r" if self.tty else "\n"
        if isinstance(line, str):
            return self.send(line + end)
        return self.send(bytes(line) + end.encode())

    def sendeof(self) -> None:
        """End of input: ``^D`` into the pty (at a line start), or close stdin in pipes mode."""
        if self._master is not None:
            self.send(b"\x04")
        elif self._popen.stdin is not None:
            self._popen.stdin.close()

    def sendintr(self) -> None:
        """``^C`` into the pty: the remote terminal interrupts its foreground program."""
        self.send(b"\x03")

    def resize(self, rows: int, cols: int) -> None:
        """Set the pty's size; ssh tells the remote side (window-change), it gets SIGWINCH."""
        if self._master is None:
            raise ValueError("resize() needs tty=True")
        set_size(self._rfd, rows, cols)  # the kernel sends SIGWINCH to ssh (its terminal)

    def getwinsize(self) -> tuple[int, int]:
        """The pty's ``(rows, cols)``."""
        size = None if self._master is None else get_size(self._rfd)
        if size is None:
            raise ValueError("getwinsize() needs tty=True")
        return size

    # -- the process -------------------------------------------------------------------
    def _reap(self) -> None:
        if self.returncode is not None or (rc := self._popen.poll()) is None:
            return
        log = self._log.read()
        self._log.close()
        self._raw = True  # ssh is gone: no raw mode for send() to wait for
        if rc != 255 or MUX_SESSION not in log:
            info = interpret_exit(self.destination, rc, log)
            self.returncode, self.ssh_error = info.returncode, info.error
        elif _MUX_STATUS in log or self._master_answers():
            # over a master, 255 is the program's status if the master reported one; without
            # one it was a signal death or a lost connection (a passenger is not told which:
            # the master is asked)
            self.returncode = 255 if _MUX_STATUS in log else UNKNOWN_SIGNAL
        else:
            self.returncode, self._lost = 255, True
            self.ssh_error = SSHConnectionError(
                self.destination,
                "the connection was lost (the control master is gone) before the "
                "program's exit status arrived",
            )

    def _master_answers(self) -> bool:
        if self.control_path is None:
            return True  # no master of ours to ask
        try:
            with MuxControl(self.control_path, timeout=_ALIVE_CHECK) as m:
                m.alive_check()
        except MuxError:
            return False
        return True

    def poll(self) -> int | None:
        """``returncode`` if the program has exited (and ssh with it), else None."""
        self._reap()
        return self.returncode

    def isalive(self) -> bool:
        """True while the local ssh runs."""
        return self._popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for ssh to exit and return ``returncode``; output not read is discarded.
        ``ExpectTimeout`` if it has not exited within ``timeout``, ``SSHConnectionError`` if
        the connection was lost before the program's exit status came (module docstring)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._reap()
            if self.returncode is not None:
                if self._lost and self.ssh_error is not None:
                    raise self.ssh_error
                return self.returncode
            if deadline is not None and time.monotonic() > deadline:
                raise ExpectTimeout(f"{self.destination}: ssh did not exit within {timeout} s")
            # keep the pty drained so ssh can finish writing and exit
            if not self._read_some(0.05):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._popen.wait(0.05)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the local ssh (SIGHUP/SIGTERM make it close the session)."""
        if self.isalive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def close(self, force: bool = True) -> None:
        """Stop ssh if it still runs (SIGHUP, then SIGKILL after 2 s) and release the pty."""
        if self.isalive() and force:
            self.kill(signal.SIGHUP)
            deadline = time.monotonic() + 2
            while self.isalive() and time.monotonic() < deadline:
                self._read_some(0.05)
            if self.isalive():
                self.kill(signal.SIGKILL)
        for f in (self._master, self._popen.stdin, self._popen.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()  # the master's close hangs up ssh's terminal (SIGHUP)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(5)
        self._reap()
        self._log.close()
        self._closed = True

    # -- handing over the terminal -----------------------------------------------------
    def interact(
        self, escape: bytes | None = b"\x1d", **options: Unpack[InteractOptions]
    ) -> RelayResult:
        """Give the user's terminal to the program until it exits or ``escape`` is typed.

        The terminal on ``stdin_fd`` goes to raw mode (restored on every exit path), the pty
        gets its size and follows its resizes, output not yet consumed by ``expect`` is shown
        first, and keys and signals are relayed (``sshwrap.terminal.relay.relay``).  ``escape``
        (default ``^]``; None: no escape key) returns control to Python with the program still
        running.  Returns the relay's result: ``eof`` (the program ended) with ``returncode``
        (its exit status, as ``self.returncode``), or ``escaped`` (``returncode`` None).
        ``record`` (:class:`InteractOptions`): an asciicast v2 file (docs/recording.md).
        """
        check_keywords("interact", options, InteractOptions)
        if self._master is None:
            raise ValueError("interact() needs tty=True")
        result = relay_terminal(
            self._rfd,
            self.pid,
            **options,
            is_alive=self.isalive,
            escape=escape,
            pending_output=self._pending_bytes(),
            title=f"ssh {self.destination}",
        )
        if result.eof:
            self._eof = True
            result.returncode = self.wait(10)
        return result

    def _pending_bytes(self) -> bytes:
        """Unconsumed output as bytes (including bytes the decoder still holds)."""
        out, self._buffer = self._buffer, self._empty
        if isinstance(out, bytes) or self._decoder is None or self.encoding is None:
            return bytes(out, "ascii") if isinstance(out, str) else out
        held, _flag = self._decoder.getstate()
        self._decoder.reset()
        return out.encode(self.encoding, "replace") + held
