"""Fan-out through gateways, the control side: one ssh per gateway, results merged.

:class:`TreeRun` splits the hosts: those a gateway's pattern names go to that gateway (the
first gateway that names a host takes it), the rest run flat (:class:`FanoutRun`).  For each
gateway, :func:`gateway_results` starts ONE ssh to it, with the run's own ssh settings, that
runs ``python3`` there (:func:`sshwrap.io.bundle.bootstrap_command`), sends it the package's
archive and the request (:mod:`sshwrap.core.gateway_wire`), and turns the agent's JSON lines
back into :class:`HostResult`\\ s with the input's indices, as they arrive.

A gateway that cannot be reached, has no suitable ``python3``, or dies mid-run fails only its
own hosts that had not been reported yet: ``ssh_error`` with a
:class:`~sshwrap.errors.GatewayError` (an ``SSHConnectionError``) that names the gateway; a
host that a later gateway of ``via`` names too is tried through that gateway instead (one
whose chain avoids the gateway that failed).  A gateway behind a gateway (depth 2 and more,
see :class:`TreeRun`) is reached by the agent on the gateway in front of it.  Leaving the
run (its end, ``aclose()``, a cancelled task, Ctrl-C) closes each gateway ssh's stdin, which
the agent takes as the order to end every ssh it started; the gateway's ssh gets
:data:`STOP_WAIT` to exit, then TERM, then KILL after ``KILL_GRACE``, and is reaped.  With a
``deadline``, a gateway still running :data:`DEADLINE_GRACE` after it is ended the same way
and its unreported hosts are ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Mapping, Sequence
from typing import Any

from ..errors import GatewayError
from ..io.bundle import EXIT_OLD_PYTHON, bootstrap_command, package_zip
from .argv import build_ssh_argv, check_destination, find_ssh, settings_args_of
from .fanout_host import KILL_GRACE, OutputCallback
from .fanout_run import ControlPathHost, FanoutRun
from .gateway_wire import (
    REQUEST_KEYWORDS,
    START_PREFIX,
    WireError,
    decode_event,
    encode_request,
    encode_stop,
)
from .host_result import HostResult, Status, skipped_result, unfinished_result
from .per_host import HostCommand, PerHostCommands

__all__ = [
    "DEADLINE_GRACE",
    "STOP_WAIT",
    "Halt",
    "TreeRun",
    "gateway_chains",
    "gateway_results",
    "gateway_ssh_head",
    "inner_routes",
]

STOP_WAIT = 1.0
"""Seconds a gateway's ssh gets to exit once its stdin is closed (the agent's own cleanup)."""
DEADLINE_GRACE = 1.0
"""Seconds past the run's deadline before a gateway that has not finished is ended."""
_LINE_LIMIT = 1 << 30  # one result line holds a host's whole output (base64)
_READ_SIZE = 1 << 16  # what one read of the agent's lines takes at most
_STDERR_KEEP = 16384


def _reason(gateway: str, returncode: int | None, stderr: bytes, lost: bool) -> str:
    lines = [x for x in stderr.decode(errors="replace").splitlines() if x.strip()]
    last = lines[-1].strip() if lines else ""
    if returncode == 127:
        return f"gateway {gateway}: no python3 there ({last or 'not found'})"
    if returncode == EXIT_OLD_PYTHON:
        return f"gateway {gateway}: {last or 'python3 too old'}"
    if returncode == 255 and not lost:
        return f"gateway {gateway} unreachable: {last or 'ssh failed'}"
    how = (
        f"exit {returncode}"
        if returncode is not None and returncode >= 0
        else (f"signal {-returncode}" if returncode is not None else "still running")
    )
    return f"gateway {gateway}: connection lost ({how}){': ' + last if last else ''}"


