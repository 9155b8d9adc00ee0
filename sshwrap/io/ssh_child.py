"""The local ssh process: starting it, its pipes and exit on one waitable fd, its stderr relay.

- :func:`start_with_pipes` / :func:`start_in_pty` start ssh through a ``subprocess.Popen``
  constructor (exec-only: safe in a process with threads; the sync ``sshwrap.Popen`` passes
  its own ``__init__``), with ssh's stderr through a relay pipe when the caller does not read
  it, and turn the kernel's E2BIG into :class:`~sshwrap.errors.CommandTooLongError`;
- :class:`ChildPipes` multiplexes a child's pipes and its exit (a pidfd) on one epoll fd, so a
  procedure waits on all of them with one ``WaitFd`` under either driver, and does the
  non-blocking reads and writes when they are ready (Linux: epoll and ``pidfd_open``);
- :func:`relay_stderr` copies ssh's stderr to where the caller's ``stderr`` goes (a thread's
  body, for the ``Popen`` objects whose streams the user reads), keeping a bounded copy;
- :func:`write_to` writes where a child's stream given as a subprocess argument would go.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import select
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import CommandTooLongError, SSHStderr
from . import pty
from .threads import start_daemon

__all__ = [
    "ChildPipes",
    "Spawner",
    "popen_with_pipes",
    "relay_stderr",
    "start_in_pty",
    "start_with_pipes",
    "terminal_is_raw",
    "write_to",
]

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT

Spawner = Callable[..., Any]
"""``subprocess.Popen`` or a subclass's ``__init__``: called as ``spawn(argv, **popen_kw)``."""

_CHUNK = 65536


def write_to(target: Any, data: bytes, stdout_target: Any = None, default_fd: int = 2) -> None:
    """Write ``data`` where a child's stream given as ``target`` would have gone.

    For ssh's messages (``target`` is the stderr argument; None means this process's stderr)
    and for tty output (``default_fd=1``).  PIPE is handled by the callers.
    """
    if not data or target in (PIPE, DEVNULL):
        return
    if target == STDOUT:
        write_to(stdout_target if stdout_target != STDOUT else None, data, default_fd=1)
        return
    if target is None:
        fd = default_fd
    elif isinstance(target, int):
        fd = target
    else:
        with contextlib.suppress(OSError, ValueError):
            target.flush()
        try:
            fd = target.fileno()
        except (OSError, ValueError, io.UnsupportedOperation):
            return
    with contextlib.suppress(OSError):
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]


def relay_stderr(fd: int, target: Any, seen: SSHStderr) -> None:
    """Copy ssh's stderr from the pipe ``fd`` to where the caller's ``stderr`` goes, as it
    comes, keeping a bounded copy in ``seen`` (for the error message; see
    :class:`~sshwrap.errors.SSHStderr`).  Runs until EOF, then closes ``fd``."""
    try:
        while True:
            try:
                data = os.read(fd, _CHUNK)
            except InterruptedError:
                continue
            except OSError:
                return
            if not data:
                return
            seen.feed(data)
            write_to(target, data)
    finally:
        os.close(fd)


def _too_long(e: OSError, argv: Sequence[str]) -> CommandTooLongError:
    return CommandTooLongError(
        f"the system refused ssh's command line as too long ({e.strerror})",
        limit=0,
        size=sum(len(a) + 1 for a in argv),
    )


def start_with_pipes(
    spawn: Spawner,
    argv: Sequence[str],
    *,
    stdin: Any,
    stdout: Any,
    stderr: Any,
    seen: SSHStderr,
    relay_thread: bool,
    **popen_kw: Any,
) -> tuple[int, threading.Thread | None]:
    """Start ssh (``ssh -T``) with the caller's stdin/stdout/stderr, as subprocess would.

    Unless ``stderr`` is PIPE or STDOUT, ssh's stderr goes into a relay pipe (ssh prints some
    failures there before its ``-E`` log opens): with ``relay_thread`` a thread copies it on
    (:func:`relay_stderr`) and ``(-1, thread)`` is returned, otherwise its read end ``(fd,
    None)`` is the caller's to relay.  ``(-1, None)`` without a relay.
    """
    if stderr is not None and not isinstance(stderr, int):
        stderr.fileno()  # a file object without one fails here, as in subprocess
    relay_r = relay_w = -1
    if stderr not in (PIPE, STDOUT):
        relay_r, relay_w = os.pipe()
    try:
        spawn(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr if relay_w < 0 else relay_w,
            **popen_kw,
        )
    except BaseException as e:
        if relay_r >= 0:
            os.close(relay_r)
        if isinstance(e, OSError) and e.errno == errno.E2BIG:
            raise _too_long(e, argv) from e
        raise
    finally:
        if relay_w >= 0:
            os.close(relay_w)
    if relay_r >= 0 and relay_thread:
        fd = relay_r
        return -1, start_daemon(lambda: relay_stderr(fd, stderr, seen), "sshwrap-stderr")
    return relay_r, None


def popen_with_pipes(
    argv: Sequence[str], seen: SSHStderr, streams: tuple[Any, Any, Any], relay_thread: bool
) -> tuple[subprocess.Popen[bytes], int, threading.Thread | None]:
    """:func:`start_with_pipes` with :class:`subprocess.Popen` and ``streams`` (stdin, stdout,
    stderr): ``(process, relay fd, relay thread)``."""
    started: list[subprocess.Popen[bytes]] = []
    stdin, stdout, stderr = streams
    relay, thread = start_with_pipes(
        lambda args, **kw: started.append(subprocess.Popen(args, **kw)),
        argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        seen=seen,
        relay_thread=relay_thread,
    )
    return started[0], relay, thread


