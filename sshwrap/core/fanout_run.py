"""The fan-out scheduler: one command on many hosts, at most ``concurrency`` in flight.

:class:`FanoutRun` plans every host (its ssh command line, its remote session tag), then
:meth:`FanoutRun.results` runs them on the running loop and yields each host's
:class:`~sshwrap.core.host_result.HostResult` as it finishes.  Leaving the generator (the
end, ``aclose()``, a cancelled task) ends every ssh child by process group, waits for each
one and removes the run's FIFO directory: nothing is left running locally.  Hosts that had
finished keep their results (:meth:`FanoutRun.complete`), the others are ``cancelled``
(:meth:`FanoutRun.stopped_results` holds what those in flight had produced).

Hosts start in input order, from the loop's thread; a result is taken from a done callback,
so a host's end costs the scheduler the same whatever the concurrency.  With ``batch``,
``max_fail`` or ``canary`` a :class:`~sshwrap.core.batches.Gate` says whether the next host may
start (its wave is open, nothing stopped the run) and is told each result; the hosts it never
let start come back ``skipped``.  Without them there is no gate (one ``None`` test per host).
"""

from __future__ import annotations

import asyncio
import collections
import os
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
from ..io.persist import IndexEntry
from ..protocol.sshlog import SHORT_LOG_SETTINGS, short_log_supported
from .argv import (
    build_ssh_argv,
    check_destination,
    find_ssh,
    remote_command,
    settings_args_of,
)
from .batches import Gate, Spec, gate_of
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
from .fanout_warm import PersistedHosts
from .host_result import HostResult, skipped_result, unfinished_result
from .options import CommandOptions, SSHSettings, SudoOptions
from .per_host import (
    HostCommand,
    PerHostCommands,
    check_command,
    command_for,
    command_uses_host,
    per_host_commands,
)
from .sudo import SudoRun, sudo_settings

__all__ = ["ControlPathHost", "FanoutOptions", "FanoutRun"]

