"""Run a command on a remote host the way :mod:`subprocess` runs one locally.

::

    r = sshwrap.run("web1", ["printf", "%s\\n", "a b", "$HOME"], capture_output=True, text=True,
                    check=True, timeout=10)      # r.args r.returncode r.stdout r.stderr r.host
    sshwrap.check_output("web1", "uname -a")     # a str goes to the remote shell as it is
    with sshwrap.Popen("web1", ["cat"], stdin=PIPE, stdout=PIPE) as p:
        out, err = p.communicate(b"data", timeout=5)

Each call runs the system ``ssh`` once (a fresh connection, unless the user's ssh_config
multiplexes).  What sshwrap adds, and why:

- **Quoting.** A list is quoted item by item (:func:`shlex.quote`) so every item arrives
  byte identical as one argument; a ``str`` is handed to the remote shell as it is.
- **stdin defaults to DEVNULL**, not to the caller's stdin as in :mod:`subprocess`.  ssh reads
  its stdin eagerly, so inheriting it silently swallows input meant for something else, the
  classic ``while read host; do ssh "$host" uptime; done < hosts`` bug (the first ssh eats the
  rest of the host list).  Remote commands rarely want the local stdin, and when they wait for
  it they hang where nobody sees a prompt.  Pass ``stdin=None`` to inherit, ``input=`` or
  ``stdin=PIPE`` to feed data.
- **Pipes mode** (default): ``ssh -T``, stdout and stderr separate and byte exact.
  ``tty=True``: ``ssh -tt -e none`` in a local pty of ``size=(rows, cols)``; the remote command
  sees a terminal, stdout and stderr arrive merged (``\\r\\n`` line ends, input echoed by the
  remote terminal), ``-e none`` so data cannot trigger ssh's ``~.`` escapes.
- **returncode** is the remote command's exit status.  ssh exits 255 for its own failures,
  for a remote ``exit 255`` and for a remote command killed by a signal; sshwrap tells them
  apart from ssh's debug log (``-E`` into a private file, never shown to the user; ssh's
  ordinary messages from it still go where ssh's stderr would go): an ssh failure raises an
  :class:`~sshwrap.errors.SSHError` subclass, a remote signal gives a negative returncode: minus
  the signal sshwrap sent when it sent one (timeout, ``terminate``, ``kill``,
  ``send_signal``), else :data:`~sshwrap.errors.UNKNOWN_SIGNAL` (-128): ssh does not report
  which signal it was.  Over a :class:`Connection` it is exact.
- **Timeouts and signals reach the remote command.**  Without a terminal, sshd does not stop a
  command when the client goes away.  sshwrap exports a random ``SSHWRAP_SESSION`` id in front
  of every command; on a timeout (and for ``send_signal``/``terminate``/``kill``) a second
  ssh finds the processes carrying it (``/proc``, Linux remotes) and signals their
  process group: SIGTERM, then SIGKILL after 2 s unless they are gone sooner (see
  :data:`STOP_MARGIN` for its bound).  With ``tty=True`` the hang-up does it too.
  When the local ssh is stopped by a signal sshwrap did not send (the user's ^C reaches ssh
  as well: ``returncode`` is then ``-SIGINT``), the remote command gets SIGHUP the same way,
  as a closing terminal would give it (``nohup``'d commands survive).
- **ssh's own messages** (warnings, errors) still reach the caller: written where ``stderr``
  goes, or appended to the ``stderr`` that ``communicate()``/``run()`` return with
  ``stderr=PIPE``, and kept in ``Popen.ssh_messages``.  ssh's debug lines never appear.
  ssh prints some failures (an unknown option, a bad port or value, a destination it
  rejects) on its stderr *before* its log opens: unless ``stderr=PIPE`` (then
  ``communicate()``/``run()`` read it) or ``STDOUT``, ssh's stderr passes through a small
  relay thread on its way to ``stderr`` (the user sees it as it comes) that keeps a bounded
  copy, so the :class:`~sshwrap.errors.SSHError` message is ssh's own last words either way
  (:class:`~sshwrap.errors.SSHConfigError` for a setting ssh refused).  Reading a
  ``stderr=PIPE`` yourself and calling ``wait()``: those early words are in what you read,
  and the message comes from the log alone.
- **Bounds.**  ``timeout`` bounds the call, its cleanup included: the call returns at most
  :data:`STOP_MARGIN` (0.8 s) after it passes, having stopped the remote command or given up on
  the unreachable host (the second ssh killed and reaped).  ``send_signal``/``terminate``
  return within :data:`SIGNAL_TIMEOUT` (5 s, or their ``timeout=``) and raise
  :class:`~sshwrap.errors.SSHConnectionError` when the signal could not be delivered.  A
  command over the kernel's argument limits raises
  :class:`~sshwrap.errors.CommandTooLongError` (a ``ValueError``) before ssh starts.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import io
import locale
import math
import os
import re
import secrets
import select
import selectors
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import IO, Any, TypedDict, Unpack, cast

from .core.argv import (
    OptionValue,
    SSHLog,
    build_ssh_argv,
    find_ssh,
    remote_command,
    remote_signal_script,
    ssh_settings_args,
)
from .errors import (
    CalledProcessError,
    CommandTooLongError,
    SSHConnectionError,
    SSHError,
    SSHStderr,
    TimeoutExpired,
    classify_ssh_failure,
    interpret_exit,
)
from .io.threads import start_daemon

__all__ = [
    "DEVNULL",
    "PIPE",
    "STDOUT",
    "CompletedProcess",
    "Invocation",
    "Popen",
    "PopenOptions",
    "call",
    "check_call",
    "check_output",
    "run",
]

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT

Command = str | Sequence[str]
"""A remote command: a ``str`` for the remote shell as it is, or a list of arguments."""

StdSpec = int | IO[Any] | None
"""Like subprocess: PIPE, DEVNULL, STDOUT, None (inherit), an fd, or a file object."""

STOP_MARGIN = 0.8
"""Seconds the remote stop of a timed-out (or interrupted) call may take: the margin by which
``run``/``call``/``check_*`` and ``aio.run`` may overrun their ``timeout``.

