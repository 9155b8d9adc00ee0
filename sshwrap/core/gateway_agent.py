"""The agent that runs on a gateway: ``python3 -m sshwrap.core.gateway_agent``.

Started by the control node over one ssh connection (from the archive of
:mod:`sshwrap.io.bundle`, so nothing is installed on the gateway), it says ``ready``, reads one
request line from stdin (:func:`sshwrap.core.gateway_wire.decode_request`), runs the same
fan-out core as a flat run (:class:`~sshwrap.core.fanout_run.FanoutRun`, against the gateway's
own ``ssh`` and ssh config) and writes each host's events and result to stdout as JSON lines,
as they come (those within :data:`FLUSH_DELAY` of each other in one write).  A ``stop``
line from the control node (the tree's ``max_fail`` was exceeded) makes the run start no new
host (:meth:`FanoutRun.halt`): the rest are reported ``skipped``.

A request with ``via`` (hosts behind a further gateway) runs a
:class:`~sshwrap.core.gateway_run.TreeRun` instead: this agent reaches that gateway itself.

When the control side goes away (stdin closes, SIGHUP, SIGTERM, SIGINT, or stdout breaks) the
run is cancelled: every ssh it started is ended and reaped (FanoutRun's own cleanup), then
the agent exits.  Diagnostics go to stderr, never to stdout.

Run as a program, the agent runs under :func:`supervised`: a watchdog process, its parent
and a child subreaper (``PR_SET_CHILD_SUBREAPER``), so an agent killed outright (SIGKILL,
the OOM killer) still leaves nothing behind: its ssh children become the watchdog's, which
ends them (each ssh's process group: TERM, KILL after :data:`ORPHAN_GRACE`) and reaps them
before it exits with the agent's status.  The agent's temporary files go in a directory the
watchdog makes (``tempfile.tempdir``) and removes then: a killed agent leaves none.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from .fanout_run import FanoutRun
from .gateway_run import TreeRun
from .gateway_wire import Request, decode_request, encode_event, encode_result, read_stop

__all__ = ["FLUSH_DELAY", "ORPHAN_GRACE", "main", "serve", "supervised"]

FLUSH_DELAY = 0.005
"""Seconds an event line may wait for others to be written with it."""
ORPHAN_GRACE = 0.5
"""Seconds the watchdog gives a dead agent's ssh to end after TERM, before KILL."""
_PR_SET_CHILD_SUBREAPER = 36


