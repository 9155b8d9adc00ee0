"""``sshwrap.connect()``: an OpenSSH ControlMaster that sshwrap owns, and commands over it.

Design
------
**The master.**  ``connect()`` starts ``ssh -M -N -o ControlPersist=yes -o ControlPath=P`` with
its stdin and stdout on ``/dev/null`` and its log in its own file (``-E``), so it holds no pipe
of ours (a ControlPersist master that inherits a pipe keeps it open forever).  ssh authenticates
(prompts answered by ``sshwrap.io.prompts`` when ``password``/``passphrase``/``on_prompt`` are
given), then forks into the background and the first process exits: 0 means the master is up.
``P`` lives in a fresh private directory (mode 0700) and must fit ``sun_path`` (104 bytes, the
smallest, macOS's) *including* the ``.XXXXXXXXXXXXXXXX`` suffix OpenSSH appends while binding;
a too-long temporary directory falls back to ``/tmp``.  An alive check (``ssh -O check``) gives
the master's pid before anything is used.  ``close()`` sends ``-O exit`` (``MUX_C_TERMINATE``),
waits for that pid to go and removes the directory; so does dropping the Connection or
leaving the program with it open (``weakref.finalize``), since a ControlPersist master would
otherwise outlive us.

**Commands.**  sshwrap speaks OpenSSH's mux protocol itself (``sshwrap.io.mux_control``) and asks
for *proxy mode* (``MUX_C_PROXY``, OpenSSH >= 7.4): the control socket then carries the SSH
connection protocol (RFC 4254) in the clear while the master keeps transport, crypto and keys.
``sshwrap.io.pump`` opens one ``session`` channel per command on one shared socket, with one
I/O thread for all of them.  So a command costs no new process, no fd passing and no new
authentication: one channel open (done ahead: a spare channel is kept open), one ``exec``.
And it knows exactly how the command ended: ``exit-status``, or ``exit-signal`` with the
signal's name (``returncode == -signum``), which neither ``ssh -S`` nor passenger mode can
report.  ``Popen.send_signal``/``terminate``/``kill``
send ``signal`` requests, which sshd (>= 7.9) delivers with ``killpg`` to the command's session,
and a timeout sends TERM, then KILL.  We chose proxy over passenger mode
(``MUX_C_NEW_SESSION`` with stdio fds passed over the socket) because passenger mode reports an
exit value only (255 for a signal death) and cannot signal the remote command.

**Fallback.**  A master that does not speak mux protocol 4 or refuses proxy mode (older
OpenSSH, ``ControlMaster ask``) is used through ``ssh -S P`` subprocesses
(``sshwrap.process``), with that module's semantics; ``Connection(..., proxy=False)`` forces it.

**A dead master** (killed, network gone, ``ServerAliveInterval`` expired) is noticed when its
socket closes: the next call starts a new master, with the same settings and prompt answers
(``reconnect=True``, the default), or raises ``SSHConnectionError`` (``reconnect=False``).
The restart is bounded by the call's ``timeout`` (and ``connect_timeout``): ssh gets a
``ConnectTimeout`` derived from what is left and is killed and reaped when the bound runs out,
on Ctrl-C, or when an asyncio caller is cancelled.  Commands running when it died end with
``CommandLostError`` (an ``SSHConnectionError`` carrying the output that did arrive; ``run``)
or returncode 255 with ``Popen.ssh_error`` set, unless both their exit status and the end of
their output had arrived: never a returncode for a command whose end was not seen.  A
command that cannot have started (the channel was not open yet) is tried once more on the
new master.  The new master is asked for the same forwards (same ports; a remote
forward of port 0 gets the server's new choice in ``Forward.port``; one that cannot be
restored becomes inactive).

**Threads.**  Every method may be called from several threads at once; commands run
concurrently over the one master.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from .core.argv import OptionValue, check_destination, find_ssh, remote_command, ssh_settings_args
from .core.channel_run import KILL_AFTER, ChannelPopen, run_channel
from .errors import SSHConnectionError, SSHError, classify_ssh_failure
from .io.mux_control import (
    MUX_FWD_DYNAMIC,
    MUX_FWD_LOCAL,
    MUX_FWD_REMOTE,
    MuxControl,
    MuxError,
    MuxRefused,
    MuxUnsupported,
)
from .io.pump import ChannelError, ChannelLost, ProxyCore, check_exec_size

if TYPE_CHECKING:
    from .io.prompts import OnPrompt
    from .spawn import Spawned
    from .terminal.relay import RelayResult
    from .transfer import Abort, ProgressCallback

__all__ = ["SUN_PATH_MAX", "Connection", "Forward", "ForwardError", "connect"]

SUN_PATH_MAX = 104
"""Longest unix socket path sshwrap accepts (macOS's ``sun_path``; Linux allows 108)."""
_BIND_SUFFIX = 17  # ".%16s" that OpenSSH appends to ControlPath while binding
_STOP_WAIT = 2.0  # -O exit, then SIGKILL: bounded, also in the finalizer at interpreter exit
_MUX_TIMEOUT = 5.0  # longest wait for the (local) master's answer on its socket

Stream = int | IO[Any] | None


@contextlib.contextmanager
def channel_errors(host: str, last_attempt: bool) -> Iterator[None]:
    """Map channel failures to sshwrap's errors around one attempt on the master.

    ``ChannelLost`` (the master died before the channel opened: nothing ran) is swallowed so
    that the caller can start the master again and retry, except on the ``last_attempt``,
    where it becomes ``SSHConnectionError``; any other ``ChannelError`` is an ``SSHError``.
    """
    try:
        yield
    except ChannelLost:
        if last_attempt:
            raise SSHConnectionError(host, "the control master is gone") from None
    except ChannelError as e:
        raise SSHError(host, str(e)) from None


class ForwardError(SSHError):
    """A port forward could not be set up or cancelled (the master's or the server's reason)."""


def _socket_dir() -> str:
    """A new private (0700) directory whose ``m`` socket path fits ``sun_path``."""
    candidates = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        candidates.append(runtime)
    candidates += [tempfile.gettempdir(), "/tmp"]
    for base in candidates:
        # mkdtemp adds 8 characters to the prefix: check before creating anything.
        probe = os.path.join(base, "sshwrap-" + "x" * 8, "m")
        if len(os.fsencode(probe)) + _BIND_SUFFIX > SUN_PATH_MAX:
            continue
        with contextlib.suppress(OSError):
            d = tempfile.mkdtemp(prefix="sshwrap-", dir=base)
            os.chmod(d, 0o700)
            return d
    raise OSError("no temporary directory short enough for a control socket (sun_path)")


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


_LOCAL_FLOOR = 0.5  # a step with the local master (or ssh -G) gets at least this much


def _bounded(limit: float, deadline: float | None) -> float:
    """``limit`` seconds for a local step (the master's socket, ``ssh -G``), cut to what is
    left before ``deadline`` but not below ``_LOCAL_FLOOR``: they take milliseconds, and one
    cut short would leave a started master unused or its session environment unread."""
    left = _remaining(deadline)
    return limit if left is None else min(limit, max(_LOCAL_FLOOR, left))


def _time_left(deadline: float | None) -> float | None:
    """A timeout for what is left before ``deadline`` (None: no deadline)."""
    left = _remaining(deadline)
    return None if left is None else max(0.01, left)


def _start_deadline(deadline: float | None, connect_timeout: float | None) -> float | None:
    """When a (re)start of the master must be done: the call's deadline, or sooner with
    ``connect_timeout``."""
    if connect_timeout is None:
        return deadline
    t = time.monotonic() + connect_timeout
    return t if deadline is None else min(t, deadline)


def _stop_master(control_path: str, pid: int, directory: str | None) -> None:
    """``-O exit``, wait for the master's pid to go (SIGKILL after 2 s), remove its dir.

    Bounded (about 4 s at most: a master that does not answer on its socket within 2 s is
    killed), so it may run from a finalizer at interpreter exit."""
    with contextlib.suppress(MuxError), MuxControl(control_path, timeout=_STOP_WAIT) as m:
        m.terminate()
    if pid:
        deadline = time.monotonic() + _STOP_WAIT
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def _processes_with_arg(arg: str) -> list[int]:
    """Pids of this user's processes that have ``arg`` as one of their arguments."""
    want = arg.encode()
    uid = os.getuid()
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if want in args:
                found.append(int(entry))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        return st[st.rindex(b")") + 2 : st.rindex(b")") + 3] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class Forward:
    """A port forward over a Connection's master: ``port`` is the listening port (the local
    one for ``forward_local``/``forward_dynamic``, the server's for ``forward_remote``; the one
    picked when 0 was asked for).  ``int(fwd)`` is the port too.

    ``cancel()`` removes it (``ssh -O cancel``); as a context manager it cancels on exit.
    """

    def __init__(
        self,
        port: int,
        conn: Connection,
        kind: str,
        spec: tuple[int, str, int, str, int],
    ) -> None:
        self.port = port
        self.kind = kind
        self._conn: Connection | None = conn
        self._spec = spec
        self.listen_host = spec[1]
        self.connect_host = spec[3]
        self.connect_port = spec[4]

    def __int__(self) -> int:
        return self.port

    def __index__(self) -> int:
        return self.port

    @property
    def active(self) -> bool:
        """False once cancelled."""
        return self._conn is not None

    def cancel(self) -> None:
        """Remove the forward (idempotent; a no-op when the master is gone)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn._cancel_forward(self, self._spec)

    def __enter__(self) -> Forward:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()

    def __repr__(self) -> str:
        target = "socks" if self.kind == "dynamic" else f"{self.connect_host}:{self.connect_port}"
        return f"<Forward {self.kind} {self.listen_host}:{self.port} -> {target}>"


class Connection:
    """An OpenSSH ControlMaster owned by sshwrap, and commands, forwards and files over it.

    Create it with ``sshwrap.connect(...)`` (started) or ``Connection(...)`` + ``open()`` or a
    ``with``.  See the module docstring for the design.  Settings are those of
    ``sshwrap.run``: ``config`` (``-F``), ``user``, ``port``, ``identity``, ``jump``,
    ``options`` (each ``-o Key=Value``), ``ssh`` (the client binary); ``password``,
    ``passphrase`` and ``on_prompt`` answer ssh's prompts (``sshwrap.io.prompts``);
    ``start_timeout`` bounds the master's start (connection and authentication: the ssh
    that starts it is killed and reaped when it runs out, ``SSHConnectionError``);
    ``connect_timeout`` is the same bound under run_many's name (the smaller of the two
    applies); the bound, rounded up to whole seconds, is also given to ssh as
    ``ConnectTimeout`` unless ``options`` set one.  ``reconnect`` restarts a master that died;
    ``proxy=False`` runs commands as ``ssh -S`` subprocesses instead of mux proxy channels.

    **Bounds.**  A command's ``timeout`` covers the whole call, including restarting a dead
    master: the restart gets what is left of the timeout (ssh's ``ConnectTimeout`` derived
    from it, the ssh killed and reaped when it runs out) and a master that is not back in
    time raises ``SSHConnectionError`` (the command never started; a call waiting for another
    thread's restart likewise).  Ctrl-C and asyncio cancellation stop a restart at once (the
    starting ssh is killed and reaped).  The margin is documented on ``run``.
    """

    def __init__(
        self,
        destination: str,
        *,
        config: str | os.PathLike[str] | None = None,
        user: str | None = None,
        port: int | str | None = None,
        identity: str | os.PathLike[str] | None = None,
        jump: str | None = None,
        options: Mapping[str, OptionValue] | None = None,
        password: str | None = None,
        passphrase: str | None = None,
        on_prompt: OnPrompt | None = None,
        start_timeout: float | None = 60.0,
        reconnect: bool = True,
        proxy: bool = True,
        ssh: str | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        check_destination(destination)  # ValueError for what ssh would take as an option
        self.destination = destination
        self.host = destination
        self._settings = dict(
            config=config, user=user, port=port, identity=identity, jump=jump, options=options
        )
        self._settings_args = ssh_settings_args(
            config=config, user=user, port=port, identity=identity, jump=jump, options=options
        )
        self._password = password
        self._passphrase = passphrase
        self._on_prompt = on_prompt
        if connect_timeout is not None:
            start_timeout = (
                connect_timeout if start_timeout is None else min(start_timeout, connect_timeout)
            )
        self.start_timeout = start_timeout
        self._user_connect_timeout = any(k.lower() == "connecttimeout" for k in (options or {}))
        # The ssh starting a master now, and the abort flag of the call that started it.
        self._starting: tuple[subprocess.Popen[bytes], threading.Event | None] | None = None
        self.reconnect = reconnect
        self._want_proxy = proxy
        self._ssh = ssh
        self._lock = threading.RLock()
        self._dir: str | None = None
        self.control_path = ""
        self.master_pid = 0
        self._core: ProxyCore | None = None
        self._proxy = False
        self._opened = False
        self._closed = False
        self._forwards: list[Forward] = []
        self._finalizer: weakref.finalize[[str, int, str | None], Connection] | None = None
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> Connection:
        """Start the master (if not started yet); returns self."""
        with self._lock:
            self._open_locked(None, None)
        return self

    def _open_locked(self, deadline: float | None, abort: threading.Event | None) -> None:
        if self._closed:
            raise ValueError("the Connection is closed")
        if not self._opened:
            self._start_master(deadline, abort)
            self._opened = True

    def __enter__(self) -> Connection:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def log_path(self) -> str:
        """The master's own log (ssh ``-E``)."""
        return os.path.join(self._dir, "log") if self._dir else ""

    def _start_limit(self, deadline: float | None) -> float | None:
        """Seconds the master's start may take: ``start_timeout`` cut to the caller's bound."""
        left = _remaining(deadline)
        if left is None:
            return self.start_timeout
        left = max(0.0, left)
        return left if self.start_timeout is None else min(self.start_timeout, left)

    def _late(self, limit: float | None) -> SSHConnectionError:
        return SSHConnectionError(
            self.host,
            f"the control master did not connect within {limit:g} s"
            if limit is not None
            else "the control master did not connect",
            self._read_log(),
        )

    def _abort_start(self, abort: threading.Event) -> None:
        """Cancel the call that owns ``abort``: kill the ssh starting a master for it."""
        abort.set()
        starting = self._starting
        if starting is not None and starting[1] is abort:
            with contextlib.suppress(OSError):
                starting[0].kill()

    def _kill_forked_master(self) -> None:
        """After killing a starting ssh: a master it had already forked is stopped too.

        The master is asked for its pid; one that does not answer is found by its
        ``ControlPath=`` argument (a path in this Connection's private directory, so no
        process but the one this Connection started carries it)."""
        pid = 0
        path = self.control_path
        with contextlib.suppress(MuxError, OSError), MuxControl(path, timeout=0.5) as m:
            pid = m.alive_check()
        pids = [pid] if pid else _processes_with_arg(f"ControlPath={self.control_path}")
        for p in pids:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)

    def _start_master(
        self, deadline: float | None = None, abort: threading.Event | None = None
    ) -> None:
        limit = self._start_limit(deadline)
        if limit is not None and limit <= 0:
            raise self._late(0.0)
        if self._dir is None or not os.path.isdir(self._dir):
            self._dir = _socket_dir()
        d = self._dir
        self.control_path = os.path.join(d, "m")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)  # a dead master's socket: ssh would not replace it
        log = os.path.join(d, "log")
        for name in (log, self._err_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        prompts = None
        prompt_opts: list[str] = []
        if self._password is not None or self._passphrase is not None or self._on_prompt:
            from .io.prompts import PromptServer

            prompts = PromptServer(
                password=self._password, passphrase=self._passphrase, on_prompt=self._on_prompt
            )
            prompts.start()
            prompt_opts = prompts.ssh_options()
        argv = [
            self._ssh or find_ssh(),
            "-M",
            "-N",
            "-o",
            "ControlPersist=yes",
            "-o",
            f"ControlPath={self.control_path}",
            "-E",
            log,
            *prompt_opts,
            *self._settings_args,
            *(
                ["-o", f"ConnectTimeout={max(1, math.ceil(limit))}"]
                if limit is not None and not self._user_connect_timeout
                else []
            ),
            "--",
            self.destination,
        ]
        try:
            env = prompts.env() if prompts is not None else None
            # ssh's stderr apart from its -E log: what it prints before the log opens (a bad
            # option, port or value) is only there.
            with open(self._err_path, "ab") as errf:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errf,
                    env=env,
                )
            self._starting = (proc, abort)
            try:
                if abort is not None and abort.is_set():
                    proc.kill()
                rc = proc.wait(limit)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self._kill_forked_master()
                raise self._late(limit) from None
            except BaseException:
                proc.kill()
                proc.wait()
                self._kill_forked_master()
                raise
            finally:
                self._starting = None
            if rc != 0 and abort is not None and abort.is_set():
                self._kill_forked_master()
                raise SSHConnectionError(self.host, "cancelled while starting the master")
            if rc != 0:
                text, err = self._read_log(), self._read_err()
                if prompts is not None:
                    prompts.raise_for_failure(rc, text, self.host, stderr=err)
                raise classify_ssh_failure(self.host, text, rc, stderr=err)
        except BaseException:
            if not self._opened:
                self._remove_dir()
            raise
        finally:
            if prompts is not None:
                prompts.close()
        try:
            with MuxControl(self.control_path, timeout=_bounded(_MUX_TIMEOUT, deadline)) as m:
                self.master_pid = m.alive_check()
            # A Connection dropped without close() (or still open at exit) stops its master:
            # a ControlPersist master would otherwise outlive the program.
            if self._finalizer is not None:
                self._finalizer.detach()
            self._finalizer = weakref.finalize(
                self, _stop_master, self.control_path, self.master_pid, self._dir
            )
        except MuxError as e:
            self._kill_forked_master()
            if not self._opened:
                self._remove_dir()
            raise SSHConnectionError(
                self.host, f"the master started but does not answer: {e}", self._read_log()
            ) from None
        self._core = None
        self._proxy = False
        if self._want_proxy:
            self._open_proxy(deadline)

    def _open_proxy(self, deadline: float | None = None) -> None:
        try:
            with MuxControl(self.control_path, timeout=_bounded(_MUX_TIMEOUT, deadline)) as m:
                sock = m.enter_proxy()
        except MuxUnsupported:
            self._proxy = False
            self._core = None
            return
        except MuxError as e:
            raise SSHConnectionError(self.host, str(e), self._read_log()) from None
        self._core = ProxyCore(sock)
        self._core.session_env = self._config_env(deadline)
        self._proxy = True

    def _config_env(self, deadline: float | None = None) -> dict[str, str]:
        """What ssh itself would send as ``env`` for a session: ``SendEnv`` matches from our
        environment, then ``SetEnv`` values, as ``ssh -G`` resolves them from the config."""
        try:
            out = subprocess.run(
                [self._ssh or find_ssh(), "-G", *self._settings_args, "--", self.destination],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_bounded(30.0, deadline),
            )
        except (OSError, subprocess.SubprocessError):
            return {}
        send: list[str] = []
        env: dict[str, str] = {}
        for line in out.stdout.decode(errors="replace").splitlines():
            key, _, value = line.partition(" ")
            if key == "sendenv":
                send.append(value)
            elif key == "setenv":
                name, eq, val = value.partition("=")
                if eq:
                    env[name] = val
        sent = {
            k: v
            for k, v in os.environ.items()
            if any(fnmatch.fnmatchcase(k, pattern) for pattern in send)
        }
        return {**sent, **env}

    @property
    def _err_path(self) -> str:
        return os.path.join(self._dir, "err") if self._dir else ""

    def _read_log(self) -> str:
        """The master's ``-E`` log as ssh wrote it (CR LF ends each message: kept)."""
        return self._read_text(self.log_path)

    def _read_err(self) -> str:
        """What the master's ssh wrote on its stderr (before its log opened)."""
        return self._read_text(self._err_path)

    @staticmethod
    def _read_text(path: str) -> str:
        try:
            with open(path, errors="replace", newline="") as f:
                return f.read()
        except OSError:
            return ""

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def close(self) -> None:
        """Stop the master (``-O exit``), wait for it to go, remove the socket directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            core, self._core = self._core, None
            if core is not None:
                core.close()
            if self._finalizer is not None:
                self._finalizer()  # -O exit, wait for the master, remove the directory
                self._finalizer = None
            self._forwards.clear()
            self._remove_dir()

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    @property
    def alive(self) -> bool:
        """True if the master answers an alive check now (``ssh -O check``, 5 s at most)."""
        with self._lock:
            if not self._opened or self._closed:
                return False
        return self._answers(None)

    def _answers(self, deadline: float | None) -> bool:
        try:
            with MuxControl(self.control_path, timeout=_bounded(_MUX_TIMEOUT, deadline)) as m:
                m.alive_check()
        except MuxError:
            return False
        return True

    @property
    def uses_proxy(self) -> bool:
        """True when commands run on channels over the mux proxy (else ``ssh -S``)."""
        self._ensure()
        return self._proxy

    def _acquire(self, deadline: float | None, abort: threading.Event | None) -> None:
        """Take the lock, giving up when ``deadline`` passes (``SSHConnectionError``: another
        call is (re)starting the master and it is not up in time) or ``abort`` is set."""
        while True:
            if abort is not None and abort.is_set():
                raise SSHConnectionError(self.host, "cancelled while waiting for the master")
            left = _remaining(deadline)
            if left is not None and left <= 0:
                raise SSHConnectionError(
                    self.host, "the control master was not (re)started within the timeout"
                )
            if abort is not None:
                step = 0.05 if left is None else min(0.05, left)  # polls the abort flag
            else:
                step = -1 if left is None else left
            if self._lock.acquire(timeout=step):
                return

    def _ensure(
        self, deadline: float | None = None, abort: threading.Event | None = None
    ) -> ProxyCore | None:
        """The proxy core to use (None: the ``ssh -S`` fallback); restarts a dead master.

        ``deadline`` (``time.monotonic()``) bounds everything, the restart included;
        ``abort`` (set by ``_abort_start``) stops it early."""
        self._acquire(deadline, abort)
        try:
            return self._ensure_locked(deadline, abort)
        finally:
            self._lock.release()

    def _ensure_locked(
        self, deadline: float | None, abort: threading.Event | None
    ) -> ProxyCore | None:
        if self._closed:
            raise ValueError("the Connection is closed")
        if not self._opened:
            self._open_locked(deadline, abort)
        core = self._core
        if core is not None and core.alive:
            return core
        if not self._proxy and self._answers(deadline):
            return None
        if core is not None and self._answers(deadline):
            self._open_proxy(deadline)  # the master lives: only our socket ended
            return self._core
        if not self.reconnect:
            raise SSHConnectionError(
                self.host,
                "the control master is gone (reconnect=False)",
                self._read_log(),
            )
        if core is not None:
            core.close(_bounded(5.0, deadline))
        self._core = None
        old = self.master_pid
        if old and _pid_alive(old):
            with contextlib.suppress(ProcessLookupError):
                os.kill(old, signal.SIGTERM)
        self.restarts += 1
        self._start_master(deadline, abort)
        self._restore_forwards(deadline)
        return self._core

    def _restore_forwards(self, deadline: float | None = None) -> None:
        """Ask the new master for the forwards the old one had (lock held)."""
        kept: list[Forward] = []
        for fwd in self._forwards:
            try:
                with MuxControl(self.control_path, timeout=_bounded(10.0, deadline)) as m:
                    got = m.open_forward(*fwd._spec)
            except MuxError:
                fwd._conn = None  # its port is taken now, or the server refuses: gone
                continue
            if got is not None:
                fwd.port = got  # a remote forward of port 0: the server's new choice
            kept.append(fwd)
        self._forwards = kept

    def _fallback_kwargs(self) -> dict[str, Any]:
        opts: dict[str, OptionValue] = {
            "ControlPath": self.control_path,
            "ControlMaster": "no",
        }
        base = self._settings.get("options")
        if isinstance(base, Mapping):
            for k, v in base.items():
                if k.lower() not in ("controlpath", "controlmaster"):
                    opts.setdefault(k, v)
        kw = {k: v for k, v in self._settings.items() if k != "options" and v is not None}
        kw["options"] = opts
        if self._ssh is not None:
            kw["ssh"] = self._ssh
        return kw

    # -- commands ----------------------------------------------------------------------
    def run(
        self,
        args: str | Sequence[str],
        *,
        input: bytes | str | None = None,
        stdin: Stream = subprocess.DEVNULL,
        stdout: Stream = None,
        stderr: Stream = None,
        capture_output: bool = False,
        timeout: float | None = None,
        check: bool = False,
        text: bool | None = None,
        encoding: str | None = None,
        errors: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        tty: bool = False,
        size: tuple[int, int] | None = None,
        kill_after: float = KILL_AFTER,
        connect_timeout: float | None = None,
    ) -> Any:
        """Run a command over the master and wait for it, like ``sshwrap.run``.

        Returns a ``CompletedProcess`` (with ``host``).  ``returncode`` is the remote exit
        status, or ``-signum`` if a signal killed the command.  A timeout sends TERM, then
        KILL after ``kill_after`` seconds, then closes the channel, and raises
        ``TimeoutExpired`` with the output so far.  ``timeout`` bounds the whole call: a
        dead master's restart comes out of it (``SSHConnectionError`` when the master is not
        back in time), and so does the stop; the call returns within ``timeout + kill_after +
        0.5`` seconds (1 s past the timeout with the default ``kill_after``), even when the
        host or the session is frozen (the remote command may then outlive the call).
        A connection lost before the command's exit status and the end of its output
        arrived raises ``CommandLostError`` (an ``SSHConnectionError``; ``stdout`` and
        ``command_stderr`` hold what came), never a returncode.  A command longer than
        ``sshwrap.io.pump.MAX_COMMAND`` bytes raises ``ValueError`` before anything is sent.
        ``connect_timeout`` bounds restarting a dead master (as ``run_many``'s does).
        stdin defaults to DEVNULL, as in ``sshwrap.run``.  ``tty=True`` asks for a remote
        terminal of ``size=(rows, cols)``: output merged on stdout, CR LF line ends.
        """
        from .process import CompletedProcess

        deadline = None if timeout is None else time.monotonic() + timeout
        start_deadline = _start_deadline(deadline, connect_timeout)
        command = remote_command(args, env=env, cwd=cwd)
        check_exec_size(command)
        for attempt in (0, 1):
            core = self._ensure(start_deadline)
            if core is None:
                from .process import run as process_run

                return process_run(
                    self.destination,
                    args,
                    input=input,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    capture_output=capture_output,
                    timeout=_time_left(deadline),  # what a restart of the master left
                    check=check,
                    text=text,
                    encoding=encoding,
                    errors=errors,
                    env=env,
                    cwd=cwd,
                    tty=tty,
                    size=size,
                    **self._fallback_kwargs(),
                )
            with channel_errors(self.host, last_attempt=attempt == 1):
                return run_channel(
                    core,
                    self.host,
                    args,
                    command,
                    input=input,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    capture_output=capture_output,
                    timeout=timeout,
                    deadline=deadline,
                    check=check,
                    text=text,
                    encoding=encoding,
                    errors=errors,
                    kill_after=kill_after,
                    tty=tty,
                    size=size,
                    make_result=lambda a, rc, o, e: CompletedProcess(a, rc, o, e, host=self.host),
                )
        raise AssertionError("unreachable")

    def Popen(
        self,
        args: str | Sequence[str],
        *,
        stdin: Stream = subprocess.DEVNULL,
        stdout: Stream = None,
        stderr: Stream = None,
        text: bool | None = None,
        encoding: str | None = None,
        errors: str | None = None,
        bufsize: int = -1,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        tty: bool = False,
        size: tuple[int, int] | None = None,
    ) -> Any:
        """Start a command over the master, like ``sshwrap.Popen`` / ``subprocess.Popen``.

        Returns a ``ChannelPopen`` (``stdin``/``stdout``/``stderr`` pipes, ``poll``, ``wait``,
        ``communicate``, ``send_signal``/``terminate``/``kill`` reaching the remote process
        group; ``tty=True``: a remote terminal, ``resize(rows, cols)``), or with the ``ssh -S``
        fallback an ``sshwrap.Popen`` running ``ssh`` through the master.
        """
        command = remote_command(args, env=env, cwd=cwd)
        check_exec_size(command)
        for attempt in (0, 1):
            core = self._ensure()
            if core is None:
                from .process import Popen as ProcessPopen

                return ProcessPopen(
                    self.destination,
                    args,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    text=text,
                    encoding=encoding,
                    errors=errors,
                    bufsize=bufsize,
                    env=env,
                    cwd=cwd,
                    tty=tty,
                    size=size,
                    **self._fallback_kwargs(),
                )
            with channel_errors(self.host, last_attempt=attempt == 1):
                return ChannelPopen(
                    core,
                    self.host,
                    args,
                    command,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    text=text,
                    encoding=encoding,
                    errors=errors,
                    bufsize=bufsize,
                    tty=tty,
                    size=size,
                )
        raise AssertionError("unreachable")

    def call(self, args: str | Sequence[str], **kwargs: Any) -> int:
        """Run a command and return its returncode (like ``subprocess.call``)."""
        rc: int = self.run(args, **kwargs).returncode
        return rc

    def check_call(self, args: str | Sequence[str], **kwargs: Any) -> int:
        """Run a command; ``CalledProcessError`` if it fails; return 0."""
        self.run(args, check=True, **kwargs)
        return 0

    def check_output(self, args: str | Sequence[str], **kwargs: Any) -> Any:
        """Run a command and return its stdout; ``CalledProcessError`` if it fails."""
        if "stdout" in kwargs:
            raise ValueError("stdout argument not allowed, it will be overridden.")
        return self.run(args, stdout=subprocess.PIPE, check=True, **kwargs).stdout

    # -- forwards ----------------------------------------------------------------------
    def forward_local(
        self, listen_port: int, host: str, port: int, *, listen_host: str = "127.0.0.1"
    ) -> Forward:
        """``ssh -L``: listen on ``listen_host:listen_port`` here, connect to ``host:port``
        from the server.  Port 0 picks a free port.  Returns a ``Forward`` (the port)."""
        return self._open_local_like(MUX_FWD_LOCAL, "local", listen_host, listen_port, host, port)

    def forward_dynamic(self, listen_port: int = 0, *, listen_host: str = "127.0.0.1") -> Forward:
        """``ssh -D``: a SOCKS4/5 proxy here whose connections leave from the server."""
        # ssh -D names the target "socks" (readconf.c); the master requires a name.
        return self._open_local_like(
            MUX_FWD_DYNAMIC, "dynamic", listen_host, listen_port, "socks", 0
        )

    def forward_remote(
        self, listen_port: int, host: str, port: int, *, listen_host: str = "127.0.0.1"
    ) -> Forward:
        """``ssh -R``: the server listens on ``listen_host:listen_port`` (0: the server picks
        and the Forward holds its choice); connections come back to ``host:port`` from here."""
        self._ensure()
        spec = (MUX_FWD_REMOTE, listen_host, listen_port, host, port)
        try:
            with MuxControl(self.control_path) as m:
                got = m.open_forward(*spec)
        except MuxRefused as e:
            raise ForwardError(self.host, f"remote forward refused: {e}") from None
        except MuxError as e:
            raise SSHConnectionError(self.host, str(e)) from None
        fwd = Forward(got if got is not None else listen_port, self, "remote", spec)
        with self._lock:
            self._forwards.append(fwd)
        return fwd

    def _open_local_like(
        self, ftype: int, kind: str, listen_host: str, listen_port: int, host: str, port: int
    ) -> Forward:
        self._ensure()
        # The master does not report the port it bound for 0: pick a free one and ask for it
        # (another process may take it in between: then try another).
        tries = 20 if listen_port == 0 else 1
        last = ""
        for _ in range(tries):
            lport = listen_port or _free_port(listen_host)
            spec = (ftype, listen_host, lport, host, port)
            try:
                with MuxControl(self.control_path) as m:
                    m.open_forward(*spec)
            except MuxRefused as e:
                last = str(e)
                continue
            except MuxError as e:
                raise SSHConnectionError(self.host, str(e)) from None
            fwd = Forward(lport, self, kind, spec)
            with self._lock:
                self._forwards.append(fwd)
            return fwd
        raise ForwardError(self.host, f"{kind} forward on {listen_host}:{listen_port}: {last}")

    def _cancel_forward(self, fwd: Forward, spec: tuple[int, str, int, str, int]) -> None:
        with self._lock:
            if fwd not in self._forwards or self._closed:
                return
            self._forwards = [f for f in self._forwards if f is not fwd]
        try:
            with MuxControl(self.control_path, timeout=10) as m:
                m.close_forward(*spec)
        except MuxRefused as e:
            raise ForwardError(self.host, f"cancelling {fwd!r}: {e}") from None
        except MuxError:
            pass  # the master is gone, and its forwards with it

    @property
    def forwards(self) -> list[Forward]:
        """The forwards opened through this Connection and not cancelled."""
        with self._lock:
            return list(self._forwards)

    # -- files and terminals (sshwrap.transfer, sshwrap.spawn) over the master ------------
    def put(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        progress: ProgressCallback | None = None,
        preserve_times: bool = True,
        abort: Abort | None = None,
    ) -> None:
        """Copy a local file or directory (recursively, modes kept) to ``remote`` over the
        master (SFTP; see ``sshwrap.transfer.put``).  ``progress(done, total)`` in bytes;
        ``abort`` (``sshwrap.transfer.Abort``) lets another thread stop it."""
        from .transfer import put

        put(
            local,
            remote,
            destination=self.destination,
            ssh_args=self.ssh_args(),
            ssh=self._ssh,
            progress=progress,
            preserve_times=preserve_times,
            abort=abort,
        )

    def get(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
        preserve_times: bool = True,
        abort: Abort | None = None,
    ) -> None:
        """Copy a remote file or directory to ``local`` over the master
        (see ``sshwrap.transfer.get``); ``abort`` as for ``put``."""
        from .transfer import get

        get(
            remote,
            local,
            destination=self.destination,
            ssh_args=self.ssh_args(),
            ssh=self._ssh,
            progress=progress,
            preserve_times=preserve_times,
            abort=abort,
        )

    def spawn(
        self,
        command: str | Sequence[str] | None,
        *,
        tty: bool = True,
        dimensions: tuple[int, int] = (24, 80),
        timeout: float | None = 30.0,
        encoding: str = "utf-8",
        errors: str = "replace",
    ) -> Spawned:
        """An expect-style ``Spawned`` program (``ssh -tt -e none`` in a local pty) over the
        master; ``command`` None starts a login shell.  See ``sshwrap.spawn.Spawned``."""
        from .spawn import Spawned

        if command is not None:
            check_exec_size(remote_command(command))
        return Spawned(
            command,
            destination=self.destination,
            ssh_args=self.ssh_args(),
            ssh=self._ssh,
            tty=tty,
            dimensions=dimensions,
            timeout=timeout,
            encoding=encoding,
            errors=errors,
            control_path=self.control_path,
        )

    def interact(
        self, escape: bytes | None = b"\x1d", *, stdin_fd: int = 0, stdout_fd: int = 1
    ) -> RelayResult:
        """Hand the user's terminal to a login shell over the master until it exits or the
        user types ``escape`` (default ``^]``; the shell is then hung up).  Raw mode, resizes
        and signals as in ``Spawned.interact``."""
        with self.spawn(None, tty=True, timeout=None) as s:
            return s.interact(escape, stdin_fd=stdin_fd, stdout_fd=stdout_fd)

    # -- ssh argv for other tools ------------------------------------------------------
    def ssh_args(self) -> list[str]:
        """Options that make ``ssh``/``scp``/``sftp`` use this master: ``-o ControlPath=...``
        ``-o ControlMaster=no`` plus the connection's settings (no destination)."""
        self._ensure()
        return [
            "-o",
            f"ControlPath={self.control_path}",
            "-o",
            "ControlMaster=no",
            *self._settings_args,
        ]

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._opened else "new")
        return f"<Connection {self.destination!r} {state} master_pid={self.master_pid}>"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("", "*", "localhost") else "127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def connect(
    destination: str,
    *,
    config: str | os.PathLike[str] | None = None,
    user: str | None = None,
    port: int | str | None = None,
    identity: str | os.PathLike[str] | None = None,
    jump: str | None = None,
    options: Mapping[str, OptionValue] | None = None,
    password: str | None = None,
    passphrase: str | None = None,
    on_prompt: OnPrompt | None = None,
    start_timeout: float | None = 60.0,
    reconnect: bool = True,
    proxy: bool = True,
    ssh: str | None = None,
    connect_timeout: float | None = None,
) -> Connection:
    """Start an OpenSSH master to ``destination`` owned by sshwrap; return the ``Connection``.

    Use it as a context manager (``with sshwrap.connect("web1") as c: c.run(...)``) or call
    ``close()``.  Raises ``AuthenticationError``, ``HostKeyError``, ``SSHConnectionError``
    like ``sshwrap.run`` when the master cannot connect.
    """
    return Connection(
        destination,
        config=config,
        user=user,
        port=port,
        identity=identity,
        jump=jump,
        options=options,
        password=password,
        passphrase=passphrase,
        on_prompt=on_prompt,
        start_timeout=start_timeout,
        reconnect=reconnect,
        proxy=proxy,
        ssh=ssh,
        connect_timeout=connect_timeout,
    ).open()