On a timeout the local ssh is killed at once and a second ssh signals the remote command
(SIGTERM; a watcher it leaves on the remote host sends SIGKILL ~2 s later if the command is
still there; see :func:`~sshwrap.core.argv.remote_signal_script`).  That ssh gets ``-o
ConnectTimeout=1`` and the call waits for it at most this long, then kills and reaps it (an
unreachable host: the remote command may then run on, and nothing local is left).  A fresh
connection to a healthy host takes ~0.3 s; over a ControlMaster far less.  Ctrl-C (and
``Popen.kill()``, which returns at once like ``subprocess``'s) does not wait: the
``KeyboardInterrupt`` propagates at once and the stop is left to a helper thread bounded the
same way; at interpreter exit such stops get the rest of their margin, then are killed:
nothing is orphaned.
"""

SIGNAL_TIMEOUT = 5.0
"""Default bound of ``Popen.send_signal``/``terminate`` (and the async ones): they return
within it, and raise :class:`~sshwrap.errors.SSHConnectionError` when the signal could not
be delivered (host unreachable, ssh failed)."""

_TEE_GRACE = 0.5  # after ssh exits, how long its stderr relay may take to reach EOF


class _RemoteStop:
    """One second ssh delivering a signal to a call's remote processes, with its deadline."""

    def __init__(self, host: str, argv: list[str], budget: float) -> None:
        self.host = host
        self.deadline = time.monotonic() + budget
        self.budget = budget
        self.returncode: int | None = None
        self.stderr = ""
        self.timed_out = False
        self._done = False
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # the user's ^C is not for it
        )
        with _PENDING_LOCK:
            _PENDING.add(self)

    def finish(self) -> int | None:
        """Wait until it exits or its deadline passes (then kill it); reap it.  Idempotent.

        Returns ssh's exit status, or None when it was killed at the deadline.
        """
        with self._lock:
            if not self._done:
                left = max(0.0, self.deadline - time.monotonic())
                try:
                    _, err = self.proc.communicate(timeout=left)
                except BaseException as e:
                    # over budget, or interrupted (a second ^C): killed and reaped either way
                    self.timed_out = True
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                    if not isinstance(e, subprocess.TimeoutExpired):
                        self.proc.wait()
                        self._done = True
                        with _PENDING_LOCK:
                            _PENDING.discard(self)
                        raise
                    _, err = self.proc.communicate()
                self.stderr = (err or b"").decode("utf-8", "replace")
                self.returncode = None if self.timed_out else self.proc.returncode
                self._done = True
            with _PENDING_LOCK:
                _PENDING.discard(self)
            return self.returncode

    def error(self) -> SSHError | None:
        """Why the signal was not delivered (after :meth:`finish`), or None if it was."""
        return stop_failure(self.host, self.returncode, self.stderr, self.budget)

    def in_background(self) -> None:
        """Let a helper thread (async signals blocked) finish it: at most the budget."""

        def run() -> None:
            self.finish()

        start_daemon(run, "sshwrap-remote-signal")


def stop_failure(
    host: str, returncode: int | None, stderr: str, budget: float
) -> SSHConnectionError | None:
    """The error of a remote-stop ssh that exited with ``returncode`` (None: it was killed
    when ``budget`` ran out), or None when it delivered its signal."""
    if returncode is None:
        return SSHConnectionError(
            host,
            f"could not deliver the signal: the remote stop did not finish within {budget:g} s",
            stderr,
        )
    if returncode:
        err = classify_ssh_failure(host, stderr, returncode)
        cls = type(err) if isinstance(err, SSHConnectionError) else SSHConnectionError
        return cls(host, f"could not deliver the signal: {err.message}", err.stderr, returncode)
    return None


