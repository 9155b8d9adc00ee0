"""Commands over a :class:`~sshwrap.io.master.Master`: the procedures behind both faces.

``Connection.run`` is ``run_sync(run_command(master, ...))`` and ``AsyncConnection.run`` is
``await run_async(run_command(master, ...))`` (see :mod:`sshwrap.core.waiting`); the fan-out
runs a host given as a Connection the same way.  The steps, written once:

1. the master: used at once when its proxy socket is up, else started or restarted in a
   blocking step (:meth:`Master.ensure <sshwrap.io.master.Master.ensure>`: bounded by the
   call's deadline and ``connect_timeout``; Ctrl-C or a cancel kills and reaps the starting
   ssh);
2. the channel run (:func:`sshwrap.core.session.run_on_channel`), or for ``Popen`` the start
   (:func:`sshwrap.core.channel_popen.start_popen`);
3. retried ONCE on a new master when the master was lost before the command could have
   started (the channel was not open yet: ``ChannelLost``); the second loss is
   ``SSHConnectionError``; another channel failure is an ``SSHError``;
4. a master that refuses proxy mode (older OpenSSH, ``ControlMaster ask``; ``proxy=False``
   forces it) runs the command as ``ssh -S`` through it: the procedure of ``sshwrap.run``
   (:func:`sshwrap.core.ssh_run.run_ssh`), with what is left of the timeout, ``tty`` and
   ``size`` in both faces; its ``TimeoutExpired`` carries the caller's timeout; a session
   that ended without a status while the master died is ``CommandLostError`` there too
   (read where ssh's exit is read, :class:`~sshwrap.core.invocation.Invocation`); a session
   the server refused (``MaxSessions``) is tried again until a slot frees, over the same
   master (no new login), bounded as the channel path's wait for a slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

from ..errors import (
    CalledProcessError,
    SSHConnectionError,
    SSHError,
    TimeoutExpired,
)
from ..io.deadline import deadline_after, earliest, remaining, time_left
from ..io.master import Master
from ..io.pump import ChannelError, ChannelLost, ProxyCore, check_exec_size
from . import session as sessions
from .argv import remote_command
from .channel_streams import RunStreams
from .completed import CompletedProcess
from .options import (
    Command,
    CommandOptions,
    StreamOptions,
    SudoOptions,
    TerminalOptions,
    TextOptions,
    keys_of,
    text_encoding,
)
from .session import KILL_AFTER, NO_SLOT, Backoff, run_on_channel
from .sudo import sudo_settings
from .waiting import Blocking, Procedure, Sleep

if TYPE_CHECKING:  # the ssh -S fallback and Popen load these when used (a fan-out never does)
    from .channel_popen import ChannelPopen, ChannelPopenOptions

__all__ = [
    "ABORT_WAIT",
    "ChannelRunOptions",
    "on_master",
    "run_command",
    "start_command",
    "use_master",
]

T = TypeVar("T")

ABORT_WAIT = 1.0
"""Seconds a cancelled (async) start of the master may take to be killed and reaped."""


class ChannelRunOptions(
    CommandOptions, StreamOptions, TextOptions, TerminalOptions, SudoOptions, total=False
):
    """The keywords of ``Connection.run`` (and ``AsyncConnection.run``) after the command:
    those of ``sshwrap.run`` without the ssh settings (the master has them; ``sudo=True``
    too), plus ``kill_after`` (TERM -> KILL on a timeout) and ``connect_timeout`` (a
    restart's bound)."""

    input: bytes | str | None
    capture_output: bool
    timeout: float | None
    check: bool
    kill_after: float
    connect_timeout: float | None


_FALLBACK_KEYS = keys_of(CommandOptions) | keys_of(StreamOptions) | keys_of(TextOptions)
_FALLBACK_KEYS |= keys_of(TerminalOptions) | keys_of(SudoOptions)


def use_master(master: Master, deadline: float | None = None) -> Procedure[ProxyCore | None]:
    """The master's proxy core (None: use ``ssh -S``), starting or restarting it if needed."""
    core = master.ready()
    if core is None:
        core = yield Blocking(lambda abort: master.ensure(deadline, abort), ABORT_WAIT)
    return core


def on_master(
    master: Master,
    deadline: float | None,
    attempt: Callable[[ProxyCore], Procedure[T]],
    fallback: Callable[[], Procedure[T]],
) -> Procedure[T]:
    """``attempt(core)`` on the master's proxy core, once more on a new master when the
    first was lost before the command started (``ChannelLost``); ``fallback()`` when the
    master refuses proxy mode (the same retry when its ``ssh -S`` found no master).
    ``deadline`` bounds a (re)start of the master."""
    for last in (False, True):
        core = yield from use_master(master, deadline)
        try:
            if core is None:
                return (yield from fallback())
            return (yield from attempt(core))
        except ChannelLost:
            if last:
                raise SSHConnectionError(master.host, "the control master is gone") from None
        except ChannelError as e:
            raise SSHError(master.host, str(e)) from None
    raise AssertionError("unreachable")


class StartGuard:
    r"""Keeps a command that ``ssh -S`` asked for from running once its ssh is gone.

    The master answers a new-session request only once the server opened the channel, and
    until then it does not read the client's socket (OpenSSH's mux.c
    ``mux_master_process_new_session``: ``c->mux_pause = 1``); then it sends ``exec`` whether
    the client is still there or not (``mux_session_confirm`` -> ``client_session2_setup``),
    and only then finds it gone.  So a call interrupted (or timed out) before the host
    answered would run its command later.  The guard: the remote command first reads a
    random token line from its stdin (the master reads that pipe only once the channel is
    open) and runs nothing without it; then stdin is ``run``'s ``input`` (in the pipe too,
    up to :data:`MOST`), or at its end, as ``DEVNULL`` gives.  A call
    that ends early :meth:`withdraw`\ s the token from the pipe (sshwrap keeps a reading
    end): if the master had not read it yet, the command never runs; if it had, the session
    was open and the call's stop reaches the command.  Not for a stdin of the caller's or a
    tty (a terminal would echo the token), nor an ``input`` beyond :data:`MOST`.
    """

    MOST = 1 << 20
    """Most ``input`` a guard carries (the pipe holds it all, grown to fit; Linux's default
    ``pipe-max-size``): beyond it the call runs unguarded."""

    def __init__(self, data: bytes = b"") -> None:
        self.token = secrets.token_hex(8)
        self._line = self.token.encode() + b"\n"
        self.stdin, w = os.pipe()
        self._back = os.dup(self.stdin)
        try:
            payload = memoryview(self._line + data)
            if len(payload) > 65536 and hasattr(fcntl, "F_SETPIPE_SZ"):
                with contextlib.suppress(OSError):
                    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, len(payload))
            os.set_blocking(w, False)
            while payload:  # BlockingIOError: it does not fit, no guard
                payload = payload[os.write(w, payload) :]
        except BaseException:
            self.close()
            raise
        finally:
            os.close(w)

    @classmethod
    def make(cls, data: bytes | None) -> StartGuard | None:
        """A guard carrying ``data`` as the rest of stdin, or None when it does not fit."""
        if data is not None and len(data) > cls.MOST:
            return None
        try:
            return cls(data or b"")
        except BlockingIOError:
            return None

    def command(self, remote: str) -> str:
        """``remote`` (a shell command line) behind the guard line."""
        return f'IFS= read -r t && [ "$t" = {self.token} ] || exit 0\n{remote}'

    def withdraw(self) -> None:
        """Take the token back from the pipe if the master has not read it."""
        if self._back >= 0:
            # only the token line: if it was still there, the guard fails on what follows
            # (the input); if the master had read it, the session is open (and being stopped)
            os.set_blocking(self._back, False)
            with contextlib.suppress(OSError):
                os.read(self._back, len(self._line))

    def close(self) -> None:
        """Release the pipe (the master holds its own copy while the session lives)."""
        for fd in (self.stdin, self._back):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.stdin = self._back = -1


