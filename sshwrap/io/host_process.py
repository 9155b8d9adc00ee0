"""One ssh child per host, in pipes mode, watched by the event loop (no thread per host).

Every host of a fan-out is one plain ``ssh -T`` child: its stdout and stderr are pipes, its
stdin is ``/dev/null`` (or a pipe when there is input to send), and it runs in a session of
its own (``start_new_session``), so a Ctrl-C typed at the terminal reaches sshwrap only and
sshwrap decides how every child ends.  ssh's own log goes into a pipe (``ssh -E
/proc/PID/fd/N``; elsewhere than Linux a FIFO the caller names, in a private directory): it
never reaches the caller's stderr, and its lines tell when the session is up.

The loop watches the pipes and the child's exit (a pidfd; elsewhere than Linux a short poll
once the pipes are closed) through an :class:`~sshwrap.io.fd_watcher.FdWatcher`, so a host
costs a handful of file descriptors and no thread.  Children are started from the loop's
thread by vfork + exec (no Python in the child: :class:`~sshwrap.io.child_start.ChildStarter`):
the fan-out never forks from a thread pool.

Stopping signals the child's whole process group (ssh and any ProxyCommand it runs), and
every path ends with the child reaped and every fd closed.  What the bounds are, and what an
exit means, is the core's business (:mod:`sshwrap.core.fanout_host`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import ClassVar, Protocol

from .child_start import Child, ChildStarter, SpawnedChild
from .fd_watcher import FdWatcher

__all__ = [
    "SESSION_UP",
    "Child",
    "ChildStarter",
    "HostProcess",
    "SpawnedChild",
    "StderrFilter",
    "run_bounded",
    "ssh_version",
]

_READ = 65536


def _output_pipe() -> tuple[int, int]:
    """A pipe for ssh's stdout or stderr, its read end non-blocking.  With pipe2, both ends
    (one system call): ssh makes them non-blocking itself when they are not terminals."""
    if _PIPE2:
        return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


_PIPE2 = hasattr(os, "pipe2")
SESSION_UP = (b"Sending command", b"Entering interactive session", b"master session id")
"""Words of ssh's log that mean the remote session is up (DEBUG1, or the short log of
:data:`sshwrap.protocol.sshlog.SHORT_LOG_SETTINGS`, there after a ``LogVerbose`` tag)."""


@functools.cache
def ssh_version(ssh: str) -> str:
    """What ``ssh -V`` says (asked once per process and ssh); "" if it cannot tell in 5 s."""
    try:
        argv, null = [ssh, "-V"], subprocess.DEVNULL
        done = subprocess.run(argv, stdin=null, capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (done.stderr + done.stdout).decode(errors="replace").strip()


def _proc_fd_reopenable() -> bool:
    """Whether a pipe can be reopened by its ``/proc/PID/fd/N`` path (Linux)."""
    r, w = os.pipe()
    try:
        fd = os.open(f"/proc/{os.getpid()}/fd/{w}", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    else:
        os.close(fd)
        return True
    finally:
        os.close(r)
        os.close(w)


class StderrFilter(Protocol):
    """What sees a host's stderr first (``sudo=True``: :class:`sshwrap.core.sudo.SudoRun`)."""

    @property
    def failed(self) -> BaseException | None:
        """Set once the host must stop at once (the filter's error)."""
        ...  # pragma: no cover - protocol

    def feed(self, data: bytes) -> tuple[bytes, int, bytes, bool]:
        """``(to pass on, cut out, to write to stdin now, stdin ends after it)``."""
        ...  # pragma: no cover - protocol

    def end(self) -> bytes:
        """The stream ended: what was held back."""
        ...  # pragma: no cover - protocol


