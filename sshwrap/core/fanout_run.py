"""The fan-out scheduler: one command on many hosts, at most ``concurrency`` in flight.

:class:`FanoutRun` plans every host (its ssh command line, its remote session tag), then
:meth:`FanoutRun.results` runs them on the running loop and yields each host's
:class:`~sshwrap.core.host_result.HostResult` as it finishes.  Leaving the generator (the
end, ``aclose()``, a cancelled task) ends every ssh child by process group, waits for each
one and removes the run's FIFO directory: nothing is left running locally.  Hosts that had
finished keep their results (:meth:`FanoutRun.complete`), the others are ``cancelled``
(:meth:`FanoutRun.stopped_results` holds what those in flight had produced).

Hosts start in input order, from the loop's thread; a result is taken from a done callback,
so a host's end costs the scheduler the same whatever the concurrency.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Protocol, Unpack, runtime_checkable

from ..errors import CommandTooLongError
from ..io.fd_budget import check_fd_budget
from ..io.fd_watcher import FdWatcher
from ..io.host_process import ChildStarter, HostProcess, ssh_version
from ..protocol.sshlog import SHORT_LOG_SETTINGS, short_log_supported
from .argv import (
    build_ssh_argv,
    check_destination,
    find_ssh,
    remote_command,
    settings_args_of,
)
from .fanout_host import (
    KILL_GRACE,
    ConnectionLike,
    FanoutJob,
    HostPlan,
    HostRun,
    HostTimers,
    OutputCallback,
    host_process,
    process_result,
    run_over_connection,
)
from .host_result import HostResult, unfinished_result
from .options import CommandOptions, SSHSettings, SudoOptions
from .sudo import SudoRun, sudo_settings

__all__ = ["ControlPathHost", "FanoutOptions", "FanoutRun"]

_Pending = asyncio.Future[HostResult] | HostRun
"""A host in flight: a :class:`HostRun`, or the task of a host over a connection."""


@runtime_checkable
class ControlPathHost(Protocol):
    """A host reached through an existing ControlMaster (``ssh -o ControlPath=...``)."""

    @property
    def destination(self) -> str: ...  # pragma: no cover - protocol

    @property
    def control_path(self) -> str: ...  # pragma: no cover - protocol


class FanoutOptions(SSHSettings, CommandOptions, SudoOptions, total=False):
    """The keywords of a fan-out besides hosts, command, ``concurrency`` and the bounds (see
    ``sshwrap.aio.run_many``): ssh settings, ``env``/``cwd``, ``sudo``/``sudo_password``/
    ``sudo_user``, and these."""

    input: bytes | None
    batch_mode: bool
    kill_remote: bool
    on_output: OutputCallback | None
    on_start: Callable[[str], None] | None
    retries: int


def _check_bounds(concurrency: int, **bounds: float | None) -> None:
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    for name, value in bounds.items():
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive")


class FanoutRun:
    """One command on many hosts: the plan, then :meth:`results` runs it.

    The keywords are those of ``sshwrap.aio.run_many`` (see there and
    :class:`FanoutOptions`); ``check_budget`` (default
    on) refuses with ``FdBudgetError``, before anything starts, a concurrency the open-files
    limit cannot hold.  A host that is a :class:`~sshwrap.core.fanout_host.ConnectionLike`
    runs as a channel of its master; another :class:`ControlPathHost` as ``ssh -o
    ControlPath=...``.
    """

    def __init__(
        self,
        hosts: Iterable[str | ControlPathHost],
        command: str | Sequence[str],
        *,
        concurrency: int,
        timeout: float | None,
        connect_timeout: float | None,
        deadline: float | None,
        check_budget: bool = True,
        **options: Unpack[FanoutOptions],
    ) -> None:
        _check_bounds(
            concurrency, timeout=timeout, connect_timeout=connect_timeout, deadline=deadline
        )
        self.concurrency = concurrency
        self.deadline = deadline
        self.on_start = options.get("on_start")
        retries = options.get("retries", 0)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative int, not {retries!r}")
        env, cwd = options.get("env"), options.get("cwd")
        sudo = sudo_settings(options)
        self.job = FanoutJob(
            command,
            options.get("ssh") or find_ssh(),
            timeout,
            connect_timeout,
            options.get("input"),
            env,
            cwd,
            options.get("on_output"),
            retries,
            sudo,
        )
        settings = settings_args_of(options)
        batch_mode = options.get("batch_mode", True)
        host_list = list(hosts)
        # Every destination is checked before anything runs (not even ``ssh -V`` below).
        named = {
            i: _destination(h)
            for i, h in enumerate(host_list)
            if isinstance(h, str) or not isinstance(h, ConnectionLike)
        }
        for dest, _extra in named.values():
            check_destination(dest)
        # ssh's log is read for the session up and the exit's meaning: the short log (a
        # quarter of DEBUG1's lines, each one a write for ssh and bytes to read here) where
        # this ssh takes it.
        if short_log_supported(ssh_version(self.job.ssh)):
            fixed = list(SHORT_LOG_SETTINGS)
        else:
            fixed = ["-o", "LogLevel=DEBUG1"]
        if batch_mode:
            fixed += ["-o", "BatchMode=yes"]
        if connect_timeout is not None:
            fixed += ["-o", f"ConnectTimeout={max(1, round(connect_timeout))}"]
        # The session tag only serves the remote stop after ``timeout`` / ``deadline``.
        # Without either, the command goes exactly as a plain ``ssh host cmd`` sends it.
        # (The ``export`` line costs no extra remote fork with the shells measured: bash
        # 5.2 execs the last command of ``-c`` either way, Debian's dash 0.5.12 never does.)
        tagged = options.get("kill_remote", True) and (timeout is not None or deadline is not None)
        kill_base = ["-o", "BatchMode=yes", *settings] if batch_mode else settings
        untagged_text = None if tagged else remote_command(command, env=env, cwd=cwd)
        # Under sudo, env/cwd go inside ``sudo ... sh -c`` and the tag outside, on sudo.
        sudo_inner = None if sudo is None else remote_command(command, env=env, cwd=cwd)
        self.plans: list[HostPlan] = []
        common = [*fixed, *settings]
        heads = _ArgvHeads(self.job.ssh, common, host_list)
        for i, h in enumerate(host_list):
            if i not in named:
                assert isinstance(h, ConnectionLike)
                self.plans.append(HostPlan(i, h.destination, [], conn=h))
                continue
            dest, extra = named[i]
            sid = secrets.token_hex(8) if tagged else None
            sudo_run = None
            if sudo_inner is not None:
                assert sudo is not None
                sudo_run = SudoRun(dest, sudo, self.job.input)
                text = remote_command(sudo_run.command(sudo_inner), session_id=sid)
            elif untagged_text is not None:
                text = untagged_text
            else:
                text = remote_command(command, env=env, cwd=cwd, session_id=sid)
            head = None if extra else heads.head(text)
            if head is not None:
                argv = [*head, dest, text]
            else:
                argv = build_ssh_argv(self.job.ssh, dest, text, settings=[*common, *extra])
            # The remote stop's argv is built only when a host needs it.
            kill_settings = kill_base if not extra else [*kill_base, *extra]
            self.plans.append(HostPlan(i, dest, argv, sid, kill_settings, sudo=sudo_run))
        if check_budget:
            check_fd_budget(min(concurrency, max(1, len(self.plans))))
        self._running: dict[int, HostProcess] = {}
        self._stopped: dict[int, HostResult] = {}
        self._remote_stops: set[asyncio.Task[None]] = set()

    @property
    def hosts(self) -> list[str]:
        """Every host's name (its destination), in input order."""
        return [p.host for p in self.plans]

    def stopped_results(self) -> list[HostResult]:
        """In input order, the results of the hosts that were in flight when the run was left
        early: ``cancelled`` with their output so far, or their own result when they had just
        finished."""
        return [self._stopped[i] for i in sorted(self._stopped)]

    def complete(self, results: Mapping[int, HostResult]) -> list[HostResult]:
        """One result per host in input order: ``results`` (by index), else the host's stopped
        result, else ``cancelled``."""
        out = []
        for p in self.plans:
            r = results.get(p.index) or self._stopped.get(p.index)
            out.append(r or unfinished_result(p.host, p.index, "cancelled"))
        return out

    async def results(self) -> AsyncGenerator[HostResult, None]:
        """Yield each host's result as it finishes; on exit (even cancelled) end every child."""
        loop = asyncio.get_running_loop()
        if self.job.sudo is not None and self.job.sudo.password.given:
            # A callable is asked here, once for every host, before any starts (not in the
            # middle of a host's output).
            self.job.sudo.password.get()
        t_end = None if self.deadline is None else time.monotonic() + self.deadline
        fifo_dir = tempfile.mkdtemp(prefix="sshwrap-many-")
        watcher = FdWatcher(loop)
        starter = ChildStarter()
        timers = HostTimers(loop)
        todo = list(reversed(self.plans))
        tasks: dict[_Pending, int] = {}
        done: collections.deque[_Pending] = collections.deque()
        wake: list[asyncio.Future[None]] = []

        def finished(task: _Pending) -> None:
            done.append(task)
            if wake and not wake[0].done():
                wake[0].set_result(None)

        try:
            while todo or tasks:
                while todo and len(tasks) < self.concurrency:
                    if t_end is not None and time.monotonic() >= t_end:
                        break
                    plan = todo.pop()
                    if self.on_start is not None:
                        self.on_start(plan.host)
                    if plan.conn is not None:
                        task = asyncio.ensure_future(run_over_connection(self.job, plan, t_end))
                        task.add_done_callback(finished)
                        tasks[task] = plan.index
                        continue
                    proc = host_process(self.job, plan, watcher, fifo_dir, starter)
                    self._running[plan.index] = proc
                    run = HostRun(
                        self.job,
                        plan,
                        proc,
                        t_end,
                        self._remote_stops,
                        finished,
                        timers,
                        None
                        if not self.job.retries  # (no retry: no next attempt to start)
                        else partial(self._respawn, plan, watcher, fifo_dir, starter),
                    )
                    tasks[run] = plan.index
                    run.start()
                if not tasks:
                    break  # the deadline passed before the rest could start
                if not done:
                    wake.append(loop.create_future())
                    try:
                        await wake[0]
                    finally:
                        wake.clear()
                ended = done.popleft()
                idx = tasks.pop(ended)
                self._running.pop(idx, None)
                yield ended.result()
            while todo:  # never started: the total deadline ran out first
                plan = todo.pop()
                yield unfinished_result(plan.host, plan.index, "timeout")
        finally:
            try:
                await self._shutdown(tasks)
            finally:
                timers.close()
                watcher.close()
                shutil.rmtree(fifo_dir, ignore_errors=True)

    def _respawn(
        self,
        plan: HostPlan,
        watcher: FdWatcher,
        fifo_dir: str,
        starter: ChildStarter,
        attempt: int,
    ) -> HostProcess:
        """The process of a host's next attempt, in :attr:`_running` in place of the last."""
        proc = host_process(self.job, plan, watcher, fifo_dir, starter, attempt)
        self._running[plan.index] = proc
        return proc

    async def _shutdown(self, tasks: Mapping[_Pending, int]) -> None:
        # A host whose task had finished (only its result was not yet taken) keeps it.
        for t, idx in tasks.items():
            if t.done() and not t.cancelled() and t.exception() is None:
                self._stopped[idx] = t.result()
        host_runs = {i: t for t, i in tasks.items() if isinstance(t, HostRun)}
        runs = [(i, p) for i, p in self._running.items() if i not in self._stopped]
        self._running.clear()
        # A host whose ssh had already exited when the run was cancelled is done: it keeps
        # its real result (only the loop had not yet seen the exit), not "cancelled".
        exited = {i for i, p in runs if p.has_exited()}
        try:
            for t in tasks:
                t.cancel()
            # Signal every group at once, then wait for all of them together.
            for _, p in runs:
                p.signal_group(signal.SIGTERM)
            until = time.monotonic() + KILL_GRACE
            for _, p in runs:
                if p.proc is not None:
                    await p.wait_exit(until)
            futures = [t for t in tasks if isinstance(t, asyncio.Future)]
            if futures:
                await asyncio.wait(futures)
            stops = list(self._remote_stops)
            if stops:
                # Each remote stop ends (or is killed and reaped) within its own budget; a
                # cancel now ends them at once (their ssh killed and reaped).
                try:
                    await asyncio.wait(stops)
                except asyncio.CancelledError:
                    for s in stops:
                        s.cancel()
                    await asyncio.wait(stops)
                    raise
        finally:
            for i, p in runs:
                p.kill_now()
                plan = self.plans[i]
                stopped = process_result(plan, p, None if i in exited else "cancelled")
                hr = host_runs.get(i)
                self._stopped[i] = stopped if hr is None else hr.with_attempts(stopped)
            for t, i in tasks.items():  # hosts over a connection
                if i not in self._stopped and (t.cancelled() or not t.done()):
                    plan = self.plans[i]
                    self._stopped[i] = unfinished_result(plan.host, i, "cancelled")