_Pending = asyncio.Future[HostResult | None] | HostRun
"""A host in flight: a :class:`HostRun`, or the task of a host over a connection (None: a
persisted master that did not answer, the host goes through ssh)."""


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
    batch: Spec
    max_fail: Spec
    canary: int | None
    persist_dir: str | None


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
        command: HostCommand | PerHostCommands,
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
            "" if isinstance(command, Mapping) else command,
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
        self._gate = gate_of(len(host_list), options)  # (a bad value refused before ssh -V)
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
        commands = _Commands(command, host_list, env, cwd)
        untagged_text = None if tagged or commands.varies else commands.text(command)
        # Under sudo, env/cwd go inside ``sudo ... sh -c`` and the tag outside, on sudo.
        sudo_inner = None if sudo is None or commands.varies else commands.text(command)
        self.plans: list[HostPlan] = []
        common = [*fixed, *settings]
        heads = _ArgvHeads(self.job.ssh, common, host_list)
        for i, h in enumerate(host_list):
            if i not in named:
                assert isinstance(h, ConnectionLike)
                own = commands.of(h.destination)
                self.plans.append(HostPlan(i, h.destination, [], conn=h, command=own))
                continue
            dest, extra = named[i]
            sid = secrets.token_hex(8) if tagged else None
            sudo_run = None
            if sudo is not None:
                sudo_run = SudoRun(dest, sudo, self.job.input)
                inner = sudo_inner
                if inner is None:
                    own = commands.of(dest)
                    inner = commands.text(command if own is None else own)
                text = remote_command(sudo_run.command(inner), session_id=sid)
            elif untagged_text is not None:
                text = untagged_text
            else:
                own = commands.of(dest)
                text = commands.text(command if own is None else own, sid)
            head = None if extra else heads.head(text)
            if head is not None:
                argv = [*head, dest, text]
            else:
                argv = build_ssh_argv(self.job.ssh, dest, text, settings=[*common, *extra])
            # The remote stop's argv is built only when a host needs it.
            kill_settings = kill_base if not extra else [*kill_base, *extra]
            self.plans.append(HostPlan(i, dest, argv, sid, kill_settings, sudo=sudo_run))
        # Hosts over the masters a run before left up (persist=): channels, no ssh process.
        self._persisted: PersistedHosts | None = None
        self._warm: dict[int, tuple[IndexEntry, HostCommand | None]] = {}
        directory = options.get("persist_dir")
        if directory:
            self._persisted = PersistedHosts(directory, self.job.ssh, settings, common)
            for p in self.plans:
                entry = None if p.conn is not None else self._persisted.lookup(p.host)
                if entry is not None:
                    self._warm[p.index] = (entry, commands.of(p.host))
        if check_budget:
            check_fd_budget(min(concurrency, max(1, len(self.plans))))
        self._running: dict[int, HostProcess] = {}
        self._stopped: dict[int, HostResult] = {}
        self._remote_stops: set[asyncio.Task[None]] = set()

    @property
    def hosts(self) -> list[str]:
        """Every host's name (its destination), in input order."""
        return [p.host for p in self.plans]

    def halt(self, reason: str) -> None:
        """Start no new host: those in flight finish, the others come back ``skipped`` for
        ``reason`` (a gateway agent told that the tree's ``max_fail`` was exceeded)."""
        if self._gate is None:
            self._gate = Gate(total=len(self.plans))
        self._gate.halt(reason)

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

        def start_ssh(plan: HostPlan) -> None:
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

        try:
            while todo or tasks:
                while todo and len(tasks) < self.concurrency:
                    if t_end is not None and time.monotonic() >= t_end:
                        break
                    if self._gate is not None and not self._gate.may_start(todo[-1].index):
                        break  # the next wave waits, or max_fail / a canary stopped the run
                    plan = todo.pop()
                    if self.on_start is not None:
                        self.on_start(plan.host)
                    task: asyncio.Future[HostResult | None]
                    if plan.conn is not None:
                        task = asyncio.ensure_future(run_over_connection(self.job, plan, t_end))
                    elif plan.index in self._warm:
                        assert self._persisted is not None
                        entry, own = self._warm[plan.index]
                        task = asyncio.ensure_future(
                            self._persisted.run(self.job, plan, entry, own, t_end)
                        )
                    else:
                        start_ssh(plan)
                        continue
                    task.add_done_callback(finished)
                    tasks[task] = plan.index
                if not tasks:
                    break  # the deadline passed (or the gate stopped) before the rest started
                if not done:
                    wake.append(loop.create_future())
                    try:
                        await wake[0]
                    finally:
                        wake.clear()
                ended = done.popleft()
                idx = tasks.pop(ended)
                self._running.pop(idx, None)
                result = ended.result()
                if result is None:  # its persisted master did not answer: through ssh
                    start_ssh(self.plans[idx])
                    continue
                if self._persisted is not None and result.connect_time is not None:
                    self._persisted.reached(result.host, self.concurrency)
                if self._gate is not None:
                    self._gate.ended(idx, result.status, result.host)
                yield result
            stopped = None if self._gate is None else self._gate.stopped
            while todo:  # never started: stopped by the gate, or the deadline ran out first
                plan = todo.pop()
                if stopped is not None:
                    yield skipped_result(plan.host, plan.index, stopped)
                else:
                    yield unfinished_result(plan.host, plan.index, "timeout")
            if self._persisted is not None:
                await self._persisted.record()
        finally:
            try:
                await self._shutdown(tasks)
                if self._persisted is not None:
                    await self._persisted.stop()
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
                r = t.result()
                if r is not None:
                    self._stopped[idx] = r
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
    """The part of the hosts' ssh argv before ``host command``, built once per command size.

    :func:`~sshwrap.core.argv.build_ssh_argv` checks the sizes against the kernel's limits;
    done with the longest destination written in 4-byte characters (the worst any host's can
    encode to) and the first command of each encoded size (the hosts' commands differ only in
    their session tag, of a fixed length, and in a ``%h`` or per-host command: a few sizes),
    what it passes every host of that size passes.  When that check fails, the head is None
    and each host's argv is built (and refused) on its own.
    """

    def __init__(self, ssh: str, settings: list[str], hosts: Sequence[object]) -> None:
        self.ssh = ssh
        self.settings = settings
        longest = max((len(h) for h in hosts if isinstance(h, str)), default=0)
        self.placeholder = "\U0010ffff" * max(1, longest)
        self._heads: dict[int, list[str] | None] = {}

    def head(self, text: str) -> list[str] | None:
        """The head for a command of ``text``'s size (None: build each argv fully)."""
        size = len(text) if text.isascii() else len(text.encode(errors="surrogateescape"))
        try:
            return self._heads[size]
        except KeyError:
            pass
        try:
            argv = build_ssh_argv(self.ssh, self.placeholder, text, settings=self.settings)
        except CommandTooLongError:
            head = None
        else:
            head = argv[:-2]
        self._heads[size] = head
        return head


class _Commands:
    """Each host's remote command: the run's one command, a per-host mapping's, ``%h``
    replaced (:mod:`sshwrap.core.per_host`)."""

    def __init__(
        self,
        command: HostCommand | PerHostCommands,
        hosts: Sequence[str | ControlPathHost],
        env: Mapping[str, str] | None,
        cwd: str | os.PathLike[str] | None,
    ) -> None:
        self.env, self.cwd = env, cwd
        self.mapping: dict[str, HostCommand] | None = None
        if isinstance(command, Mapping):
            names = [h if isinstance(h, str) else h.destination for h in hosts]
            self.mapping = per_host_commands(command, names, exact=False)
            self.varies = True
        else:
            check_command(command)
            self.varies = command_uses_host(command)
        self.command = command

    def of(self, host: str) -> HostCommand | None:
        """``host``'s own command (None: the run's, the same for every host)."""
        if self.mapping is not None:
            own = self.mapping[host]
        elif self.varies:
            own = self.command  # type: ignore[assignment]
        else:
            return None
        return command_for(own, host) if command_uses_host(own) else own

    def text(self, command: HostCommand | PerHostCommands, sid: str | None = None) -> str:
        """The remote command line of ``command`` (``of()``'s, or the run's)."""
        assert not isinstance(command, Mapping)
        return remote_command(command, env=self.env, cwd=self.cwd, session_id=sid)


def _destination(host: str | ControlPathHost) -> tuple[str, list[str]]:
    if isinstance(host, str):
        return host, []
    settings = ["-o", f"ControlPath={host.control_path}", "-o", "ControlMaster=no"]
    return host.destination, settings
