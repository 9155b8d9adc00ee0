"""One ssh call: its argv, its private ``-E`` log, how it ended, and the remote stop.

:class:`Invocation` is what every face that runs ssh shares (``sshwrap.run``/``Popen``,
``sshwrap.aio.run``/``create_process``): the argv (quoting, ``env``/``cwd``, settings, a
random ``SSHWRAP_SESSION`` id exported in front of the command, the private log), reading
ssh's exit (remote returncode, negative for a signal, or a typed
:class:`~sshwrap.errors.SSHError`; through a ControlMaster, a session that ended without a
status while the master died is :class:`~sshwrap.errors.CommandLostError`, returncode 255,
for ``ssh -S`` in every face), and delivering a signal to the remote command through a
second ssh (:class:`RemoteStop`), bounded and reaped.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any, Unpack

from ..errors import (
    CommandLostError,
    SSHConnectionError,
    SSHError,
    SSHStderr,
    classify_ssh_failure,
    interpret_exit,
)
from ..io.master import NO_DIRECT_LOGIN
from ..io.mux_control import master_answers
from ..io.ssh_child import ChildPipes, write_to
from ..io.threads import start_daemon
from ..protocol.sshlog import (
    mux_master_unreachable,
    mux_session_refused,
    mux_session_without_status,
)
from .argv import (
    SSHLog,
    build_ssh_argv,
    find_ssh,
    remote_command,
    remote_signal_script,
    ssh_settings_args,
)
from .child_steps import Expired, exchange
from .options import ArgvSettings, Command, SSHSettings
from .waiting import Procedure, run_sync

__all__ = [
    "MASTER_CHECK",
    "SIGNAL_TIMEOUT",
    "STOP_MARGIN",
    "TEE_GRACE",
    "Invocation",
    "MasterGoneError",
    "RemoteStop",
    "SessionRefusedError",
    "control_path",
    "stop_failure",
]

PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT

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

MASTER_CHECK = 1.0
"""Longest wait (seconds) for the ControlMaster's answer when an ``ssh -S`` session ended
without a status: a master that does not answer on its (local) socket within it was lost."""

LOST_MASTER = "the control master was lost before the command's exit status arrived"

TEE_GRACE = 0.5
"""Seconds ssh's stderr relay may take to reach EOF after ssh exited (something ssh started,
a ProxyCommand, may hold the pipe open: then it is let go)."""


class SessionRefusedError(SSHConnectionError):
    """``ssh -S``: the master's server refused to open the session (its ``MaxSessions``
    reached, or another refusal); nothing ran.  A Connection's fallback tries again until a
    slot frees or its bound runs out."""


SESSION_REFUSED = "the server refused to open a session over the control master"


class MasterGoneError(SSHConnectionError):
    """``ssh -S`` kept off a login of its own (see ``Master.fallback_settings``) found no
    master answering on its socket: nothing ran.  A Connection starts a new master and tries
    once more, as for a channel lost before it opened."""


MASTER_GONE = "the control master is gone (nothing answers on its socket)"


def control_path(settings: list[str]) -> str | None:
    """The ``ControlPath`` that ``settings`` (ssh's option arguments) give ssh, if one: the
    first, as ssh takes the first value of an option.  None for none, ``none``, or one with
    ``%`` tokens (only ssh knows what they expand to)."""
    for flag, value in itertools.pairwise(settings):
        if flag != "-o":
            continue
        key, sep, path = value.partition("=")
        if sep and key.strip().lower() == "controlpath":
            path = path.strip()
            return None if path.lower() == "none" or "%" in path else path
    return None


_NO_LOGIN = f"ProxyCommand={NO_DIRECT_LOGIN}"


def _without_option(settings: list[str], option: str) -> list[str]:
    """``settings`` without the ``-o option`` pair(s)."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(settings):
        if skip:
            skip = False
        elif arg == "-o" and settings[i + 1 : i + 2] == [option]:
            skip = True
        else:
            out.append(arg)
    return out


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


class RemoteStop:
    """One second ssh delivering a signal to a call's remote processes, with its deadline.

    :meth:`wait` is the procedure (both drivers); :meth:`finish` runs it here (idempotent,
    thread-safe); :meth:`in_background` leaves it to a helper thread.  Stops in flight get the
    rest of their budget at interpreter exit, then are killed: none is orphaned.
    """

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

    def wait(self) -> Procedure[SSHError | None]:
        """Until it exits or its deadline passes (then it is killed); it is reaped either way.
        Returns why the signal was not delivered, None if it was."""
        if self._done:
            return self.error()
        pipes = ChildPipes(self.proc)
        err = bytearray()
        assert self.proc.stderr is not None
        pipes.read_into(self.proc.stderr.fileno(), err.extend)
        try:
            yield from exchange(pipes, self.deadline)
        except BaseException as e:
            # over budget, or interrupted (a second ^C): killed and reaped either way
            self.timed_out = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
            if not isinstance(e, Expired):
                self._end()
                raise
        finally:
            pipes.close()
        self.stderr = err.decode("utf-8", "replace")
        self.returncode = None if self.timed_out else self.proc.returncode
        self._end()
        return self.error()

    def _end(self) -> None:
        self._done = True
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        with _PENDING_LOCK:
            _PENDING.discard(self)

    def finish(self) -> int | None:
        """:meth:`wait` in this thread.  Returns ssh's exit status, None if it was killed."""
        with self._lock:
            run_sync(self.wait())
            return self.returncode

    def error(self) -> SSHError | None:
        """Why the signal was not delivered (once it ended), or None if it was."""
        return stop_failure(self.host, self.returncode, self.stderr, self.budget)

    def in_background(self) -> None:
        """Let a helper thread (async signals blocked) finish it: at most the budget."""

        def run() -> None:
            self.finish()

        start_daemon(run, "sshwrap-remote-signal")


_PENDING: set[RemoteStop] = set()
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


class Invocation:
    """One ssh call: its argv, its private log, and how to read how it ended."""

    def __init__(
        self,
        host: str,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        tty: bool = False,
        **settings: Unpack[SSHSettings],
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError("host must be a non-empty string")
        self.host = host
        self.command = command
        self.tty = tty
        self.ssh = settings.pop("ssh", None) or find_ssh()
        as_options: ArgvSettings = settings
        self.settings = ssh_settings_args(**as_options)
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
        self.stopping = False  # a stop of the remote command has been started
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
            if info.error is not None and mux_session_refused(log):
                # ssh then tried a connection of its own (a ProxyCommand that fails at once
                # over sshwrap's master): its words are not the story, and nothing ran
                self.error = SessionRefusedError(self.host, SESSION_REFUSED)
                self.messages = ""
            elif info.error is not None and self._kept_off_login and mux_master_unreachable(log):
                self.error = MasterGoneError(self.host, MASTER_GONE)
                self.messages = ""
            elif self._master_lost(info.returncode, info.local_signal, log):
                self.returncode = 255
                self.error = CommandLostError(self.host, LOST_MASTER)
            if info.local_signal and not self.stopping:
                # The local ssh was killed by a signal nobody sent through sshwrap (the
                # user's ^C reaches ssh too): without a terminal the remote command would run
                # on.  Hang it up, as a terminal would: SIGHUP (nohup'd commands survive).
                self.stop_in_background(signal.SIGHUP, escalate=False)
        return self.returncode

    @property
    def _kept_off_login(self) -> bool:
        """ssh was given sshwrap's ProxyCommand that fails at once (a master's ``ssh -S``)."""
        return _without_option(self.settings, _NO_LOGIN) != self.settings

    def _master_lost(self, returncode: int, local_signal: int, log: str) -> bool:
        """ssh went through a ControlMaster, the session ended without a status, and the
        master no longer answers: it died under the session (not a remote signal death).

        OpenSSH's mux client logs the same words for both (mux.c: "Control master terminated
        unexpectedly" when no MUX_S_EXIT_MESSAGE came, and the master relays only
        ``exit-status``): the master's socket tells them apart."""
        if returncode >= 0 or local_signal or not mux_session_without_status(log):
            return False
        path = control_path(self.settings)
        return path is not None and not master_answers(path, MASTER_CHECK)

    def failure(self, stdout: Any = None, stderr: Any = None) -> SSHError | None:
        """The call's error (once it ended), None if ssh did not fail; a
        :class:`~sshwrap.errors.CommandLostError` gets ``stdout`` and ``stderr`` (what the
        caller collected of the command's output, as ``run`` would have returned it)."""
        err = self.error
        if isinstance(err, CommandLostError):
            err.stdout = err.output = stdout
            err.command_stderr = stderr
        return err

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

    # -- ssh's messages -------------------------------------------------------------------
    @staticmethod
    def _messages_go_with_output(stdout: Any, stderr: Any, tty: bool) -> bool:
        return tty or (stderr == STDOUT and stdout == PIPE)

    def write_messages(self, stdout: Any, stderr: Any, tty: bool) -> None:
        """Write ssh's messages where ``stderr`` goes (the terminal's output with a tty),
        unless that is a pipe the caller reads (then :meth:`append_messages` adds them)."""
        if self._messages_go_with_output(stdout, stderr, tty):
            target = PIPE if stdout == PIPE else stdout
        else:
            target = stderr
        if target != PIPE:
            write_to(target, self.messages.encode(), stdout)

    def append_messages(
        self, out: Any, err: Any, stdout: Any, stderr: Any, tty: bool
    ) -> tuple[Any, Any]:
        """``(out, err)`` with ssh's messages added where they belong (read pipes only)."""
        if not self.messages:
            return out, err
        if self._messages_go_with_output(stdout, stderr, tty):
            if out is not None:
                out = out + self._messages_as(out)
        elif stderr == PIPE and err is not None:
            err = err + self._messages_as(err)
        return out, err

    def _messages_as(self, sample: bytes | str) -> bytes | str:
        if isinstance(sample, str):
            return self.messages.replace("\r\n", "\n")
        return self.messages.encode()

    # -- signals to the remote command ------------------------------------------------------
    def signal_argv(
        self, sig: int, *, escalate: bool = False, budget: float = SIGNAL_TIMEOUT
    ) -> list[str]:
        """argv of the second ssh that delivers ``sig`` to this call's remote processes.

        It gets ``-o ConnectTimeout`` from ``budget`` (whole seconds, at least 1; before the
        user's settings, so it wins) and ``BatchMode=yes`` (it never prompts).
        """
        script = remote_signal_script(self.session_id, sig, escalate=escalate)
        connect = max(1, math.ceil(budget))
        # Over sshwrap's master the command's ssh may not log in anew (see
        # Master.fallback_settings); the stop may, when the master cannot give it a session.
        own = _without_option(self.settings, _NO_LOGIN)
        settings = ["-o", f"ConnectTimeout={connect}", *own, "-o", "BatchMode=yes"]
        return build_ssh_argv(self.ssh, self.host, script, settings=settings)

    def start_stop(self, sig: int, *, escalate: bool = False, budget: float) -> RemoteStop:
        """Start the second ssh for ``sig`` (see :meth:`signal_argv`), bounded by ``budget``."""
        self.sent_signal = sig
        return RemoteStop(
            self.host, self.signal_argv(sig, escalate=escalate, budget=budget), budget
        )

    def deliver(
        self, sig: int, *, escalate: bool = False, budget: float = SIGNAL_TIMEOUT
    ) -> Procedure[SSHError | None]:
        """Send ``sig`` to the remote command within ``budget`` s; why it failed, or None."""
        try:
            stop = self.start_stop(sig, escalate=escalate, budget=budget)
        except OSError as e:
            return SSHConnectionError(self.host, f"could not deliver the signal: {e}")
        return (yield from stop.wait())

    def stop_in_background(
        self, sig: int = signal.SIGTERM, *, escalate: bool = True, budget: float = STOP_MARGIN
    ) -> None:
        """Send ``sig`` (and with ``escalate`` SIGKILL later) from a helper thread, bounded
        by ``budget``: what ^C, a cancel and ``kill()`` do (they do not wait)."""
        self.stopping = True
        with contextlib.suppress(OSError):
            self.start_stop(sig, escalate=escalate, budget=budget).in_background()

    def close(self) -> None:
        """Release the log file."""
        self.log.close()