_PENDING: set[_RemoteStop] = set()
_PENDING_LOCK = threading.Lock()
# a forked child's stops are its parent's: not to be waited for or killed at the child's exit
os.register_at_fork(after_in_child=_PENDING.clear)


@atexit.register
def _finish_pending_stops() -> None:
    """At interpreter exit: give every stop in flight the rest of its margin, then kill it."""
    with _PENDING_LOCK:
        pending = list(_PENDING)
    for stop in pending:
        with contextlib.suppress(Exception):
            stop.finish()


class SSHSettings(TypedDict, total=False):
    """ssh settings accepted by every call (see :func:`sshwrap.core.argv.ssh_settings_args`)."""

    config: str | os.PathLike[str] | None
    user: str | None
    port: int | str | None
    identity: str | os.PathLike[str] | None
    jump: str | None
    options: Mapping[str, OptionValue] | None
    ssh: str | None


class PopenOptions(SSHSettings, total=False):
    """The keyword arguments of :class:`Popen` besides host and command."""

    stdin: StdSpec
    stdout: StdSpec
    stderr: StdSpec
    bufsize: int
    text: bool | None
    encoding: str | None
    errors: str | None
    env: Mapping[str, str] | None
    cwd: str | os.PathLike[str] | None
    tty: bool
    size: tuple[int, int] | None


