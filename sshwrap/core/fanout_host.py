"""One host of a fan-out: its bounds, its stop, its result.

Timeouts: ``connect_timeout`` bounds the time from start until the session is up (it is
also handed to ssh as ``ConnectTimeout``); ``timeout`` bounds the remote command from then
on; the run's deadline bounds everything.  A host over its limit has its ssh process group
killed (TERM, then KILL after :data:`KILL_GRACE`); the others do not notice.  A command that
outlives ``timeout`` is also stopped on the remote side when the plan carries a session tag
(``kill_remote``): a second, short ssh signals the processes so tagged (TERM, then KILL on
the remote side).  That second ssh starts at once, alongside the local stop, with a
``ConnectTimeout`` and a limit of :data:`STOP_BUDGET`: when the host does not answer in time
(a cut link, a frozen sshd) it is killed and reaped, so every bound holds within 1 s,
cleanup included.

A host given as a connection runs as a channel of that connection's ControlMaster: its own
bounds (``timeout``, ``connect_timeout``, ``kill_after``) do the work.

Retries (``retries``, default 0): a host whose ssh failed before its session was up with a
connection-level failure (an ``SSHConnectionError``: refused, timed out, reset, closed
during the banner or key exchange, unreachable, or ``connect_timeout`` itself) is started
again, up to ``retries`` more times, after a backoff with full jitter (uniform in
``[0, min(RETRY_CAP, RETRY_BASE * 2**(n-1))]`` before the n-th retry), each attempt with its
own ``connect_timeout``.  Never retried: a failure after the session was up, a remote
command's status (``exit 255`` included), authentication, host key and config failures
(retrying those hides an attack or locks accounts), a name that does not resolve (a wrong
name stays wrong), and a host whose backoff would end at or past the run's deadline.  A
host over a connection is not retried (its master's restart is its own).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import random
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

from ..errors import CommandLostError, SSHConnectionError, SSHError, SudoError, TimeoutExpired
from ..io.deadline import capped
from ..io.fd_watcher import FdWatcher
from ..io.host_process import ChildStarter, HostProcess, run_bounded
from ..io.master import Master
from .argv import build_ssh_argv, remote_signal_script
from .commands import run_command
from .host_result import (
    HostResult,
    Status,
    connect_timeout_error,
    interpret_ssh_exit,
    result_status,
)
from .host_timers import HostTimers
from .sudo import SudoRun, SudoSettings
from .waiting import run_async

__all__ = [
    "KILL_GRACE",
    "RETRY_BASE",
    "RETRY_CAP",
    "STOP_BUDGET",
    "ConnectionLike",
    "FanoutJob",
    "HostPlan",
    "HostRun",
    "HostTimers",
    "OutputCallback",
    "host_process",
    "process_result",
    "retry_delay",
    "retryable",
    "run_over_connection",
]

# Every bound (``timeout``, ``deadline``, ``connect_timeout``) covers the stop that follows it:
# ssh gets TERM, then KILL after KILL_GRACE; the remote stop (a second ssh) gets STOP_BUDGET
# from the moment the bound ran out, and is killed and reaped when that is over.  So a host
# ends, cleanup included, within STOP_BUDGET (0.7 s) of its bound: inside the 1 s promised.
KILL_GRACE = 0.5
"""Seconds between TERM and KILL for a host's ssh."""
STOP_BUDGET = 0.7
"""Seconds the remote stop may take after a host's bound ran out."""
RETRY_BASE = 0.5
"""Seconds: the bound of the first retry's backoff (doubling for each one after it)."""
RETRY_CAP = 8.0
"""Seconds: the largest bound of a retry's backoff."""
_NAME_NOT_RESOLVED = (
    "could not resolve",
    "name or service not known",
    "name resolution",
    "nodename nor servname",
)
_CONN_KILL_AFTER = 0.3  # TERM -> KILL over a connection (which adds at most 0.5 s more)
_EOF_GRACE = 2.0  # seconds to wait for pipes to close once ssh has exited

OutputCallback = Callable[[str, int, bytes], None]
"""``on_output(host, stream, data)``: stream 1 is stdout, 2 is stderr."""