async def serve(req: Request, out: BinaryIO, stdin_fd: int | None = 0) -> None:
    """Run ``req`` and write its events to ``out``; cancelled when ``stdin_fd`` reaches EOF
    or a hang-up signal arrives (each ends every ssh of the run first)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop() -> None:
        task.cancel()

    def write(line: bytes) -> None:
        # Lines wait at most FLUSH_DELAY to go out together: one ssh packet and one wake-up
        # of the control node for many hosts' events, not one per line.
        if not lost:
            if not pending:
                loop.call_later(FLUSH_DELAY, flush)
            pending.append(line)

    def flush() -> None:
        if lost or not pending:
            return
        data = b"".join(pending)
        pending.clear()
        try:
            out.write(data)
            out.flush()
        except (OSError, ValueError):
            # (Called from the loop's callbacks too, where an exception would only be logged.)
            lost.append(True)
            stop()

    lost: list[bool] = []
    pending: list[bytes] = []
    stdin_buf = bytearray()  # stdin's bytes since its last complete line

    def on_stdin() -> None:
        assert stdin_fd is not None
        try:
            data = os.read(stdin_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(stdin_fd)
            stop()
        stdin_buf.extend(data)
        while (end := stdin_buf.find(b"\n") + 1) > 0:
            reason = read_stop(bytes(stdin_buf[:end]))
            del stdin_buf[:end]
            if reason is not None:  # the control node: start no new host
                run.halt(reason)

    # Hosts are names, and a name may come twice: each start takes the name's next index,
    # its output goes to the oldest one in flight.
    unstarted: dict[str, list[int]] = {}
    for i, h in enumerate(req.hosts):
        unstarted.setdefault(h, []).append(i)
    running: dict[str, list[int]] = {}

    def on_start(host: str) -> None:
        i = unstarted[host].pop(0)
        running.setdefault(host, []).append(i)
        write(encode_event("start", i))

    def on_output(host: str, stream: int, data: bytes) -> None:
        write(encode_event("out", running[host][0], s=stream, data=data))

    kw: dict[str, Any] = dict(req.keywords)
    kw.setdefault("concurrency", 32)
    kw.setdefault("timeout", None)
    kw.setdefault("connect_timeout", 30.0)
    kw.setdefault("deadline", None)
    via, forward_agent = kw.pop("via", None), kw.pop("forward_agent", None)
    callbacks: dict[str, Any] = {
        "input": req.input,
        "on_start": on_start,
        "on_output": on_output if req.output else None,
    }
    run: FanoutRun | TreeRun = (
        TreeRun(
            req.hosts,
            req.command,
            {g: set(members) for g, members in via.items()},
            forward_agent=forward_agent,
            **callbacks,
            **kw,
        )
        if via
        else FanoutRun(req.hosts, req.command, **callbacks, **kw)
    )
    hooked = []
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
        hooked.append(sig)
    if stdin_fd is not None:
        os.set_blocking(stdin_fd, False)
        loop.add_reader(stdin_fd, on_stdin)
    gen = run.results()
    try:
        async for r in gen:
            held = running.get(r.host, [])
            if r.index in held:
                held.remove(r.index)
            write(encode_result(r.index, r))
        write(encode_event("done"))
        flush()
    finally:
        await gen.aclose()
        if stdin_fd is not None:
            loop.remove_reader(stdin_fd)
        for sig in hooked:
            loop.remove_signal_handler(sig)


def main(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Read the request from ``stdin`` (default: the process's), run it; the exit status."""
    inp = stdin if stdin is not None else sys.stdin.buffer
    out = stdout if stdout is not None else sys.stdout.buffer
    try:
        out.write(encode_event("ready"))
        out.flush()
    except OSError:
        return 1
    line = inp.readline()
    if not line:
        return 0  # the control side left before sending a request
    try:
        req = decode_request(line)
    except ValueError as e:
        out.write(encode_event("fail", message=f"bad request: {e}"))
        out.flush()
        return 2
    try:
        asyncio.run(serve(req, out))
    except (asyncio.CancelledError, KeyboardInterrupt):
        return 1
    except ValueError as e:  # a keyword FanoutRun refuses
        out.write(encode_event("fail", message=str(e)))
        out.flush()
        return 2
    return 0


def _children() -> list[int]:
    """This (single-threaded) process's children; zombies among them are reaped first."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(k) for k in f.read().split()]
    except OSError:
        return []


def _end_orphans() -> None:
    """End and reap every child (the ssh a dead agent left, now ours): TERM to each one's
    process group (an ssh leads its own), KILL after ORPHAN_GRACE."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        kids = _children()
        if not kids:
            return
        for k in kids:
            try:
                os.killpg(k, sig)
            except (ProcessLookupError, PermissionError):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(k, sig)
        t_end = time.monotonic() + ORPHAN_GRACE
        for k in kids:
            try:
                fd = os.pidfd_open(k)
            except OSError:
                continue
            try:
                select.select([fd], [], [], max(0.0, t_end - time.monotonic()))
            finally:
                os.close(fd)
    _children()


def supervised(agent: Callable[[], int]) -> int:
    """Run ``agent`` in a child process, this one its watchdog (see the module docstring);
    the agent's exit status.  Where the subreaper cannot be set, ``agent`` runs here."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return agent()
    except (ImportError, OSError, AttributeError):
        return agent()
    # The agent's temporary files (a fan-out's fifo directory) go in a directory of the
    # watchdog's, which removes it whatever becomes of the agent.
    try:
        own_tmp: str | None = tempfile.mkdtemp(prefix="sshwrap-agent-")
    except OSError:
        own_tmp = None
    pid = os.fork()
    if pid == 0:
        if own_tmp is not None:
            tempfile.tempdir = own_tmp
        code = 1
        try:
            code = agent()
        except BaseException:
            import traceback

            traceback.print_exc()
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os._exit(code)

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    # The agent's stdin is not ours to read: only its EOF matters, and the agent sees it.
    os.close(0)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 0
            break
    _end_orphans()
    if own_tmp is not None:
        shutil.rmtree(own_tmp, ignore_errors=True)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(supervised(main))