class Halt:
    """ "Start no new host" for the gateways of a run (:meth:`TreeRun.halt`): each agent that
    runs gets a ``stop`` line on its stdin, once it has answered the request (so the line is
    never read with it); a gateway not yet sent its request gets none, its hosts ``skipped``."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._agents: set[asyncio.StreamWriter] = set()

    def __call__(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            for stdin in self._agents:
                self._send(stdin)

    def _send(self, stdin: asyncio.StreamWriter) -> None:
        assert self.reason is not None
        if not stdin.is_closing():
            stdin.write(encode_stop(self.reason))

    def watch(self, stdin: asyncio.StreamWriter) -> None:
        """The agent behind ``stdin`` runs its hosts: a stop, now or later, goes to it."""
        if stdin not in self._agents:
            self._agents.add(stdin)
            if self.reason is not None:
                self._send(stdin)

    def forget(self, stdin: asyncio.StreamWriter) -> None:
        self._agents.discard(stdin)


async def _end(proc: asyncio.subprocess.Process) -> None:
    """Close the gateway ssh's stdin, give it STOP_WAIT, then TERM, KILL; always reaped."""
    try:
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), STOP_WAIT)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), KILL_GRACE)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())


async def _agent_lines(
    stream: asyncio.StreamReader, t_end: float | None
) -> AsyncGenerator[bytes, None]:
    """The agent's lines (without their line ends) as they come, all that one read brings
    (one wake-up and one timer for many hosts' lines, not one each); ``TimeoutError`` once
    ``t_end`` (``time.monotonic()``) passes, ``WireError`` for a line over the limit."""
    tail = b""
    while True:
        left = None if t_end is None else t_end - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError
        read = stream.read(_READ_SIZE)
        chunk = await (read if left is None else asyncio.wait_for(read, left))
        if not chunk:
            if tail:
                yield tail  # (a last line cut short: its decoding fails, as it should)
            return
        *whole, tail = (tail + chunk).split(b"\n") if tail else chunk.split(b"\n")
        if len(tail) > _LINE_LIMIT:
            raise WireError(f"a line over {_LINE_LIMIT} bytes")
        for line in whole:
            if line:
                yield line