class _ArgvHeads:
    """The part of the hosts' ssh argv before ``host command``, built once per run.

    :func:`~sshwrap.core.argv.build_ssh_argv` checks the sizes against the kernel's limits;
    done once with the longest destination written in 4-byte characters (the worst any
    host's can encode to) and a command of the hosts' length (they differ only in their
    session tag, of a fixed length), what it passes every host passes.  When that check
    fails, the head is None and each host's argv is built (and refused) on its own.
    """

    def __init__(self, ssh: str, settings: list[str], hosts: Sequence[object]) -> None:
        self.ssh = ssh
        self.settings = settings
        longest = max((len(h) for h in hosts if isinstance(h, str)), default=0)
        self.placeholder = "\U0010ffff" * max(1, longest)
        self._head: list[str] | None = None
        self._text_len = -1

    def head(self, text: str) -> list[str] | None:
        """The head for a command of ``text``'s length (None: build each argv fully)."""
        if len(text) != self._text_len:
            self._text_len = len(text)
            try:
                argv = build_ssh_argv(self.ssh, self.placeholder, text, settings=self.settings)
            except CommandTooLongError:
                self._head = None
            else:
                self._head = argv[:-2]
        return self._head


def _destination(host: str | ControlPathHost) -> tuple[str, list[str]]:
    if isinstance(host, str):
        return host, []
    settings = ["-o", f"ControlPath={host.control_path}", "-o", "ControlMaster=no"]
    return host.destination, settings
