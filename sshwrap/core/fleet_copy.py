"""Fleet copy, written once: one file (or tree) to or from many hosts over their masters.

``sshwrap.put_many``/``get_many`` and their async twins run :func:`copy_many`, a procedure
(:mod:`sshwrap.core.waiting`) that supervises one worker thread per host in flight, at most
``concurrency`` at a time.  Each worker starts the host's ControlMaster (a host given by name:
a ``Connection`` that is closed afterwards) or reuses the one of a ``Connection`` it was given
(left open), then copies over it with SFTP (the transfer functions of ``sshwrap.transfer``,
handed in by the face: atomic per file, verified, recursive, modes and times kept), the
session asked of the master itself (``MUX_C_NEW_SESSION`` with our socket passed to it: no
``ssh -S`` process per host, ~7 ms of CPU each).

Why threads: the SFTP session (:mod:`sshwrap.io.sftp_session`) is blocking IO, and so is a
master's start; a thread per host in flight runs them unchanged, and no pty is forked (the
fork-with-threads hazard of pitfall 9 does not arise: ssh starts with ``subprocess`` pipes and
socketpairs only).  The supervisor is a procedure, not a thread: it waits on a change counter
the workers bump, so the sync face blocks the caller's thread (Ctrl-C interrupts it) and the
async face awaits on the loop, with one body.  Workers block ``SIGINT``, so Ctrl-C always
reaches the caller's thread (and the ssh children they start ignore it: sshwrap ends them).

Bounds.  ``connect_timeout`` bounds each master's start (the starting ssh killed and reaped:
``ssh_error``, as ``run_many``'s connect timeout); ``timeout`` bounds each host's transfer
once its master is up (``timeout``); ``deadline`` the whole call (hosts it stops or never
starts: ``timeout``).  A host to stop is first asked to stop at its next acknowledged chunk
(the transfer then removes its temporary file, remote ones included), and after
:data:`STOP_GRACE` seconds its byte stream is cut (``Abort``): an upload whose temporary file
is still there removes it through a new SFTP session over the same master, within
``sshwrap.transfer.FRESH_REMOVE_TIMEOUT`` (a loaded host answers the old session only after
the writes still in flight); its master is closed if it was started here.  So a stopped host
is done within about 1 s of its bound, every ssh it started reaped.
Ctrl-C (sync) and cancellation (async) stop every host the same way; the sync face
then raises :class:`CopyInterrupted` (a ``KeyboardInterrupt``) carrying every result, the
unfinished ones ``cancelled``.  Nothing partial ever appears under a destination's name (the
transfers' guarantee); only a connection that dies mid-upload (or a host that does not
answer for the whole stop) can leave a remote ``.NAME.sshwrap-*.part`` file behind.

Per-host values.  ``%h`` in either path is replaced by the host's name (its destination for a
``Connection``), ``%%h`` is a literal ``%h`` and any other ``%`` stays as it is: the one
expander of commands and paths, :func:`sshwrap.core.per_host.expand_host`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, cast, runtime_checkable

from ..errors import SkippedError, SSHError
from ..io.deadline import earliest, remaining
from ..io.fd_budget import check_fd_budget
from ..io.flags import Changes, Flag
from ..io.master import Master
from ..io.sftp_session import Abort
from .batches import Gate, Spec, gate_of
from .host_result import CopyInterrupted, CopyResult, Status
from .options import SSH_SETTINGS_KEYS, SSHSettings, check_keywords
from .per_host import expand_host, has_host_token
from .waiting import Procedure, WaitChange

__all__ = [
    "STOP_GRACE",
    "CopyInterrupted",
    "CopyOptions",
    "CopyPlan",
    "CopyResult",
    "CopyTools",
    "Direction",
    "HostLink",
    "copy_many",
    "copy_plans",
    "expand_host",
    "has_host_token",
]

Direction = Literal["put", "get"]
STOP_GRACE = 0.3
"""Seconds a host asked to stop gets to stop at a chunk boundary (its cleanup done) before
its byte stream is cut."""
_JOIN_BOUND = 6.0  # after a stop: the longest wait for the workers (masters' close included)
_PROGRESS = Callable[[int, int], None]


class CopyOptions(SSHSettings, total=False):
    """The keywords of ``put_many``/``get_many`` (both faces) after the paths.

    ``concurrency`` (32), ``timeout``, ``connect_timeout`` (30 s) and ``deadline`` as in
    ``run_many`` (see the module docstring); the ssh settings (``config``, ``user``, ``port``,
    ``identity``, ``jump``, ``options``, ``ssh``) for the hosts given by name;
    ``batch_mode`` (default on: ``BatchMode=yes``, a fleet cannot answer prompts);
    ``preserve_times`` (default on); ``on_progress(host, done, total)`` in bytes, called from
    the host's worker thread (an exception it raises fails that host); ``on_result(result)``
    each host's :class:`CopyResult` as the host ends (before the call returns), in the
    caller's thread (sync) or on the loop (async): an exception it raises stops every host
    as Ctrl-C does, then goes on (a ``KeyboardInterrupt``: :class:`CopyInterrupted`);
    ``batch``, ``max_fail``, ``canary`` as ``run_many``'s (:mod:`sshwrap.core.batches`).
    """

    concurrency: int
    timeout: float | None
    connect_timeout: float | None
    deadline: float | None
    batch_mode: bool
    preserve_times: bool
    on_progress: Callable[[str, int, int], None] | None
    on_result: Callable[[CopyResult], None] | None
    batch: Spec
    max_fail: Spec
    canary: int | None


class Transfer(Protocol):
    """``sshwrap.transfer.put`` or ``get``: ``(source, destination, *, ...)``."""

    def __call__(
        self,
        src: str,
        dst: str,
        /,
        *,
        destination: str,
        ssh_args: Sequence[str],
        ssh: str | None,
        progress: _PROGRESS | None,
        preserve_times: bool,
        abort: Abort | None,
        control_path: str | None,
    ) -> None: ...  # pragma: no cover - protocol


@runtime_checkable
class HostLink(Protocol):
    """A host given as a connection: ``sshwrap.Connection`` (or anything with its
    ``destination`` and ``master``)."""

    @property
    def destination(self) -> str: ...  # pragma: no cover - protocol

    @property
    def master(self) -> Master: ...  # pragma: no cover - protocol


class OwnedLink(HostLink, Protocol):
    """A connection the copy starts for a host name, and closes."""

    def close(self) -> None: ...  # pragma: no cover - protocol


@dataclass(frozen=True)
class CopyTools:
    """What the face hands the core: the transfers and how to make a host's connection."""

    put: Transfer
    get: Transfer
    connect: Callable[[str, SSHSettings, float | None], OwnedLink]
    """``connect(name, settings, connect_timeout)``: a ``Connection``, not started."""


