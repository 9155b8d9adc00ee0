"""The asyncio twin of :mod:`sshwrap.process`: ``await sshwrap.aio.run(host, cmd)``.

:func:`run` is the procedure of ``sshwrap.run`` (:func:`sshwrap.core.ssh_run.run_ssh`:
quoting, ``env``/``cwd``, settings, the private ``-E`` log, the timeout's remote stop, the
result or the typed :class:`~sshwrap.errors.SSHError`) run by the async driver
(:func:`~sshwrap.core.waiting.run_async`): same arguments, results, errors and bounds,
``tty=True``/``size`` included.  :func:`create_process` starts ssh the way
:class:`sshwrap.Popen` does (``subprocess.Popen``, the stderr relay; with ``tty=True`` in a
local pty, :mod:`sshwrap.core.tty_process`) and connects asyncio streams to its pipes, or to
the terminal read through the loop; its signals are the sync ones' steps.  stdin defaults to
DEVNULL, as in the sync API.  A cancelled ``run`` kills the local ssh at once and leaves the
remote stop to a helper thread, bounded like ^C in the sync face.

``send_signal``/``terminate``/``kill`` are plain methods, as in
:class:`asyncio.subprocess.Process`: the remote stop starts at once and goes on in the
background (bounded, its ssh reaped).  ``send_signal``/``terminate`` return a
:class:`SignalDelivery`: ``await`` it to wait for the delivery (and get its error there), or
drop it: a delivery that failed while the command ran is then raised by the next ``wait()``
or ``communicate()``, as the sync face raises it from ``send_signal``.

::

    r = await sshwrap.aio.run("web1", ["uname", "-a"], capture_output=True, text=True)
    p = await sshwrap.aio.create_process("web1", "tail -f log", stdout=PIPE)
    line = await p.stdout.readline()
    p.terminate()
    await p.wait()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Coroutine, Generator
from typing import IO, Any, TypeVar, Unpack, cast

from ..core.child_steps import exchange
from ..core.completed import CompletedProcess
from ..core.getoutput import GetoutputSettings, getoutput_options, status_output
from ..core.invocation import SIGNAL_TIMEOUT, TEE_GRACE, Invocation
from ..core.options import (
    Command,
    PopenOptions,
    ProcessOptions,
    RunOptions,
    check_keywords,
    check_terminal,
    invocation_settings,
)
from ..core.ssh_run import run_ssh, tty_input
from ..core.tty_process import (
    LoopTerminal,
    TerminalWriter,
    start_in_terminal,
    terminal_sink,
    until_raw,
)
from ..core.waiting import Blocking, Procedure, WaitFlag, run_async
from ..errors import SSHConnectionError, SSHError
from ..io.flags import Flag
from ..io.ssh_child import ChildPipes, popen_with_pipes
from ..io.threads import start_daemon
from ..process import SSHExitState
from ..terminal.modes import set_size

__all__ = [
    "DEVNULL",
    "PIPE",
    "STDOUT",
    "Process",
    "ProcessOptions",
    "RunOptions",
    "SignalDelivery",
    "TerminalWriter",
    "create_process",
    "process_repr",
    "run",
]

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
T = TypeVar("T")


def until_set(flag: Flag) -> Procedure[None]:
    """Until ``flag`` is set."""
    yield WaitFlag(flag)


def process_repr(kind: str, host: str, pid: int | None, returncode: int | None, args: Any) -> str:
    """``<kind: host: 'web1' pid: 123 running args: ...>`` (or ``returncode: N`` once it is
    known), like :class:`subprocess.Popen`'s repr plus the host and the pid."""
    shown = repr(args)
    if len(shown) > 80:
        shown = shown[:76] + "..."
    state = "running" if returncode is None else f"returncode: {returncode}"
    return f"<{kind}: host: {host!r} pid: {pid} {state} args: {shown}>"


class _Delivery:
    """One signal's delivery by a second ssh, finished by a helper thread (bounded by its
    budget, the ssh reaped; at interpreter exit it gets the rest of its budget)."""

    def __init__(self, failure: SSHError | None = None) -> None:
        self.finished = Flag()
        self.failure = failure  # not delivered while the command ran
        self.claimed = False
        if failure is not None:
            self.finished.set()

    def start(
        self, call: Invocation, sig: int, timeout: float, running: Callable[[], bool]
    ) -> None:
        """Start the second ssh now; the helper thread waits for it."""
        stop = call.start_stop(sig, budget=timeout)

        def finish() -> None:
            try:
                stop.finish()
                error = stop.error()
                if error is not None and running():
                    self.failure = error
            finally:
                self.finished.set()

        start_daemon(finish, "sshwrap-remote-signal")

    @property
    def pending(self) -> bool:
        """Not finished, or failed and not reported yet."""
        return not self.finished.is_set() or (self.failure is not None and not self.claimed)

    def claim(self) -> SSHError | None:
        """Its failure, once (None: delivered, or already reported)."""
        if self.failure is None or self.claimed or not self.finished.is_set():
            return None
        self.claimed = True
        return self.failure


