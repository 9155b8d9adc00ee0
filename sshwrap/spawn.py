"""Expect-style control of a remote program: ``Spawned``.

``Spawned`` runs ``ssh -tt -e none`` in a local pty, so the remote program sees a terminal
(sudo, passwd, REPLs, curses programs), and lets Python wait for text with ``expect()``, type
with ``send()``/``sendline()``, and finally hand the user's own terminal to it with
``interact()`` (the same relay and raw-mode code as the ``sshwrap`` command).  The pty is
ssh's controlling terminal (resizes, ssh's own prompts and the hang-up on ``close()`` work as
in a terminal window) and no Python runs in the child, so spawning is safe while a
Connection's pump thread runs (:func:`sshwrap.io.pty.spawn_in_pty`).

What the remote pty does to the data (a pty is not a byte-exact channel): output arrives
with ``\\r\\n`` line ends and stderr merged into stdout; what you send is "typed": echoed
back unless the program turns echo off, line-edited in canonical mode, and control
characters act (``\\x03`` interrupts, ``\\x04`` at the start of a line is end-of-file).
``-e none`` turns off ssh's escape character, so a ``~.`` in your data does not disconnect.
With ``tty=False`` the program runs under ``ssh -T`` with pipes instead: byte exact, stderr
still merged into the stream ``expect`` reads.

ssh's log goes to a private file (``-E``, LogLevel DEBUG2) so that ``returncode`` is the remote
program's exit status (or ``-128``, :data:`sshwrap.errors.UNKNOWN_SIGNAL`, for a signal death:
neither ssh nor an OpenSSH mux passenger is told which signal), ssh's own failure becomes
``ssh_error`` (an ``SSHError``; ``returncode`` is then 255), and ssh's closing
``Connection to HOST closed.`` line is dropped from the end of the output.

Over a master, a session that ends without an exit status is either a signal death or a lost
connection (the master killed, or the server's end of its connection gone): a passenger is told
neither.  Given the master's ``control_path`` (``Connection.spawn`` passes it), ``Spawned``
asks the master whether it still answers (an alive check, 1 s at most): if it does, the program
was killed by a signal (``-128``); if not, the connection was lost and ``wait()`` /
``expect_eof()`` raise ``SSHConnectionError`` (also kept in ``ssh_error``; ``returncode`` 255),
so a dropped connection never looks like a killed program.

Timeouts and end of file raise :class:`ExpectTimeout` / :class:`ExpectEOF` (sshwrap errors, and
also ``TimeoutError`` / ``EOFError``); ``before`` then holds what arrived.
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
from collections.abc import Mapping, Sequence

from .core.argv import SSHLog, check_destination, find_ssh, remote_command
from .errors import (
    UNKNOWN_SIGNAL,
    SSHConnectionError,
    SSHError,
    SSHWrapError,
    interpret_exit,
)
from .io.mux_control import MuxControl, MuxError
from .io.pty import spawn_in_pty
from .terminal.modes import get_size, raw_mode, set_size
from .terminal.relay import RelayResult, relay

__all__ = ["ExpectEOF", "ExpectError", "ExpectTimeout", "Spawned"]

_READ = 65536
# ssh -tt's closing line; it follows the program's last output directly (no newline before
# it when the output did not end with one, e.g. after a shell prompt)
_QUIT = re.compile(r"(?:Shared c|C)onnection to [^\r\n]{1,300} closed\.\r*\n\Z")
_MUX_SESSION = "mux_client_request_session: master session id"
_MUX_STATUS = "Received exit status from master"
_ALIVE_CHECK = 1.0  # seconds the master gets to answer after a session without exit status


class ExpectError(SSHWrapError):
    """Base of the errors ``expect()`` raises; ``before`` holds the output that arrived."""

    def __init__(self, message: str, before: str | bytes = "") -> None:
        super().__init__(message)
        self.before = before


class ExpectTimeout(ExpectError, TimeoutError):
    """No pattern matched within the timeout."""


class ExpectEOF(ExpectError, EOFError):
    """The program's output ended before a pattern matched."""