async def gateway_results(
    gateway: str,
    hosts: Sequence[tuple[int, str]],
    command: HostCommand | PerHostCommands,
    keywords: Mapping[str, Any],
    *,
    ssh_argv_head: Sequence[str],
    input: bytes | None = None,
    deadline: float | None = None,
    on_output: OutputCallback | None = None,
    on_start: Callable[[str], None] | None = None,
    halt: Halt | None = None,
) -> AsyncGenerator[HostResult, None]:
    """Run ``command`` on ``hosts`` ((input index, name) pairs) through ``gateway``; yield
    each host's result as the agent reports it (with the input index), then one error result
    for each host it did not report.  ``ssh_argv_head``: ssh and its settings, before the
    destination.  ``deadline``: seconds for the whole run (the agent has it too); ``halt``:
    the run's :class:`Halt` (once halted, no new host starts; those never started:
    ``skipped``)."""
    names = [h for _, h in hosts]
    t0, wall0 = time.monotonic(), time.time()
    t_end = None if deadline is None else t0 + deadline + DEADLINE_GRACE
    archive = package_zip()
    argv = [*ssh_argv_head, check_destination(gateway), bootstrap_command(len(archive))]
    reported: set[int] = set()
    status: Status = "ssh_error"
    reason = ""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        limit=_LINE_LIMIT,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    err = bytearray()

    async def drain_stderr(stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            err.extend(chunk)
            del err[:-_STDERR_KEEP]

    err_task = asyncio.ensure_future(drain_stderr(proc.stderr))
    done = False
    try:
        proc.stdin.write(archive)
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        try:
            async with contextlib.aclosing(_agent_lines(proc.stdout, t_end)) as lines:
                async for line in lines:
                    if on_start is None and line.startswith(START_PREFIX):
                        continue  # (nobody wants it: not decoded)
                    ev = decode_event(line, names)  # (a WireError ends the run: below)
                    if ev.kind == "ready" and halt is not None and halt.reason is not None:
                        status, reason = "skipped", halt.reason
                        break
                    if ev.kind != "ready" and halt is not None:
                        halt.watch(proc.stdin)
                    if ev.kind == "ready":
                        # The agent runs now: it gets what is left of the deadline, not all of it.
                        kw = dict(keywords)
                        if deadline is not None:
                            kw["deadline"] = max(0.001, deadline - (time.monotonic() - t0))
                        proc.stdin.write(
                            encode_request(
                                names, command, kw, input=input, output=on_output is not None
                            )
                        )
                        with contextlib.suppress(ConnectionError):
                            await proc.stdin.drain()
                    elif ev.kind == "done":
                        done = True
                        break
                    elif ev.kind == "fail":
                        reason = f"gateway {gateway}: the agent refused the run: {ev.message}"
                        break
                    elif ev.kind == "start":
                        if on_start is not None:
                            on_start(names[ev.index])
                    elif ev.kind == "out":
                        if on_output is not None:
                            on_output(names[ev.index], ev.stream, ev.data)
                    elif ev.result is not None and ev.index not in reported:
                        reported.add(ev.index)
                        ev.result.index = hosts[ev.index][
                            0
                        ]  # (decoded for this run alone: no copy)
                        yield ev.result
        except TimeoutError:
            status, reason = "timeout", f"gateway {gateway}: the deadline ran out"
        except WireError as e:
            reason = f"gateway {gateway}: bad answer from the agent ({e})"
    finally:
        if halt is not None:
            halt.forget(proc.stdin)
        await _end(proc)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(err_task, KILL_GRACE)
    if done and len(reported) == len(hosts):
        return
    if not reason:
        reason = _reason(gateway, proc.returncode, bytes(err), bool(reported))
    duration = time.monotonic() - t0
    for local, (i, h) in enumerate(hosts):
        if local in reported:
            continue
        if status == "timeout":
            yield unfinished_result(h, i, "timeout")
        elif status == "skipped":
            yield skipped_result(h, i, reason)
        else:
            stderr = bytes(err).decode(errors="replace")
            error = GatewayError(h, reason, stderr, gateway=gateway)
            yield HostResult(h, None, b"", b"", error, wall0, duration, "ssh_error", index=i)


def gateway_ssh_head(
    options: Mapping[str, Any], connect_timeout: float | None, forward_agent: bool | None
) -> list[str]:
    """ssh and its options, before the destination, for the ssh to a gateway: the call's ssh
    settings (the user's config applies as ssh reads it), ``-T``, ``BatchMode=yes`` unless
    ``batch_mode`` is off, ``ConnectTimeout``.  ``forward_agent``: ``None`` adds nothing, so
    the user's config decides (a ``ForwardAgent`` there is honoured; ssh's default is no);
    ``True`` adds ``-A`` (forward the agent to the gateways), ``False`` ``-a`` (never, even when
    the config says yes).  Either way the gateway's own ssh to its hosts reads the config as
    a flat run does."""
    fixed = ["-T", "-o", "LogLevel=ERROR"]
    if options.get("batch_mode", True):
        fixed += ["-o", "BatchMode=yes"]
    if connect_timeout is not None:
        fixed += ["-o", f"ConnectTimeout={max(1, round(connect_timeout))}"]
    if forward_agent is not None:
        fixed.append("-A" if forward_agent else "-a")
    head = [options.get("ssh") or find_ssh(), *fixed, *settings_args_of(options)]
    # ssh refuses a command line that is too long: checked here, before anything runs.
    build_ssh_argv(head[0], "gw", "x", settings=head[1:])
    return head


def gateway_chains(via: Mapping[str, Collection[str]]) -> dict[str, list[str]]:
    """Each gateway's chain, outermost first: a gateway that another one names (the first
    that does) is behind it.  ``ValueError`` for a cycle."""
    parent: dict[str, str] = {}
    for g in via:
        for f, members in via.items():
            if f != g and g in members:
                parent[g] = f
                break
    chains = {}
    for g in via:
        chain = [g]
        while chain[-1] in parent:
            up = parent[chain[-1]]
            if up in chain:
                loop = " -> ".join([up, *reversed(chain[chain.index(up) :])])
                raise ValueError(f"via: gateways behind each other in a cycle: {loop}")
            chain.append(up)
        chains[g] = chain[::-1]
    return chains


def inner_routes(
    chains: Mapping[str, Sequence[str]], hosts: Sequence[tuple[str, str]]
) -> dict[str, list[str]]:
    """The ``via`` for the agent on the outermost gateway of ``hosts`` ((name, innermost
    gateway) pairs): each gateway below it names the next one of the chain, the innermost its
    hosts."""
    inner: dict[str, dict[str, None]] = {}
    for h, gw in hosts:
        chain = chains[gw]
        for up, down in zip(chain[1:], [*chain[2:], h], strict=False):
            inner.setdefault(up, {})[down] = None
    return {g: list(members) for g, members in inner.items()}


class TreeRun:
    """One command on many hosts, some of them through gateways (``via``: gateway name ->
    the set of host names it serves); the rest run flat.  :meth:`results` and
    :meth:`complete` as :class:`FanoutRun`'s.  The keywords are ``run_many``'s, and
    ``forward_agent`` (see :func:`gateway_ssh_head`).

    A gateway that another gateway of ``via`` names is behind that one (depth 2 and more:
    ``{"gw1": "gw2,web[1-5]", "gw2": "web[6-9]"}``, ClusterShell's topology): its hosts go to
    the outermost gateway of the chain, whose agent runs a :class:`TreeRun` of its own with
    the rest of the chain (the request's ``via``).  A cycle raises ``ValueError``.
    """

    def __init__(
        self,
        hosts: Sequence[str | ControlPathHost],
        command: HostCommand | PerHostCommands,
        via: Mapping[str, Collection[str]],
        *,
        concurrency: int,
        timeout: float | None,
        connect_timeout: float | None,
        deadline: float | None,
        forward_agent: bool | None = None,
        **options: Any,
    ) -> None:
        self.names = [h if isinstance(h, str) else h.destination for h in hosts]
        self.chains = gateway_chains(via)
        flat: list[int] = []
        self.routes: dict[str, list[tuple[int, str, str]]] = {}
        self.gateways: dict[int, list[str]] = {}
        self.tried: dict[int, set[str]] = {}
        self.failed: dict[int, set[str]] = {}
        for i, h in enumerate(hosts):
            gw = None
            if isinstance(h, str):
                self.gateways[i] = [g for g, members in via.items() if h in members and g != h]
                gw = self.gateways[i][0] if self.gateways[i] else None
            if gw is None or not isinstance(h, str):
                flat.append(i)
            else:
                self.tried[i] = {gw}
                self.routes.setdefault(self.chains[gw][0], []).append((i, h, gw))
        self._flat_index = flat
        bounds: dict[str, Any] = {
            "concurrency": concurrency,
            "timeout": timeout,
            "connect_timeout": connect_timeout,
            "deadline": deadline,
        }
        self.flat = (
            FanoutRun([hosts[i] for i in flat], command, **bounds, **options) if flat else None
        )
        self.command = command
        self.deadline = deadline
        self.input: bytes | None = options.get("input")
        self.on_output: OutputCallback | None = options.get("on_output")
        self.on_start: Callable[[str], None] | None = options.get("on_start")
        self.keywords = {k: v for k, v in {**options, **bounds}.items() if k in REQUEST_KEYWORDS}
        if forward_agent is not None:
            self.keywords["forward_agent"] = forward_agent
        self.ssh_head = gateway_ssh_head(options, connect_timeout, forward_agent)
        self._halt = Halt()

    @property
    def hosts(self) -> list[str]:
        """Every host's name, in input order."""
        return list(self.names)

    def complete(self, results: Mapping[int, HostResult]) -> list[HostResult]:
        """One result per host in input order: ``results`` (by index), else what a flat host
        in flight had when the run was left, else ``cancelled``."""
        stopped = {}
        if self.flat is not None:
            for r in self.flat.stopped_results():
                i = self._flat_index[r.index]
                stopped[i] = dataclasses.replace(r, index=i)
        out = []
        for i, h in enumerate(self.names):
            out.append(results.get(i) or stopped.get(i) or unfinished_result(h, i, "cancelled"))
        return out

    def halt(self, reason: str) -> None:
        """Start no new host, flat or through a gateway (a ``stop`` line to each agent):
        those in flight finish, the others come back ``skipped`` for ``reason``."""
        if self.flat is not None:
            self.flat.halt(reason)
        self._halt(reason)

    def _through(
        self, gateway: str, hosts: Sequence[tuple[int, str, str]], t0: float
    ) -> AsyncGenerator[HostResult, None]:
        """Run ``hosts`` ((index, name, innermost gateway) triples) through ``gateway``, the
        outermost one of each host's chain."""
        left = (
            None if self.deadline is None else max(0.001, self.deadline - (time.monotonic() - t0))
        )
        keywords = dict(self.keywords)
        inner = inner_routes(self.chains, [(h, gw) for _, h, gw in hosts])
        if inner:
            keywords["via"] = inner
        return gateway_results(
            gateway,
            [(i, h) for i, h, _ in hosts],
            self.command,
            keywords,
            ssh_argv_head=self.ssh_head,
            input=self.input,
            deadline=left,
            on_output=self.on_output,
            on_start=self.on_start,
            halt=self._halt,
        )

    def _next_gateway(self, r: HostResult) -> str | None:
        """The gateway to try next for a host its gateway failed (``via`` names it twice):
        one not tried yet for it whose chain holds no gateway that failed it."""
        if not isinstance(r.error, GatewayError) or r.index not in self.tried:
            return None
        failed = self.failed.setdefault(r.index, set())
        failed.add(r.error.gateway)
        for gw in self.gateways.get(r.index, []):
            if gw not in self.tried[r.index] and not failed.intersection(self.chains[gw]):
                self.tried[r.index].add(gw)
                return gw
        return None

    async def results(self) -> AsyncGenerator[HostResult, None]:
        """Yield each host's result as it finishes (flat hosts and every gateway's together);
        a host whose gateway failed is tried through the next gateway that names it.  On exit
        (even cancelled) every gateway's ssh and every flat ssh is ended."""
        t0 = time.monotonic()
        Retry = tuple[str, list[tuple[int, str, str]]]
        queue: asyncio.Queue[HostResult | BaseException | Retry | None] = asyncio.Queue()

        async def pump(source: AsyncIterator[HostResult]) -> None:
            retry: dict[str, list[tuple[int, str, str]]] = {}
            try:
                async for r in source:
                    nxt = self._next_gateway(r)
                    if nxt is None:
                        queue.put_nowait(r)
                    else:
                        retry.setdefault(self.chains[nxt][0], []).append((r.index, r.host, nxt))
                for gw, hosts in retry.items():
                    queue.put_nowait((gw, hosts))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # handed to the consumer
                queue.put_nowait(e)
            finally:
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()
                queue.put_nowait(None)

        sources: list[AsyncIterator[HostResult]] = []
        if self.flat is not None:
            sources.append(_reindexed(self.flat.results(), self._flat_index))
        sources += [self._through(gw, hosts, t0) for gw, hosts in self.routes.items()]
        tasks = [asyncio.ensure_future(pump(s)) for s in sources]
        try:
            left = len(tasks)
            while left:
                item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                elif isinstance(item, tuple):
                    tasks.append(asyncio.ensure_future(pump(self._through(*item, t0))))
                    left += 1
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _reindexed(
    source: AsyncGenerator[HostResult, None], index: Sequence[int]
) -> AsyncGenerator[HostResult, None]:
    try:
        async for r in source:
            yield dataclasses.replace(r, index=index[r.index])
    finally:
        await source.aclose()
