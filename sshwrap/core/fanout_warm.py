"""Hosts of a ``persist=`` run whose master a run before left up: channels, no ssh process.

A run with ``persist=`` looks each host up in the persisted masters' index
(:class:`sshwrap.io.persist.MasterIndex`).  A host found there runs as a channel of that
master through sshwrap's own mux client (a :class:`~sshwrap.io.master.Master` adopting the
socket, not owned: proxy mode, as a ``Connection``'s commands run;
:func:`~sshwrap.core.fanout_host.run_over_connection`): no ``ssh`` process and no login.
Its liveness check is one ``connect()`` on the socket, the mux hello and the proxy request,
bounded by ``connect_timeout`` and at most :data:`ALIVE_BOUND`.  A host
whose master does not answer (missing, dead, frozen) runs as any other, through ``ssh`` with
``ControlMaster=auto``: ssh removes a stale socket and becomes the new master, so a dead
master is replaced, never reported as a failure.

After the run's hosts are done, the hosts that went through ssh and reached their server (a
master is up for them now) are asked of ``ssh -G`` (:meth:`PersistedHosts.record`, bounded),
and the index learns their sockets for the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Sequence

from ..errors import SSHError
from ..io.attach import config_env
from ..io.master import Master
from ..io.persist import IndexEntry, MasterIndex, config_stamp, index_key
from .fanout_host import FanoutJob, HostPlan, run_over_connection
from .host_result import HostResult

__all__ = ["ALIVE_BOUND", "RECORD_BOUND", "PersistedHosts", "WarmHost"]

ALIVE_BOUND = 2.0
"""Seconds the liveness check of a persisted master may take at most."""
RECORD_BOUND = 10.0
"""Seconds the ``ssh -G`` calls that fill the index may still take once the run's hosts are
done (then those left are killed and reaped)."""


@dataclasses.dataclass(frozen=True)
class WarmHost:
    """A host over its persisted master (a ``ConnectionLike``)."""

    destination: str
    control_path: str
    master: Master


class PersistedHosts:
    """The persisted masters of one run: the index's entries, and what to add to it.

    ``settings``: the hosts' ssh settings (what names a master: ``-F``, ``-l``, ``-o`` ...,
    the persist options included); ``common``: the ssh options the hosts' ssh run with."""

    def __init__(self, directory: str, ssh: str, settings: list[str], common: list[str]) -> None:
        self.index = MasterIndex(directory)
        self.ssh = ssh
        self.settings = settings
        self.common = common
        self.stamp = config_stamp(settings)
        self._keys: dict[str, str] = {}
        self._envs: dict[tuple[str, ...], dict[str, str]] = {}
        self._asking: dict[str, asyncio.Task[None]] = {}
        self._slots: asyncio.Semaphore | None = None

    def key(self, host: str) -> str:
        """``host``'s index key."""
        key = self._keys.get(host)
        if key is None:
            key = self._keys[host] = index_key(self.ssh, self.settings, host, self.stamp)
        return key

    def lookup(self, host: str) -> IndexEntry | None:
        """``host``'s persisted master, if the index knows one."""
        return self.index.get(self.key(host))

    def reached(self, host: str, parallel: int) -> None:
        """``host`` reached its server through ssh: its master is up, ask ``ssh -G`` for its
        socket now (``parallel`` at a time; :meth:`record` bounds them)."""
        key = self.key(host)
        if self.index.get(key) is not None or key in self._asking:
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, parallel))
        self._asking[key] = asyncio.ensure_future(self._ask(key, host, self._slots))

    async def _ask(self, key: str, host: str, slots: asyncio.Semaphore) -> None:
        async with slots:
            config = await _ssh_config([self.ssh, *self.common, "-G", "--", host])
        if config:
            self.index.add(key, config)

    def _env(self, entry: IndexEntry) -> dict[str, str]:
        env = self._envs.get(entry.env_lines)
        if env is None:
            env = self._envs[entry.env_lines] = config_env("\n".join(entry.env_lines))
        return env

    async def run(
        self,
        job: FanoutJob,
        plan: HostPlan,
        entry: IndexEntry,
        command: str | Sequence[str] | None,
        t_end: float | None,
    ) -> HostResult | None:
        """``plan`` as a channel of its persisted master; None when the master does not
        answer (the host then goes through ssh)."""
        limit = (
            ALIVE_BOUND if job.connect_timeout is None else min(ALIVE_BOUND, job.connect_timeout)
        )
        deadline = time.monotonic() + limit
        if t_end is not None:
            deadline = min(deadline, t_end)
        master = Master(
            plan.host,
            settings={},
            settings_args=self.settings,
            ssh=self.ssh,
            locate_ssh=lambda: self.ssh,
            reconnect=False,
            session_env=self._env(entry),
        )
        master.adopt(entry.control_path, check=False)  # the proxy request is the check
        check = asyncio.ensure_future(asyncio.to_thread(master.ensure, deadline))
        try:
            await asyncio.shield(check)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await check
            master.close()
            raise
        except (SSHError, OSError, ValueError):
            master.close()
            return None
        try:
            host = WarmHost(plan.host, entry.control_path, master)
            own = dataclasses.replace(plan, conn=host, command=command)
            return await run_over_connection(job, own, t_end)
        finally:
            master.close()

    async def record(self) -> None:
        """Wait for the ``ssh -G`` calls of the hosts :meth:`reached` (those not done within
        :data:`RECORD_BOUND` of the run's end are killed and reaped) and save the index."""
        if self._asking:
            tasks = list(self._asking.values())
            await asyncio.wait(tasks, timeout=RECORD_BOUND)
            await self.stop()
        with contextlib.suppress(OSError):
            self.index.save()

    async def stop(self) -> None:
        """End the ``ssh -G`` calls still running (each is killed and reaped)."""
        tasks = list(self._asking.values())
        self._asking.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _ssh_config(argv: list[str]) -> str:
    """``ssh -G``'s output ("" when it fails); cancelled: its ssh is killed and reaped."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return ""
    try:
        out, _ = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    return out.decode(errors="replace") if proc.returncode == 0 else ""