class SignalDelivery:
    """What ``send_signal``/``terminate`` return: the signal's delivery, already under way.

    Safe to drop (no warning, nothing left behind): the delivery goes on in the background
    and, when it fails while the command runs, the next ``wait()``/``communicate()`` raises
    its :class:`~sshwrap.errors.SSHConnectionError`.  ``await`` it to wait for the delivery
    (at most the signal's ``timeout``) and get that error here instead.  Over a channel the
    signal is sent at once: the handle is done already.
    """

    def __init__(self, delivery: _Delivery | None = None) -> None:
        self._delivery = delivery

    def done(self) -> bool:
        """Whether the delivery has ended."""
        return self._delivery is None or self._delivery.finished.is_set()

    def __await__(self) -> Generator[Any, None, None]:
        return self._wait().__await__()

    async def _wait(self) -> None:
        if self._delivery is None:
            return
        await run_async(until_set(self._delivery.finished))
        error = self._delivery.claim()
        if error is not None:
            raise error

    def __repr__(self) -> str:
        return f"<SignalDelivery {'done' if self.done() else 'pending'}>"


class Process(SSHExitState):
    """A remote command in a local ssh process, like :class:`asyncio.subprocess.Process`.

    ``stdin``/``stdout``/``stderr`` are asyncio streams (with PIPE); ``pid`` is the local ssh's;
    ``returncode`` is the remote command's once ssh has exited.  ``wait()`` and
    ``communicate()`` raise :class:`~sshwrap.errors.SSHError` when ssh itself failed.
    ``send_signal``/``terminate`` start the delivery through a second ssh at once and return
    a :class:`SignalDelivery` (see the module docs); ``kill()`` kills the local ssh at once
    and SIGKILLs the remote command in the background.

    ``tty=True``: ``stdout`` (with ``stdout=PIPE``; otherwise the output goes where stdout
    goes, as it comes) reads the terminal, stdout and stderr merged (``stderr`` is None,
    ``\\r\\n`` line ends); ``stdin`` (with ``stdin=PIPE``) is a :class:`TerminalWriter`;
    ``communicate(input)`` types ``input`` and ends it with ^D; ``resize(rows, cols)``
    changes the terminal's size.
    """

    def __init__(
        self,
        call: Invocation,
        proc: subprocess.Popen[bytes],
        args: Command,
        streams: tuple[Any, Any, Any],
        stdout_arg: Any,
        stderr_arg: Any,
        tee: threading.Thread | None,
        terminal: LoopTerminal | None = None,
    ) -> None:
        self._begin(call, stdout_arg, stderr_arg)
        self._popen = proc
        self.args = args
        self.stdin: asyncio.StreamWriter | TerminalWriter | None = streams[0]
        self.stdout: asyncio.StreamReader | None = streams[1]
        self.stderr: asyncio.StreamReader | None = streams[2]
        self._tee = tee
        self._terminal = terminal
        self._deliveries: list[_Delivery] = []

    @property
    def pid(self) -> int:
        """The local ssh's pid."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The remote returncode (negative for a signal), None while ssh runs."""
        raw = self._popen.poll()
        return None if raw is None else self._settle(raw)

    def __repr__(self) -> str:
        """Host, pid, state (the returncode last seen) and command, like ``subprocess``'s."""
        return process_repr("Process", self.host, self.pid, self._call.returncode, self.args)

    def _exited(self) -> Procedure[int]:
        """Until ssh has exited (its pidfd), then its stderr relay's or its terminal's end
        (bounded)."""
        pipes = ChildPipes(self._popen)
        try:
            yield from exchange(pipes, None)
        finally:
            pipes.close()
        tee, self._tee = self._tee, None
        if tee is not None:
            yield Blocking(lambda _abort: tee.join(TEE_GRACE))
            self._call.note_stderr()  # the error, if already read, with what the relay saw
        if self._terminal is not None:
            yield WaitFlag(self._terminal.ended, TEE_GRACE)  # ssh's early words come there
        return cast(int, self._popen.returncode)

    async def _reporting(self, work: Coroutine[Any, Any, T]) -> T:
        """``work``, unless a signal's delivery fails first: then its error (the sync face
        raises it from ``send_signal``, before anything waits for the command)."""
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                self._raise_failure()
                pending = [d for d in self._deliveries if not d.finished.is_set()]
                if not pending:
                    break
                watches = [asyncio.ensure_future(run_async(until_set(d.finished))) for d in pending]
                try:
                    await asyncio.wait([task, *watches], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for watch in watches:
                        watch.cancel()
            result = await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._raise_failure()
        return result

    def _raise_failure(self) -> None:
        for delivery in self._deliveries:
            error = delivery.claim()
            if error is not None:
                raise error

    async def wait(self) -> int:
        """Wait for ssh to exit; the remote returncode, or raise SSHError (also when a
        signal sent without awaiting it could not be delivered)."""
        self._settle(await self._reporting(run_async(self._exited())))
        if self.ssh_error is not None:
            raise self.ssh_error
        assert self._call.returncode is not None
        return self._call.returncode

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        """Send ``input`` (with a tty: typed, then ^D), read stdout and stderr to EOF, wait (no
        timeout: see :func:`run`)."""
        return await self._reporting(self._communicate(input))

    async def _communicate(self, input: bytes | None) -> tuple[bytes | None, bytes | None]:
        if self._terminal is not None and input:
            if self.stdin is None:
                raise ValueError("input needs stdin=PIPE")
            input = tty_input(input)
        out_buf, err_buf = bytearray(), bytearray()
        await asyncio.gather(
            _feed(self.stdin, input),
            _read_all(self.stdout, out_buf),
            _read_all(self.stderr, err_buf),
        )
        out = bytes(out_buf) if self.stdout is not None else None
        err = bytes(err_buf) if self.stderr is not None else None
        raw = await run_async(self._exited())
        if self._stderr_arg == PIPE and self._terminal is None:
            self._call.note_stderr(err)
        self._settle(raw)
        if self.ssh_error is not None:
            raise self.ssh_error
        return cast(tuple[bytes | None, bytes | None], self._with_messages(out, err))

    def send_signal(self, sig: int, *, timeout: float = SIGNAL_TIMEOUT) -> SignalDelivery:
        """Deliver ``sig`` to the remote command through a second ssh, started now.

        Returns at once; the delivery ends within ``timeout`` (default
        :data:`~sshwrap.process.SIGNAL_TIMEOUT`, 5 s).  Awaiting the returned
        :class:`SignalDelivery` waits for it and raises
        :class:`~sshwrap.errors.SSHConnectionError` with ssh's words when the signal could
        not be delivered; not awaited, the next ``wait()``/``communicate()`` raises that.
        """
        if self._popen.poll() is not None:
            return SignalDelivery()
        try:
            delivery = _Delivery()
            delivery.start(self._call, sig, timeout, self._running)
        except OSError as e:
            delivery = _Delivery(
                SSHConnectionError(self.host, f"could not deliver the signal: {e}")
            )
        self._deliveries = [d for d in self._deliveries if d.pending] + [delivery]
        return SignalDelivery(delivery)

    def terminate(self, *, timeout: float = SIGNAL_TIMEOUT) -> SignalDelivery:
        """SIGTERM to the remote command (at once, bounded and reported like
        :meth:`send_signal`)."""
        return self.send_signal(signal.SIGTERM, timeout=timeout)

    def _running(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the local ssh now, the remote command in the background."""
        if self._popen.poll() is not None:
            return
        self._call.stop_in_background(signal.SIGKILL, escalate=False)
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()

    def resize(self, rows: int, cols: int) -> None:
        """Change the terminal's size (``tty=True`` only); ssh forwards it to the remote pty
        (nothing to do once the terminal has ended)."""
        if self._terminal is None:
            raise ValueError("resize() needs tty=True")
        if self._terminal.master >= 0:
            set_size(self._terminal.master, rows, cols)

    def close(self) -> None:
        """Release the private log file and the terminal (done by :func:`run`; the log also
        after ``wait``, the terminal at its end)."""
        self._call.close()
        if self._terminal is not None:
            self._terminal.close()


async def _streams(
    proc: subprocess.Popen[bytes], limit: int
) -> tuple[asyncio.StreamWriter | None, asyncio.StreamReader | None, asyncio.StreamReader | None]:
    """asyncio streams on ``proc``'s pipes (they take the pipes over)."""
    loop = asyncio.get_running_loop()

    async def reader(pipe: IO[bytes] | None) -> asyncio.StreamReader | None:
        if pipe is None:
            return None
        stream = asyncio.StreamReader(limit=limit, loop=loop)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), pipe)
        return stream

    writer = None
    if proc.stdin is not None:
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), proc.stdin
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return writer, await reader(proc.stdout), await reader(proc.stderr)


