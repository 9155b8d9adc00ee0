"""An OpenSSH ControlMaster that sshwrap owns: start, check, restart, stop; or attaches to.

**Start.**  :class:`Master` runs ``ssh -M -N -o ControlPersist=yes -o ControlPath=P`` with its
stdin and stdout on ``/dev/null`` and its log in its own file (``-E``), so it holds no pipe of
ours (a ControlPersist master that inherits a pipe keeps it open forever).  ssh authenticates
(prompts answered by :mod:`sshwrap.io.prompts` when ``password``/``passphrase``/``on_prompt``
are given), then forks into the background and the first process exits: 0 means the master is
up.  ``P`` lives in a fresh private directory (mode 0700) and must fit ``sun_path`` (104 bytes,
the smallest, macOS's) *including* the ``.XXXXXXXXXXXXXXXX`` suffix OpenSSH appends while
binding; a too-long temporary directory falls back to ``/tmp``.  An alive check (``ssh -O
check``) gives the master's pid before anything is used.  A start that runs out of time, is
interrupted (Ctrl-C) or aborted (the ``abort`` flag of :meth:`Master.ensure`, set when an
asyncio caller is cancelled) kills and reaps the starting ssh, and kills a master it had
already forked.

**Proxy mode.**  Once up, the master is asked for proxy mode (``MUX_C_PROXY``, OpenSSH >= 7.4)
and its socket becomes a :class:`sshwrap.io.pump.ProxyCore`.  A master that does not speak
it (older OpenSSH, ``ControlMaster ask``) is used through ``ssh -S P`` subprocesses instead
(:meth:`Master.ensure` returns None; ``proxy=False`` forces it).

**Restart.**  A dead master (killed, network gone, ``ServerAliveInterval`` expired) is noticed
when its socket closes: the next :meth:`Master.ensure` starts a new master with the same
settings and prompt answers (``reconnect=True``), or raises ``SSHConnectionError``.  The
restart is bounded by the caller's deadline: ssh gets a ``ConnectTimeout`` derived from what is
left and is killed and reaped when the bound runs out.  The new master is asked for the same
forwards (:mod:`sshwrap.io.forwards`).

**Stop.**  :meth:`Master.close` sends ``-O exit`` (``MUX_C_TERMINATE``), waits for the pid to
go (SIGKILL after 2 s) and removes the directory; so does dropping the Master or leaving the
program with it open (``weakref.finalize``), since a ControlPersist master would otherwise
outlive us.

**Attach, detach.**  :meth:`Master.adopt` uses a master already listening (the user's own,
``attach=True``/``"auto"`` finds the configured one, or a detached one) and
:meth:`Master.detach` leaves sshwrap's master running past the program: see
:mod:`sshwrap.io.attach`.  A master that is not ``owned`` is neither stopped nor restarted.

Every method may be called from several threads at once (one lock guards the lifecycle).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import SSHConnectionError, SSHError, classify_ssh_failure
from .attach import (
    SUN_PATH_MAX,
    Detached,
    config_env,
    configured_master,
    pid_alive,
    processes_with_arg,
    socket_dir,
    stop_master,
)
from .deadline import local_step, remaining
from .flags import Flag
from .forwards import Forward, ForwardSpec, open_forward, restore_forwards
from .mux_control import MuxControl, MuxError, MuxUnsupported, master_answers
from .pump import ProxyCore

if TYPE_CHECKING:
    from .prompts import OnPrompt

__all__ = ["SUN_PATH_MAX", "Master"]

NO_DIRECT_LOGIN = "false"
"""The ``ProxyCommand`` of ``ssh -S`` over sshwrap's master: no connection of its own."""
_MUX_TIMEOUT = 5.0  # longest wait for the (local) master's answer on its socket


def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace", newline="") as f:
            return f.read()
    except OSError:
        return ""