@runtime_checkable
class ConnectionLike(Protocol):
    """A host given as a connection (``sshwrap.Connection``, ``sshwrap.aio.AsyncConnection``):
    its command runs as a channel of ``master`` (:func:`sshwrap.core.commands.run_command`)."""

    @property
    def destination(self) -> str: ...  # pragma: no cover - protocol

    @property
    def control_path(self) -> str: ...  # pragma: no cover - protocol

    @property
    def master(self) -> Master: ...  # pragma: no cover - protocol


@dataclass(frozen=True)
class FanoutJob:
    """What every host runs, and the bounds each host gets."""

    command: str | Sequence[str]
    ssh: str
    timeout: float | None
    connect_timeout: float | None
    input: bytes | None = None
    env: Mapping[str, str] | None = None
    cwd: str | os.PathLike[str] | None = None
    on_output: OutputCallback | None = None
    retries: int = 0
    """How many more times a host is started after a connection-level failure."""
    sudo: SudoSettings | None = None
    """``sudo=True``: each host's command goes through ``sudo -S`` (:class:`HostPlan.sudo`)."""


@dataclass
class HostPlan:
    """One host's part: its index in the input, its name, and how its command goes."""

    index: int
    host: str
    argv: list[str]
    """The ssh command line (without ``-E``, which each start adds)."""
    sid: str | None = None
    """The remote command's session tag, when ``kill_remote`` is on."""
    kill_settings: list[str] | None = None
    """ssh settings of the remote stop."""
    conn: ConnectionLike | None = None
    """A connection: the command runs as a channel of its master (``argv`` unused)."""
    command: str | Sequence[str] | None = None
    """Over a connection: the host's own command (``%h`` replaced, a per-host one), else
    None for the job's."""
    sudo: SudoRun | None = None
    """``sudo=True``: the host's sudo (its stderr's filter; ``argv`` runs its command).  An
    attempt that is retried never had a session, so never fed it: the next one reuses it."""


def _deadline_first(limit: float | None, t_end: float | None, t0: float) -> bool:
    if t_end is None:
        return False
    return limit is None or t_end <= t0 + limit


def retry_delay(retry: int) -> float:
    """The backoff before the ``retry``-th retry (1 for the first): full jitter, uniform in
    ``[0, min(RETRY_CAP, RETRY_BASE * 2**(retry-1))]``."""
    return random.uniform(0.0, min(RETRY_CAP, RETRY_BASE * 2.0 ** (retry - 1)))


def retryable(result: HostResult, session_up: bool) -> bool:
    """Whether a host's failed attempt may be tried again: ssh failed with a connection-level
    error (not a lost command, not a name that does not resolve) before any session."""
    error = result.error
    if session_up or result.status != "ssh_error" or not isinstance(error, SSHConnectionError):
        return False
    if isinstance(error, CommandLostError):
        return False
    words = f"{error.message}\n{error.stderr}\n{result.ssh_log}".lower()
    return not any(w in words for w in _NAME_NOT_RESOLVED)


def host_process(
    job: FanoutJob,
    plan: HostPlan,
    watcher: FdWatcher,
    fifo_dir: str,
    starter: ChildStarter | None = None,
    attempt: int = 1,
) -> HostProcess:
    """The (not yet started) ssh child of ``plan``, its log FIFO (if any) in ``fifo_dir``;
    ``starter``: the run's (one per run: the environment is taken once); ``attempt``: which
    start of the host it is (each has its own FIFO)."""
    on_output = None if job.on_output is None else partial(job.on_output, plan.host)
    fifo = f"{fifo_dir}/{plan.index}" if attempt == 1 else f"{fifo_dir}/{plan.index}.{attempt}"
    return HostProcess(
        plan.argv,
        watcher=watcher,
        fifo_path=fifo,
        input=job.input if plan.sudo is None else None,  # (sudo sends it after the password)
        on_output=on_output,
        starter=starter,
        stderr_filter=plan.sudo,
    )


