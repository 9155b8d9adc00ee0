"""Ptys that ssh runs in: the one way sshwrap starts a program on a new local terminal.

``Spawned`` (and ``Connection.spawn``/``interact``) and ``Popen(tty=True)`` start ssh here.
The program gets a new pty as stdin, stdout and stderr **and as its controlling terminal**,
as it would in a real terminal window:

- the size is set on the pty before the program starts, and a later resize of the master
  (:func:`~sshwrap.terminal.modes.set_size`) makes the kernel send SIGWINCH to the pty's
  foreground process group, so ssh forwards the new size (a window-change request);
- ``/dev/tty`` is the pty, so ssh's own prompts (a passphrase, a host key question) are
  read from and written to it, like the program's output;
- closing the master hangs the terminal up: the kernel sends SIGHUP to the program (the
  session leader), so nothing keeps running on a terminal nobody holds.

Safe in a process with threads (the mux pump thread runs while ``Connection.spawn`` starts a
program): no Python code runs in the child.  A forked copy of a threaded Python process
holds every lock as it was at the fork, including locks that other threads held (the
import lock, a logging handler's lock, malloc's): Python code there can deadlock, and
CPython 3.12+ warns about ``os.fork``/``os.forkpty`` with threads running.  The child is
started with :class:`subprocess.Popen`, whose child side is C code up to the ``exec`` (no
at-fork handlers run, no bytecode), and it execs ``setsid -c`` (util-linux or busybox), which
calls ``setsid()`` and makes its stdin, the pty, the controlling terminal (``TIOCSCTTY``)
before it execs the program in the same process: the pid is the program's.  The child must
therefore not be a process-group leader (no ``start_new_session``/``process_group``: then
``setsid`` would fork and its parent exit at once); until its ``setsid()``, about a
millisecond, it is in the caller's process group, so a ^C typed just then stops the start
along with the caller.  Without a ``setsid`` on the system, a fresh interpreter (exec'd, not
forked: ``python -I -S -c``, some 10 ms) does the same two calls.

Reading and writing the master: :class:`PtyReader` (EIO reads as end of file; drops ssh's
closing line; :meth:`~PtyReader.read_ready` is its one read that never waits, for a loop)
and :class:`PtyWriter` (waits for ssh's raw mode before the first write).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..terminal.modes import set_size

__all__ = [
    "RAW_WAIT",
    "SETSID",
    "PtyReader",
    "PtyWriter",
    "TtyOutput",
    "controlling_tty_argv",
    "open_pty",
    "spawn_in_pty",
    "start_in_pty",
]

_T = TypeVar("_T")

SETSID: str | None = shutil.which("setsid", path=os.pathsep.join((os.defpath, "/usr/bin")))
"""The ``setsid`` program that gives the child its controlling terminal (None: none found;
a fresh interpreter does it then)."""

# What ``setsid -c PROGRAM ARGS...`` does, for a system without setsid(1).
_SETSID_PY = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def controlling_tty_argv(argv: Sequence[str], setsid: str | None = SETSID) -> list[str]:
    """``argv`` behind a program that makes the child's stdin its controlling terminal.

    ``argv[0]`` must be a path (:func:`start_in_pty` resolves it).  ``setsid`` is the
    ``setsid`` program to use; None uses a fresh interpreter instead.
    """
    if setsid is not None:
        return [setsid, "-c", "--", *argv]
    return [sys.executable, "-I", "-S", "-c", _SETSID_PY, *argv]


def open_pty(size: tuple[int, int]) -> tuple[int, int]:
    """A new pty ``(master, slave)`` whose window is ``size`` (rows, cols); both fds are
    non-inheritable and the caller closes them."""
    master, slave = os.openpty()
    try:
        set_size(slave, *size)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


def _resolve(program: str, env: Mapping[str, str] | None) -> str:
    """``program``'s path as the child's ``PATH`` finds it; FileNotFoundError as subprocess
    raises it (the program behind ``setsid`` could only report it on the pty)."""
    path = shutil.which(program, path=os.pathsep.join(os.get_exec_path(env)))
    if path is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    return path


def start_in_pty(
    start: Callable[..., _T],
    argv: Sequence[str],
    size: tuple[int, int] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    setsid: str | None = SETSID,
) -> tuple[_T, int]:
    """Start ``argv`` on a new pty that is its controlling terminal; return ``(started,
    master)``.

    ``start`` is :class:`subprocess.Popen` or a callable that takes its arguments (a
    subclass's ``__init__`` bound to the instance): it is called as ``start(args,
    stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd)`` and must not add
    ``start_new_session``, ``process_group`` or ``preexec_fn`` (see the module docstring).
    The pty is ``size`` (rows, cols; None: 24 x 80) from the start; the caller owns
    ``master`` (close it to hang the program up).  ``FileNotFoundError`` if ``argv[0]`` is
    not found.
    """
    args = controlling_tty_argv([_resolve(argv[0], env), *argv[1:]], setsid)
    master, slave = open_pty(size or (24, 80))
    try:
        started = start(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return started, master


def spawn_in_pty(
    argv: Sequence[str],
    size: tuple[int, int] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    setsid: str | None = SETSID,
) -> tuple[subprocess.Popen[bytes], int]:
    """:func:`start_in_pty` with :class:`subprocess.Popen`: ``(process, master)``; the
    process's ``pid`` is the program's, ``wait()``/``poll()`` reap it."""
    started: tuple[subprocess.Popen[bytes], int] = start_in_pty(
        subprocess.Popen, argv, size=size, env=env, cwd=cwd, setsid=setsid
    )
    return started


# "Shared connection to HOST closed." when the session went over a master (ssh -S)
_QUIT_MESSAGE = re.compile(rb"((?:Shared c|C)onnection to [^\r\n]{1,300} closed\.\r*\n)\Z")


class TtyOutput:
    """Drops ssh's own ``Connection to HOST closed.`` line (``Shared connection ...`` over a
    master) from a terminal's output.

    ssh -tt writes it into the terminal after the remote output when its log level is INFO or
    more (sshwrap needs DEBUG2); it comes last, so a chunk ending with it is held back until
    more output (then passed on) or the end (then dropped).
    """

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        """The output to pass on for ``data``."""
        data = self._pending + data
        self._pending = b""
        m = _QUIT_MESSAGE.search(data)
        if m is not None:
            self._pending = data[m.start(1) :]
            data = data[: m.start(1)]
        return data


class _MasterStream(io.RawIOBase):
    """A raw stream over a pty master fd; closing it closes the fd."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed and self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        super().close()


