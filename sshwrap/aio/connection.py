"""The asyncio face of ``sshwrap.connect``: ``await sshwrap.aio.connect(...)``.

::

    async with await sshwrap.aio.connect("web1") as c:
        r = await c.run(["uname", "-a"], capture_output=True, text=True)
        results = await asyncio.gather(*(c.run("true") for _ in range(100)))

One core, two faces: an ``AsyncConnection`` wraps the same ``Connection`` (its ``master``:
lifecycle, mux proxy channels, forwards) and runs the same procedures
(:mod:`sshwrap.core.commands`) with the async driver (``run_async``).  Commands wait without
threads: the channel I/O thread wakes the event loop (``call_soon_threadsafe``) when a channel
opens or ends, so a hundred concurrent ``run`` calls cost a hundred channels, not a hundred
threads.  Starting and stopping the master, restarting a dead one and forwards run in a worker
thread (``asyncio.to_thread``); a cancelled start kills and reaps its ssh.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
from typing import TYPE_CHECKING, Any, Unpack

from ..connection import Connection, ConnectOptions, Detached, Forward, MasterState
from ..core.channel_popen import ChannelPopen
from ..core.commands import ChannelRunOptions, run_command, start_command, use_master
from ..core.completed import CompletedProcess
from ..core.getoutput import OutputOptions, getoutput_options, status_output
from ..core.invocation import SIGNAL_TIMEOUT
from ..core.options import (
    Command,
    CommandOptions,
    StreamOptions,
    TerminalOptions,
    check_keywords,
)
from ..core.shell import ShellRunOptions, ShellSession, check_shell_options, open_shell
from ..core.waiting import run_async
from ..errors import SSHError
from .process import SignalDelivery, process_repr, until_set

if TYPE_CHECKING:
    from ..transfer import CopyOptions
    from .process import Process

__all__ = [
    "AsyncChannelProcess",
    "AsyncConnection",
    "AsyncShell",
    "ChannelProcessOptions",
    "attach",
    "connect",
]


class AsyncChannelProcess:
    """A remote command on a channel of an ``AsyncConnection``, like asyncio's ``Process``.

    ``stdin`` is an ``asyncio.StreamWriter`` and ``stdout``/``stderr`` are
    ``asyncio.StreamReader`` objects for ``PIPE``, else None.  ``returncode`` is exact
    (``-signum`` for a remote signal death); ``send_signal``/``terminate``/``kill`` are plain
    methods, as in :class:`asyncio.subprocess.Process`: the signal request goes over the
    channel at once and reaches the remote process group.  ``send_signal``/``terminate``
    take the ``timeout`` keyword and return a (done) :class:`~sshwrap.aio.SignalDelivery`, as
    :class:`sshwrap.aio.Process`'s do, so ``await p.terminate()`` works on both.
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
    def pid(self) -> None:
        """None: the command runs on a channel, there is no local process."""
        return None

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
        await run_async(until_set(self._popen.closed))
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

    def send_signal(self, sig: int, *, timeout: float = SIGNAL_TIMEOUT) -> SignalDelivery:
        """Send ``sig`` to the remote command's process group (a request on the channel,
        sent now: ``timeout`` has nothing to bound; the handle is done)."""
        self._popen.send_signal(sig)
        return SignalDelivery()

    def terminate(self, *, timeout: float = SIGNAL_TIMEOUT) -> SignalDelivery:
        """SIGTERM to the remote command (see :meth:`send_signal`)."""
        self._popen.terminate()
        return SignalDelivery()

    def kill(self) -> None:
        """SIGKILL to the remote command."""
        self._popen.kill()

    def resize(self, rows: int, cols: int) -> None:
        """Change the remote terminal's size (``tty=True``): the command gets SIGWINCH."""
        self._popen.resize(rows, cols)

    def __repr__(self) -> str:
        """Host, pid (None: no local process), state and command, like ``subprocess``'s."""
        p = self._popen
        return process_repr("AsyncChannelProcess", self.host, p.pid, p.returncode, self.args)