def process_result(
    plan: HostPlan, proc: HostProcess, status: Status | None, error: SSHError | None = None
) -> HostResult:
    """The host's result; a ``status`` given forces timeout/cancelled/ssh_error.  Under sudo,
    a command that sudo did not run is ``failed`` with the :class:`SudoError` (no
    ``returncode``)."""
    end = proc.t_end if proc.t_end is not None else time.monotonic()
    log = proc.log.decode(errors="replace")
    returncode: int | None = None
    signalled = False
    failure: SSHError | SudoError | None = error
    if status is None:
        assert proc.returncode is not None
        sudo = plan.sudo
        if sudo is not None and sudo.failed is not None:  # refused: ssh was killed for it
            status, failure = "failed", sudo.failed
        else:
            returncode, failure, signalled = interpret_ssh_exit(
                plan.host, proc.returncode, log, proc.err
            )
            status = result_status(returncode, failure)
            if sudo is not None and failure is None and (refusal := sudo.outcome(returncode)):
                status, failure, returncode, signalled = "failed", refusal, None, False
    return HostResult(
        host=plan.host,
        returncode=returncode,
        stdout=b"".join(proc.out),
        stderr=b"".join(proc.err),
        error=failure,
        started=proc.started_wall,
        duration=(end - proc.t0) if proc.started_wall is not None else 0.0,
        status=status,
        connect_time=None if proc.t_up is None else proc.t_up - proc.t0,
        signalled=signalled,
        ssh_log=log,
        index=plan.index,
    )


_CONNECT, _COMMAND, _DRAIN, _STOPPING, _BACKOFF, _DONE = range(6)