def start_in_pty(spawn: Spawner, argv: Sequence[str], size: tuple[int, int] | None) -> int:
    """Start ssh (``ssh -tt``) on a new pty of ``size`` (rows, cols; default 24 x 80) that is
    its stdin, stdout, stderr and controlling terminal (:func:`sshwrap.io.pty.start_in_pty`:
    no Python in the child); returns the pty master."""
    try:
        _, master = pty.start_in_pty(spawn, argv, size=size or (24, 80))
    except OSError as e:
        if e.errno == errno.E2BIG:
            raise _too_long(e, argv) from e
        raise
    return master


def terminal_is_raw(master: int) -> bool:
    """Whether ssh has put the terminal of ``master`` in raw mode (or it is gone)."""
    import termios

    try:
        lflag = termios.tcgetattr(master)[3]
    except termios.error:
        return True
    return not lflag & termios.ICANON


class ChildPipes:
    """A child's pipes and its exit, waitable as one fd (:meth:`fileno`, an epoll fd).

    Register what to do (:meth:`read_into`, :meth:`feed`), wait until :meth:`fileno` is
    readable (``WaitFd``), then :meth:`step`: every ready pipe is read or written without
    blocking, and the child is reaped once its pidfd says it exited.  :attr:`busy` while a
    required reader is open, input is left or the child runs; :attr:`following` while an
    optional reader (ssh's stderr relay, which something ssh started may hold open) is open.
    """

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc
        self._ep = select.epoll()
        self._pidfd = -1
        self._readers: dict[int, tuple[Callable[[bytes], None], bool]] = {}
        self._reads: dict[int, Callable[[], bytes | None]] = {}
        self._writer = -1
        self._data = memoryview(b"")
        self._done: Callable[[], None] | None = None
        self._gate: Callable[[], bool] | None = None
        if proc.returncode is None:
            self._pidfd = os.pidfd_open(proc.pid)
            self._ep.register(self._pidfd, select.EPOLLIN)

    def fileno(self) -> int:
        """The epoll fd: readable when a registered pipe is ready or the child exited."""
        return self._ep.fileno()

    def read_into(
        self,
        fd: int,
        sink: Callable[[bytes], None],
        *,
        required: bool = True,
        read: Callable[[], bytes | None] | None = None,
    ) -> None:
        """Read ``fd`` to EOF into ``sink``; a read error counts as EOF (a pty's EIO).
        ``required``: :attr:`busy` until then.  ``fd`` is made non-blocking, unless ``read``
        says how to read it when it is ready (a buffered reader's ``read1``, which must not
        block then; None for "nothing now")."""
        self._readers[fd] = (sink, required)
        if read is None:
            os.set_blocking(fd, False)
        else:
            self._reads[fd] = read
        self._ep.register(fd, select.EPOLLIN)

    def feed(
        self,
        fd: int,
        data: bytes,
        done: Callable[[], None],
        gate: Callable[[], bool] | None = None,
    ) -> None:
        """Write ``data`` to ``fd`` (made non-blocking), then call ``done`` (close it); a
        broken pipe ends it early.  With ``gate``, writing starts once ``gate()`` is true or
        the child exited (see :attr:`gated`)."""
        self._writer, self._data, self._done, self._gate = fd, memoryview(data), done, gate
        if not data:
            self._finish_writing()
            return
        os.set_blocking(fd, False)
        if gate is None:
            self._ep.register(fd, select.EPOLLOUT)

    @property
    def exited(self) -> bool:
        """Whether the child has exited and is reaped."""
        return self.proc.returncode is not None

    @property
    def gated(self) -> bool:
        """Input waits for its gate (a state with no event: re-check it every few ms)."""
        return self._gate is not None

    @property
    def busy(self) -> bool:
        """A required reader is open, input is left, or the child runs."""
        return (
            not self.exited
            or self._writer >= 0
            or any(required for _, required in self._readers.values())
        )

    @property
    def following(self) -> bool:
        """An optional reader is still open."""
        return any(not required for _, required in self._readers.values())

    def step(self) -> None:
        """Serve what is ready now (never blocks)."""
        if self._gate is not None and (self._gate() or self._reap()):
            self._gate = None
            self._ep.register(self._writer, select.EPOLLOUT)
        for fd, _events in self._ep.poll(0):
            if fd == self._pidfd:
                self._reap()
            elif fd == self._writer:
                self._write()
            elif fd in self._readers:
                self._read(fd)

    def _reap(self) -> bool:
        if self._pidfd >= 0 and self.proc.poll() is not None:
            self._ep.unregister(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        return self.exited

    def _read(self, fd: int) -> None:
        read = self._reads.get(fd)
        try:
            data = os.read(fd, _CHUNK) if read is None else read()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data is None:
            return
        if data:
            self._readers[fd][0](data)
            return
        self._ep.unregister(fd)
        del self._readers[fd]
        self._reads.pop(fd, None)

    def _write(self) -> None:
        try:
            n = os.write(self._writer, self._data[:_CHUNK])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = len(self._data)  # the reader is gone: the rest cannot arrive
        self._data = self._data[n:]
        if not self._data:
            self._ep.unregister(self._writer)
            self._finish_writing()

    def _finish_writing(self) -> None:
        self._writer = -1
        self._gate = None
        if self._done is not None:
            with contextlib.suppress(OSError):
                self._done()
            self._done = None

    def close(self) -> None:
        """Release the epoll and pidfd, and end the input (the read pipes are their owners' to
        close)."""
        if self._writer >= 0:
            self._finish_writing()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self._ep.close()