def _start_in_terminal(call: Invocation, args: Command, kwargs: ProcessOptions) -> Process:
    """ssh -tt in a local pty, its output read through the loop (see :class:`Process`)."""
    proc, master = start_in_terminal(call, kwargs.get("size"))
    try:
        stdout = kwargs.get("stdout")
        stream = asyncio.StreamReader(limit=kwargs.get("limit", 2**16))
        collect = stream.feed_data if stdout == PIPE else None
        shown = stream if stdout == PIPE else None
        terminal = LoopTerminal(master, terminal_sink(call, stdout, collect, master), shown)
    except BaseException:
        os.close(master)
        proc.kill()
        proc.wait()
        raise
    writer = None
    if kwargs.get("stdin", DEVNULL) == PIPE:
        writer = TerminalWriter(
            terminal, lambda: until_raw(master, lambda: proc.poll() is not None)
        )
    streams = (writer, shown, None)
    return Process(call, proc, args, streams, stdout, kwargs.get("stderr"), None, terminal)


async def create_process(host: str, args: Command, **kwargs: Unpack[ProcessOptions]) -> Process:
    """Start ``args`` on ``host``; like :func:`asyncio.create_subprocess_exec`.

    ``stdin`` defaults to DEVNULL (see :mod:`sshwrap.process` for why); ``tty=True`` runs it
    in a terminal of ``size=(rows, cols)`` as ``sshwrap.Popen`` does (``size`` without it:
    :class:`ValueError`).  A keyword it does not take raises :class:`TypeError`.
    """
    check_keywords("create_process", kwargs, ProcessOptions)
    check_terminal(kwargs)
    stdin = kwargs.get("stdin", DEVNULL)
    stdout = kwargs.get("stdout")
    stderr = kwargs.get("stderr")
    tty = bool(kwargs.get("tty", False))
    call = Invocation(host, args, tty=tty, **invocation_settings(kwargs))
    if tty:
        try:
            return _start_in_terminal(call, args, kwargs)
        except BaseException:
            call.close()
            raise
    try:
        proc, _, tee = popen_with_pipes(call.argv, call.stderr, (stdin, stdout, stderr), True)
    except BaseException:
        call.close()
        raise
    try:
        streams = await _streams(proc, kwargs.get("limit", 2**16))
    except BaseException:
        proc.kill()
        proc.wait()
        call.close()
        raise
    return Process(call, proc, args, streams, stdout, stderr, tee)