class HostRun:
    """One host's ssh seen through its bounds; :attr:`result` once :meth:`done`.

    No task per host: the run is a small state machine that the child's events (the session
    up, the exit, the pipes closed: :attr:`HostProcess.listener
    <sshwrap.io.host_process.HostProcess.listener>`) and one timer at a time step on, from the
    loop's thread; ``on_done(self)`` is called once, at the end.  Phases: connect (until the
    session is up or ssh exits, bounded by ``connect_timeout`` and the run's deadline
    ``t_end``), command (until ssh exits, bounded by ``timeout`` and ``t_end``), drain (what is
    still in the pipes once ssh has exited: a child of ssh's may hold them, not past the
    host's bound), or stopping (TERM, then KILL after :data:`KILL_GRACE`).  A remote stop
    started for a timed-out host goes into ``remote_stops`` (and leaves it when done).  With
    ``job.retries``, a retryable failure (:func:`retryable`) leads to a backoff (one timer),
    then ``respawn()`` gives the next attempt's process (:attr:`proc`, :attr:`attempts`).
    :meth:`cancel` leaves the process to the caller (the run's shutdown ends it).  It has the
    ``done``/``cancelled``/``exception``/``result`` of a future, to sit among the tasks of the
    hosts over a connection.
    """

    def __init__(
        self,
        job: FanoutJob,
        plan: HostPlan,
        proc: HostProcess,
        t_end: float | None,
        remote_stops: set[asyncio.Task[None]],
        on_done: Callable[[HostRun], None],
        timers: HostTimers,
        respawn: Callable[[int], HostProcess] | None = None,
    ) -> None:
        self.job = job
        self.respawn = respawn
        self.plan = plan
        self.proc = proc
        self.t_end = t_end
        self.remote_stops = remote_stops
        self.on_done = on_done
        self.timers = timers

    # The state every host starts in (class attributes: an instance stores what changes).
    attempts = 1
    """How many ssh were started for the host so far."""
    _first: tuple[float | None, float] | None = None
    _phase = _CONNECT
    _until: float | None = None
    _timer_at: float | None = None
    _stop_status: Status = "timeout"
    _result: HostResult | None = None
    _error: BaseException | None = None

    def start(self) -> None:
        """Start the host's ssh (from the loop's thread); :meth:`done` at once if it cannot."""
        self._launch()

    def _launch(self) -> None:
        proc = self.proc
        try:
            proc.start()
        except OSError as e:
            error = SSHError(self.plan.host, f"cannot run ssh: {e}")
            self._finish(process_result(self.plan, proc, "ssh_error", error))
            return
        limit = self.job.connect_timeout
        if self.t_end is not None:
            limit = capped(limit, self.t_end)
        self._until = None if limit is None else time.monotonic() + limit
        proc.listener = self._step
        self._step()

    def _step(self) -> None:
        try:
            self._advance()
        except Exception as e:  # the consumer gets it, as from a task
            self._cancel_timer()
            self.proc.listener = None
            self.proc.kill_now()
            self._phase = _DONE
            self._error = e
            self.on_done(self)

    def _advance(self) -> None:
        proc = self.proc
        while True:
            phase = self._phase
            if phase == _DONE:
                return
            if proc.refused is not None and phase <= _DRAIN:  # sudo refused: at once, no retry
                proc.kill_now()
                self._finish(process_result(self.plan, proc, None))
                return
            until = self._until
            late = until is not None and time.monotonic() >= until  # (the loop's clock)
            if phase == _CONNECT:
                if proc.up or proc.exit_seen:
                    limit = self.job.timeout
                    if self.t_end is not None:
                        limit = capped(limit, self.t_end)
                    self._until = None if limit is None else time.monotonic() + limit
                    self._phase = _COMMAND
                    continue
                if late:
                    first = _deadline_first(self.job.connect_timeout, self.t_end, proc.t0)
                    self._stop("timeout" if first else "ssh_error")
                    continue
            elif phase == _COMMAND:
                if proc.exit_seen:
                    if proc.pipes_closed:  # (the usual end: nothing left to drain)
                        self._end_drained()
                        return
                    if proc.log_writer is not None:
                        proc.log_writer_close()
                    grace = _EOF_GRACE
                    if until is not None:
                        grace = min(grace, max(0.0, until - time.monotonic()) + KILL_GRACE)
                    self._until = time.monotonic() + grace
                    self._phase = _DRAIN
                    continue
                if late:
                    # The remote stop starts now, alongside the local one: both end within
                    # STOP_BUDGET of the bound.
                    _remote_stop(
                        self.job, self.plan, time.monotonic() + STOP_BUDGET, self.remote_stops
                    )
                    self._stop("timeout")
                    continue
            elif phase == _DRAIN:
                if proc.pipes_closed or late:
                    self._end_drained()
                    return
            elif phase == _BACKOFF:
                if late:
                    self._restart()
                    return
            elif proc.exit_seen or late:  # _STOPPING
                proc.kill_now()
                self._end(self._stopped_result())
                return
            self._arm(until)
            return

    def _end_drained(self) -> None:
        """ssh exited and its output is read (or the drain's grace ran out): the result."""
        self.proc.kill_now()
        self._end(process_result(self.plan, self.proc, None))

    def _end(self, result: HostResult) -> None:
        """The attempt's end: the host's result, or a backoff before the next attempt."""
        proc = self.proc
        if self.attempts > self.job.retries or self.respawn is None:
            self._finish(result)
            return
        if not retryable(result, proc.up or proc.t_up is not None):
            self._finish(result)
            return
        delay = retry_delay(self.attempts)
        now = time.monotonic()
        if self.t_end is not None and now + delay >= self.t_end:
            self._finish(result)
            return
        if self._first is None:
            self._first = (proc.started_wall, proc.t0)
        proc.listener = None
        self._phase = _BACKOFF
        self._until = proc.loop.time() + delay
        self._arm(self._until)

    def _restart(self) -> None:
        assert self.respawn is not None
        self.attempts += 1
        self.proc = self.respawn(self.attempts)
        self._phase = _CONNECT
        self._launch()

    def _stop(self, status: Status) -> None:
        """TERM the host's group now; KILL at the end of the grace (or once it exited)."""
        self._stop_status = status
        self._phase = _STOPPING
        self.proc.signal_group(signal.SIGTERM)
        self._until = self.proc.loop.time() + KILL_GRACE

    def _stopped_result(self) -> HostResult:
        proc, plan = self.proc, self.plan
        if self._stop_status == "timeout":
            return process_result(plan, proc, "timeout")
        assert self.job.connect_timeout is not None
        log = proc.log.decode(errors="replace")
        error = connect_timeout_error(plan.host, self.job.connect_timeout, log)
        return process_result(plan, proc, "ssh_error", error)

    def _arm(self, until: float | None) -> None:
        if until != self._timer_at:
            self._timer_at = until  # (an earlier time left in the timers goes stale)
            if until is not None:
                self.timers.arm(self, until)

    def on_timer(self) -> None:
        """The time armed has come (called by :class:`HostTimers`)."""
        self._timer_at = None
        self._step()

    def _cancel_timer(self) -> None:
        self._timer_at = None

    @property
    def timer_at(self) -> float | None:
        """When this host's timer is armed for (None: not armed)."""
        return self._timer_at

    def with_attempts(self, result: HostResult) -> HostResult:
        """``result`` with this host's attempt count (and ``started``/``duration`` from its
        first attempt on)."""
        if self.attempts == 1 or self._first is None:
            return result
        started, t0 = self._first
        duration = result.duration
        if result.started is not None:
            duration += self.proc.t0 - t0
        return dataclasses.replace(
            result, attempts=self.attempts, started=started, duration=duration
        )

    def _finish(self, result: HostResult) -> None:
        if self.attempts != 1:
            result = self.with_attempts(result)
        self._timer_at = None
        self.proc.listener = None
        self._phase = _DONE
        self._result = result
        self.on_done(self)

    def cancel(self) -> bool:
        """Stop seeing the host through (its process is the caller's to end); whether it was
        still running."""
        if self._phase == _DONE:
            return False
        self._cancel_timer()
        self.proc.listener = None
        self._phase = _DONE
        return True

    def done(self) -> bool:
        """Whether the host has its result (or an error)."""
        return self._result is not None or self._error is not None

    def cancelled(self) -> bool:
        """Whether :meth:`cancel` ended it before it was done."""
        return self._phase == _DONE and not self.done()

    def exception(self) -> BaseException | None:
        """What went wrong in sshwrap itself while seeing the host through, if anything."""
        return self._error

    def result(self) -> HostResult:
        """The host's result (or the error that stopped the run from getting it)."""
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def _remote_stop(
    job: FanoutJob, plan: HostPlan, until: float, remote_stops: set[asyncio.Task[None]]
) -> None:
    """Start the remote stop of a timed-out host: a second ssh, bounded by ``until``.

    Its ``ConnectTimeout`` is what is left until ``until`` (ssh's minimum is 1 s), and at
    ``until`` (``time.monotonic()``) it is killed and reaped if still running.  The remote
    script escalates to KILL on its own, so it finishes there even when the local side
    has given up on it.
    """
    if plan.sid is None or plan.kill_settings is None:
        return
    script = remote_signal_script(plan.sid, signal.SIGTERM, escalate=True)
    connect = max(1, math.ceil(until - time.monotonic()))
    settings = ["-o", f"ConnectTimeout={connect}", *plan.kill_settings]
    argv = build_ssh_argv(job.ssh, plan.host, script, settings=settings)
    task = asyncio.ensure_future(run_bounded(argv, until))
    remote_stops.add(task)
    task.add_done_callback(remote_stops.discard)