def _run_through(
    master: Master,
    args: Command,
    deadline: float | None,
    timeout: float | None,
    options: ChannelRunOptions,
    passed: dict[str, Any],
) -> Procedure[CompletedProcess]:
    """``ssh -S`` through ``master`` (:func:`~sshwrap.core.ssh_run.run_ssh`), tried again
    while the server refuses the session (its ``MaxSessions``: the master's fallback
    settings keep ssh from logging in anew), as the channel path waits for a slot: after a
    growing delay, until ``deadline`` or, without a timeout, ``OPEN_TIMEOUT``; then the
    channel path's ``TimeoutExpired`` / ``SSHError``."""
    from .invocation import MASTER_GONE, MasterGoneError, SessionRefusedError
    from .ssh_run import run_ssh

    host = master.host
    give_up = deadline if deadline is not None else deadline_after(sessions.OPEN_TIMEOUT)
    backoff = Backoff()
    data = options.get("input")
    if data is None:
        guarded = options.get("stdin", subprocess.DEVNULL) == subprocess.DEVNULL
    else:  # (input with a stdin: run_ssh refuses it, as subprocess.run does)
        guarded = options.get("stdin") is None
        if isinstance(data, str):
            data = data.encode(
                options.get("encoding") or text_encoding(), options.get("errors") or "strict"
            )
    # (sudo feeds stdin itself, password first: its fallback runs unguarded, as with a tty)
    guarded = guarded and not options.get("tty", False) and not options.get("sudo", False)
    while True:
        guard = StartGuard.make(data) if guarded else None
        try:
            result: CompletedProcess = yield from run_ssh(
                master.destination,
                args if guard is None else guard.command(remote_command(args)),
                input=options.get("input") if guard is None else None,
                capture_output=options.get("capture_output", False),
                timeout=time_left(deadline),  # what a restart of the master left
                **(passed if guard is None else passed | {"stdin": guard.stdin}),
                **master.fallback_settings(direct_login=False),
            )
            return CompletedProcess(
                args, result.returncode, result.stdout, result.stderr, host=host
            )
        except TimeoutExpired as e:  # the caller's timeout, not what was left of it
            assert timeout is not None
            if guard is not None:
                guard.withdraw()
            raise TimeoutExpired(args, timeout, e.output, e.stderr, host=host) from None
        except MasterGoneError:  # the master died just now: nothing ran, a new one is tried
            raise ChannelLost(MASTER_GONE) from None
        except SessionRefusedError:
            left = remaining(give_up)
            if left is not None and left <= 0:
                if timeout is not None:
                    raise TimeoutExpired(args, timeout, host=host) from None
                raise SSHError(host, NO_SLOT) from None
            pause = backoff.next()
            yield Sleep(pause if left is None else min(pause, left))
        except BaseException:  # Ctrl-C, a cancel, an error: a session not open yet never runs
            if guard is not None:
                guard.withdraw()
            raise
        finally:
            if guard is not None:
                guard.close()


