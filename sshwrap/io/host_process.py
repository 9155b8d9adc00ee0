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
thread by ``os.posix_spawn`` (clone + exec, no Python in the child; ``subprocess.Popen``
where it cannot close inherited fds: :class:`ChildStarter`): the fan-out never forks from a
thread pool.

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

from .fd_watcher import FdWatcher

__all__ = [
    "SESSION_UP",
    "Child",
    "ChildStarter",
    "HostProcess",
    "SpawnedChild",
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


_devnull: int | None = None


def _dev_null() -> int:
    global _devnull
    if _devnull is None:
        _devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _devnull


class Child(Protocol):
    """A started child: ``subprocess.Popen`` or :class:`SpawnedChild`."""

    @property
    def pid(self) -> int: ...  # pragma: no cover - protocol

    @property
    def returncode(self) -> int | None: ...  # pragma: no cover - protocol

    def poll(self) -> int | None: ...  # pragma: no cover - protocol

    def wait(self) -> int: ...  # pragma: no cover - protocol


class SpawnedChild:
    """A child started by ``os.posix_spawn``: its pid, and ``poll``/``wait`` as in
    ``subprocess.Popen`` (``returncode`` is ``-signum`` for a signal)."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Reap the child if it has exited (never blocks); its ``returncode`` or None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 0  # reaped elsewhere (SIGCHLD ignored): as subprocess does
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        """Reap the child, blocking until it exits; its ``returncode``."""
        while self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                self.returncode = 0  # as subprocess does
            else:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


_MAX_CLOSES = 64
"""Inheritable fds that posix_spawn closes one by one in the child; more: ``subprocess``."""


def _inheritable_fds() -> list[int] | None:
    """This process's file descriptors above 2 that a child would inherit (None: unknown)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    found = []
    for name in names:
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # (the listing's own fd, closed since)
                if os.get_inheritable(fd):
                    found.append(fd)
    return found


class ChildStarter:
    """Starts the children of one run, each in a session of its own.

    ``os.posix_spawn`` (glibc: ``clone(CLONE_VM | CLONE_VFORK)`` + exec, no Python in the
    child, safe with threads) with the environment taken once, when this starter is made:
    about half the parent's CPU of ``subprocess.Popen``, whose Python part, error pipe and
    environment conversion run for every child.  Like Popen's ``close_fds``, no fd but the
    child's stdio reaches it: sshwrap's own fds are all close-on-exec, and those this
    process holds that a child would inherit (a shell's, the caller's; listed once, here)
    are closed in the child (``POSIX_SPAWN_CLOSEFROM`` where there is one).  With more than
    a few of them, or without /proc, or where there is no ``posix_spawn`` with ``setsid``,
    children start through ``subprocess.Popen`` (vfork + exec) as before.
    """

    def __init__(self) -> None:
        self.env: dict[bytes, bytes] | dict[str, str] = (
            dict(os.environb) if os.supports_bytes_environ else dict(os.environ)
        )
        self.proc_fds = f"/proc/{os.getpid()}/fd/"
        """This process's fds by path (Linux), for ssh's ``-E``."""
        self._closes: list[tuple[int, ...]] = []
        closefrom: int | None = getattr(os, "POSIX_SPAWN_CLOSEFROM", None)
        self.posix_spawn = hasattr(os, "posix_spawn")
        if closefrom is not None:
            self._closes = [(closefrom, 3)]
        elif self.posix_spawn:
            inherited = _inheritable_fds()
            if inherited is None or len(inherited) > _MAX_CLOSES:
                self.posix_spawn = False
            else:
                self._closes = [(os.POSIX_SPAWN_CLOSE, fd) for fd in sorted(inherited)]

    def start(self, argv: list[str], stdin: int = -1, stdout: int = -1, stderr: int = -1) -> Child:
        """Start ``argv`` with these fds as its stdio (-1: /dev/null); OSError if it cannot."""
        null = _dev_null()
        fds = [fd if fd >= 0 else null for fd in (stdin, stdout, stderr)]
        # (A source fd among 0-2 would need the dup2-onto-itself care that Popen takes.)
        if self.posix_spawn and min(fds) > 2:
            actions: list[tuple[int, ...]] = [
                (os.POSIX_SPAWN_DUP2, fds[0], 0),
                (os.POSIX_SPAWN_DUP2, fds[1], 1),
                (os.POSIX_SPAWN_DUP2, fds[2], 2),
            ]
            actions += self._closes  # (after the dup2s: one may close a source)
            spawn = os.posix_spawn if "/" in argv[0] else os.posix_spawnp
            try:
                pid = spawn(argv[0], argv, self.env, file_actions=actions, setsid=True)
                return SpawnedChild(pid)
            except NotImplementedError:  # no POSIX_SPAWN_SETSID here
                self.posix_spawn = False
        return subprocess.Popen(
            argv, stdin=fds[0], stdout=fds[1], stderr=fds[2], start_new_session=True
        )


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


class HostProcess:
    """One ssh child and its pipes, driven by the event loop (through ``watcher``).

    ``argv`` is the ssh command line without ``-E`` (added by :meth:`start`); ``input`` goes
    to its stdin (None: ``/dev/null``); ``on_output(stream, data)`` (1 stdout, 2 stderr) sees
    the bytes as they arrive.  After :meth:`start`: ``out``/``err`` collect the output,
    ``log`` ssh's log; the flags ``up`` (the session is up), ``exit_seen`` and
    ``pipes_closed`` (stdout and stderr at EOF) tell the progress, :meth:`wait_for` waits on
    them, ``t0``/``t_up``/``t_end`` (``time.monotonic()``, the loop's clock) and
    ``started_wall`` (``time.time()``) tell when.
    """

    log_through_proc_fd: ClassVar[bool | None] = None
    """Whether ssh's log goes by a ``/proc/PID/fd/N`` path (None: not checked yet; checked
    once).  False forces the FIFO path used where ``/proc`` cannot reopen a pipe."""

    def __init__(
        self,
        argv: list[str],
        *,
        watcher: FdWatcher,
        fifo_path: str,
        input: bytes | None = None,
        on_output: Callable[[int, bytes], None] | None = None,
        starter: ChildStarter | None = None,
    ) -> None:
        self.argv = argv
        self.starter = starter
        self.watcher = watcher
        self.loop = watcher.loop
        self.on_output = on_output
        self.input = input
        self.fifo: str | None = fifo_path
        self.proc: Child | None = None
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.log = bytearray()
        self.fds: dict[int, int] = {}  # fd -> stream (1 stdout, 2 stderr, 3 ssh's log)
        self.log_writer: int | None = None
        self.pidfd: int | None = None
        self.stdin_fd: int | None = None
        self.stdin_pos = 0
        self.up = False
        self.exit_seen = False
        self.pipes_closed = False
        self._pipes_open = 2  # stdout and stderr
        self._waiters: list[asyncio.Future[None]] = []
        self.listener: Callable[[], None] | None = None
        """Called (soon, from the loop) after the flags changed: one call for a batch."""
        self._notify_pending = False
        self.started_wall: float | None = None
        self.t0 = 0.0
        self.t_up: float | None = None
        self.t_end: float | None = None

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        """Create ssh's log pipe (or FIFO) and start ssh; watch its fds."""
        opened: list[int] = []
        if self.starter is None:
            self.starter = ChildStarter()
        try:
            # Our own write end keeps the log from reading as EOF before ssh opens it; it is
            # closed at ssh's first log line (or when ssh exits).
            if HostProcess.log_through_proc_fd is None:
                HostProcess.log_through_proc_fd = _proc_fd_reopenable()
            if HostProcess.log_through_proc_fd:
                # A pipe that ssh opens by its /proc path: no FIFO to create and remove (a
                # directory operation on the temp file system: ~0.2 ms of CPU per host on
                # ext4, a tenth of that through the pipe).
                self.fifo = None
                # (Both ends non-blocking: ssh opens the pipe anew, with its own flags.)
                log_r, self.log_writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self.fds[log_r] = 3
                log_path = f"{self.starter.proc_fds}{self.log_writer}"
            else:
                assert self.fifo is not None
                log_path = self.fifo
                os.mkfifo(log_path, 0o600)
                log_r = os.open(log_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self.fds[log_r] = 3
                self.log_writer = os.open(log_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            out_r, out_w = _output_pipe()
            opened += [out_r, out_w]
            err_r, err_w = _output_pipe()
            opened += [err_r, err_w]
            if self.input is not None:
                in_r, in_w = os.pipe()
                opened += [in_r, in_w]
            else:
                in_r = in_w = -1
            self.started_wall = time.time()
            self.t0 = time.monotonic()
            argv = [self.argv[0], "-E", log_path, *self.argv[1:]]
            self.proc = self.starter.start(argv, in_r, out_w, err_w)
        except BaseException:
            for fd in opened:
                os.close(fd)
            self.close_fds()
            raise
        for fd in (out_w, err_w, in_r):
            if fd >= 0:
                os.close(fd)
        fds = self.fds
        fds[out_r] = 1
        fds[err_r] = 2
        if in_w >= 0:
            self.stdin_fd = in_w
            os.set_blocking(in_w, False)
            self.loop.add_writer(in_w, self._writable)
        watch = [(fd, self._on_log if s == 3 else self._on_output) for fd, s in fds.items()]
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None  # not Linux: exit is polled once the pipes close
        else:
            watch.append((self.pidfd, self._reap))
        self.watcher.add_all(watch)

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
        self.stdin_pos += n
        if self.stdin_pos >= len(self.input):
            self._close_stdin()

    def _close_stdin(self) -> None:
        if self.stdin_fd is not None:
            self.loop.remove_writer(self.stdin_fd)
            os.close(self.stdin_fd)
            self.stdin_fd = None

    def _read(self, fd: int) -> bytes | None:
        """Read ``fd`` once: its bytes, or None (nothing yet; or EOF: then it is closed)."""
        try:
            data = os.read(fd, _READ)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if data:
            return data
        self._close_fd(fd)
        return None

    def _readable(self, fd: int) -> bool:
        """Read ``fd`` once; False if there was nothing to read yet (or it reached EOF)."""
        data = self._read(fd)
        if data is None:
            return False
        if self.fds[fd] == 3:
            self._got_log(data)
        else:
            self._got_output(fd, data)
        return True

    def _on_log(self, fd: int) -> None:
        if (data := self._read(fd)) is not None:
            self._got_log(data)

    def _on_output(self, fd: int) -> None:
        if (data := self._read(fd)) is not None:
            self._got_output(fd, data)

    def _got_log(self, data: bytes) -> None:
        if self.log_writer is not None:
            self.log_writer_close()
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
        (self.out if stream == 1 else self.err).append(data)
        if self.on_output is not None:
            self.on_output(stream, data)

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
            waiters, self._waiters = self._waiters, []
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
            self._waiters.append(fut)
            timer = None if until is None else loop.call_at(until, _wake_one, fut)
            try:
                await fut
            finally:
                if timer is not None:
                    timer.cancel()
                if fut in self._waiters:
                    self._waiters.remove(fut)
        return True

    async def wait_exit(self, until: float | None) -> bool:
        """Wait until the loop has seen ssh exit, or until ``until``; whether it has."""
        return await self.wait_for(lambda: self.exit_seen, until)

    def _close_fd(self, fd: int) -> None:
        self.watcher.remove(fd)
        os.close(fd)
        if self.fds.pop(fd) != 3:
            self._pipes_open -= 1
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
        self.log_writer_close()
        for fd in list(self.fds):
            while fd in self.fds and self._readable(fd):
                pass  # drained until it would block or reads EOF (which forgets the fd)
        self.close_fds()

    def close_fds(self) -> None:
        """Close everything this host holds and remove its FIFO (idempotent)."""
        for fd in list(self.fds):
            self.watcher.remove(fd)
            os.close(fd)
        self.fds.clear()
        self.log_writer_close()
        if self.pidfd is not None:
            self.watcher.remove(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
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