async def run_over_connection(job: FanoutJob, plan: HostPlan, t_end: float | None) -> HostResult:
    """A host given as a connection: the command is a channel of its master."""
    assert plan.conn is not None
    started = time.time()
    t0 = time.monotonic()
    returncode: int | None = None
    error: SSHError | SudoError | None = None
    out: bytes = b""
    err: bytes = b""
    status: Status
    try:
        # The connection's own bounds do the work: ``timeout`` covers the whole call
        # (a dead master's restart too) and returns within timeout + kill_after + 0.5 s;
        # ``connect_timeout`` bounds the restart.  Cancelling it (Ctrl-C) stops the
        # restart or the remote command within about 1 s.
        sudo = job.sudo
        run = run_command(
            plan.conn.master,
            job.command if plan.command is None else plan.command,
            input=job.input,
            capture_output=True,
            timeout=capped(job.timeout, t_end),
            connect_timeout=capped(job.connect_timeout, t_end),
            kill_after=_CONN_KILL_AFTER,
            env=job.env,
            cwd=job.cwd,
            sudo=sudo is not None,
            sudo_password=None if sudo is None or not sudo.password.given else sudo.password,
            sudo_user=None if sudo is None else sudo.user,
        )
        cp = await run_async(run)
    except TimeoutExpired as e:
        status = "timeout"
        out = e.output if isinstance(e.output, bytes) else b""
        err = e.stderr if isinstance(e.stderr, bytes) else b""
    except SSHError as e:
        status, error = "ssh_error", e
    except SudoError as e:  # (as over ssh: the command did not run)
        status, error = "failed", e
    else:
        returncode, out, err = cp.returncode, cp.stdout or b"", cp.stderr or b""
        status = result_status(returncode, None)
    if job.on_output is not None:
        for stream, data in ((1, out), (2, err)):
            if data:
                job.on_output(plan.host, stream, data)
    return HostResult(
        host=plan.host,
        returncode=returncode,
        stdout=out,
        stderr=err,
        error=error,
        started=started,
        duration=time.monotonic() - t0,
        status=status,
        connect_time=0.0 if error is None else None,
        signalled=returncode is not None and returncode < 0,
        index=plan.index,
    )
