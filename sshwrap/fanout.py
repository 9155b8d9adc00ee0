"""One command on many hosts: the asyncio core behind ``run_many`` and ``sshwrap-many``.

Design
------
Every host gets one plain ``ssh -T`` child in pipes mode (no pty per host, no thread per
host): its stdout and stderr are pipes, its stdin is ``/dev/null`` (or a pipe when ``input``
is given), and it runs in a session of its own (``start_new_session``), so a Ctrl-C typed at
the terminal reaches sshwrap only and sshwrap decides how every child ends.  ssh's own log
goes, at ``LogLevel=DEBUG1``, into a pipe (``ssh -E /proc/PID/fd/N``; elsewhere than Linux
a FIFO in a private 0700 directory): it
never reaches the caller's stderr, it tells when the session is up (which ends the connect
phase and starts the command timeout), and it tells the remote exit status from the remote
signal from ssh's own failure (ssh exits 255 for all three).

The event loop watches the pipes with ``loop.add_reader`` and each child's exit with a
pidfd (Linux; elsewhere a short poll once the pipes are closed), so an in-flight host costs
a handful of file descriptors and no thread.  Children are started with ``subprocess.Popen``
from the loop's thread (vfork + exec on Linux): the fan-out never forks from a thread pool.

Timeouts: ``connect_timeout`` bounds the time from start until the session is up (it is
also handed to ssh as ``ConnectTimeout``); ``timeout`` bounds the remote command from then
on; ``deadline`` bounds the whole run.  A host over its limit has its ssh process group
killed (TERM, then KILL after 0.5 s); the others do not notice.  A command that
outlives ``timeout`` is also stopped on the remote side when ``kill_remote`` is on (the
default): like ``sshwrap.run``, the command is tagged with a random session id in its
environment, and a second, short ssh signals the processes so tagged (TERM, then KILL on
the remote side).  That second ssh starts at once, alongside the local stop, with a
``ConnectTimeout`` and a limit of 0.7 s: when the host does not answer in time (a cut link,
a frozen sshd) it is killed and reaped, so every bound holds within 1 s, cleanup included.
Without ``timeout`` or ``deadline`` nothing can need that stop, so the command then goes
untagged, exactly as a plain ``ssh host cmd`` sends it.

Cancelling (task cancellation, Ctrl-C, leaving the ``async for`` through ``aclose()``) kills
every ssh child by process group, waits for each one, and removes the FIFO directory: nothing
is left running locally.  Hosts that had finished keep their results; the synchronous
``run_many`` raises ``FanoutInterrupted`` (a ``KeyboardInterrupt``) carrying every result,
the unfinished ones marked ``cancelled``.  A remote command that runs without a terminal is
not stopped by a cancellation (that would take a new connection per host, and a prompt stop
cannot wait for them): sshd closes its session, and the command ends when it next writes,
or when it is done.  Over a ``Connection`` (below) cancelling stops the remote command too.

Connections: a host given as sshwrap's own ``Connection`` (``sshwrap.connect``, or its aio
twin) runs as a channel of that connection's ControlMaster (OpenSSH's mux proxy mode, see
``sshwrap.connection``): no new ssh process, no key exchange, and the exact ``-signum`` for a
remote signal death.  Any other object with ``destination`` and ``control_path`` attributes
runs as ``ssh -o ControlPath=... -o ControlMaster=no``.  A ControlMaster that the user's own
ssh config sets up is reused by ssh itself.

Resources: ``concurrency`` caps the ssh processes in flight, and so the file descriptors;
``check_fd_budget`` refuses, before anything starts, a concurrency that ``RLIMIT_NOFILE``
cannot hold (raising the soft limit up to the hard one first when that is enough).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from .core.argv import (
    OptionValue,
    build_ssh_argv,
    find_ssh,
    remote_command,
    remote_signal_script,
    ssh_settings_args,
)
from .errors import SSHConnectionError, SSHError, SSHWrapError, interpret_exit, ssh_messages

__all__ = [
    "FDS_PER_HOST",
    "FanoutInterrupted",
    "FdBudgetError",
    "HostResult",
    "Status",
    "check_fd_budget",
    "run_many",
    "run_many_async",
]

Status = Literal["ok", "failed", "timeout", "ssh_error", "cancelled"]

#: File descriptors sshwrap holds per host in flight: stdout, stderr, the log FIFO (read end
#: and, until ssh opens it, a write end), the pidfd, and a stdin pipe when ``input`` is given.
FDS_PER_HOST = 6
# Pipes that exist only while a child is being started (Popen's ends, its error pipe,
# /dev/null), plus what the caller may open for each result (``--outdir`` files).
_SPAWN_FDS = 10
_RESERVE_FDS = 16

_READ = 65536
# Every bound (``timeout``, ``deadline``, ``connect_timeout``) covers the stop that follows it:
# ssh gets TERM, then KILL after _KILL_GRACE; the remote stop (a second ssh) gets _STOP_BUDGET
# from the moment the bound ran out, and is killed and reaped when that is over.  So a host
# ends, cleanup included, within _STOP_BUDGET (0.7 s) of its bound: inside the 1 s promised.
_KILL_GRACE = 0.5  # seconds between TERM and KILL
_STOP_BUDGET = 0.7  # seconds the remote stop may take after a host's bound ran out
_CONN_KILL_AFTER = 0.3  # TERM -> KILL over a Connection (which adds at most 0.5 s more)
_EOF_GRACE = 2.0  # seconds to wait for pipes to close once ssh has exited
# Lines in ssh's DEBUG1 log that mean the remote session is up.
_SESSION_UP = (b"debug1: Sending command", b"master session id", b"Entering interactive session")


class FdBudgetError(SSHWrapError, ValueError):
    """The requested concurrency needs more file descriptors than ``RLIMIT_NOFILE`` allows."""

    def __init__(self, concurrency: int, needed: int, soft: int, hard: int, most: int) -> None:
        self.concurrency = concurrency
        self.needed = needed
        self.soft = soft
        self.hard = hard
        self.max_concurrency = most
        hard_s = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        super().__init__(
            f"concurrency {concurrency} needs about {needed} open files "
            f"({FDS_PER_HOST} per host in flight), but the open-files limit is {soft} "
            f"(hard limit {hard_s}); use a concurrency of at most {most}, "
            "or raise the limit (ulimit -n)"
        )


class FanoutInterrupted(KeyboardInterrupt):
    """Raised by ``run_many`` on Ctrl-C, after every ssh child has ended.

    ``results`` holds one ``HostResult`` per host, in input order: those that finished, and
    the others with status ``cancelled`` and whatever output they had produced.
    """

    def __init__(self, results: list[HostResult]) -> None:
        super().__init__("interrupted")
        self.results = results


@runtime_checkable
class ConnectionLike(Protocol):
    """What ``run_many`` needs from a Connection to reuse its ControlMaster."""

    @property
    def destination(self) -> str: ...  # pragma: no cover - protocol

    @property
    def control_path(self) -> str: ...  # pragma: no cover - protocol


@dataclass
class HostResult:
    """What happened on one host.

    - ``returncode``: the remote command's exit status; ``-signum`` (see ``signalled``) when
      a signal killed it; ``None`` when there is no remote status (ssh failed, timed out,
      cancelled).
    - ``stdout`` / ``stderr``: the remote command's bytes (complete, or up to the moment the
      host was stopped).  ssh's own messages are not mixed in (see ``error`` and
      ``ssh_log``), except what ssh prints before its log opens (a setting it refuses):
      that stays in ``stderr`` and is the ``error``'s message too.
    - ``error``: the typed ``SSHError`` when ssh itself failed (refused, timed out, name not
      resolved, authentication, host key).
    - ``status``: ``ok`` (exit 0), ``failed`` (non-zero exit or signal), ``timeout``
      (``timeout`` or ``deadline`` ran out), ``ssh_error``, ``cancelled``.
    - ``started``: wall clock (``time.time()``) when its ssh started (``None`` if it never
      did); ``duration``: seconds until it ended; ``connect_time``: seconds until the
      session was up (``None`` if it never was).
    """

    host: str
    returncode: int | None
    stdout: bytes
    stderr: bytes
    error: SSHError | None
    started: float | None
    duration: float
    status: Status = "ok"
    connect_time: float | None = None
    signalled: bool = False
    ssh_log: str = field(default="", repr=False)
    index: int = field(default=0, repr=False)

    @property
    def ok(self) -> bool:
        """True when the remote command ran and exited 0."""
        return self.status == "ok"

    @property
    def timed_out(self) -> bool:
        """True when ``timeout`` or ``deadline`` stopped this host."""
        return self.status == "timeout"


# -- ssh's exit, read from its log -------------------------------------------------------


def _interpret(
    host: str, returncode: int, log: str, stderr: Sequence[bytes] = ()
) -> tuple[int | None, SSHError | None, bool]:
    """(remote returncode, ssh error, signalled) from ssh's exit status and DEBUG1 log.

    ``stderr`` is what came on ssh's stderr pipe: when no session was up, those are ssh's own
    words (a refused option, a bad port: printed before its log opened), and the error says
    them.
    """
    if returncode < 0:
        # ssh itself died of a signal that sshwrap did not send.
        sig = signal.Signals(-returncode).name if -returncode in _SIGNALS else str(-returncode)
        return (
            None,
            SSHError(host, f"ssh was killed by {sig}", ssh_messages(log), returncode),
            False,
        )
    if returncode != 255:
        # The remote command's own status (ssh exits 255 only for its own failure or a
        # remote signal): nothing in the log can change it.
        return returncode, None, False
    text = b"".join(stderr).decode(errors="replace") if stderr else ""
    info = interpret_exit(host, returncode, log, stderr=text)
    if info.error is not None:
        return None, info.error, False
    return info.returncode, None, info.returncode < 0


_SIGNALS = {int(s) for s in signal.Signals}


def _connect_timeout_error(host: str, seconds: float, log: str) -> SSHError:
    return SSHConnectionError(
        host, f"connection not up after {seconds:g} s (connect_timeout)", ssh_messages(log)
    )


# -- fd budget ----------------------------------------------------------------------------


def _open_fds() -> int:
    for d in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(d))
    return 32


def check_fd_budget(concurrency: int, *, extra: int = 0) -> int:
    """Make sure ``concurrency`` hosts in flight fit the open-files limit; return the need.

    The soft ``RLIMIT_NOFILE`` is raised (up to the hard limit) when that is enough;
    otherwise ``FdBudgetError`` says the largest concurrency that fits.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    base = _open_fds() + _SPAWN_FDS + _RESERVE_FDS + extra
    needed = base + concurrency * FDS_PER_HOST
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return needed
    if hard == resource.RLIM_INFINITY or needed <= hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            return needed
    limit = soft if hard == resource.RLIM_INFINITY else max(soft, hard)
    most = max(0, (limit - base) // FDS_PER_HOST)
    raise FdBudgetError(concurrency, needed, soft, hard, most)


# -- one host -----------------------------------------------------------------------------


_DEVNULL: int | None = None
_PROC_FD: bool | None = None


def _proc_fd_ok() -> bool:
    """Whether a pipe can be reopened by its ``/proc/PID/fd/N`` path (Linux), checked once."""
    global _PROC_FD
    if _PROC_FD is None:
        r, w = os.pipe()
        try:
            fd = os.open(f"/proc/{os.getpid()}/fd/{w}", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            _PROC_FD = False
        else:
            os.close(fd)
            _PROC_FD = True
        finally:
            os.close(r)
            os.close(w)
    return _PROC_FD


def _spawn(argv: list[str], stdin: int, stdout: int, stderr: int = -1) -> subprocess.Popen[bytes]:
    """Start ssh in a session of its own with these fds as its stdio (-1: /dev/null).

    (A plain fork without waiting for the exec was measured too: no faster here, since on a
    busy machine the time goes to waiting for a CPU, not to the spawn itself.)
    """
    global _DEVNULL
    if _DEVNULL is None:
        _DEVNULL = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return subprocess.Popen(
        argv,
        stdin=stdin if stdin >= 0 else _DEVNULL,
        stdout=stdout if stdout >= 0 else _DEVNULL,
        stderr=stderr if stderr >= 0 else _DEVNULL,
        start_new_session=True,
    )


@dataclass
class _Spec:
    index: int
    host: str
    argv: list[str]  # without -E (added per start)
    sid: str | None  # the remote command's session tag, when kill_remote is on
    kill_settings: list[str] | None = None  # ssh settings of the remote stop
    conn: Any = None  # an AsyncConnection: the command runs as a channel of its master


OutputCallback = Callable[[str, int, bytes], None]
"""``on_output(host, stream, data)``: stream 1 is stdout, 2 is stderr."""


class _HostRun:
    """One ssh child and its pipes, driven by the event loop's readers."""

    def __init__(
        self,
        spec: _Spec,
        fifo_dir: str,
        loop: asyncio.AbstractEventLoop,
        on_output: OutputCallback | None,
        input: bytes | None,
    ) -> None:
        self.spec = spec
        self.loop = loop
        self.on_output = on_output
        self.input = input
        self.fifo: str | None = os.path.join(fifo_dir, str(spec.index))
        self.proc: subprocess.Popen[bytes] | None = None
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.log = bytearray()
        self.fds: dict[int, int] = {}  # fd -> stream (1 stdout, 2 stderr, 3 ssh's log)
        self.log_writer: int | None = None
        self.pidfd: int | None = None
        self.stdin_fd: int | None = None
        self.stdin_pos = 0
        self.session_up = asyncio.Event()
        self.exited = asyncio.Event()
        self.pipes_closed = asyncio.Event()
        self.started_wall: float | None = None
        self.t0 = 0.0
        self.t_up: float | None = None
        self.t_end: float | None = None

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        """Create ssh's log pipe (or FIFO) and start ssh; register the fds with the loop."""
        opened: list[int] = []
        try:
            # Our own write end keeps the log from reading as EOF before ssh opens it; it is
            # closed at ssh's first log line (or when ssh exits).
            if _proc_fd_ok():
                # A pipe that ssh opens by its /proc path: no FIFO to create and remove (a
                # directory operation on the temp file system: ~0.2 ms of CPU per host on
                # ext4, a tenth of that through the pipe).
                self.fifo = None
                log_r, self.log_writer = os.pipe()
                self.fds[log_r] = 3
                log_path = f"/proc/{os.getpid()}/fd/{self.log_writer}"
                os.set_blocking(log_r, False)
            else:
                assert self.fifo is not None
                log_path = self.fifo
                os.mkfifo(log_path, 0o600)
                log_r = os.open(log_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self.fds[log_r] = 3
                self.log_writer = os.open(log_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            out_r, out_w = os.pipe()
            opened += [out_r, out_w]
            err_r, err_w = os.pipe()
            opened += [err_r, err_w]
            if self.input is not None:
                in_r, in_w = os.pipe()
                opened += [in_r, in_w]
            else:
                in_r = in_w = -1
            self.started_wall = time.time()
            self.t0 = time.monotonic()
            argv = [self.spec.argv[0], "-E", log_path, *self.spec.argv[1:]]
            self.proc = _spawn(argv, in_r, out_w, err_w)
        except BaseException:
            for fd in opened:
                os.close(fd)
            self.close_fds()
            raise
        for fd in (out_w, err_w, in_r):
            if fd >= 0:
                os.close(fd)
        for fd, stream in ((out_r, 1), (err_r, 2)):
            os.set_blocking(fd, False)
            self.fds[fd] = stream
        if in_w >= 0:
            self.stdin_fd = in_w
            os.set_blocking(in_w, False)
            self.loop.add_writer(in_w, self._writable)
        for fd in self.fds:
            self.loop.add_reader(fd, self._readable, fd)
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None  # not Linux: exit is polled once the pipes close
        else:
            self.loop.add_reader(self.pidfd, self._reap)

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

    def _readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._got(fd, data)

    def _got(self, fd: int, data: bytes) -> None:
        if not data:
            self._close_fd(fd)
            return
        stream = self.fds[fd]
        if stream == 3:
            self.log_writer_close()
            start = max(0, len(self.log) - 64)
            self.log += data
            if not self.session_up.is_set():
                window = bytes(self.log[start:])
                if any(m in window for m in _SESSION_UP):
                    self._up()
            return
        if not self.session_up.is_set():
            self._up()
        (self.out if stream == 1 else self.err).append(data)
        if self.on_output is not None:
            self.on_output(self.spec.host, stream, data)

    def log_writer_close(self) -> None:
        """Close sshwrap's own write end of the log FIFO (once ssh has it, or has exited)."""
        if self.log_writer is not None:
            os.close(self.log_writer)
            self.log_writer = None

    def _up(self) -> None:
        self.t_up = time.monotonic()
        self.session_up.set()

    def _close_fd(self, fd: int) -> None:
        self.loop.remove_reader(fd)
        os.close(fd)
        del self.fds[fd]
        # Only stdout and stderr count: a ControlPersist master that this ssh forked keeps
        # the log open (it keeps logging there); its last lines are drained after the exit.
        if not any(stream != 3 for stream in self.fds.values()) and not self.pipes_closed.is_set():
            self.pipes_closed.set()
            if self.pidfd is None and not self.exited.is_set():
                self.loop.create_task(self._poll_exit())

    async def _poll_exit(self) -> None:
        # No pidfd (not Linux): the pipes are closed, so ssh is exiting; poll briefly.
        assert self.proc is not None
        while self.proc.poll() is None:
            await asyncio.sleep(0.005)
        self._exited()

    def _reap(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            return
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        self._exited()

    def _exited(self) -> None:
        if self.t_end is None:
            self.t_end = time.monotonic()
        self.exited.set()

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

    async def stop(self) -> None:
        """TERM, then KILL after a grace period; returns once ssh is reaped."""
        if self.proc is None:
            return
        self.signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.exited.wait(), _KILL_GRACE)
        except TimeoutError:
            pass
        finally:
            self.kill_now()

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
            while fd in self.fds:
                try:
                    data = os.read(fd, _READ)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                self._got(fd, data)
        self.close_fds()

    def close_fds(self) -> None:
        """Close everything this host holds and remove its FIFO (idempotent)."""
        for fd in list(self.fds):
            self.loop.remove_reader(fd)
            os.close(fd)
        self.fds.clear()
        self.log_writer_close()
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        self._close_stdin()
        if self.fifo is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.fifo)

    # -- result ---------------------------------------------------------------------------
    def result(self, status: Status | None, error: SSHError | None = None) -> HostResult:
        """Build the host's result; a ``status`` given forces timeout/cancelled/ssh_error."""
        end = self.t_end if self.t_end is not None else time.monotonic()
        log = self.log.decode(errors="replace")
        returncode: int | None = None
        signalled = False
        if status is None:
            assert self.proc is not None and self.proc.returncode is not None
            returncode, error, signalled = _interpret(
                self.spec.host, self.proc.returncode, log, self.err
            )
            status = _status(returncode, error)
        return HostResult(
            host=self.spec.host,
            returncode=returncode,
            stdout=b"".join(self.out),
            stderr=b"".join(self.err),
            error=error,
            started=self.started_wall,
            duration=(end - self.t0) if self.started_wall is not None else 0.0,
            status=status,
            connect_time=None if self.t_up is None else self.t_up - self.t0,
            signalled=signalled,
            ssh_log=log,
            index=self.spec.index,
        )


def _status(returncode: int | None, error: SSHError | None) -> Status:
    if error is not None:
        return "ssh_error"
    return "ok" if returncode == 0 else "failed"


# -- the run ------------------------------------------------------------------------------


def _as_async_connection(host: object) -> Any:
    """sshwrap's own Connection (or its aio twin) as an ``AsyncConnection``, else None."""
    from .aio.connection import AsyncConnection
    from .connection import Connection

    if isinstance(host, AsyncConnection):
        return host
    if isinstance(host, Connection):
        return AsyncConnection(host)
    return None


def _destination(host: str | ConnectionLike) -> tuple[str, list[str]]:
    if isinstance(host, str):
        return host, []
    return host.destination, [
        "-o",
        f"ControlPath={host.control_path}",
        "-o",
        "ControlMaster=no",
    ]


class _Runner:
    """The scheduler: at most ``concurrency`` hosts in flight, results as they finish."""

    def __init__(
        self,
        hosts: Iterable[str | ConnectionLike],
        command: str | Sequence[str],
        *,
        concurrency: int,
        timeout: float | None,
        connect_timeout: float | None,
        deadline: float | None,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        config: str | os.PathLike[str] | None = None,
        user: str | None = None,
        port: int | None = None,
        identity: str | os.PathLike[str] | None = None,
        jump: str | None = None,
        options: Mapping[str, OptionValue] | None = None,
        ssh: str | None = None,
        batch_mode: bool = True,
        kill_remote: bool = True,
        on_output: OutputCallback | None = None,
        on_start: Callable[[str], None] | None = None,
        check_budget: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        for name, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
            ("deadline", deadline),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        self.concurrency = concurrency
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.deadline = deadline
        self.input = input
        self.on_output = on_output
        self.on_start = on_start
        ssh = ssh or find_ssh()
        settings = ssh_settings_args(
            config=config, user=user, port=port, identity=identity, jump=jump, options=options
        )
        fixed = ["-o", "LogLevel=DEBUG1"]
        if batch_mode:
            fixed += ["-o", "BatchMode=yes"]
        if connect_timeout is not None:
            fixed += ["-o", f"ConnectTimeout={max(1, round(connect_timeout))}"]
        self.specs: list[_Spec] = []
        self.command = command
        self.env = env
        self.cwd = cwd
        # The session tag only serves the remote stop after ``timeout`` / ``deadline``.
        # Without either, the command goes exactly as a plain ``ssh host cmd`` sends it.
        # (The ``export`` line costs no extra remote fork with the shells measured: bash
        # 5.2 execs the last command of ``-c`` either way, Debian's dash 0.5.12 never does.)
        tagged = kill_remote and (timeout is not None or deadline is not None)
        self.ssh = ssh
        kill_base = ["-o", "BatchMode=yes", *settings] if batch_mode else settings
        untagged_text = None if tagged else remote_command(command, env=env, cwd=cwd)
        for i, h in enumerate(hosts):
            if not isinstance(h, str):
                aconn = _as_async_connection(h)
                if aconn is not None:
                    self.specs.append(_Spec(i, aconn.destination, [], None, conn=aconn))
                    continue
            dest, extra = _destination(h)
            sid = secrets.token_hex(8) if tagged else None
            if untagged_text is not None:
                text = untagged_text
            else:
                text = remote_command(command, env=env, cwd=cwd, session_id=sid)
            args = [*fixed, *settings, *extra]
            argv = build_ssh_argv(ssh, dest, text, settings=args)
            # The remote stop's argv is built only when a host needs it (see _kill_remote).
            kill_settings = kill_base if not extra else [*kill_base, *extra]
            self.specs.append(_Spec(i, dest, argv, sid, kill_settings))
        if check_budget:
            check_fd_budget(min(concurrency, max(1, len(self.specs))))
        self.running: dict[int, _HostRun] = {}
        self.partial: dict[int, HostResult] = {}
        self.kill_tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> AsyncGenerator[HostResult, None]:
        """Yield each host's result as it finishes; on exit (even cancelled) end every child."""
        loop = asyncio.get_running_loop()
        t_end = None if self.deadline is None else time.monotonic() + self.deadline
        fifo_dir = tempfile.mkdtemp(prefix="sshwrap-many-")
        todo = list(reversed(self.specs))
        tasks: dict[asyncio.Future[HostResult], int] = {}
        try:
            while todo or tasks:
                while todo and len(tasks) < self.concurrency:
                    if t_end is not None and time.monotonic() >= t_end:
                        break
                    spec = todo.pop()
                    if self.on_start is not None:
                        self.on_start(spec.host)
                    if spec.conn is not None:
                        coro = self._host_conn(spec, t_end)
                    else:
                        run = _HostRun(spec, fifo_dir, loop, self.on_output, self.input)
                        self.running[spec.index] = run
                        coro = self._host(run, t_end)
                    tasks[asyncio.ensure_future(coro)] = spec.index
                if not tasks:
                    break  # the deadline passed before the rest could start
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    idx = tasks.pop(t)
                    self.running.pop(idx, None)
                    yield t.result()
            while todo:  # never started: the total deadline ran out first
                spec = todo.pop()
                yield HostResult(
                    spec.host, None, b"", b"", None, None, 0.0, "timeout", index=spec.index
                )
        finally:
            try:
                await self._shutdown(tasks)
            finally:
                shutil.rmtree(fifo_dir, ignore_errors=True)

    async def _shutdown(self, tasks: Mapping[asyncio.Future[HostResult], int]) -> None:
        runs = list(self.running.values())
        self.running.clear()
        # A host whose ssh had already exited when the run was cancelled is done: it keeps
        # its real result (only the loop had not yet seen the exit), not "cancelled".
        finished = {r.spec.index for r in runs if r.has_exited()}
        try:
            for t in tasks:
                t.cancel()
            # Signal every group at once, then wait for all of them together.
            for r in runs:
                r.signal_group(signal.SIGTERM)
            waits = [asyncio.ensure_future(r.exited.wait()) for r in runs if r.proc is not None]
            if waits:
                _, pending = await asyncio.wait(waits, timeout=_KILL_GRACE)
                for p in pending:
                    p.cancel()
            if tasks:
                await asyncio.wait(tasks)
            kills = list(self.kill_tasks)
            if kills:
                # Each remote stop ends (or is killed and reaped) within its own budget; a
                # cancel now ends them at once (their ssh killed and reaped).
                try:
                    await asyncio.wait(kills)
                except asyncio.CancelledError:
                    for k in kills:
                        k.cancel()
                    await asyncio.wait(kills)
                    raise
        finally:
            for r in runs:
                r.kill_now()
                done = r.spec.index in finished
                self.partial[r.spec.index] = r.result(None if done else "cancelled")
            for t, idx in tasks.items():  # hosts over a Connection
                if idx not in self.partial and (t.cancelled() or not t.done()):
                    spec = self.specs[idx]
                    self.partial[idx] = HostResult(
                        spec.host, None, b"", b"", None, None, 0.0, "cancelled", index=idx
                    )

    async def _host(self, run: _HostRun, t_end: float | None) -> HostResult:
        host = run.spec.host
        try:
            run.start()
        except OSError as e:
            return run.result("ssh_error", SSHError(host, f"cannot run ssh: {e}"))
        exit_wait = asyncio.ensure_future(run.exited.wait())
        up_wait = asyncio.ensure_future(run.session_up.wait())
        try:
            # Connect phase: until the session is up (or ssh exits).
            limit = _left(self.connect_timeout, t_end)
            await asyncio.wait({up_wait, exit_wait}, timeout=limit, return_when=_FIRST)
            if not run.session_up.is_set() and not run.exited.is_set():
                await run.stop()
                if _deadline_first(self.connect_timeout, t_end, run.t0):
                    return run.result("timeout")
                assert self.connect_timeout is not None
                log = run.log.decode(errors="replace")
                return run.result(
                    "ssh_error", _connect_timeout_error(host, self.connect_timeout, log)
                )
            # Command phase: until ssh exits.
            limit = _left(self.timeout, t_end)
            cmd_end = None if limit is None else time.monotonic() + limit
            if not run.exited.is_set():
                await asyncio.wait({exit_wait}, timeout=limit)
            if not run.exited.is_set():
                # The remote stop starts now, alongside the local one: both end within
                # _STOP_BUDGET of the bound.
                self._kill_remote(run, time.monotonic() + _STOP_BUDGET)
                await run.stop()
                return run.result("timeout")
            # ssh has exited: collect what is still in the pipes (a child of ssh's may hold
            # them), not past the host's bound.
            run.log_writer_close()
            if not run.pipes_closed.is_set():
                grace = _EOF_GRACE
                if cmd_end is not None:
                    grace = min(grace, max(0.0, cmd_end - time.monotonic()) + _KILL_GRACE)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.pipes_closed.wait(), grace)
            run.kill_now()
            return run.result(None)
        finally:
            exit_wait.cancel()
            up_wait.cancel()

    async def _host_conn(self, spec: _Spec, t_end: float | None) -> HostResult:
        """A host given as a Connection: the command is a channel of its master."""
        from .errors import TimeoutExpired

        started = time.time()
        t0 = time.monotonic()
        returncode: int | None = None
        error: SSHError | None = None
        out: bytes = b""
        err: bytes = b""
        status: Status
        try:
            # The connection's own bounds do the work: ``timeout`` covers the whole call
            # (a dead master's restart too) and returns within timeout + kill_after + 0.5 s;
            # ``connect_timeout`` bounds the restart.  Cancelling it (Ctrl-C) stops the
            # restart or the remote command within about 1 s.
            cp = await spec.conn.run(
                self.command,
                input=self.input,
                capture_output=True,
                timeout=_left(self.timeout, t_end),
                connect_timeout=_left(self.connect_timeout, t_end),
                kill_after=_CONN_KILL_AFTER,
                env=self.env,
                cwd=self.cwd,
            )
        except TimeoutExpired as e:
            status = "timeout"
            out = e.output if isinstance(e.output, bytes) else b""
            err = e.stderr if isinstance(e.stderr, bytes) else b""
        except SSHError as e:
            status, error = "ssh_error", e
        else:
            returncode, out, err = cp.returncode, cp.stdout or b"", cp.stderr or b""
            status = _status(returncode, None)
        if self.on_output is not None:
            for stream, data in ((1, out), (2, err)):
                if data:
                    self.on_output(spec.host, stream, data)
        return HostResult(
            host=spec.host,
            returncode=returncode,
            stdout=out,
            stderr=err,
            error=error,
            started=started,
            duration=time.monotonic() - t0,
            status=status,
            connect_time=0.0 if error is None else None,
            signalled=returncode is not None and returncode < 0,
            index=spec.index,
        )

    def _kill_remote(self, run: _HostRun, until: float) -> None:
        """Start the remote stop of a timed-out host: a second ssh, bounded by ``until``.

        Its ``ConnectTimeout`` is what is left until ``until`` (ssh's minimum is 1 s), and at
        ``until`` (``time.monotonic()``) it is killed and reaped if still running.  The remote
        script escalates to KILL on its own, so it finishes there even when the local side
        has given up on it.
        """
        spec = run.spec
        if spec.sid is None or spec.kill_settings is None:
            return
        script = remote_signal_script(spec.sid, signal.SIGTERM, escalate=True)
        connect = max(1, math.ceil(until - time.monotonic()))
        settings = ["-o", f"ConnectTimeout={connect}", *spec.kill_settings]
        argv = build_ssh_argv(self.ssh, spec.host, script, settings=settings)
        task = asyncio.ensure_future(_run_bounded(argv, until))
        self.kill_tasks.add(task)
        task.add_done_callback(self.kill_tasks.discard)


_FIRST = asyncio.FIRST_COMPLETED


async def _run_bounded(argv: list[str], until: float) -> None:
    """Run a helper ssh (stdio on /dev/null, its own session) until it exits or ``until``.

    Then (or when cancelled) its process group is killed and it is reaped: it never outlives
    the call.  Its exit is watched with a pidfd (no thread); elsewhere than Linux, polled.
    """
    loop = asyncio.get_running_loop()
    try:
        proc = _spawn(argv, -1, -1)
    except OSError:
        return  # no ssh to run: the remote stop is best effort
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


def _left(limit: float | None, t_end: float | None) -> float | None:
    left = None if t_end is None else max(0.0, t_end - time.monotonic())
    if limit is None:
        return left
    return limit if left is None else min(limit, left)


def _deadline_first(limit: float | None, t_end: float | None, t0: float) -> bool:
    if t_end is None:
        return False
    return limit is None or t_end <= t0 + limit


# -- public API ---------------------------------------------------------------------------


async def run_many_async(
    hosts: Iterable[str | ConnectionLike],
    command: str | Sequence[str],
    *,
    concurrency: int = 32,
    timeout: float | None = None,
    connect_timeout: float | None = 30.0,
    deadline: float | None = None,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    config: str | os.PathLike[str] | None = None,
    user: str | None = None,
    port: int | None = None,
    identity: str | os.PathLike[str] | None = None,
    jump: str | None = None,
    options: Mapping[str, OptionValue] | None = None,
    ssh: str | None = None,
    batch_mode: bool = True,
    kill_remote: bool = True,
    on_output: OutputCallback | None = None,
    on_start: Callable[[str], None] | None = None,
) -> AsyncIterator[HostResult]:
    """Run ``command`` on every host, ``concurrency`` at a time; yield results as they finish.

    This is ``sshwrap.aio.run_many``.  ``command`` is quoted like ``sshwrap.run``: a list
    item by item, a ``str`` as it is.  ``timeout`` bounds each remote command (from the
    moment its session is up), ``connect_timeout`` each connection (also ssh's
    ``ConnectTimeout``), ``deadline`` the whole run (hosts it stops or never starts come back
    with status ``timeout``).  ``input`` is sent to every host's stdin (default:
    ``/dev/null``, so no host reads the caller's stdin).  ssh settings (``config``, ``user``,
    ``port``, ``identity``, ``jump``, ``options``) go to every ssh as ``-F/-l/-p/-i/-J/-o``.
    ``batch_mode`` (default on) sets ``BatchMode=yes``: a fan-out cannot answer prompts, so
    a host that would ask fails at once instead of hanging (each ssh has no terminal, so
    with ``batch_mode=False`` it can only ask through ``SSH_ASKPASS``).  ``kill_remote``
    (default on) stops a timed-out command on the remote side too.
    Every bound covers the cleanup it causes: a host over ``timeout``, ``connect_timeout``
    or ``deadline`` is done within 1 s of it (its ssh: TERM, KILL 0.5 s later; the remote
    stop: its own ssh with a ``ConnectTimeout``, killed and reaped 0.7 s after the bound
    when the host does not answer, e.g. a cut link or a frozen sshd), so the whole run ends
    within 1 s of its last bound and leaves no ssh behind.  Destinations, users and jump
    hosts starting with ``-`` raise ``ValueError`` before any ssh runs.
    ``on_output(host, stream, data)`` (stream 1 or 2) sees the bytes as they arrive;
    ``on_start(host)`` each host as it starts.
    A host may be a ``Connection``: its ControlMaster is reused.

    Leave early with ``contextlib.aclosing``; cancelling the consuming task ends every ssh
    child before the cancellation completes.  Raises ``FdBudgetError`` before starting
    anything if the open-files limit cannot hold ``concurrency`` hosts in flight.
    """
    runner = _Runner(
        hosts,
        command,
        concurrency=concurrency,
        timeout=timeout,
        connect_timeout=connect_timeout,
        deadline=deadline,
        input=input,
        env=env,
        cwd=cwd,
        config=config,
        user=user,
        port=port,
        identity=identity,
        jump=jump,
        options=options,
        ssh=ssh,
        batch_mode=batch_mode,
        kill_remote=kill_remote,
        on_output=on_output,
        on_start=on_start,
    )
    gen = runner.run()
    try:
        async for result in gen:
            yield result
    finally:
        await gen.aclose()


def run_many(
    hosts: Iterable[str | ConnectionLike],
    command: str | Sequence[str],
    *,
    concurrency: int = 32,
    timeout: float | None = None,
    connect_timeout: float | None = 30.0,
    deadline: float | None = None,
    **kwargs: Any,
) -> list[HostResult]:
    """Run ``command`` on every host; return one ``HostResult`` per host, in input order.

    ``sshwrap.run_many(["web1", "web2"], "uptime", concurrency=100, timeout=30)``.  The
    keywords are those of ``sshwrap.aio.run_many`` (bounds kept within 1 s, cleanup
    included).  On Ctrl-C every ssh child is ended first (within about 1 s, remote stops in
    flight included), then ``FanoutInterrupted`` (a ``KeyboardInterrupt``) is raised carrying
    ``results``: the finished hosts, and the others marked ``cancelled`` with their output
    so far.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_many() inside a running event loop: use sshwrap.aio.run_many")
    runner = _Runner(
        hosts,
        command,
        concurrency=concurrency,
        timeout=timeout,
        connect_timeout=connect_timeout,
        deadline=deadline,
        **kwargs,
    )
    results: dict[int, HostResult] = {}

    interrupted = False
    # (Decided before asyncio.run, which installs a SIGINT handler of its own.)
    watch = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )

    async def main() -> None:
        nonlocal interrupted
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_sigint() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        # Through the loop's own wakeup fd: a plain handler would not wake the selector when
        # the kernel delivers SIGINT to another thread, and Ctrl-C would wait for the hosts.
        if watch:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        gen = runner.run()
        try:
            async for r in gen:
                results[r.index] = r
        finally:
            await gen.aclose()
            if watch:
                loop.remove_signal_handler(signal.SIGINT)

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        if not interrupted and not isinstance(sys.exc_info()[1], KeyboardInterrupt):
            raise
        raise FanoutInterrupted(_complete(runner.specs, {**runner.partial, **results})) from None
    return _complete(runner.specs, results)


def _complete(specs: list[_Spec], results: Mapping[int, HostResult]) -> list[HostResult]:
    out = []
    for spec in specs:
        r = results.get(spec.index)
        if r is None:
            r = HostResult(
                spec.host, None, b"", b"", None, None, 0.0, "cancelled", index=spec.index
            )
        out.append(r)
    return out