class PtyReader(_MasterStream):
    """The pty master as a raw stream: EIO (Linux's end of a pty) reads as EOF; ssh's own
    ``Connection to HOST closed.`` line is dropped (:class:`TtyOutput`).  Closing it closes
    ``fd``."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._eof = False
        self._shown = TtyOutput()
        self._extra = b""

    def readable(self) -> bool:
        return True

    def read_ready(self, size: int = 65536) -> bytes | None:
        """What the terminal has to pass on now, in one read that does not wait when the fd
        is non-blocking or readable: ``b""`` at its end (EIO), None for nothing yet (no data,
        or all of it held back as the start of ssh's closing line)."""
        if not self._extra and not self._eof:
            try:
                data = os.read(self._fd, max(size, 65536))
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno != errno.EIO:  # EIO: the end of a pty on Linux
                    raise
                data = b""
            if not data:
                self._eof = True
            else:
                self._extra = self._shown.feed(data)
                if not self._extra:
                    return None
        data, self._extra = self._extra[:size], self._extra[size:]
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while (data := self.read_ready(len(view))) is None:
            select.select([self._fd], [], [])  # nothing to pass on yet: wait for more
        view[: len(data)] = data
        return len(data)


RAW_WAIT = 60.0
"""Seconds a :class:`PtyWriter`'s first write waits for ssh to reach its session (raw mode)."""


class PtyWriter(_MasterStream):
    """Writes to the pty master, but only once ssh has put the terminal in raw mode.

    Before that, the local terminal is still cooked: it would echo the bytes back and eat
    ``^D``/``^C``/``^U``, so what the remote side received would depend on timing.  (ssh takes
    the remote terminal's modes from this cooked state, so sshwrap cannot simply start raw.)
    ``ready(timeout)`` waits up to ``timeout`` seconds for raw mode (True: raw); the first
    write calls it with ``wait``.  Closing it closes ``fd``.
    """

    def __init__(self, fd: int, ready: Callable[[float], bool], wait: float = RAW_WAIT) -> None:
        super().__init__(fd)
        self._ready = ready
        self._wait = wait
        self._raw = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if not self._raw:
            self._raw = self._ready(self._wait)
        while True:
            try:
                return os.write(self._fd, data)
            except BlockingIOError:  # made non-blocking by communicate(): wait for room
                select.select([], [self._fd], [])
