"""The asyncio twin of :mod:`sshwrap.process`: ``await sshwrap.aio.run(host, cmd)``.

:func:`run` is the procedure of ``sshwrap.run`` (:func:`sshwrap.core.ssh_run.run_ssh`:
quoting, ``env``/``cwd``, settings, the private ``-E`` log, the timeout's remote stop, the
result or the typed :class:`~sshwrap.errors.SSHError`) run by the async driver
(:func:`~sshwrap.core.waiting.run_async`): same arguments, results, errors and bounds,
``tty=True``/``size`` included.  :func:`create_process` starts ssh the way
:class:`sshwrap.Popen` does (``subprocess.Popen``, the stderr relay) and connects asyncio
streams to its pipes; its signals are the sync ones' procedures.  stdin defaults to DEVNULL,
as in the sync API.  A cancelled ``run`` kills the local ssh at once and leaves the remote
stop to a helper thread, bounded like ^C in the sync face.

::

    r = await sshwrap.aio.run("web1", ["uname", "-a"], capture_output=True, text=True)
    p = await sshwrap.aio.create_process("web1", "tail -f log", stdout=PIPE)
    line = await p.stdout.readline()
    await p.terminate()
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
from typing import IO, Any, Unpack, cast

from ..core.child_steps import exchange
from ..core.completed import CompletedProcess
from ..core.invocation import SIGNAL_TIMEOUT, TEE_GRACE, Invocation
from ..core.options import (
    Command,
    PopenOptions,
    ProcessOptions,
    RunOptions,
    check_keywords,
    invocation_settings,
)
from ..core.ssh_run import run_ssh
from ..core.waiting import Blocking, Procedure, run_async
from ..errors import SSHError
from ..io.ssh_child import ChildPipes, popen_with_pipes

__all__ = [
    "DEVNULL",
    "PIPE",
    "STDOUT",
    "Process",
    "ProcessOptions",
    "RunOptions",
    "create_process",
    "run",
]

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT


class Process:
    """A remote command in a local ssh process, like :class:`asyncio.subprocess.Process`.

    ``stdin``/``stdout``/``stderr`` are asyncio streams (with PIPE); ``pid`` is the local ssh's;
    ``returncode`` is the remote command's once ssh has exited.  ``wait()`` and
    ``communicate()`` raise :class:`~sshwrap.errors.SSHError` when ssh itself failed.
    ``send_signal``/``terminate`` are coroutines here (they reach the remote side through a
    second ssh); ``kill()`` kills the local ssh at once and SIGKILLs the remote command in the
    background.
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
    ) -> None:
        self._call = call
        self._popen = proc
        self.args = args
        self.host = call.host
        self.ssh_args = call.argv
        self.stdin: asyncio.StreamWriter | None = streams[0]
        self.stdout: asyncio.StreamReader | None = streams[1]
        self.stderr: asyncio.StreamReader | None = streams[2]
        self.ssh_error: SSHError | None = None
        self.ssh_messages = ""
        self._stdout_arg = stdout_arg
        self._stderr_arg = stderr_arg
        self._tee = tee

    @property
    def pid(self) -> int:
        """The local ssh's pid."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The remote returncode (negative for a signal), None while ssh runs."""
        raw = self._popen.poll()
        if raw is None:
            return None
        self._finish(raw)
        return self._call.returncode

    def _finish(self, raw: int) -> None:
        if self._call.returncode is None:
            self._call.finish(raw)
            self.ssh_messages = self._call.messages
            self._call.write_messages(self._stdout_arg, self._stderr_arg, False)
        self.ssh_error = self._call.error

    def _exited(self) -> Procedure[int]:
        """Until ssh has exited (its pidfd), then its stderr relay's EOF (bounded)."""
        pipes = ChildPipes(self._popen)
        try:
            yield from exchange(pipes, None)
        finally:
            pipes.close()
        tee, self._tee = self._tee, None
        if tee is not None:
            yield Blocking(lambda _abort: tee.join(TEE_GRACE))
            self._call.note_stderr()  # the error, if already read, with what the relay saw
        return cast(int, self._popen.returncode)

    async def wait(self) -> int:
        """Wait for ssh to exit; the remote returncode, or raise SSHError."""
        self._finish(await run_async(self._exited()))
        if self.ssh_error is not None:
            raise self.ssh_error
        assert self._call.returncode is not None
        return self._call.returncode

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        """Send ``input``, read stdout and stderr to EOF, wait (no timeout: see :func:`run`)."""
        out_buf, err_buf = bytearray(), bytearray()
        await asyncio.gather(
            _feed(self.stdin, input),
            _read_all(self.stdout, out_buf),
            _read_all(self.stderr, err_buf),
        )
        out = bytes(out_buf) if self.stdout is not None else None
        err = bytes(err_buf) if self.stderr is not None else None
        raw = await run_async(self._exited())
        if self._stderr_arg == PIPE:
            self._call.note_stderr(err)
        self._finish(raw)
        if self.ssh_error is not None:
            raise self.ssh_error
        return cast(
            tuple[bytes | None, bytes | None],
            self._call.append_messages(out, err, self._stdout_arg, self._stderr_arg, False),
        )

    async def send_signal(self, sig: int, *, timeout: float = SIGNAL_TIMEOUT) -> None:
        """Deliver ``sig`` to the remote command (through a second ssh; awaits it).

        Returns within ``timeout`` (default :data:`~sshwrap.process.SIGNAL_TIMEOUT`, 5 s);
        raises :class:`~sshwrap.errors.SSHConnectionError` with ssh's words when the signal
        could not be delivered.
        """
        if self._popen.poll() is not None:
            return
        error = await run_async(self._call.deliver(sig, budget=timeout))
        if error is not None and self._popen.poll() is None:
            raise error

    async def terminate(self, *, timeout: float = SIGNAL_TIMEOUT) -> None:
        """SIGTERM to the remote command (bounded and raising like :meth:`send_signal`)."""
        await self.send_signal(signal.SIGTERM, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: the local ssh now, the remote command in the background."""
        if self._popen.poll() is not None:
            return
        self._call.stop_in_background(signal.SIGKILL, escalate=False)
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()

    def close(self) -> None:
        """Release the private log file (done by :func:`run` and after ``wait``)."""
        self._call.close()


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


async def create_process(host: str, args: Command, **kwargs: Unpack[ProcessOptions]) -> Process:
    """Start ``args`` on ``host``; like :func:`asyncio.create_subprocess_exec`.

    ``stdin`` defaults to DEVNULL (see :mod:`sshwrap.process` for why).  Pipes only: a
    keyword it does not take (``tty``, for one) raises :class:`TypeError`.
    """
    check_keywords("create_process", kwargs, ProcessOptions)
    stdin = kwargs.get("stdin", DEVNULL)
    stdout = kwargs.get("stdout")
    stderr = kwargs.get("stderr")
    call = Invocation(host, args, **invocation_settings(kwargs))
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


async def _feed(stream: asyncio.StreamWriter | None, data: bytes | None) -> None:
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