class Spawned:
    """A remote program in a local pty (``ssh -tt -e none``), driven expect-style.

    ``Spawned(command, destination=host, ssh_args=[...])``: ``command`` is a str for the remote
    shell, a list (each item quoted), or None for a login shell.  ``ssh_args`` are ssh options
    before the destination (``-F``, ``-S``/``-o ControlPath=...`` to use a master).

    - ``encoding`` (default utf-8, undecodable bytes replaced): output is decoded to str;
      ``before``/``after`` are str and patterns are str regular expressions (or compiled
      ones).  ``encoding="latin-1"`` maps every byte to one character, for binary-safe
      matching.
    - ``timeout``: default for ``expect`` (seconds, None waits forever).
    - ``dimensions``: the pty's ``(rows, cols)`` from the start.
    - ``control_path``: the master's socket when ``ssh_args`` use one, so that a lost
      connection is told from a signal death (see the module docstring).

    A context manager: leaving it closes the program (SIGHUP, then SIGKILL) if still running.
    """

    def __init__(
        self,
        command: str | Sequence[str] | None,
        *,
        destination: str,
        ssh_args: Sequence[str] = (),
        ssh: str | None = None,
        tty: bool = True,
        dimensions: tuple[int, int] = (24, 80),
        timeout: float | None = 30.0,
        encoding: str = "utf-8",
        errors: str = "replace",
        env: Mapping[str, str] | None = None,
        control_path: str | None = None,
    ) -> None:
        check_destination(destination)  # ValueError before any ssh: ssh would read an option
        self.destination = destination
        self.control_path = control_path
        self._lost = False
        self.timeout = timeout
        self.tty = tty
        self.encoding = encoding
        self._decoder = codecs.getincrementaldecoder(encoding)(errors)
        self._buffer = ""
        self.before = ""
        self.after = ""
        self.match: re.Match[str] | None = None
        self.returncode: int | None = None
        self.ssh_error: SSHError | None = None
        self._eof = False
        self._log = SSHLog()
        remote = remote_command(command) if command is not None else None
        # DEBUG2 (not DEBUG1): over a master, only DEBUG2 logs whether the master sent an
        # exit status; a session that ended without one was killed by a signal.
        self.argv = [
            ssh or find_ssh(),
            *(["-tt", "-e", "none"] if tty else ["-T"]),
            *("-E", self._log.path, "-o", "LogLevel=DEBUG2"),
            *ssh_args,
            "--",
            destination,
            *([remote] if remote is not None else []),
        ]
        # tty mode: the pty master (a FileIO, so closing twice is safe and GC closes it)
        self._master: io.FileIO | None = None
        self._popen: subprocess.Popen[bytes]
        spawn_env = dict(os.environ if env is None else env)
        try:
            if tty:
                self._popen, master = spawn_in_pty(self.argv, env=spawn_env, size=dimensions)
                self._master = io.FileIO(master, "rb+")
                self._rfd = self._wfd = master
            else:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=spawn_env,
                    bufsize=0,
                    start_new_session=True,
                )
                assert self._popen.stdin is not None and self._popen.stdout is not None
                self._wfd = self._popen.stdin.fileno()
                self._rfd = self._popen.stdout.fileno()
        except BaseException:
            self._log.close()
            raise

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> Spawned:
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
    def _decode(self, data: bytes, final: bool = False) -> str:
        return self._decoder.decode(data, final)

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
            self._buffer = _QUIT.sub("", self._buffer + self._decode(b"", final=True))
            return False
        self._buffer += self._decode(data)
        return True

    @staticmethod
    def _compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
        return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)

    def expect(
        self,
        pattern: str
        | re.Pattern[str]
        | type[ExpectError]
        | Sequence[str | re.Pattern[str] | type[ExpectError]],
        timeout: float | None = -1,
    ) -> int:
        """Wait until one of the regular expressions matches the output; return its index.

        The earliest match in the output wins (ties: the first pattern).  ``before`` is the
        output before the match, ``after`` the matched text, ``match`` the ``re.Match``; the
        output up to the end of the match is consumed.  Raises ``ExpectTimeout`` after
        ``timeout`` seconds (-1, the default: the instance's ``timeout``; None: no limit)
        and ``ExpectEOF`` when the output ends first (``before`` then holds the rest) -
        unless the class ``ExpectEOF`` / ``ExpectTimeout`` is itself one of the patterns:
        then its index is returned instead (``s.expect(["[$#] ", ExpectEOF])``).
        """
        items = [pattern] if isinstance(pattern, (str, re.Pattern, type)) else list(pattern)
        patterns: list[tuple[int, re.Pattern[str]]] = []
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
                patterns.append((i, self._compile(p)))
        wanted = " | ".join(repr(rx.pattern) for _, rx in patterns) or "nothing"
        limit = self.timeout if timeout == -1 else timeout
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            best: tuple[int, int, re.Match[str]] | None = None
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
                self.before, self._buffer = self._buffer, ""
                self.after = ""
                self.match = None
                self._reap()
                if on_eof >= 0:
                    return on_eof
                raise ExpectEOF(
                    f"{self.destination}: output ended before {wanted} matched", self.before
                )
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.before = self._buffer
                self.after = ""
                self.match = None
                if on_timeout >= 0:
                    return on_timeout
                raise ExpectTimeout(
                    f"{self.destination}: none of {wanted} seen within {limit} s", self._buffer
                )
            self._read_some(left)

    def expect_eof(self, timeout: float | None = -1) -> int:
        """Wait until the output ends and the program exits; return ``returncode``.

        ``before`` gets all remaining output.  Raises ``ExpectTimeout`` if that takes longer
        than ``timeout``, ``SSHConnectionError`` if the connection was lost (``wait``).
        """
        limit = self.timeout if timeout == -1 else timeout
        deadline = None if limit is None else time.monotonic() + limit
        while not self._eof:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.before = self._buffer
                raise ExpectTimeout(
                    f"{self.destination}: output did not end within {limit} s", self._buffer
                )
            self._read_some(left)
        self.before, self._buffer = self._buffer, ""
        self.after = ""
        self.match = None
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        rc = self.wait(left)
        return rc

    def read_nonblocking(self) -> str:
        """Everything that has arrived and was not consumed yet (reads what is ready)."""
        while self._read_some(0):
            r, _, _ = select.select([self._rfd], [], [], 0)
            if not r:
                break
        out, self._buffer = self._buffer, ""
        return out

    # -- writing -----------------------------------------------------------------------
    def send(self, data: str | bytes) -> int:
        """Send ``data`` (typed into the remote pty in tty mode); return the bytes sent."""
        raw = data.encode(self.encoding) if isinstance(data, str) else data
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

    def sendline(self, line: str | bytes = "") -> int:
        """Send ``line`` then Enter: ``\\r`` in tty mode (what a terminal sends), else ``\\n``."""
        end = "\r" if self.tty else "\n"
        if isinstance(line, bytes):
            return self.send(line + end.encode())
        return self.send(line + end)

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
    def _ssh_returncode(self) -> int | None:
        return self._popen.poll()

    def _reap(self) -> None:
        if self.returncode is not None:
            return
        rc = self._ssh_returncode()
        if rc is None:
            return
        log = self._log.read()
        self._log.close()
        if rc == 255 and _MUX_SESSION in log:
            # a session over a master ran: 255 is the program's own status if the master
            # reported one; without one the program was killed by a signal or the master's
            # connection was lost, and a passenger is not told which: ask the master
            if _MUX_STATUS in log:
                self.returncode = 255
            elif self.control_path is not None and not self._master_answers():
                self.returncode = 255
                self._lost = True
                self.ssh_error = SSHConnectionError(
                    self.destination,
                    "the connection was lost (the control master is gone) before the "
                    "program's exit status arrived",
                )
            else:
                self.returncode = UNKNOWN_SIGNAL
            return
        info = interpret_exit(self.destination, rc, log)
        self.returncode = info.returncode
        self.ssh_error = info.error

    def _master_answers(self) -> bool:
        assert self.control_path is not None
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
        return self._ssh_returncode() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for ssh to exit and return ``returncode``; output not read is discarded.

        Raises ``ExpectTimeout`` if it has not exited within ``timeout``, and
        ``SSHConnectionError`` if the connection was lost before the program's exit status
        came (see the module docstring).
        """
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

    # -- handing over the terminal -----------------------------------------------------
    def interact(
        self, escape: bytes | None = b"\x1d", *, stdin_fd: int = 0, stdout_fd: int = 1
    ) -> RelayResult:
        """Give the user's terminal to the program until it exits or ``escape`` is typed.

        The terminal on ``stdin_fd`` goes to raw mode (restored on every exit path), the pty
        gets its size and follows its resizes, output not yet consumed by ``expect`` is shown
        first, and keys and signals are relayed (``sshwrap.terminal.relay.relay``).  ``escape``
        (default ``^]``; None: no escape key) returns control to Python with the program still
        running.  Returns the relay's result: ``eof`` (the program ended: ``returncode`` is
        set) or ``escaped``.
        """
        if self._master is None:
            raise ValueError("interact() needs tty=True")
        size = get_size(stdin_fd)
        if size is None:
            size = get_size(stdout_fd)
        if size is not None and size[0] > 0 and size[1] > 0:
            with contextlib.suppress(OSError):
                set_size(self._rfd, *size)
        pending = self._pending_bytes()

        def forward(signum: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

        with raw_mode(stdin_fd):
            result = relay(
                self._rfd,
                stdin_fd=stdin_fd,
                stdout_fd=stdout_fd,
                is_alive=self.isalive,
                on_signal=forward,
                escape=escape,
                pending_output=pending,
            )
        if result.eof:
            self._eof = True
            self.wait(10)
        return result

    def _pending_bytes(self) -> bytes:
        """Unconsumed output as bytes (including bytes the decoder still holds)."""
        out = self._buffer.encode(self.encoding, "replace")
        self._buffer = ""
        held, _flag = self._decoder.getstate()
        self._decoder.reset()
        return out + held