def _command(args: Command, options: CommandOptions) -> str:
    """The remote command line (``env``/``cwd`` applied), refused before anything is sent
    when it would not fit in one request."""
    command = remote_command(args, env=options.get("env"), cwd=options.get("cwd"))
    check_exec_size(command)
    return command


def run_command(
    master: Master, args: Command, **options: Unpack[ChannelRunOptions]
) -> Procedure[CompletedProcess]:
    """Run ``args`` over ``master`` and wait: the procedure of ``Connection.run`` (same
    arguments, results, errors and bounds; see its docstring).  ``timeout`` bounds the whole
    call, a restart of the master included; ``connect_timeout`` bounds that restart."""
    timeout = options.get("timeout")
    deadline = deadline_after(timeout)
    command = _command(args, options)
    host = master.host
    sudo = sudo_settings(options)
    if sudo is not None and sudo.password.given:  # one Password: a callable is asked once
        options["sudo_password"] = sudo.password

    def make_result(a: Any, rc: int, out: Any, err: Any) -> CompletedProcess:
        return CompletedProcess(a, rc, out, err, host=host)

    def attempt(core: ProxyCore) -> Procedure[CompletedProcess]:
        streams = RunStreams.for_run(host, args, options)
        result: CompletedProcess = yield from run_on_channel(
            core,
            streams,
            streams.wrap(command),
            timeout=timeout,
            deadline=deadline,
            check=options.get("check", False),
            kill_after=options.get("kill_after", KILL_AFTER),
            tty=options.get("tty", False),
            size=options.get("size"),
            make_result=make_result,
        )
        return result

    def fallback() -> Procedure[CompletedProcess]:
        passed: dict[str, Any] = {k: v for k, v in options.items() if k in _FALLBACK_KEYS}
        result: CompletedProcess = yield from _run_through(
            master, args, deadline, timeout, options, passed
        )
        if options.get("check", False) and result.returncode != 0:
            raise CalledProcessError(
                result.returncode, args, result.stdout, result.stderr, host=host
            )
        return result

    start_deadline = earliest(deadline, options.get("connect_timeout"))
    return (yield from on_master(master, start_deadline, attempt, fallback))


def start_command(
    master: Master, args: Command, **options: Unpack[ChannelPopenOptions]
) -> Procedure[ChannelPopen | None]:
    """Start ``args`` on a channel of ``master``: the ``ChannelPopen`` (the procedure of
    ``Connection.Popen`` and ``AsyncConnection.create_process``), or None when the master
    refuses proxy mode (the face then starts ``ssh -S`` through it: its own process type)."""
    from .channel_popen import start_popen

    command = _command(args, options)

    def attempt(core: ProxyCore) -> Procedure[ChannelPopen | None]:
        popen: ChannelPopen = yield from start_popen(core, master.host, args, command, **options)
        return popen

    def fallback() -> Procedure[ChannelPopen | None]:
        return None
        yield  # a procedure that waits for nothing

    return (yield from on_master(master, None, attempt, fallback))
