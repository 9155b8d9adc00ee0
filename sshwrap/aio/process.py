"""The asyncio twin of :mod:`sshwrap.process`: ``await sshwrap.aio.run(host, cmd)``.

It runs the same ssh argv (:class:`sshwrap.process.Invocation`: quoting, ``env``/``cwd``,
settings, the private ``-E`` log) through :func:`asyncio.create_subprocess_exec`, and reads
the outcome the same way (remote returncode, negative for a signal, typed
:class:`~sshwrap.errors.SSHError` when ssh failed).  Pipes mode only (no ``tty``): a pty per
call does not scale to fan-out.  stdin defaults to DEVNULL, as in the sync API.

::

    r = await sshwrap.aio.run("web1", ["uname", "-a"], capture_output=True, text=True)
    p = await sshwrap.aio.create_process("web1", "tail -f log", stdout=PIPE)
    line = await p.stdout.readline()
    await p.terminate()
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import locale
import os
import signal
import time
from collections.abc import Mapping
from typing import Unpack, cast

from ..errors import CalledProcessError, CommandTooLongError, SSHError, SSHStderr, TimeoutExpired
from ..process import (
    _TEE_GRACE,
    DEVNULL,
    PIPE,
    SIGNAL_TIMEOUT,
    STDOUT,
    STOP_MARGIN,
    Command,
    CompletedProcess,
    Invocation,
    SSHSettings,
    StdSpec,
    _write_to,
    stop_failure,
)

__all__ = ["DEVNULL", "PIPE", "STDOUT", "Process", "ProcessOptions", "create_process", "run"]


class _InvocationOptions(SSHSettings, total=False):
    env: Mapping[str, str] | None
    cwd: str | os.PathLike[str] | None


_INVOCATION_KEYS = frozenset(_InvocationOptions.__annotations__) | frozenset(
    SSHSettings.__annotations__
)


class ProcessOptions(SSHSettings, total=False):
    """Keyword arguments of :func:`create_process` besides host and command."""

    stdin: StdSpec
    stdout: StdSpec
    stderr: StdSpec
    env: Mapping[str, str] | None
    cwd: str | os.PathLike[str] | None
    limit: int


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
        proc: asyncio.subprocess.Process,
        args: Command,
        stderr_arg: StdSpec,
        stdout_arg: StdSpec,
        tee: asyncio.Task[None] | None = None,
    ) -> None:
        self._call = call
        self._proc = proc
        self.args = args
        self.host = call.host
        self.ssh_args = call.argv
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        # With stderr not PIPE, ssh's stderr goes through ``tee`` to where it was meant to go.
        self.stderr = proc.stderr if tee is None else None
        self.ssh_error: SSHError | None = None
        self.ssh_messages = ""
        self._stderr_arg = stderr_arg
        self._stdout_arg = stdout_arg
        self._tee = tee

    @property
    def pid(self) -> int:
        """The local ssh's pid."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The remote returncode (negative for a signal), None while ssh runs."""
        raw = self._proc.returncode
        if raw is None:
            return None
        self._finish(raw)
        return self._call.returncode

    async def _settle(self) -> None:
        """After ssh's exit: let its stderr relay reach EOF (bounded), so the error has it."""
        if self._tee is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._tee), _TEE_GRACE)
            # still open: something ssh started holds the pipe; stop relaying it
            self._tee.cancel()
            self._tee = None
            self._call.note_stderr()  # the error, if already read, with what the relay saw
        self.ssh_error = self._call.error

    def _finish(self, raw: int) -> None:
        if self._call.returncode is not None:
            self.ssh_error = self._call.error
            return
        self._call.finish(raw)
        self.ssh_error = self._call.error
        self.ssh_messages = self._call.messages
        target = self._stderr_arg
        if target == STDOUT and self._stdout_arg == PIPE:
            target = PIPE
        if target != PIPE:
            _write_to(target, self.ssh_messages.encode(), self._stdout_arg)

    async def wait(self) -> int:
        """Wait for ssh to exit; the remote returncode, or raise SSHError."""
        await self._proc.wait()
        await self._settle()
        self._finish_now()
        if self.ssh_error is not None:
            raise self.ssh_error
        assert self._call.returncode is not None
        return self._call.returncode

    def _finish_now(self) -> None:
        raw = self._proc.returncode
        assert raw is not None
        self._finish(raw)

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        """Send ``input``, read stdout and stderr to EOF, wait (no timeout: see :func:`run`)."""
        out_buf, err_buf = bytearray(), bytearray()
        # not ``self._proc.communicate``: with a relayed stderr, the relay reads that pipe
        await asyncio.gather(
            _feed(self.stdin, input),
            _read_all(self.stdout, out_buf),
            _read_all(self.stderr, err_buf),
        )
        await self._proc.wait()
        out = bytes(out_buf) if self.stdout is not None else None
        err = bytes(err_buf) if self.stderr is not None else None
        await self._settle()
        if self._stderr_arg == PIPE:
            self._call.note_stderr(err)
        self._finish_now()
        if self.ssh_error is not None:
            raise self.ssh_error
        if self.ssh_messages:
            extra = self.ssh_messages.encode()
            if self._stderr_arg == PIPE and err is not None:
                err += extra
            elif self._stderr_arg == STDOUT and out is not None:
                out += extra
        return out, err

    async def send_signal(self, sig: int, *, timeout: float = SIGNAL_TIMEOUT) -> None:
        """Deliver ``sig`` to the remote command (through a second ssh; awaits it).

        Returns within ``timeout`` (default :data:`~sshwrap.process.SIGNAL_TIMEOUT`, 5 s);
        raises :class:`~sshwrap.errors.SSHConnectionError` with ssh's words when the signal
        could not be delivered.
        """
        if self._proc.returncode is not None:
            return
        error = await _remote_stop(self._call, sig, escalate=False, budget=timeout)
        if error is not None and self._proc.returncode is None:
            raise error

    async def terminate(self, *, timeout: float = SIGNAL_TIMEOUT) -> None:
        """SIGTERM to the remote command (bounded and raising like :meth:`send_signal`)."""
        await self.send_signal(signal.SIGTERM, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: the local ssh now, the remote command in the background."""
        self._abandon(signal.SIGKILL, escalate=False)

    def _abandon(self, sig: int = signal.SIGTERM, *, escalate: bool = True) -> None:
        """Kill the local ssh; stop the remote command in the background (STOP_MARGIN)."""
        if self._proc.returncode is not None:
            return
        self._call.signal_remote(sig, escalate=escalate, wait=False)
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    async def _stop_now(self) -> None:
        """Kill the local ssh and stop the remote command (SIGTERM, then KILL), waiting for
        the stop at most STOP_MARGIN: what a timed-out or cancelled ``run`` does."""
        if self._proc.returncode is not None:
            return
        self._call.stopping = True
        stop = asyncio.ensure_future(
            _remote_stop(self._call, signal.SIGTERM, escalate=True, budget=STOP_MARGIN)
        )
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        await stop

    def close(self) -> None:
        """Release the private log file (done by :func:`run` and after ``wait``)."""
        self._call.close()


async def create_process(host: str, args: Command, **kwargs: Unpack[ProcessOptions]) -> Process:
    """Start ``args`` on ``host``; like :func:`asyncio.create_subprocess_exec`.

    ``stdin`` defaults to DEVNULL (see :mod:`sshwrap.process` for why).
    """
    stdin = kwargs.get("stdin", DEVNULL)
    stdout = kwargs.get("stdout")
    stderr = kwargs.get("stderr")
    limit = kwargs.get("limit", 2**16)
    settings = cast(SSHSettings, {k: v for k, v in kwargs.items() if k in _INVOCATION_KEYS})
    call = Invocation(host, args, **settings)
    # ssh's stderr passes through sshwrap unless the caller reads it (PIPE) or merges it:
    # ssh prints some failures there before its -E log opens.
    tee = stderr not in (PIPE, STDOUT)
    try:
        proc = await asyncio.create_subprocess_exec(
            *call.argv, stdin=stdin, stdout=stdout, stderr=PIPE if tee else stderr, limit=limit
        )
    except BaseException as e:
        call.close()
        if isinstance(e, OSError) and e.errno == errno.E2BIG:
            raise CommandTooLongError(
                f"the system refused ssh's command line as too long ({e.strerror})",
                limit=0,
                size=sum(len(a) + 1 for a in call.argv),
            ) from e
        raise
    task = None
    if tee:
        assert proc.stderr is not None
        task = asyncio.ensure_future(_relay_stderr(proc.stderr, stderr, call.stderr))
    return Process(call, proc, args, stderr, stdout, task)


async def _relay_stderr(stream: asyncio.StreamReader, target: StdSpec, seen: SSHStderr) -> None:
    """Copy ssh's stderr to where the caller's ``stderr`` goes, keeping a bounded copy."""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        seen.feed(chunk)
        _write_to(target, chunk)


async def _remote_stop(
    call: Invocation, sig: int, *, escalate: bool, budget: float
) -> SSHError | None:
    """Run the second ssh that delivers ``sig`` (see ``Invocation.signal_argv``), bounded by
    ``budget``: killed and reaped when it runs out.  Returns why it failed, None if it worked."""
    call.sent_signal = sig
    argv = call.signal_argv(sig, escalate=escalate, budget=budget)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as e:
        return stop_failure(call.host, 255, str(e), budget)
    rc: int | None
    try:
        _, err = await asyncio.wait_for(proc.communicate(), budget)
        rc = proc.returncode
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        if not isinstance(e, TimeoutError):
            raise  # cancelled: the child watcher reaps the killed ssh
        await proc.wait()
        err, rc = b"", None
    return stop_failure(call.host, rc, (err or b"").decode("utf-8", "replace"), budget)


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


class RunOptions(ProcessOptions, total=False):
    """Keyword arguments of :func:`run` besides its own."""

    text: bool | None
    encoding: str | None
    errors: str | None


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

    Same keywords and results as the sync one (``text``/``encoding``/``errors`` decode after
    the fact); on a timeout the remote command is stopped and
    :class:`~sshwrap.errors.TimeoutExpired` carries the output so far.
    """
    text = kwargs.pop("text", None)
    encoding = kwargs.pop("encoding", None)
    errors = kwargs.pop("errors", None)
    options = cast(ProcessOptions, kwargs)
    text_mode = bool(text or encoding or errors)
    enc = encoding or locale.getpreferredencoding(False)
    err_mode = errors or "strict"
    data: bytes | None
    data = input.encode(enc, err_mode) if isinstance(input, str) else input
    if data is not None:
        if options.get("stdin", DEVNULL) not in (None, DEVNULL, PIPE):
            raise ValueError("stdin and input arguments may not both be used.")
        options["stdin"] = PIPE
    if capture_output:
        if options.get("stdout") is not None or options.get("stderr") is not None:
            raise ValueError("stdout and stderr arguments may not be used with capture_output.")
        options["stdout"] = PIPE
        options["stderr"] = PIPE
    p = await create_process(host, args, **options)
    out_buf = bytearray()
    err_buf = bytearray()
    io_task = asyncio.gather(
        _feed(p.stdin, data), _read_all(p.stdout, out_buf), _read_all(p.stderr, err_buf)
    )
    try:
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            await asyncio.wait_for(asyncio.shield(io_task), timeout)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            raw = await asyncio.wait_for(p._proc.wait(), left)
        except TimeoutError:
            await p._stop_now()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(io_task), _TEE_GRACE)
            io_task.cancel()
            await p._proc.wait()
            await p._settle()
            raise TimeoutExpired(
                args,
                timeout or 0.0,
                bytes(out_buf) if p.stdout is not None else None,
                bytes(err_buf) if p.stderr is not None else None,
                host=host,
            ) from None
        except BaseException:
            io_task.cancel()
            if p._tee is not None:
                p._tee.cancel()
            p._abandon()  # cancelled: at once; the stop finishes in the background
            with contextlib.suppress(BaseException):
                await p._proc.wait()
            raise
        await p._settle()
        if p._stderr_arg == PIPE:
            p._call.note_stderr(err_buf)
        p._finish(raw)
        if p.ssh_error is not None:
            raise p.ssh_error
    finally:
        p.close()
    stdout: bytes | str | None = bytes(out_buf) if p.stdout is not None else None
    stderr: bytes | str | None = bytes(err_buf) if p.stderr is not None else None
    if p.ssh_messages:
        extra = p.ssh_messages.encode()
        if p._stderr_arg == PIPE and stderr is not None:
            stderr = bytes(err_buf) + extra
        elif p._stderr_arg == STDOUT and stdout is not None:
            stdout = bytes(out_buf) + extra
    if text_mode:
        if isinstance(stdout, bytes):
            stdout = stdout.decode(enc, err_mode).replace("\r\n", "\n").replace("\r", "\n")
        if isinstance(stderr, bytes):
            stderr = stderr.decode(enc, err_mode).replace("\r\n", "\n").replace("\r", "\n")
    rc = p._call.returncode
    assert rc is not None
    if check and rc:
        raise CalledProcessError(rc, args, stdout, stderr, host=host)
    return CompletedProcess(args, rc, stdout, stderr, host=host)