class Master:
    """One ControlMaster to ``destination``: see the module docstring.

    ``settings`` are the keywords of ``sshwrap.run`` that name the connection (``config``,
    ``user``, ``port``, ``identity``, ``jump``, ``options``) and ``settings_args`` the same as
    ssh options; ``ssh`` the client binary (None: ``locate_ssh()`` tells it when needed);
    ``password``/``passphrase``/``on_prompt`` answer ssh's prompts; ``start_timeout`` bounds a
    start; ``reconnect`` restarts a dead master; ``proxy=False`` uses ``ssh -S`` only;
    ``session_env``: the ``env`` of a session over the proxy, known (else ``ssh -G`` tells it).
    Nothing starts before :meth:`open` or :meth:`ensure`.  ``sshwrap.connect`` makes one.
    """

    def __init__(
        self,
        destination: str,
        *,
        settings: Mapping[str, Any],
        settings_args: Sequence[str],
        ssh: str | None,
        locate_ssh: Callable[[], str],
        password: str | None = None,
        passphrase: str | None = None,
        on_prompt: OnPrompt | None = None,
        start_timeout: float | None = 60.0,
        reconnect: bool = True,
        proxy: bool = True,
        attach: bool | str = False,
        session_env: Mapping[str, str] | None = None,
    ) -> None:
        self.destination = destination
        self._session_env = session_env
        self.host = destination
        self._settings = dict(settings)
        self.settings_args = list(settings_args)
        """The connection's settings as ssh options (``-F``, ``-l``, ``-o`` ...)."""
        self._locate_ssh = locate_ssh
        self._password = password
        self._passphrase = passphrase
        self._on_prompt = on_prompt
        self.start_timeout = start_timeout
        """Seconds a start may take at most (None: no bound but the caller's)."""
        options = settings.get("options") or {}
        self._user_connect_timeout = any(k.lower() == "connecttimeout" for k in options)
        self.reconnect = reconnect
        self.want_proxy = proxy
        self.ssh = ssh
        """The ssh binary given (None: the one on ``PATH``)."""
        self._lock = threading.RLock()
        self._dir: str | None = None
        self.directory = ""
        """The private directory of the socket and the log (the last one, once removed)."""
        self.control_path = ""
        self.pid = 0
        self._core: ProxyCore | None = None
        self._proxy = False
        self.opened = False
        self.closed = False
        self.forwards: list[Forward] = []
        """The forwards opened and not cancelled (kept over a restart)."""
        self._finalizer: weakref.finalize[[str, int, str | None], Master] | None = None
        self.restarts = 0
        self.owned = True
        """False for a master that was adopted and not owned: ``close()`` leaves it running."""
        self.attach_configured = attach
        """True/``"auto"``: :meth:`open` first looks for the user's configured master."""
        self._adopted = False
        self._skip_check = False

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> None:
        """Start the master if it is not started yet (``ValueError`` once closed)."""
        with self._lock:
            self._open_locked(None, None)

    def adopt(
        self,
        control_path: str,
        *,
        own: bool = False,
        directory: str | None = None,
        check: bool = True,
    ) -> None:
        """Before :meth:`open`: use the master listening at ``control_path`` instead of
        starting one.  ``own``: ``close()`` stops it and removes ``directory`` (a detached
        master's); else ``close()`` leaves it running, and once it is gone a call raises
        ``SSHConnectionError`` unless ``reconnect`` (then a master of sshwrap's own starts).
        ``check=False`` (a master not owned, in proxy mode): no alive check first (``pid``
        stays 0), the proxy request is the check."""
        with self._lock:
            if self.opened or self.closed:
                raise ValueError("adopt() is for a Master not opened yet")
            self._skip_check = not check and not own and self.want_proxy
            self.control_path, self.owned, self._adopted = control_path, own, True
            self._dir, self.directory = directory, directory or ""

    def detach(self) -> Detached:
        """Leave the (started) master running past ``close()`` and the program's exit: the
        finalizer that stops it goes, the socket directory stays; this Master is closed.
        Returns what a later process needs to attach to it (:class:`Detached`)."""
        with self._lock:
            if self.closed or not self.opened:
                raise ValueError("detach() needs an open Connection")
            settings = {k: v for k, v in self._settings.items() if v is not None}
            d = Detached(self.control_path, self.destination, self.pid, self._dir, settings)
            self.closed, core, self._core = True, self._core, None
            if core is not None:
                core.close()
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            self.forwards.clear()
            return d

    def _open_locked(self, deadline: float | None, abort: Flag | None) -> None:
        if self.closed:
            raise ValueError("the Connection is closed")
        if not self.opened:
            if self.attach_configured and not self._adopted:
                ssh = self.ssh or self._locate_ssh()
                path = configured_master(ssh, self.settings_args, self.destination, deadline)
                if path is not None:
                    self.adopt(path)
                elif self.attach_configured != "auto":
                    raise SSHConnectionError(
                        self.host, "no control master of the user's answers (attach=True)"
                    )
            if self._adopted:
                self._use(deadline)
            else:
                self._start(deadline, abort)
            self.opened = True

    @property
    def log_path(self) -> str:
        """The master's own log (ssh ``-E``)."""
        return os.path.join(self._dir, "log") if self._dir else ""

    def read_log(self) -> str:
        """The master's ``-E`` log as ssh wrote it (CR LF ends each message: kept)."""
        return _read_text(self.log_path)

    @property
    def _err_path(self) -> str:
        return os.path.join(self._dir, "err") if self._dir else ""

    def _start_limit(self, deadline: float | None) -> float | None:
        """Seconds the master's start may take: ``start_timeout`` cut to the caller's bound."""
        left = remaining(deadline)
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
            self.read_log(),
        )

    def _kill_forked_master(self) -> None:
        """After killing a starting ssh: a master it had already forked is stopped too.

        The master is asked for its pid; one that does not answer is found by its
        ``ControlPath=`` argument (a path in this Master's private directory, so no
        process but the one this Master started carries it)."""
        pid = 0
        with (
            contextlib.suppress(MuxError, OSError),
            MuxControl(self.control_path, timeout=0.5) as m,
        ):
            pid = m.alive_check()
        pids = [pid] if pid else processes_with_arg(f"ControlPath={self.control_path}")
        for p in pids:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)

    def _argv(self, log: str, prompt_opts: list[str], limit: float | None) -> list[str]:
        timeout_opt = (
            ["-o", f"ConnectTimeout={max(1, math.ceil(limit))}"]
            if limit is not None and not self._user_connect_timeout
            else []
        )
        return [
            self.ssh or self._locate_ssh(),
            *("-M", "-N", "-o", "ControlPersist=yes", "-o", f"ControlPath={self.control_path}"),
            *("-E", log, *prompt_opts, *self.settings_args, *timeout_opt),
            "--",
            self.destination,
        ]

    def _start(self, deadline: float | None, abort: Flag | None) -> None:
        limit = self._start_limit(deadline)
        if limit is not None and limit <= 0:
            raise self._late(0.0)
        if self._adopted:  # the attached master is gone and reconnect=True: one of our own
            self._dir = self._dir if self.owned else None
            self._adopted, self.owned, self._skip_check = False, True, False
        if self._dir is None or not os.path.isdir(self._dir):
            self._dir = self.directory = socket_dir()
        self.control_path = os.path.join(self._dir, "m")
        log = os.path.join(self._dir, "log")
        for name in (self.control_path, log, self._err_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)  # a dead master's socket: ssh would not replace it
        prompts = None
        prompt_opts: list[str] = []
        if self._password is not None or self._passphrase is not None or self._on_prompt:
            from .prompts import PromptServer

            prompts = PromptServer(
                password=self._password, passphrase=self._passphrase, on_prompt=self._on_prompt
            )
            prompts.start()
            prompt_opts = prompts.ssh_options()
        try:
            # ssh's stderr apart from its -E log: what it prints before the log opens (a bad
            # option, port or value) is only there.
            fd = os.open(self._err_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with open(fd, "ab") as errf:  # private, as the log is
                proc = subprocess.Popen(
                    self._argv(log, prompt_opts, limit),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errf,
                    env=prompts.env() if prompts is not None else None,
                )
            unhook = abort.add_callback(proc.kill) if abort is not None else None
            try:
                rc = proc.wait(limit)
            except BaseException as e:  # the bound ran out, or Ctrl-C
                proc.kill()
                proc.wait()
                self._kill_forked_master()
                if isinstance(e, subprocess.TimeoutExpired):
                    raise self._late(limit) from None
                raise
            finally:
                if unhook is not None:
                    unhook()
            if rc != 0 and abort is not None and abort.is_set():
                self._kill_forked_master()
                raise SSHConnectionError(self.host, "cancelled while starting the master")
            if rc != 0:
                text, err = self.read_log(), _read_text(self._err_path)
                if prompts is not None:
                    prompts.raise_for_failure(rc, text, self.host, stderr=err)
                raise classify_ssh_failure(self.host, text, rc, stderr=err)
        except BaseException:
            if not self.opened:
                self._remove_dir()
            raise
        finally:
            if prompts is not None:
                prompts.close()
        self._use(deadline)

    def _use(self, deadline: float | None) -> None:
        """The started or adopted master: its pid, then proxy mode if wanted."""
        if not self._skip_check:
            self._check_started(deadline)
        self._core = None
        self._proxy = False
        if self.want_proxy:
            self._open_proxy(deadline)

    def _check_started(self, deadline: float | None) -> None:
        """The first alive check (the pid), and the finalizer that stops the master."""
        try:
            with MuxControl(self.control_path, timeout=local_step(_MUX_TIMEOUT, deadline)) as m:
                self.pid = m.alive_check()
        except MuxError as e:
            if self._adopted:
                raise SSHConnectionError(
                    self.host, f"no control master answers at {self.control_path}: {e}"
                ) from None
            self._kill_forked_master()
            if not self.opened:
                self._remove_dir()
            raise SSHConnectionError(
                self.host, f"the master started but does not answer: {e}", self.read_log()
            ) from None
        # A Master dropped without close() (or still open at exit) stops its master: a
        # ControlPersist master would otherwise outlive the program.
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = (
            weakref.finalize(self, stop_master, self.control_path, self.pid, self._dir)
            if self.owned
            else None
        )

    def _open_proxy(self, deadline: float | None = None) -> None:
        try:
            with MuxControl(self.control_path, timeout=local_step(_MUX_TIMEOUT, deadline)) as m:
                sock = m.enter_proxy()
        except MuxUnsupported:
            self._proxy = False
            self._core = None
            return
        except MuxError as e:
            raise SSHConnectionError(self.host, str(e), self.read_log()) from None
        core = ProxyCore(sock)
        core.session_env = self._config_env(deadline)
        self._core = core
        self._proxy = True

    def _config_env(self, deadline: float | None = None) -> dict[str, str]:
        """What ssh itself would send as ``env`` for a session (:func:`config_env`), as
        ``ssh -G`` resolves the config; the ``session_env`` given instead, if any."""
        if self._session_env is not None:
            return dict(self._session_env)
        try:
            out = subprocess.run(
                [self.ssh or self._locate_ssh(), "-G", *self.settings_args, "--", self.destination],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=local_step(30.0, deadline),
            )
        except (OSError, subprocess.SubprocessError):
            return {}
        return config_env(out.stdout.decode(errors="replace"))

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def close(self, *, stop: bool | None = None) -> None:
        """Stop the master (``-O exit``), wait for it to go, remove the socket directory.

        A master not ``owned`` is left running (this Master's forwards cancelled) unless
        ``stop=True``; ``stop=False`` leaves an owned one running too, as :meth:`detach`."""
        with self._lock:
            if self.closed:
                return
            stop = self.owned if stop is None else stop
            for fwd in [] if stop else list(self.forwards):
                with contextlib.suppress(SSHError):  # ForwardError: the master refused it
                    fwd.cancel()
            self.closed = True
            core, self._core = self._core, None
            if core is not None:
                core.close()
            if self._finalizer is not None and not stop:
                self._finalizer.detach()
            elif self._finalizer is not None:
                self._finalizer()  # -O exit, wait for the master, remove the directory
            elif stop and self.opened:
                stop_master(self.control_path, self.pid, self._dir)
            self._finalizer = None
            self.forwards.clear()
            if stop:
                self._remove_dir()

    @property
    def alive(self) -> bool:
        """True if the master answers an alive check now (``ssh -O check``, 5 s at most)."""
        with self._lock:
            if not self.opened or self.closed:
                return False
        return self.answers(None)

    def answers(self, deadline: float | None) -> bool:
        """True if the master answers an alive check (bounded by ``deadline``, at least
        ``LOCAL_FLOOR`` seconds)."""
        return master_answers(self.control_path, local_step(_MUX_TIMEOUT, deadline))

    @property
    def uses_proxy(self) -> bool:
        """True when commands run on channels over the mux proxy (else ``ssh -S``)."""
        self.ensure()
        return self._proxy

    # -- ensure: the core to use, restarting a dead master --------------------------------
    def ready(self) -> ProxyCore | None:
        """The proxy core if it can be used at once (no lock, no wait), else None: then
        :meth:`ensure` (which may block) tells the core, the fallback or the error."""
        core = self._core
        if core is not None and core.alive and self.opened and not self.closed:
            return core
        return None

    def _acquire(self, deadline: float | None, abort: Flag | None) -> None:
        """Take the lock, giving up when ``deadline`` passes (``SSHConnectionError``: another
        call is (re)starting the master and it is not up in time) or ``abort`` is set."""
        while True:
            if abort is not None and abort.is_set():
                raise SSHConnectionError(self.host, "cancelled while waiting for the master")
            left = remaining(deadline)
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

    def ensure(self, deadline: float | None = None, abort: Flag | None = None) -> ProxyCore | None:
        """The proxy core to use (None: the ``ssh -S`` fallback); starts the master if needed
        and restarts a dead one.

        ``deadline`` (``time.monotonic()``) bounds everything, the restart included; setting
        ``abort`` stops a start at once (its ssh killed and reaped, ``SSHConnectionError``)."""
        self._acquire(deadline, abort)
        try:
            return self._ensure_locked(deadline, abort)
        finally:
            self._lock.release()

    def _ensure_locked(self, deadline: float | None, abort: Flag | None) -> ProxyCore | None:
        if self.closed:
            raise ValueError("the Connection is closed")
        if not self.opened:
            self._open_locked(deadline, abort)
        core = self._core
        if core is not None and core.alive:
            return core
        if not self._proxy and self.answers(deadline):
            return None
        if core is not None and self.answers(deadline):
            self._open_proxy(deadline)  # the master lives: only our socket ended
            return self._core
        if not self.reconnect:
            why = "attached: none is started in its place" if self._adopted else "reconnect=False"
            raise SSHConnectionError(
                self.host, f"the control master is gone ({why})", self.read_log()
            )
        if core is not None:
            core.close(local_step(5.0, deadline))
        self._core = None
        old = self.pid
        if old and self.owned and pid_alive(old):
            with contextlib.suppress(ProcessLookupError):
                os.kill(old, signal.SIGTERM)
        self.restarts += 1
        self._start(deadline, abort)
        self.forwards = restore_forwards(
            self.control_path, self.forwards, local_step(10.0, deadline)
        )
        return self._core

    # -- for ssh, scp, sftp and the ssh -S fallback -----------------------------------------
    def fallback_settings(self, *, direct_login: bool = True) -> dict[str, Any]:
        """Keywords of ``sshwrap.run``/``Popen`` (settings, ``ssh``) that run ``ssh -S`` over
        this master: ``options`` gets ``ControlPath`` and ``ControlMaster=no``; without
        ``direct_login`` or over an attached master (and unless ``jump`` is set) also a
        ``ProxyCommand`` that fails at once.

        ssh's mux client that the master cannot serve (the server refused the session, at
        its ``MaxSessions``; the master gone) logs in anew on a connection of its own
        (OpenSSH's ssh.c: ``muxclient()`` returns, then ``ssh_connect``): that ProxyCommand
        (the first value wins, the user's config comes after) makes it fail instead, so the
        command runs over this master or not at all (``Connection.run`` then waits for a
        slot, :mod:`sshwrap.core.commands`; a face that cannot try again keeps the login)."""
        opts: dict[str, Any] = {"ControlPath": self.control_path, "ControlMaster": "no"}
        no_login = not direct_login or self._adopted  # an attached master: never a login
        if no_login and not self._settings.get("jump"):  # ssh refuses -J with one
            opts["ProxyCommand"] = NO_DIRECT_LOGIN
        base = self._settings.get("options")
        if isinstance(base, Mapping):
            for k, v in base.items():
                if k.lower() not in ("controlpath", "controlmaster"):
                    opts.setdefault(k, v)
        kw = {k: v for k, v in self._settings.items() if k != "options" and v is not None}
        kw["options"] = opts
        if self.ssh is not None:
            kw["ssh"] = self.ssh
        return kw

    def ssh_args(self) -> list[str]:
        """Options that make ``ssh``/``scp``/``sftp`` use this master (starting it if
        needed): ``-o ControlPath=...`` ``-o ControlMaster=no`` plus the settings."""
        self.ensure()
        return [
            "-o",
            f"ControlPath={self.control_path}",
            "-o",
            "ControlMaster=no",
            *self.settings_args,
        ]

    # -- forwards ------------------------------------------------------------------------
    def add_forward(self, kind: str, spec: ForwardSpec) -> Forward:
        """Open a forward (see :func:`sshwrap.io.forwards.open_forward`; the master started
        if needed) and keep it for a restart of the master."""
        self.ensure()
        fwd = open_forward(self.host, self.control_path, kind, spec, self._cancel_forward)
        with self._lock:
            self.forwards.append(fwd)
        return fwd

    def _cancel_forward(self, fwd: Forward) -> bool:
        """Forget ``fwd``; False when it is not ours any more (or the master is closed)."""
        with self._lock:
            if fwd not in self.forwards or self.closed:
                return False
            self.forwards = [f for f in self.forwards if f is not fwd]
            return True

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("open" if self.opened else "new")
        return f"<Master {self.destination!r} {state} pid={self.pid}>"