class Invocation:
    """One ssh call: its argv, its private log, and how to read how it ended.

    The core shared by :class:`Popen` and :mod:`sshwrap.aio` (one core, two faces).
    """

    def __init__(
        self,
        host: str,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        tty: bool = False,
        config: str | os.PathLike[str] | None = None,
        user: str | None = None,
        port: int | str | None = None,
        identity: str | os.PathLike[str] | None = None,
        jump: str | None = None,
        options: Mapping[str, OptionValue] | None = None,
        ssh: str | None = None,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError("host must be a non-empty string")
        self.host = host
        self.command = command
        self.tty = tty
        self.ssh = ssh or find_ssh()
        self.settings = ssh_settings_args(
            config=config, user=user, port=port, identity=identity, jump=jump, options=options
        )
        self.session_id = secrets.token_hex(8)
        remote = remote_command(command, env=env, cwd=cwd, session_id=self.session_id)
        self.log = SSHLog()
        try:
            self.argv = build_ssh_argv(
                self.ssh, host, remote, settings=self.settings, tty=tty, log_path=self.log.path
            )
        except BaseException:
            self.log.close()
            raise
        self.sent_signal = 0
        self.returncode: int | None = None
        self.ssh_returncode: int | None = None  # the local ssh's own exit status
        self.stopping = False  # a background stop of the remote command has been started
        self.error: SSHError | None = None
        self.messages = ""
        self.stderr = SSHStderr()  # what sshwrap saw of ssh's stderr (see SSHStderr)
        self._log_text = ""

    def finish(self, ssh_returncode: int) -> int:
        """Record ssh's exit status; set ``returncode``, ``error``, ``messages`` (once)."""
        if self.returncode is None:
            self.ssh_returncode = ssh_returncode
            log = self._log_text = self.log.read()
            self.log.close()
            info = interpret_exit(
                self.host, ssh_returncode, log, self.sent_signal, stderr=self.stderr.text()
            )
            self.returncode = info.returncode
            self.error = info.error
            self.messages = info.messages
            if info.local_signal and not self.stopping:
                # The local ssh was killed by a signal nobody sent through sshwrap (the
                # user's ^C reaches ssh too): without a terminal the remote command would run
                # on.  Hang it up, as a terminal would: SIGHUP (nohup'd commands survive).
                self.signal_remote(signal.SIGHUP, wait=False)
        return self.returncode

    def note_stderr(self, data: bytes | str | bytearray | None = None) -> None:
        """Record ssh's stderr seen after the fact (a PIPE read by ``communicate``; None: the
        relay has already recorded it).

        If the call already ended in an ssh failure, its error is re-read with it, so the
        message has what ssh printed before its log opened.
        """
        if data:
            self.stderr.feed(data)
        if self.error is not None and self.ssh_returncode is not None and self.stderr:
            self.error = classify_ssh_failure(
                self.host, self._log_text, self.ssh_returncode, stderr=self.stderr.text()
            )

    def signal_argv(
        self, sig: int, *, escalate: bool = False, budget: float = SIGNAL_TIMEOUT
    ) -> list[str]:
        """argv of the second ssh that delivers ``sig`` to this call's remote processes.

        It gets ``-o ConnectTimeout`` from ``budget`` (whole seconds, at least 1; before the
        user's settings, so it wins) and ``BatchMode=yes`` (it never prompts).
        """
        script = remote_signal_script(self.session_id, sig, escalate=escalate)
        connect = max(1, math.ceil(budget))
        settings = ["-o", f"ConnectTimeout={connect}", *self.settings, "-o", "BatchMode=yes"]
        return build_ssh_argv(self.ssh, self.host, script, settings=settings)

    def start_stop(self, sig: int, *, escalate: bool = False, budget: float) -> _RemoteStop:
        """Start the second ssh for ``sig`` (see :meth:`signal_argv`), bounded by ``budget``."""
        self.sent_signal = sig
        return _RemoteStop(
            self.host, self.signal_argv(sig, escalate=escalate, budget=budget), budget
        )

    def signal_remote(
        self,
        sig: int,
        *,
        escalate: bool = False,
        wait: bool = True,
        budget: float | None = None,
    ) -> SSHError | None:
        """Send ``sig`` to the remote command within ``budget`` seconds.

        ``wait``: block until delivered or the budget (default :data:`SIGNAL_TIMEOUT`) runs
        out and return why it failed (None: delivered).  Otherwise a helper thread finishes
        it within ``budget`` (default :data:`STOP_MARGIN`) and None is returned.
        """
        if budget is None:
            budget = SIGNAL_TIMEOUT if wait else STOP_MARGIN
        if not wait:
            self.stopping = True
        try:
            stop = self.start_stop(sig, escalate=escalate, budget=budget)
        except OSError as e:
            return SSHConnectionError(self.host, f"could not deliver the signal: {e}")
        if not wait:
            stop.in_background()
            return None
        stop.finish()
        return stop.error()

    def close(self) -> None:
        """Release the log file."""
        self.log.close()


def _write_to(
    target: StdSpec, data: bytes, stdout_target: StdSpec = None, default_fd: int = 2
) -> None:
    """Write ``data`` where a child's stream given as ``target`` would have gone.

    For ssh's messages (``target`` is the stderr argument; None means this process's stderr)
    and for tty output (``default_fd=1``).  PIPE is handled by the callers.
    """
    if not data or target in (PIPE, DEVNULL):
        return
    if target == STDOUT:
        _write_to(stdout_target if stdout_target != STDOUT else None, data, default_fd=1)
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


def _relay_stderr(fd: int, target: StdSpec, seen: SSHStderr) -> None:
    """Copy ssh's stderr from the pipe ``fd`` to where the caller's ``stderr`` goes, as it
    comes, keeping a bounded copy in ``seen`` (for the error message; see
    :class:`~sshwrap.errors.SSHStderr`).  Runs until EOF, then closes ``fd``."""
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                return
            if not data:
                return
            seen.feed(data)
            _write_to(target, data)
    finally:
        os.close(fd)


_QUIT_MESSAGE = re.compile(rb"(Connection to [^\r\n]{1,300} closed\.\r*\n)\Z")


class _PtyReader(io.RawIOBase):
    """The pty master as a raw stream: EIO (Linux's end of a pty) reads as EOF.

    It also drops ssh's own ``Connection to HOST closed.`` line, which ssh -tt writes into the
    terminal after the remote output when its log level is INFO or more (sshwrap needs DEBUG2).
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._eof = False
        self._pending = b""
        self._extra = b""

    def fileno(self) -> int:
        return self._fd

    def readable(self) -> bool:
        return True

    def _read_raw(self, n: int) -> bytes:
        while True:
            try:
                return os.read(self._fd, n)
            except BlockingIOError:
                # communicate() made the shared file description non-blocking: wait for data
                select.select([self._fd], [], [])
                continue
            except OSError as e:
                if e.errno == errno.EIO:
                    return b""
                raise

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = len(view)
        if want == 0:
            return 0
        if self._extra:
            data, self._extra = self._extra[:want], self._extra[want:]
            view[: len(data)] = data
            return len(data)
        if self._eof:
            return 0
        while True:
            data = self._read_raw(max(want, 65536))
            if not data:
                self._eof = True
                self._pending = b""  # ssh's closing message, at the very end: dropped
                return 0
            data = self._pending + data
            self._pending = b""
            m = _QUIT_MESSAGE.search(data)
            if m is not None:
                self._pending = data[m.start(1) :]
                data = data[: m.start(1)]
                if not data:
                    continue
            break
        data, self._extra = data[:want], data[want:]
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed and self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        super().close()


class _PtyWriter(io.RawIOBase):
    """Writes to the pty master, but only once ssh has put the terminal in raw mode.

    Before that, the local terminal is still cooked: it would echo the bytes back and eat
    ``^D``/``^C``/``^U``, so what the remote side received would depend on timing.  (ssh takes
    the remote terminal's modes from this cooked state, so sshwrap cannot simply start raw.)
    """

    def __init__(self, fd: int, ready: Callable[[float], bool]) -> None:
        super().__init__()
        self._fd = fd
        self._ready = ready
        self._raw = False

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if not self._raw:
            self._raw = self._ready(_RAW_WAIT)
        while True:
            try:
                return os.write(self._fd, data)
            except BlockingIOError:
                select.select([], [self._fd], [])

    def close(self) -> None:
        if not self.closed and self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        super().close()


_RAW_WAIT = 60.0  # how long a write waits for ssh to reach its session (and raw mode)


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Popen(subprocess.Popen[Any]):
    """A remote command in a local ``ssh`` process, with the :class:`subprocess.Popen` API.

    ``Popen(host, command, stdin=DEVNULL, stdout=None, stderr=None, text=..., env=..., cwd=...,
    tty=False, size=None, config=..., user=..., port=..., identity=..., jump=..., options=...)``

    - ``args`` is the command as given; ``ssh_args`` the full ssh argv; ``pid`` is the local
      ssh's pid; ``host`` the destination.
    - ``stdout`` can be read line by line as the remote writes it (nothing waits for exit).
    - ``wait()`` and ``communicate()`` raise :class:`~sshwrap.errors.SSHError` when ssh itself
      failed (``poll()`` never raises; it sets ``ssh_error``).  ``ssh_messages`` holds what ssh
      printed at its normal log level (also written where ``stderr`` goes, or appended to the
      stderr that ``communicate()`` returns when ``stderr=PIPE``).
    - ``send_signal(sig)``/``terminate()`` deliver the signal to the remote command (through a
      second ssh, waiting for it at most :data:`SIGNAL_TIMEOUT` or ``timeout=``; raising
      :class:`~sshwrap.errors.SSHConnectionError` when it could not be delivered); ``kill()``
      sends SIGKILL there (in the background, at most :data:`STOP_MARGIN`) and kills the local
      ssh at once.
    - ``stdin`` defaults to DEVNULL (see the module docs for why).
    - ``tty=True``: ``stdout`` reads the terminal (stdout and stderr merged), ``stdin`` (with
      ``stdin=PIPE``) writes to it, ``resize(rows, cols)`` changes its size.
    """

    def __init__(
        self,
        host: str,
        args: Command,
        *,
        stdin: StdSpec = DEVNULL,
        stdout: StdSpec = None,
        stderr: StdSpec = None,
        bufsize: int = -1,
        text: bool | None = None,
        encoding: str | None = None,
        errors: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        tty: bool = False,
        size: tuple[int, int] | None = None,
        config: str | os.PathLike[str] | None = None,
        user: str | None = None,
        port: int | str | None = None,
        identity: str | os.PathLike[str] | None = None,
        jump: str | None = None,
        options: Mapping[str, OptionValue] | None = None,
        ssh: str | None = None,
    ) -> None:
        self._call = Invocation(
            host,
            args,
            env=env,
            cwd=cwd,
            tty=tty,
            config=config,
            user=user,
            port=port,
            identity=identity,
            jump=jump,
            options=options,
            ssh=ssh,
        )
        self.host = host
        self.ssh_args = self._call.argv
        self.ssh_error: SSHError | None = None
        self.ssh_messages = ""
        self._tty = tty
        self._stdin_arg = stdin
        self._stdout_arg = stdout
        self._stderr_arg = stderr
        self._quiet = False
        self._killed_local = False
        self._master = -1  # the pty master (tty=True)
        self._pty_out: io.BufferedReader[Any] | None = None  # its reader
        self._deferring = False  # inside communicate(): wait() leaves the error to it
        self._tee: threading.Thread | None = None
        tee_w = -1
        try:
            if tty:
                self._start_tty(stdin, stdout, bufsize, text, encoding, errors, size)
            else:
                ssh_stderr: StdSpec = stderr
                if stderr is not None and not isinstance(stderr, int):
                    stderr.fileno()  # a file object without one fails here, as in subprocess
                if stderr not in (PIPE, STDOUT):
                    # ssh's stderr passes through sshwrap on its way to ``stderr``: ssh prints
                    # some failures there before its -E log opens (see _relay_stderr).
                    tee_r, tee_w = os.pipe()
                    ssh_stderr = tee_w
                super().__init__(
                    self._call.argv,
                    bufsize=bufsize,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=ssh_stderr,
                    text=text,
                    encoding=encoding,
                    errors=errors,
                )
                if tee_w >= 0:
                    os.close(tee_w)
                    tee_w = -1
                    self._tee = start_daemon(
                        lambda: _relay_stderr(tee_r, stderr, self._call.stderr), "sshwrap-stderr"
                    )
        except BaseException as e:
            if tee_w >= 0:
                os.close(tee_w)
                os.close(tee_r)
            self._call.close()
            if isinstance(e, OSError) and e.errno == errno.E2BIG:
                raise CommandTooLongError(
                    f"the system refused ssh's command line as too long ({e.strerror})",
                    limit=0,
                    size=sum(len(a) + 1 for a in self._call.argv),
                ) from e
            raise
        self.args = args

    def _start_tty(
        self,
        stdin: StdSpec,
        stdout: StdSpec,
        bufsize: int,
        text: bool | None,
        encoding: str | None,
        errors: str | None,
        size: tuple[int, int] | None,
    ) -> None:
        rows, cols = size or (24, 80)
        master, slave = os.openpty()
        try:
            _set_winsize(slave, rows, cols)
            # ssh gets the terminal as stdin/stdout/stderr; a new session so that the user's
            # ^C reaches only what sshwrap decides.
            super().__init__(
                self._call.argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.text_mode = bool(text or encoding or errors)
        self.encoding = encoding
        self.errors = errors
        raw = _PtyReader(master)
        self._master = master
        buffered = io.BufferedReader(raw, buffer_size=bufsize if bufsize > 1 else 65536)
        reader: IO[Any] = buffered
        writer: IO[Any] | None = None
        if stdin == PIPE:
            pty_writer = _PtyWriter(os.dup(master), self._ssh_in_raw_mode)
            writer = cast(IO[Any], pty_writer)
            if self.text_mode:
                writer = io.TextIOWrapper(
                    io.BufferedWriter(pty_writer),
                    encoding=encoding,
                    errors=errors,
                    write_through=True,
                )
        self._pty_out = buffered
        if self.text_mode:
            reader = io.TextIOWrapper(reader, encoding=encoding, errors=errors)
        # Like subprocess, ``stdout`` is there only with stdout=PIPE; otherwise communicate()
        # copies the terminal's output to where stdout goes (inherited: this stdout).
        self.stdout = reader if stdout == PIPE else None
        self.stdin = writer
        self.stderr = None

    def _is_raw(self) -> bool:
        try:
            lflag = termios.tcgetattr(self._master)[3]
        except termios.error:
            return True
        return not lflag & termios.ICANON

    def _ssh_in_raw_mode(self, timeout: float) -> bool:
        """Wait until ssh has put the local terminal in raw mode (or exited); True if raw."""
        deadline = time.monotonic() + timeout
        while not self._is_raw():
            if self.poll() is not None or time.monotonic() > deadline:
                return False
            # termios changes raise no event to wait on; this bounds the check rate.
            time.sleep(0.005)
        return True

    # -- exit status ------------------------------------------------------------------------
    def _finish(self) -> None:
        if self._call.returncode is not None or self.returncode is None:
            return
        if self._tee is not None:
            # ssh has exited: its stderr relay reaches EOF at once (unless something ssh
            # started still holds the pipe: then it goes on alone, to that EOF).
            self._tee.join(_TEE_GRACE)
            self._tee = None
        self.returncode = self._call.finish(self.returncode)
        self.ssh_error = self._call.error
        self.ssh_messages = self._call.messages
        if self._tty:
            target: StdSpec = PIPE if self._stdout_arg == PIPE else self._stdout_arg
        else:
            target = self._stderr_arg
            if target == STDOUT and self._stdout_arg == PIPE:
                target = PIPE
        if target != PIPE:
            _write_to(target, self.ssh_messages.encode(), self._stdout_arg)

    def _messages_as(self, sample: bytes | str) -> bytes | str:
        if isinstance(sample, bytes):
            return self.ssh_messages.encode()
        return self.ssh_messages.replace("\r\n", "\n")

    def poll(self) -> int | None:
        """The remote returncode if ssh has exited, else None; never raises SSHError."""
        if super().poll() is not None:
            self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for ssh to exit; return the remote returncode or raise SSHError."""
        try:
            raw = super().wait(timeout)
        except TimeoutExpired:
            raise
        except subprocess.TimeoutExpired:
            raise TimeoutExpired(self.args, timeout or 0.0, host=self.host) from None
        if self._deferring:
            return raw  # communicate() finishes once it has ssh's stderr
        self._finish()
        if self.ssh_error is not None and not self._quiet:
            raise self.ssh_error
        assert self.returncode is not None
        return self.returncode

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]:
        """Send ``input``, read stdout and stderr to EOF together, wait; like subprocess."""
        if self._tty:
            out, err = self._tty_communicate(input, timeout)
        else:
            self._deferring = True
            try:
                out, err = super().communicate(input, timeout)
            except TimeoutExpired as e:
                e.timeout = timeout or 0.0
                raise
            except subprocess.TimeoutExpired as e:
                raise TimeoutExpired(
                    self.args, timeout or 0.0, e.output, e.stderr, host=self.host
                ) from None
            finally:
                self._deferring = False
            if self._stderr_arg == PIPE:
                self._call.note_stderr(err)
            self._finish()
            self.ssh_error = self._call.error
            if self.ssh_error is not None and not self._quiet:
                raise self.ssh_error
        if self.ssh_messages:
            if self._tty or (self._stderr_arg == STDOUT and self._stdout_arg == PIPE):
                if out is not None:
                    out = out + self._messages_as(out)
            elif self._stderr_arg == PIPE and err is not None:
                err = err + self._messages_as(err)
        return out, err

    def _tty_communicate(self, input: Any, timeout: float | None) -> tuple[Any, None]:
        """communicate() through the terminal: input is typed, then ^D; output merged."""
        endtime = None if timeout is None else time.monotonic() + timeout
        data = b""
        if input:
            if self.stdin is None:
                raise ValueError("input needs stdin=PIPE")
            if isinstance(input, str):
                data = input.encode(self.encoding or "utf-8", self.errors or "strict")
            else:
                data = bytes(input)
            # End of input for the remote terminal: ^D at the start of a line.
            data += b"\x04" if data.endswith(b"\n") else b"\x04\x04"
        raw_reader = self._pty_out
        assert raw_reader is not None
        collect = self._stdout_arg == PIPE
        chunks: list[bytes] = []
        pending = memoryview(data)
        with selectors.DefaultSelector() as sel:
            sel.register(self._master, selectors.EVENT_READ)
            wfd = -1
            waiting_raw = bool(pending) and self.stdin is not None
            if waiting_raw:
                assert self.stdin is not None
                self.stdin.flush()
            while True:
                remaining = None if endtime is None else endtime - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutExpired(
                        self.args,
                        timeout or 0.0,
                        b"".join(chunks) if collect else None,
                        None,
                        host=self.host,
                    )
                if waiting_raw:
                    if self._is_raw() or self.poll() is not None:
                        waiting_raw = False
                        assert self.stdin is not None
                        wfd = self.stdin.fileno()
                        os.set_blocking(wfd, False)
                        sel.register(wfd, selectors.EVENT_WRITE)
                    else:
                        # no event for a termios change: re-check every 5 ms meanwhile
                        remaining = 0.005 if remaining is None else min(remaining, 0.005)
                for key, _events in sel.select(remaining):
                    if key.fd == wfd:
                        try:
                            n = os.write(wfd, pending[:4096])
                            pending = pending[n:]
                        except BlockingIOError:
                            pass
                        except OSError:
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(wfd)
                            wfd = -1
                        continue
                    chunk = raw_reader.read1(65536)
                    if chunk:
                        # ssh's own early words arrive through the terminal too
                        self._call.stderr.feed(chunk)
                        if collect:
                            chunks.append(chunk)
                        else:
                            _write_to(self._stdout_arg, chunk, default_fd=1)
                        continue
                    self._tty_wait(endtime, timeout, chunks)
                    if not collect:
                        return None, None
                    out = b"".join(chunks)
                    if not self.text_mode:
                        return out, None
                    enc = self.encoding or locale.getpreferredencoding(False)
                    text = out.decode(enc, self.errors or "strict")
                    return text.replace("\r\n", "\n").replace("\r", "\n"), None

    def _tty_wait(self, endtime: float | None, timeout: float | None, chunks: list[bytes]) -> None:
        remaining = None if endtime is None else max(0.0, endtime - time.monotonic())
        try:
            self.wait(remaining)
        except TimeoutExpired as e:
            e.output = b"".join(chunks) if self._stdout_arg == PIPE else None
            e.timeout = timeout or 0.0
            raise

    # -- signals ----------------------------------------------------------------------------
    def send_signal(self, sig: int, *, timeout: float = SIGNAL_TIMEOUT) -> None:
        """Deliver ``sig`` to the remote command (through a second ssh; waits for it).

        Returns within ``timeout`` (default :data:`SIGNAL_TIMEOUT`, 5 s); raises
        :class:`~sshwrap.errors.SSHConnectionError` with ssh's words when the signal could not
        be delivered (host unreachable or not answering in time, ssh failed).
        """
        if self.poll() is not None:
            return
        error = self._call.signal_remote(sig, wait=True, budget=timeout)
        if error is not None and self.poll() is None:
            raise error

    def terminate(self, *, timeout: float = SIGNAL_TIMEOUT) -> None:
        """SIGTERM to the remote command (the returncode will say -15 when it dies of it).

        Bounded and raising like :meth:`send_signal`.
        """
        self.send_signal(signal.SIGTERM, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL to the remote command (in the background) and to the local ssh, at once."""
        self._abandon(signal.SIGKILL, escalate=False)

    def _abandon(
        self, sig: int = signal.SIGTERM, *, escalate: bool = True, wait: bool = False
    ) -> None:
        """Stop the remote command and kill the local ssh now.

        The remote stop gets :data:`STOP_MARGIN`: ``wait`` waits for it (then kills it),
        otherwise a helper thread does.
        """
        if self.poll() is not None:
            return
        self._call.stopping = True
        try:
            stop = self._call.start_stop(sig, escalate=escalate, budget=STOP_MARGIN)
        except OSError:
            stop = None
        self._killed_local = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if stop is not None:
            if wait:
                stop.finish()
            else:
                stop.in_background()

    def resize(self, rows: int, cols: int) -> None:
        """Change the terminal size (``tty=True`` only); ssh forwards it to the remote pty."""
        if not self._tty:
            raise ValueError("resize() needs tty=True")
        _set_winsize(self._master, rows, cols)
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGWINCH)

    # -- lifetime ---------------------------------------------------------------------------
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._quiet = True
        try:
            super().__exit__(exc_type, value, traceback)
        finally:
            self._quiet = False
            self._call.close()
            if self._pty_out is not None:
                self._pty_out.close()

    def __del__(self, *args: Any, **kwargs: Any) -> None:
        call = getattr(self, "_call", None)
        if call is not None and self.returncode is not None:
            call.close()
        with contextlib.suppress(AttributeError):
            super().__del__(*args, **kwargs)


class CompletedProcess(subprocess.CompletedProcess[Any]):
    """What :func:`run` returns: ``args``, ``returncode``, ``stdout``, ``stderr``, ``host``."""

    def __init__(
        self,
        args: Command,
        returncode: int,
        stdout: Any = None,
        stderr: Any = None,
        *,
        host: str = "",
    ) -> None:
        super().__init__(args, returncode, stdout, stderr)
        self.host = host

    def __repr__(self) -> str:
        parts = [f"host={self.host!r}", f"args={self.args!r}", f"returncode={self.returncode!r}"]
        if self.stdout is not None:
            parts.append(f"stdout={self.stdout!r}")
        if self.stderr is not None:
            parts.append(f"stderr={self.stderr!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def check_returncode(self) -> None:
        """Raise :class:`~sshwrap.errors.CalledProcessError` if the returncode is non-zero."""
        if self.returncode:
            raise CalledProcessError(
                self.returncode, self.args, self.stdout, self.stderr, host=self.host
            )


def run(
    host: str,
    args: Command,
    *,
    input: Any = None,
    capture_output: bool = False,
    timeout: float | None = None,
    check: bool = False,
    **kwargs: Unpack[PopenOptions],
) -> CompletedProcess:
    """Run ``args`` on ``host`` and wait; like :func:`subprocess.run`.

    Raises :class:`~sshwrap.errors.SSHError` (a subclass, its message ssh's own last words)
    when ssh failed, :class:`~sshwrap.errors.TimeoutExpired` once ``timeout`` has passed and
    the remote command is stopped (at most :data:`STOP_MARGIN` later),
    :class:`~sshwrap.errors.CalledProcessError` with ``check=True`` and a non-zero returncode.
    """
    if input is not None:
        if kwargs.get("stdin", DEVNULL) not in (None, DEVNULL, PIPE):
            raise ValueError("stdin and input arguments may not both be used.")
        kwargs["stdin"] = PIPE
    if capture_output:
        if kwargs.get("stdout") is not None or kwargs.get("stderr") is not None:
            raise ValueError("stdout and stderr arguments may not be used with capture_output.")
        kwargs["stdout"] = PIPE
        kwargs["stderr"] = PIPE
    with Popen(host, args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except TimeoutExpired:
            process._abandon(wait=True)
            process._quiet = True
            process.wait()
            raise
        except SSHError:
            raise
        except BaseException:
            process._abandon()  # ^C: at once; the stop finishes in the background
            raise
        retcode = process.poll()
        assert retcode is not None
    if check and retcode:
        raise CalledProcessError(retcode, args, stdout, stderr, host=host)
    return CompletedProcess(args, retcode, stdout, stderr, host=host)


def call(
    host: str, args: Command, *, timeout: float | None = None, **kwargs: Unpack[PopenOptions]
) -> int:
    """Run ``args`` on ``host`` and return its returncode; like :func:`subprocess.call`."""
    with Popen(host, args, **kwargs) as p:
        try:
            return p.wait(timeout=timeout)
        except TimeoutExpired:
            p._abandon(wait=True)
            p._quiet = True
            p.wait()
            raise
        except SSHError:
            raise
        except BaseException:
            p._abandon()  # ^C: at once; the stop finishes in the background
            raise


def check_call(
    host: str, args: Command, *, timeout: float | None = None, **kwargs: Unpack[PopenOptions]
) -> int:
    """Like :func:`call` but raise CalledProcessError on a non-zero returncode."""
    retcode = call(host, args, timeout=timeout, **kwargs)
    if retcode:
        raise CalledProcessError(retcode, args, host=host)
    return 0


def check_output(
    host: str,
    args: Command,
    *,
    input: Any = None,
    timeout: float | None = None,
    **kwargs: Unpack[PopenOptions],
) -> Any:
    """Run ``args`` on ``host`` and return its stdout; CalledProcessError if non-zero."""
    if "stdout" in kwargs:
        raise ValueError("stdout argument not allowed, it will be overridden.")
    kwargs["stdout"] = PIPE
    return run(host, args, input=input, timeout=timeout, check=True, **kwargs).stdout