class AsyncShell:
    """A persistent remote shell from asyncio: ``sshwrap.shell.Shell``'s twin over the same
    procedures (:mod:`sshwrap.core.shell`, run by ``run_async``).  Cancelling a ``run``
    stops its command as a timeout does (the shell survives when the command ends within
    the bound)."""

    def __init__(self, session: ShellSession) -> None:
        self._session = session
        self.host = session.host
        self.pid = session.pid

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (or once the shell had to be stopped)."""
        return self._session.closed

    async def run(self, args: Command, **options: Unpack[ShellRunOptions]) -> CompletedProcess:
        """``Shell.run`` without blocking the loop: same arguments, results and errors."""
        return await run_async(self._session.run(args, **options))

    async def close(self) -> None:
        """End the shell (``Shell.close``); the Connection stays open."""
        await run_async(self._session.close())

    async def __aenter__(self) -> AsyncShell:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<AsyncShell {self.host!r} pid={self.pid} {state}>"


class ChannelProcessOptions(CommandOptions, StreamOptions, TerminalOptions, total=False):
    """The keywords of ``AsyncConnection.create_process`` after the command (``tty``/``size``
    too, over a channel and over the ``ssh -S`` fallback)."""


class AsyncConnection(MasterState):
    """An sshwrap-owned ControlMaster used from asyncio; ``sync`` is the ``Connection``.

    Its state (``master``, ``attached``, ``closed``, ``control_path``, ``master_pid`` ...) is
    the Connection's (:class:`sshwrap.connection.MasterState`)."""

    def __init__(self, conn: Connection) -> None:
        self.sync = conn
        self.host = conn.host
        self.destination = conn.destination
        self._master = conn.master

    async def open(self) -> AsyncConnection:
        """Start the master (if not started yet) without blocking the loop; returns self.

        Cancelling it kills the ssh that is starting the master (it is reaped by the worker
        thread, which ends at once) and waits up to 1 s for that thread."""
        await run_async(use_master(self.sync.master))
        return self

    async def __aenter__(self) -> AsyncConnection:
        if not self.sync.master.opened:
            await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, *, stop: bool | None = None) -> None:
        """Stop the master and remove its directory (``Connection.close``: an attached
        master not ours is left running unless ``stop=True``)."""
        await asyncio.to_thread(functools.partial(self.sync.close, stop=stop))

    async def detach(self) -> Detached:
        """Leave the master running past this program (``Connection.detach``)."""
        return await asyncio.to_thread(self.sync.detach)

    async def alive(self) -> bool:
        """True if the master answers an alive check."""
        return await asyncio.to_thread(lambda: self.sync.alive)

    async def run(self, args: Command, **options: Unpack[ChannelRunOptions]) -> CompletedProcess:
        """``Connection.run`` without blocking the loop; same arguments, results and bounds
        (``timeout`` covers restarting a dead master too, within the same margin).

        Cancelling it stops the remote command (TERM, the channel closed, whether or not it
        was open yet) or the master's restart (its ssh killed and reaped) within about 1 s.
        Falls back to ``ssh -S`` through the master (``tty`` and ``size`` too) when the master
        does not speak proxy mode, as the sync face does.
        """
        return await run_async(run_command(self.sync.master, args, **options))

    async def create_process(
        self, args: Command, **options: Unpack[ChannelProcessOptions]
    ) -> AsyncChannelProcess | Process:
        """Start a command on a channel; ``PIPE`` streams are asyncio streams (binary).

        Returns an ``AsyncChannelProcess``, or with the ``ssh -S`` fallback (a master that
        does not speak proxy mode) an ``sshwrap.aio.Process`` running ``ssh`` through the
        master, as ``Connection.Popen`` returns an ``sshwrap.Popen`` then."""
        popen = await run_async(start_command(self.sync.master, args, bufsize=0, **options))
        if popen is None:  # the master refuses proxy mode: ssh -S through it, as Popen does
            from .process import create_process as create_ssh_process

            settings = self.sync.master.fallback_settings()
            return await create_ssh_process(self.destination, args, **options, **settings)
        proc = AsyncChannelProcess(popen)
        await proc._connect_pipes()
        return proc

    async def shell(self, *, tty: bool = False, program: str = "sh") -> AsyncShell:
        """A persistent remote shell on one channel (``Connection.shell``'s twin)."""
        check_shell_options(tty, program)
        return AsyncShell(await run_async(open_shell(self.sync.master, program)))

    async def getstatusoutput(
        self, args: Command, **options: Unpack[OutputOptions]
    ) -> tuple[int, str]:
        """``(returncode, output)``, stderr merged; like ``subprocess.getstatusoutput``."""
        return status_output(await self.run(args, **getoutput_options(options)))

    async def getoutput(self, args: Command, **options: Unpack[OutputOptions]) -> str:
        """The output, stderr merged; like ``subprocess.getoutput``."""
        return (await self.getstatusoutput(args, **options))[1]

    async def call(self, args: Command, **kwargs: Any) -> int:
        """Run a command and return its returncode."""
        rc: int = (await self.run(args, **kwargs)).returncode
        return rc

    async def check_output(self, args: Command, **kwargs: Any) -> Any:
        """Run a command and return its stdout; ``CalledProcessError`` if it fails."""
        if "stdout" in kwargs:
            raise ValueError("stdout argument not allowed, it will be overridden.")
        return (await self.run(args, stdout=subprocess.PIPE, check=True, **kwargs)).stdout

    async def put(
        self, local: str | os.PathLike[str], remote: str, **options: Unpack[CopyOptions]
    ) -> None:
        """``Connection.put`` in a worker thread (``progress`` is called from that thread).

        Cancelling it stops the transfer in its thread (``sshwrap.transfer.Abort``) and waits
        for that, so a cancelled copy never completes later in the background."""
        from ..transfer import CopyOptions, to_thread_abortable

        check_keywords("put", options, CopyOptions)
        await to_thread_abortable(
            lambda abort: self.sync.put(local, remote, **options, abort=abort)
        )

    async def get(
        self, remote: str, local: str | os.PathLike[str], **options: Unpack[CopyOptions]
    ) -> None:
        """``Connection.get`` in a worker thread (``progress`` is called from that thread);
        cancelling it stops the transfer as for ``put``."""
        from ..transfer import CopyOptions, to_thread_abortable

        check_keywords("get", options, CopyOptions)
        await to_thread_abortable(
            lambda abort: self.sync.get(remote, local, **options, abort=abort)
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


async def attach(
    target: str | os.PathLike[str] | Detached,
    destination: str | None = None,
    *,
    own: bool = False,
    **options: Unpack[ConnectOptions],
) -> AsyncConnection:
    """Attach to a running master (in a worker thread); the async twin of ``sshwrap.attach``
    (same arguments)."""
    conn = AsyncConnection(Connection.attached_to(target, destination, own=own, **options))
    try:
        return await conn.open()
    except BaseException:
        conn.sync.close()  # not opened: nothing blocks (own=True removes a dead master's dir)
        raise


async def connect(destination: str, **options: Unpack[ConnectOptions]) -> AsyncConnection:
    """Start an sshwrap-owned master (in a worker thread); the async twin of ``connect``
    (same keywords)."""
    return await AsyncConnection(Connection(destination, **options)).open()