def _local_name(host: str) -> str:
    """``host`` as one local path component (``get_many``'s ``local_dir/HOST``, a ``%h`` in a
    local path): refused when it would not be one."""
    if host in ("", ".", "..") or "/" in host or "\0" in host:
        raise ValueError(f"host {host!r} cannot name a local directory or file")
    return host


@dataclass(frozen=True)
class CopyPlan:
    """One host's copy: its name, what to reach it by, its two paths, and the local
    directory to create first (``get``: ``local_dir/HOST``, or a ``%h`` target's parent)."""

    index: int
    host: str
    link: str | HostLink
    source: str
    target: str
    local_dir: str = ""


def _link_of(i: int, item: object) -> str | HostLink:
    if isinstance(item, str | HostLink):
        return item
    raise TypeError(
        f"hosts[{i}] must be a host name (str) or a Connection, not {type(item).__name__}"
    )


def copy_plans(
    direction: Direction,
    links: Sequence[object],
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
) -> list[CopyPlan]:
    """The plan of every host, checked before anything starts (``ValueError``/``TypeError``:
    a host that cannot name a local path, two hosts writing the same local
    path; ``FileNotFoundError``: a ``put_many`` source without ``%h`` that does not exist)."""
    src, dst = os.fspath(source), os.fspath(target)
    if not isinstance(src, str) or not isinstance(dst, str):
        raise TypeError("the paths must be str or os.PathLike[str]")
    if not src or not dst:
        raise ValueError("the source and the target must not be empty")
    per_host_local = has_host_token(src if direction == "put" else dst)
    if direction == "put" and not per_host_local:
        os.stat(src)  # one missing source fails the call, not every host
    plans: list[CopyPlan] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(links):
        link = _link_of(i, item)
        name = link if isinstance(link, str) else link.destination
        local_name = _local_name(name) if per_host_local or direction == "get" else name
        s = expand_host(src, name if direction == "get" else local_name)
        d = expand_host(dst, name if direction == "put" else local_name)
        local_dir = ""
        if direction == "get":
            if per_host_local:
                local_dir = os.path.dirname(d)
            else:
                d = local_dir = os.path.join(dst, local_name)
            where = os.path.abspath(d)
            if where in seen:
                raise ValueError(f"hosts {seen[where]!r} and {name!r} would both write {d!r}")
            seen[where] = name
        plans.append(CopyPlan(i, name, link, s, d, local_dir))
    return plans