class HostProcess:
    """One ssh child and its pipes, driven by the event loop (through ``watcher``).

    ``argv`` is the ssh command line without ``-E`` (added by :meth:`start`); ``input`` goes
    to its stdin (None: ``/dev/null``); ``on_output(stream, data)`` (1 stdout, 2 stderr) sees
    the bytes as they arrive.  After :meth:`start`: ``out``/``err`` collect the output,
    ``log`` ssh's log; the flags ``up`` (the session is up), ``exit_seen`` and
    ``pipes_closed`` (stdout and stderr at EOF) tell the progress, :meth:`wait_for` waits on
    them, ``t0``/``t_up``/``t_end`` (``time.monotonic()``, the loop's clock) and
    ``started_wall`` (``time.time()``) tell when.

    ``stderr_filter`` (``sudo=True``): the stderr goes through it first; stdin is then a pipe
    that stays open, written only what the filter asks (:meth:`send_input`), ``input`` is the
    filter's business (it must be None here); once ``stderr_filter.failed`` is set it is
    :attr:`refused`, and the listener is told.
    """

    log_through_proc_fd: ClassVar[bool | None] = None
    """Whether ssh's log goes by a ``/proc/PID/fd/N`` path (None: not checked yet; checked
    once).  False forces the FIFO path used where ``/proc`` cannot reopen a pipe."""

    # The state every host starts in, as class attributes: an instance stores only what
    # changes (a fan-out makes one of these per host).
    proc: Child | None = None
    refused: BaseException | None = None
    """The ``stderr_filter``'s failure, once it failed."""
    log_writer: int | None = None
    pidfd: int | None = None
    stdin_fd: int | None = None
    stdin_pos = 0
    up = False
    exit_seen = False
    pipes_closed = False
    listener: Callable[[], None] | None = None
    """Called (soon, from the loop) after the flags changed: one call for a batch."""
    started_wall: float | None = None
    t0 = 0.0
    t_up: float | None = None
    t_end: float | None = None
    _stdin_end = True  # (stdin ends once ``input`` is written)
    _writer_on = False
    _pipes_open = 2  # stdout and stderr
    _notify_pending = False
    _waiters: list[asyncio.Future[None]] | None = None

    def __init__(
        self,
        argv: list[str],
        *,
        watcher: FdWatcher,
        fifo_path: str,
        input: bytes | None = None,
        on_output: Callable[[int, bytes], None] | None = None,
        starter: ChildStarter | None = None,
        stderr_filter: StderrFilter | None = None,
    ) -> None:
        self.argv = argv
        self.starter = starter
        self.watcher = watcher
        self.loop = watcher.loop
        self.on_output = on_output
        self.input = input
        self.stderr_filter = stderr_filter
        if stderr_filter is not None:
            assert input is None, "with a stderr filter, the filter writes stdin"
            self.input = b""
            self._stdin_end = False
        self.fifo: str | None = fifo_path
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.log = bytearray()
        self.fds: dict[int, int] = {}  # fd -> stream (1 stdout, 2 stderr, 3 ssh's log)

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        """Create ssh's log pipe (or FIFO) and start ssh; watch its fds."""
        starter = self.starter
        if starter is None:
            starter = self.starter = ChildStarter()
        fds = self.fds
        out_r = out_w = err_r = err_w = in_r = in_w = -1
        try:
            # Our own write end keeps the log from reading as EOF before ssh opens it; it is
            # closed at ssh's first log line (or when ssh exits).
            by_proc = HostProcess.log_through_proc_fd
            if by_proc is None:
                by_proc = HostProcess.log_through_proc_fd = _proc_fd_reopenable()
            if by_proc:
                # A pipe that ssh opens by its /proc path: no FIFO to create and remove (a
                # directory operation on the temp file system: ~0.2 ms of CPU per host on
                # ext4, a tenth of that through the pipe).
                self.fifo = None
                # (Both ends non-blocking: ssh opens the pipe anew, with its own flags.)
                log_r, self.log_writer = _output_pipe()
                fds[log_r] = 3
                log_path = f"{starter.proc_fds}{self.log_writer}"
            else:
                assert self.fifo is not None
                log_path = self.fifo
                os.mkfifo(log_path, 0o600)
                log_r = os.open(log_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                fds[log_r] = 3
                self.log_writer = os.open(log_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            out_r, out_w = _output_pipe()
            err_r, err_w = _output_pipe()
            if self.input is not None:
                in_r, in_w = os.pipe()
            self.started_wall = time.time()
            self.t0 = time.monotonic()
            argv = self.argv
            self.proc = starter.start([argv[0], "-E", log_path, *argv[1:]], in_r, out_w, err_w)
        except BaseException:
            for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
                if fd >= 0:
                    os.close(fd)
            self.close_fds()
            raise
        os.close(out_w)
        os.close(err_w)
        fds[out_r] = 1
        fds[err_r] = 2
        if in_w >= 0:
            os.close(in_r)
            self.stdin_fd = in_w
            os.set_blocking(in_w, False)
            if self._stdin_end:
                self._writer_on = True
                self.loop.add_writer(in_w, self._writable)
        watcher = self.watcher
        watcher.add_each(fds, self._on_ready)
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            pass  # not Linux: exit is polled once the pipes close
        else:
            watcher.add(self.pidfd, self._reap)

    @property
    def returncode(self) -> int | None:
        """ssh's exit status once reaped (``-signum`` for a signal), else None."""
        return None if self.proc is None else self.proc.returncode

    # -- I/O callbacks --------------------------------------------------------------------
    def _writable(self) -> None:
        assert self.stdin_fd is not None and self.input is not None
        chunk = memoryview(self.input)[self.stdin_pos : self.stdin_pos + _READ]
        try:
            n = os.write(self.stdin_fd, chunk)
        except BlockingIOError:
            return
        except OSError:
            n = len(self.input)  # the remote side stopped reading: give up on input
            self._stdin_end = True
        self.stdin_pos += n
        if self.stdin_pos >= len(self.input):
            if self._stdin_end:
                self._close_stdin()
            else:  # (a filter's stdin: idle until it sends more)
                self._writer_on = False
                self.loop.remove_writer(self.stdin_fd)

    def send_input(self, data: bytes, end: bool) -> None:
        """Write ``data`` to ssh's stdin after what is still unwritten, then close it if
        ``end`` (the ``stderr_filter``'s stdin; nothing once stdin is closed)."""
        if self.stdin_fd is None or self.input is None:
            return
        if data:
            self.input = bytes(memoryview(self.input)[self.stdin_pos :]) + data
            self.stdin_pos = 0
        self._stdin_end = self._stdin_end or end
        if not self._writer_on:
            self._writer_on = True
            self.loop.add_writer(self.stdin_fd, self._writable)

    def _close_stdin(self) -> None:
        if self.stdin_fd is not None:
            self._writer_on = False
            self.loop.remove_writer(self.stdin_fd)
            os.close(self.stdin_fd)
            self.stdin_fd = None

    def _on_ready(self, fd: int) -> bool:
        """Read ``fd`` once and take the bytes; False if there was nothing to read yet (or
        it reached EOF: then it is closed).  (One call per chunk of every host: a call less
        here is a few percent of a fan-out's own CPU.)"""
        try:
            data = os.read(fd, _READ)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._close_fd(fd)
            return False
        if self.fds[fd] == 3:
            self._got_log(data)
        else:
            self._got_output(fd, data)
        return True

    def _got_log(self, data: bytes) -> None:
        if self.log_writer is not None:
            os.close(self.log_writer)  # (ssh has the log open: see log_writer_close)
            self.log_writer = None
        log = self.log
        start = len(log) - 64
        log += data
        if not self.up:
            if start < 0:
                start = 0
            for marker in SESSION_UP:  # (a regex costs ~40x more CPU on a 4 KB log)
                if log.find(marker, start) >= 0:
                    self._up()
                    break

    def _got_output(self, fd: int, data: bytes) -> None:
        if not self.up:
            self._up()
        stream = self.fds[fd]
        if stream == 2 and self.stderr_filter is not None:
            data = self._filtered(data)
            if not data:
                return
        (self.out if stream == 1 else self.err).append(data)
        if self.on_output is not None:
            self.on_output(stream, data)

    def _filtered(self, data: bytes) -> bytes:
        """``data`` through the stderr filter: what it passes on (it may write stdin, or
        fail: then the host is :attr:`refused` and nothing more goes to stdin)."""
        f = self.stderr_filter
        assert f is not None
        out, _, send, end = f.feed(data)
        if f.failed is not None:
            if self.refused is None:
                self.refused = f.failed
                self._close_stdin()
                self._wake()
        elif send or end:
            self.send_input(send, end)
        return out

    def _filter_end(self) -> None:
        """stderr ended: what the filter held back is stderr after all."""
        assert self.stderr_filter is not None
        tail = self.stderr_filter.end()
        if tail:
            self.err.append(tail)
            if self.on_output is not None:
                self.on_output(2, tail)

    def log_writer_close(self) -> None:
        """Close sshwrap's own write end of the log FIFO (once ssh has it, or has exited)."""
        if self.log_writer is not None:
            os.close(self.log_writer)
            self.log_writer = None

    def _up(self) -> None:
        self.t_up = time.monotonic()
        self.up = True
        self._wake()

    def _wake(self) -> None:
        if self.listener is not None and not self._notify_pending:
            # After, not now: the listener may end the process, which must not happen in the
            # middle of one of its fd callbacks.
            self._notify_pending = True
            self.watcher.call_after(self._notify)
        if self._waiters:
            waiters, self._waiters = self._waiters, None
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def _notify(self) -> None:
        self._notify_pending = False
        if self.listener is not None:
            self.listener()

    async def wait_for(self, done: Callable[[], bool], until: float | None) -> bool:
        """Wait until ``done()`` holds (checked at each change of the flags) or until
        ``until`` (``time.monotonic()``; None: no limit); the last ``done()``."""
        loop = self.loop
        while not done():
            if until is not None and loop.time() >= until:
                return False
            fut = loop.create_future()
            waiters = self._waiters
            if waiters is None:
                waiters = self._waiters = []
            waiters.append(fut)
            timer = None if until is None else loop.call_at(until, _wake_one, fut)
            try:
                await fut
            finally:
                if timer is not None:
                    timer.cancel()
                if self._waiters is not None and fut in self._waiters:
                    self._waiters.remove(fut)
        return True

    async def wait_exit(self, until: float | None) -> bool:
        """Wait until the loop has seen ssh exit, or until ``until``; whether it has."""
        return await self.wait_for(lambda: self.exit_seen, until)

    def _close_fd(self, fd: int) -> None:
        self.watcher.remove(fd)
        os.close(fd)
        stream = self.fds.pop(fd)
        if stream != 3:
            self._pipes_open -= 1
            if stream == 2 and self.stderr_filter is not None:
                self._filter_end()
        # Only stdout and stderr count: a ControlPersist master that this ssh forked keeps
        # the log open (it keeps logging there); its last lines are drained after the exit.
        if not self._pipes_open and not self.pipes_closed:
            self.pipes_closed = True
            self._wake()
            if self.pidfd is None and not self.exit_seen:
                self.loop.create_task(self._poll_exit())

    async def _poll_exit(self) -> None:
        # No pidfd (not Linux): the pipes are closed, so ssh is exiting; poll briefly.
        assert self.proc is not None
        while self.proc.poll() is None:
            await asyncio.sleep(0.005)
        self._exited()

    def _reap(self, fd: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            return
        if self.pidfd is not None:
            self.watcher.remove(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        self._exited()

    def _exited(self) -> None:
        if self.t_end is None:
            self.t_end = time.monotonic()
        self.exit_seen = True
        self._wake()

    # -- stopping -------------------------------------------------------------------------
    def has_exited(self) -> bool:
        """True if ssh has exited (reaping it if its exit was not yet seen by the loop)."""
        if self.proc is None:
            return False
        if self.proc.returncode is None and self.proc.poll() is None:
            return False
        self._exited()
        return True

    def signal_group(self, sig: int) -> None:
        """Signal ssh's process group (ssh and any ProxyCommand it runs), while unreaped."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def kill_now(self) -> None:
        """Synchronous end: KILL the group if still there, reap it, drain and close the fds."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            self.signal_group(signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                proc.wait()
            self._exited()
        if self.log_writer is not None:
            self.log_writer_close()
        for fd in list(self.fds):
            while fd in self.fds and self._on_ready(fd):
                pass  # drained until it would block or reads EOF (which forgets the fd)
        self.close_fds()

    def close_fds(self) -> None:
        """Close everything this host holds and remove its FIFO (idempotent)."""
        for fd, stream in list(self.fds.items()):
            self.watcher.remove(fd)
            os.close(fd)
            if stream == 2 and self.stderr_filter is not None:
                self._filter_end()
        self.fds.clear()
        if self.log_writer is not None:
            self.log_writer_close()
        if self.pidfd is not None:
            self.watcher.remove(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        if self.stdin_fd is not None:
            self._close_stdin()
        if self.fifo is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.fifo)


def _wake_one(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def run_bounded(argv: list[str], until: float) -> None:
    """Run a helper command (stdio on /dev/null, its own session) until it exits or ``until``.

    ``until`` is a ``time.monotonic()`` time.  Then (or when cancelled) its process group is
    killed and it is reaped: it never outlives the call.  Its exit is watched with a pidfd
    (no thread); elsewhere than Linux, polled.  A command that cannot start is ignored (the
    caller's step is best effort).
    """
    loop = asyncio.get_running_loop()
    try:
        proc = ChildStarter().start(argv)
    except OSError:
        return
    exited = asyncio.Event()
    pidfd: int | None = None
    try:
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            while proc.poll() is None and time.monotonic() < until:
                await asyncio.sleep(0.01)
        else:
            loop.add_reader(pidfd, exited.set)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exited.wait(), max(0.0, until - time.monotonic()))
    finally:
        if pidfd is not None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