async def _read_all(stream: asyncio.StreamReader | None, sink: bytearray) -> None:
    if stream is None:
        return
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        sink += chunk


async def _feed(stream: asyncio.StreamWriter | TerminalWriter | None, data: bytes | None) -> None:
    if stream is None:
        return
    try:
        if data:
            stream.write(data)
            await stream.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        stream.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await stream.wait_closed()


async def run(
    host: str,
    args: Command,
    *,
    input: bytes | str | None = None,
    capture_output: bool = False,
    timeout: float | None = None,
    check: bool = False,
    **kwargs: Unpack[RunOptions],
) -> CompletedProcess:
    """Run ``args`` on ``host`` and wait; the async :func:`sshwrap.run`.

    Same keywords, results, errors and bounds as the sync one (``tty=True``/``size`` too);
    on a timeout the remote command is stopped and :class:`~sshwrap.errors.TimeoutExpired`
    carries the output so far.
    """
    options = cast(PopenOptions, {k: v for k, v in kwargs.items() if k != "limit"})
    return await run_async(run_ssh(host, args, input, timeout, capture_output, check, **options))


async def getstatusoutput(
    host: str, args: Command, **options: Unpack[GetoutputSettings]
) -> tuple[int, str]:
    """The async :func:`sshwrap.getstatusoutput`."""
    return status_output(await run(host, args, **getoutput_options(options)))


async def getoutput(host: str, args: Command, **options: Unpack[GetoutputSettings]) -> str:
    """The async :func:`sshwrap.getoutput`."""
    return (await getstatusoutput(host, args, **options))[1]