# -- one host, in its thread ------------------------------------------------------------------
class _Stopped(BaseException):
    """Raised from the progress callback of a host asked to stop (a BaseException, so the
    transfer's cleanup takes its short interrupted path and the error is not a result)."""


@dataclass(frozen=True)
class _Job:
    """What every host's worker does, and its bounds."""

    transfer: Transfer
    graceful: bool  # a stop waits for a chunk boundary (an upload: its remote cleanup)
    connect: Callable[[str, SSHSettings, float | None], OwnedLink]
    settings: SSHSettings
    connect_timeout: float | None
    timeout: float | None
    preserve_times: bool
    on_progress: Callable[[str, int, int], None] | None


class _Host:
    """One host's copy in a worker thread, and what the supervisor needs to bound it."""

    def __init__(self, plan: CopyPlan, job: _Job, events: Changes, t_end: float | None):
        self.plan = plan
        self.job = job
        self.events = events
        self.t_end = t_end
        self.stop_flag = Flag()  # aborts a master's start; the progress callback raises
        self.abort = Abort()
        self.stop_status: Status | None = None
        self.stop_at: float | None = None  # when the stop was asked (the cut comes later)
        self.cut = False
        self.ticking = False  # bytes may be moving: a stop waits for a chunk boundary
        self.until: float | None = None  # the transfer's timeout, once the master is up
        self.done = 0
        self.total: int | None = None
        self.result: CopyResult | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread."""
        # SIGINT blocked while the thread starts: it inherits the mask, so Ctrl-C is
        # delivered to the caller's thread (a wait there wakes), never to a worker.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.thread = threading.Thread(
                target=self._main, name=f"sshwrap-copy-{self.plan.host}", daemon=True
            )
            self.thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def stop(self, status: Status, now: float) -> None:
        """Ask the copy to stop (``status`` is its result's): at its next chunk when bytes
        of an upload are moving (its temporary file is then removed), else cut at once."""
        if self.stop_status is not None:
            return
        self.stop_status, self.stop_at = status, now
        self.stop_flag.set()
        if not (self.ticking and self.job.graceful):
            self.cut_now()

    def cut_now(self) -> None:
        """Cut the copy's byte stream: it raises at once, wherever it waits."""
        if not self.cut:
            self.cut = True
            self.abort.abort()

    def check(self, now: float) -> float | None:
        """Apply the bounds due at ``now``; when to look again (None: on its events only)."""
        if self.stop_at is None and self.until is not None and now >= self.until:
            self.stop("timeout", now)
        if self.stop_at is None:
            return self.until
        if not self.cut and now >= self.stop_at + STOP_GRACE:
            self.cut_now()
        return None if self.cut else self.stop_at + STOP_GRACE

    def _progress(self, done: int, total: int) -> None:
        self.ticking = True
        self.done, self.total = done, total
        if self.stop_flag.is_set():
            raise _Stopped
        if self.job.on_progress is not None:
            self.job.on_progress(self.plan.host, done, total)

    def _main(self) -> None:
        plan, job = self.plan, self.job
        t0, started = time.monotonic(), time.time()
        status: Status = "ok"
        error: BaseException | None = None
        connect_time: float | None = None
        owned: OwnedLink | None = None
        made = ""
        try:
            link = plan.link
            if isinstance(link, str):
                link = owned = job.connect(link, job.settings, job.connect_timeout)
            master = link.master
            master.ensure(earliest(self.t_end, job.connect_timeout), self.stop_flag)
            connect_time = time.monotonic() - t0
            ssh_args = master.ssh_args()
            if job.timeout is not None:
                self.until = time.monotonic() + job.timeout
                self.events.bump()  # the supervisor arms the bound
            if plan.local_dir and not os.path.isdir(plan.local_dir):
                os.makedirs(plan.local_dir, exist_ok=True)
                made = plan.local_dir
            job.transfer(
                plan.source,
                plan.target,
                destination=link.destination,
                ssh_args=ssh_args,
                ssh=master.ssh,
                progress=self._progress,
                preserve_times=job.preserve_times,
                abort=self.abort,
                control_path=master.control_path,  # the master runs the SFTP session itself
            )
        except _Stopped:
            status = "cancelled"
        except SSHError as e:
            status, error = "ssh_error", e
        except BaseException as e:  # a transfer error, a local OSError, a callback's own
            status, error = "failed", e
        finally:
            try:
                if owned is not None:
                    owned.close()
                if made and status != "ok":
                    with contextlib.suppress(OSError):
                        os.rmdir(made)  # (only if empty: nothing came)
            finally:
                if status != "ok" and self.stop_status is not None:
                    status, error = self.stop_status, None
                elif status == "ssh_error" and self._past_deadline():
                    status, error = "timeout", None
                self.result = CopyResult(
                    host=plan.host,
                    status=status,
                    error=error,
                    started=started,
                    duration=time.monotonic() - t0,
                    connect_time=connect_time,
                    source=plan.source,
                    target=plan.target,
                    transferred=self.done,
                    total=self.total,
                    index=plan.index,
                )
                self.events.bump()

    def _past_deadline(self) -> bool:
        left = remaining(self.t_end)
        return left is not None and left <= 0.05


# -- the supervisor: one procedure for both faces ---------------------------------------------
def _never_ran(plan: CopyPlan, status: Status, gate: Gate | None = None) -> CopyResult:
    """A host that never started: ``status``, or ``skipped`` when the gate had stopped."""
    why = gate.stopped if gate is not None and status != "cancelled" else None
    error = None if why is None else SkippedError(plan.host, why)
    status = status if why is None else "skipped"
    s, t, i = plan.source, plan.target, plan.index
    return CopyResult(plan.host, status, error, None, 0.0, source=s, target=t, index=i)


def copy_many(
    func: str,
    direction: Direction,
    links: Sequence[object],
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    tools: CopyTools,
    options: CopyOptions,
) -> Procedure[list[CopyResult]]:
    """The procedure of ``func`` (``put_many``/``get_many``): copy ``source`` to ``target``
    on every host (``put``: local to remote; ``get``: remote into the local directory
    ``target/HOST/``, or to the path ``target`` when it holds ``%h``); one ``CopyResult`` per
    host, in input order.  ``options`` are :class:`CopyOptions`.

    Everything is checked here, before any host starts: a bad keyword, bound, token or path
    raises at once (``TypeError``/``ValueError``/``FileNotFoundError``; ``FdBudgetError``
    when the open-files limit cannot hold ``concurrency`` hosts)."""
    check_keywords(func, options, CopyOptions)
    gate = gate_of(len(links), options)
    concurrency = options.get("concurrency", 32)
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError("concurrency must be an int of at least 1")
    for name in ("timeout", "connect_timeout", "deadline"):
        value = cast(dict[str, object], options).get(name)
        if value is not None and (not isinstance(value, int | float) or value <= 0):
            raise ValueError(f"{name} must be a positive number of seconds")
    plans = copy_plans(direction, links, source, target)
    check_fd_budget(min(concurrency, max(1, len(plans))))
    settings = cast(SSHSettings, {k: v for k, v in options.items() if k in SSH_SETTINGS_KEYS})
    if options.get("batch_mode", True):
        given = settings.get("options") or {}
        if not any(k.lower() == "batchmode" for k in given):
            settings["options"] = {**given, "BatchMode": "yes"}
    job = _Job(
        transfer=tools.put if direction == "put" else tools.get,
        graceful=direction == "put",
        connect=tools.connect,
        settings=settings,
        connect_timeout=options.get("connect_timeout", 30.0),
        timeout=options.get("timeout"),
        preserve_times=options.get("preserve_times", True),
        on_progress=options.get("on_progress"),
    )
    on_result = options.get("on_result")
    return _supervise(plans, job, concurrency, options.get("deadline"), on_result, gate)


def _supervise(
    plans: list[CopyPlan],
    job: _Job,
    concurrency: int,
    deadline: float | None,
    on_result: Callable[[CopyResult], None] | None,
    gate: Gate | None,
) -> Procedure[list[CopyResult]]:
    t_end = None if deadline is None else time.monotonic() + deadline
    events = Changes()
    waiting = list(reversed(plans))
    running: list[_Host] = []
    results: dict[int, CopyResult] = {}
    seen = 0

    def collect() -> None:
        for h in list(running):
            if h.result is not None:
                assert h.thread is not None
                h.thread.join()
                results[h.plan.index] = h.result
                running.remove(h)
                if gate is not None:
                    gate.ended(h.plan.index, h.result.status, h.plan.host)
                if on_result is not None:
                    on_result(h.result)
            elif h.thread is None or h.thread.ident is None:  # never started (interrupted)
                h.stop("cancelled", time.monotonic())  # (if it did start: it ends at once)
                h.cut_now()
                running.remove(h)

    def complete(status: Status) -> list[CopyResult]:
        return [results.get(p.index) or _never_ran(p, status, gate) for p in plans]

    def wait(until: float | None) -> WaitChange:
        """Until a host's event, or ``until`` (the next bound: the host's, ``deadline``)."""
        wakes = [w for h in running if (w := h.check(time.monotonic())) is not None]
        if until is not None:
            wakes.append(until)
        left = None if not wakes else max(0.0, min(wakes) - time.monotonic())
        return WaitChange(events, seen, left)

    def stop_all(status: Status) -> Procedure[None]:
        """Stop every running host and wait for them (bounded)."""
        nonlocal seen
        now = time.monotonic()
        for h in running:
            h.stop(status, now)
        bound = now + _JOIN_BOUND
        try:
            while True:
                seen = events.value
                collect()
                if not running or time.monotonic() >= bound:
                    break
                yield wait(bound)
        except BaseException:  # interrupted again: cut every stream now
            for h in running:
                h.cut_now()
            raise
        for h in running:  # not done within the bound (never seen): reported as stopped
            results[h.plan.index] = _never_ran(h.plan, h.stop_status or status)

    try:
        while True:
            seen = events.value
            collect()
            if t_end is not None and time.monotonic() >= t_end:
                yield from stop_all("timeout")
                return complete("timeout")
            while waiting and len(running) < concurrency:
                if gate is not None and not gate.may_start(waiting[-1].index):
                    break  # the next wave waits, or max_fail / a canary stopped the copy
                h = _Host(waiting.pop(), job, events, t_end)
                running.append(h)
                h.start()
            if not running:  # all done, or the gate stopped the rest
                return complete("skipped")
            yield wait(t_end)
    except GeneratorExit:  # closed unfinished (no driver any more): stop without waiting
        for h in running:
            h.stop("cancelled", time.monotonic())
            h.cut_now()
        raise
    except KeyboardInterrupt:
        yield from stop_all("cancelled")
        raise CopyInterrupted(complete("cancelled")) from None
    except BaseException:
        yield from stop_all("cancelled")
        raise
