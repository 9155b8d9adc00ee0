"""The asyncio face of ``sshwrap.connect``: ``await sshwrap.aio.connect(...)``.

::

    async with await sshwrap.aio.connect("web1") as c:
        r = await c.run(["uname", "-a"], capture_output=True, text=True)
        results = await asyncio.gather(*(c.run("true") for _ in range(100)))

One core, two faces: an ``AsyncConnection`` wraps the same ``Connection`` (master lifecycle,
mux proxy channels, forwards).  Commands wait without threads: the channel I/O thread wakes the
event loop (``call_soon_threadsafe``) when a channel opens or ends, so a hundred concurrent
``run`` calls cost a hundred channels, not a hundred threads.  Starting and stopping the master,
restarting a dead one, forwards and ``Popen``-style processes run in a worker thread
(``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..connection import (
    Connection,
    Forward,
    Stream,
    _start_deadline,
    _time_left,
    channel_errors,
)
from ..core.argv import OptionValue, remote_command
from ..core.channel_run import KILL_AFTER, ChannelPopen, notify_event, run_channel_async
from ..errors import SSHError
from ..io.pump import ProxyCore, check_exec_size

if TYPE_CHECKING:
    from ..io.prompts import OnPrompt
    from ..transfer import ProgressCallback

__all__ = ["AsyncChannelProcess", "AsyncConnection", "connect"]


class AsyncChannelProcess:
    """A remote command on a channel of an ``AsyncConnection``, like asyncio's ``Process``.

    ``stdin`` is an ``asyncio.StreamWriter`` and ``stdout``/``stderr`` are
    ``asyncio.StreamReader`` objects for ``PIPE``, else None.  ``returncode`` is exact
    (``-signum`` for a remote signal death); ``send_signal``/``terminate``/``kill`` reach the
    remote process group.
    """

    def __init__(self, popen: ChannelPopen) -> None:
        self._popen = popen
        self.args = popen.args
        self.host = popen.host
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None

    async def _connect_pipes(self) -> None:
        loop = asyncio.get_running_loop()
        p = self._popen
        for name in ("stdout", "stderr"):
            f = getattr(p, name)
            if f is not None:
                reader = asyncio.StreamReader(limit=2**16)
                await loop.connect_read_pipe(
                    functools.partial(asyncio.StreamReaderProtocol, reader), f
                )
                setattr(self, name, reader)
        if p.stdin is not None:
            transport, protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, p.stdin
            )
            self.stdin = asyncio.StreamWriter(transport, protocol, None, loop)

    @property
    def returncode(self) -> int | None:
        """The remote returncode once the command ended, else None."""
        return self._popen.poll()

    @property
    def ssh_error(self) -> SSHError | None:
        """Set when the channel ended without an exit status (the master went away)."""
        return self._popen.ssh_error

    async def wait(self) -> int:
        """Wait for the command to end; raises ``SSHError`` when it ended without a status."""
        ch = self._popen._ch
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with ch.core.lock:
            ch.notify = functools.partial(notify_event, loop, event)
        while True:
            event.clear()
            if ch.closed.is_set():
                break
            await event.wait()
        rc: int = self._popen.wait(0)
        return rc

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        """Send ``input``, read stdout and stderr to their end, wait for the command."""

        async def feed() -> None:
            if self.stdin is None:
                return
            try:
                if input:
                    self.stdin.write(input)
                    await self.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                self.stdin.close()

        async def read(r: asyncio.StreamReader | None) -> bytes | None:
            return None if r is None else await r.read()

        _, out, err = await asyncio.gather(feed(), read(self.stdout), read(self.stderr))
        await self.wait()
        return out, err

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the remote command's process group."""
        self._popen.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM to the remote command."""
        self._popen.terminate()

    def kill(self) -> None:
        """SIGKILL to the remote command."""
        self._popen.kill()


_ABORT_WAIT = 1.0  # how long a cancelled master start may take to be killed and reaped


class AsyncConnection:
    """An sshwrap-owned ControlMaster used from asyncio; ``sync`` is the ``Connection``."""

    def __init__(self, conn: Connection) -> None:
        self.sync = conn
        self.host = conn.host
        self.destination = conn.destination

    async def __aenter__(self) -> AsyncConnection:
        if not self.sync._opened:
            await self._ensure(None)
        return self

    async def _ensure(self, deadline: float | None) -> ProxyCore | None:
        """``Connection._ensure`` (start or restart the master) without blocking the loop.

        Bounded by ``deadline`` (``time.monotonic()``) like the sync call.  Cancelling it
        kills the ssh that is starting the master (it is reaped by the worker thread, which
        ends at once) and waits up to 1 s for that thread, then lets the cancel through.
        """
        conn = self.sync
        core = conn._core
        if core is not None and core.alive and conn._opened and not conn._closed:
            return core
        abort = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(conn._ensure, deadline, abort))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            conn._abort_start(abort)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(work, _ABORT_WAIT)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the master and remove its directory (``Connection.close``)."""
        await asyncio.to_thread(self.sync.close)

    async def alive(self) -> bool:
        """True if the master answers an alive check."""
        return await asyncio.to_thread(lambda: self.sync.alive)

    @property
    def control_path(self) -> str:
        """The master's control socket."""
        return self.sync.control_path

    @property
    def master_pid(self) -> int:
        """The master's pid."""
        return self.sync.master_pid

    async def run(
        self,
        args: str | Sequence[str],
        *,
        input: bytes | str | None = None,
        stdin: Stream = subprocess.DEVNULL,
        stdout: Stream = None,
        stderr: Stream = None,
        capture_output: bool = False,
        timeout: float | None = None,
        check: bool = False,
        text: bool | None = None,
        encoding: str | None = None,
        errors: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        tty: bool = False,
        size: tuple[int, int] | None = None,
        kill_after: float = KILL_AFTER,
        connect_timeout: float | None = None,
    ) -> Any:
        """``Connection.run`` without blocking the loop; same arguments, results and bounds
        (``timeout`` covers restarting a dead master too, within the same margin).

        Cancelling it stops the remote command, or the master's restart (its ssh killed and
        reaped) within about 1 s.  Falls back to ``sshwrap.aio.run`` through the master when
        the master does not speak proxy mode.
        """
        from ..process import CompletedProcess

        deadline = None if timeout is None else time.monotonic() + timeout
        start_deadline = _start_deadline(deadline, connect_timeout)
        command = remote_command(args, env=env, cwd=cwd)
        check_exec_size(command)
        conn = self.sync
        for attempt in (0, 1):
            core = await self._ensure(start_deadline)
            if core is None:
                if tty:
                    raise ValueError("tty=True needs a master that speaks proxy mode")
                from .process import run as aio_run

                return await aio_run(
                    self.destination,
                    args,
                    input=input,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    capture_output=capture_output,
                    timeout=_time_left(deadline),  # what a restart of the master left
                    check=check,
                    text=text,
                    encoding=encoding,
                    errors=errors,
                    env=env,
                    cwd=cwd,
                    **conn._fallback_kwargs(),
                )
            with channel_errors(self.host, last_attempt=attempt == 1):
                return await run_channel_async(
                    core,
                    self.host,
                    args,
                    command,
                    input=input,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    capture_output=capture_output,
                    timeout=timeout,
                    deadline=deadline,
                    check=check,
                    text=text,
                    encoding=encoding,
                    errors=errors,
                    kill_after=kill_after,
                    tty=tty,
                    size=size,
                    make_result=lambda a, rc, o, e: CompletedProcess(a, rc, o, e, host=self.host),
                )
        raise AssertionError("unreachable")

    async def create_process(
        self,
        args: str | Sequence[str],
        *,
        stdin: Stream = subprocess.DEVNULL,
        stdout: Stream = None,
        stderr: Stream = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> AsyncChannelProcess:
        """Start a command on a channel; ``PIPE`` streams are asyncio streams (binary)."""
        command = remote_command(args, env=env, cwd=cwd)
        check_exec_size(command)
        for attempt in (0, 1):
            core = await self._ensure(None)
            if core is None:
                raise SSHError(self.host, "create_process needs a master that speaks proxy mode")
            popen: ChannelPopen | None = None
            with channel_errors(self.host, last_attempt=attempt == 1):
                popen = await asyncio.to_thread(
                    ChannelPopen,
                    core,
                    self.host,
                    args,
                    command,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    bufsize=0,
                )
            if popen is None:
                continue  # the master was gone: start it again, once
            proc = AsyncChannelProcess(popen)
            await proc._connect_pipes()
            return proc
        raise AssertionError("unreachable")

    async def call(self, args: str | Sequence[str], **kwargs: Any) -> int:
        """Run a command and return its returncode."""
        rc: int = (await self.run(args, **kwargs)).returncode
        return rc

    async def check_output(self, args: str | Sequence[str], **kwargs: Any) -> Any:
        """Run a command and return its stdout; ``CalledProcessError`` if it fails."""
        if "stdout" in kwargs:
            raise ValueError("stdout argument not allowed, it will be overridden.")
        return (await self.run(args, stdout=subprocess.PIPE, check=True, **kwargs)).stdout

    async def put(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        progress: ProgressCallback | None = None,
        preserve_times: bool = True,
    ) -> None:
        """``Connection.put`` in a worker thread (``progress`` is called from that thread).

        Cancelling it stops the transfer in its thread (``sshwrap.transfer.Abort``) and waits
        for that, so a cancelled copy never completes later in the background."""
        from ..transfer import to_thread_abortable

        await to_thread_abortable(
            lambda abort: self.sync.put(
                local, remote, progress=progress, preserve_times=preserve_times, abort=abort
            )
        )

    async def get(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
        preserve_times: bool = True,
    ) -> None:
        """``Connection.get`` in a worker thread (``progress`` is called from that thread);
        cancelling it stops the transfer as for ``put``."""
        from ..transfer import to_thread_abortable

        await to_thread_abortable(
            lambda abort: self.sync.get(
                remote, local, progress=progress, preserve_times=preserve_times, abort=abort
            )
        )

    async def forward_local(
        self, listen_port: int, host: str, port: int, *, listen_host: str = "127.0.0.1"
    ) -> Forward:
        """``Connection.forward_local`` (cancel the handle with ``cancel()``)."""
        return await asyncio.to_thread(
            self.sync.forward_local, listen_port, host, port, listen_host=listen_host
        )

    async def forward_remote(
        self, listen_port: int, host: str, port: int, *, listen_host: str = "127.0.0.1"
    ) -> Forward:
        """``Connection.forward_remote``."""
        return await asyncio.to_thread(
            self.sync.forward_remote, listen_port, host, port, listen_host=listen_host
        )

    async def forward_dynamic(
        self, listen_port: int = 0, *, listen_host: str = "127.0.0.1"
    ) -> Forward:
        """``Connection.forward_dynamic``."""
        return await asyncio.to_thread(
            self.sync.forward_dynamic, listen_port, listen_host=listen_host
        )


async def connect(
    destination: str,
    *,
    config: str | os.PathLike[str] | None = None,
    user: str | None = None,
    port: int | str | None = None,
    identity: str | os.PathLike[str] | None = None,
    jump: str | None = None,
    options: Mapping[str, OptionValue] | None = None,
    password: str | None = None,
    passphrase: str | None = None,
    on_prompt: OnPrompt | None = None,
    start_timeout: float | None = 60.0,
    reconnect: bool = True,
    proxy: bool = True,
    ssh: str | None = None,
    connect_timeout: float | None = None,
) -> AsyncConnection:
    """Start an sshwrap-owned master (in a worker thread); the async twin of ``connect``."""
    conn = Connection(
        destination,
        config=config,
        user=user,
        port=port,
        identity=identity,
        jump=jump,
        options=options,
        password=password,
        passphrase=passphrase,
        on_prompt=on_prompt,
        start_timeout=start_timeout,
        reconnect=reconnect,
        proxy=proxy,
        ssh=ssh,
        connect_timeout=connect_timeout,
    )
    ac = AsyncConnection(conn)
    await ac._ensure(None)
    return ac
