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
import os
import subprocess
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .argv import OptionValue, remote_command
from .channel import ChannelError, ChannelLost
from .channel_process import KILL_AFTER, run_channel_async
from .connection import Connection, Forward, Stream
from .errors import SSHConnectionError, SSHError

if TYPE_CHECKING:
    from .prompts import OnPrompt

__all__ = ["AsyncConnection", "connect"]


class AsyncConnection:
    """An sshwrap-owned ControlMaster used from asyncio; ``sync`` is the ``Connection``."""

    def __init__(self, conn: Connection) -> None:
        self.sync = conn
        self.host = conn.host
        self.destination = conn.destination

    async def __aenter__(self) -> AsyncConnection:
        if not self.sync._opened:
            await asyncio.to_thread(self.sync.open)
        return self

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
        kill_after: float = KILL_AFTER,
    ) -> Any:
        """``Connection.run`` without blocking the loop; same arguments and results.

        Cancelling it stops the remote command.  Falls back to ``sshwrap.aio.run`` through
        the master when the master does not speak proxy mode.
        """
        from .process import CompletedProcess

        command = remote_command(args, env=env, cwd=cwd)
        conn = self.sync
        for attempt in (0, 1):
            core = conn._core
            if core is None or not core.alive or not conn._opened:
                core = await asyncio.to_thread(conn._ensure)
            if core is None:
                from .aio import run as aio_run

                return await aio_run(
                    self.destination,
                    args,
                    input=input,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    capture_output=capture_output,
                    timeout=timeout,
                    check=check,
                    text=text,
                    encoding=encoding,
                    errors=errors,
                    env=env,
                    cwd=cwd,
                    **conn._fallback_kwargs(),
                )
            try:
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
                    check=check,
                    text=text,
                    encoding=encoding,
                    errors=errors,
                    kill_after=kill_after,
                    make_result=lambda a, rc, o, e: CompletedProcess(a, rc, o, e, host=self.host),
                )
            except ChannelLost:
                if attempt:
                    raise SSHConnectionError(self.host, "the control master is gone") from None
            except ChannelError as e:
                raise SSHError(self.host, str(e)) from None
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
    )
    await asyncio.to_thread(conn.open)
    return AsyncConnection(conn)
