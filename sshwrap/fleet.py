"""Fleet copy: ``put_many`` / ``get_many`` (and ``sshwrap.aio``'s twins), one file or tree to
or from many hosts, each over its own ControlMaster with SFTP.

::

    results = sshwrap.put_many(["web1", "web2"], "build.tgz", "/srv/build.tgz")
    results = sshwrap.get_many(hosts, "/var/log/%h.log", "logs/")   # logs/web1/web1.log ...
    assert all(r.ok for r in results), [(r.host, r.status, r.error) for r in results]

A host is a name (a ``Connection`` is started for it and closed after the copy) or a
``Connection`` (its master is reused and left open).  Each host's copy is ``sshwrap.transfer``'s
``put``/``get`` over that master: atomic per file (a private temporary name, then a rename:
nothing partial ever appears under a destination's name), verified, recursive for a
directory, modes and (``preserve_times``) modification times kept.  ``get_many`` puts each
host's files under ``local_dir/HOST/`` (created), unless the local path holds ``%h``: it is
then the exact per-host destination (its parent directory created).  ``%h`` in any path is
the host's name (``%%`` a ``%``).

Results: one :class:`CopyResult` per host, in the hosts' order, with ``run_many``'s field
names and statuses (``ok``, ``failed`` for a transfer error, ``ssh_error``, ``timeout``,
``cancelled``; ``error`` the typed exception).  The bounds are ``run_many``'s:
``concurrency`` (32), ``connect_timeout`` (30 s) for each master's start, ``timeout`` for each
host's transfer, ``deadline`` for the whole call; rolling batches as ``run_many``'s
(``batch``, ``max_fail``, ``canary``: a failed copy counts, the hosts never started are
``skipped``); Ctrl-C (or cancelling the async call) stops
every transfer and every master started here within about 1 s, and the sync call then raises
:class:`CopyInterrupted` carrying the results.  The design is :mod:`sshwrap.core.fleet_copy`'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Unpack

from .connection import Connection
from .core.fleet_copy import (
    CopyInterrupted,
    CopyOptions,
    CopyResult,
    CopyTools,
    Direction,
    HostLink,
    copy_many,
    expand_host,
)
from .core.options import SSHSettings
from .core.waiting import Procedure, run_async, run_sync
from .fanout import _host_list
from .transfer import get, put

__all__ = [
    "CopyInterrupted",
    "CopyOptions",
    "CopyResult",
    "expand_host",
    "get_many",
    "get_many_async",
    "put_many",
    "put_many_async",
]

Hosts = str | Iterable[str | HostLink]
"""A host name (one host), or an iterable of names and ``Connection`` objects."""


def _connect(name: str, settings: SSHSettings, connect_timeout: float | None) -> Connection:
    # proxy=False: SFTP runs as ssh -S over the master, no mux proxy channel is needed
    return Connection(
        name, **settings, connect_timeout=connect_timeout, proxy=False, reconnect=False
    )


_TOOLS = CopyTools(put=put, get=get, connect=_connect)


def _copy(
    func: str,
    direction: Direction,
    hosts: Hosts,
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    options: CopyOptions,
) -> Procedure[list[CopyResult]]:
    items = _host_list(hosts)  # type: ignore[arg-type]
    return copy_many(func, direction, items, source, target, _TOOLS, options)


def put_many(
    hosts: Hosts,
    local: str | os.PathLike[str],
    remote: str,
    **options: Unpack[CopyOptions],
) -> list[CopyResult]:
    """Copy local file or directory ``local`` to ``remote`` on every host.

    ``put_many(["web1", "web2"], "build.tgz", "/srv/build.tgz", concurrency=50)``.  ``%h`` in
    either path is each host's name.  Returns one :class:`CopyResult` per host, in order.  The
    keywords are :class:`~sshwrap.core.fleet_copy.CopyOptions`: ``concurrency``, ``timeout``,
    ``connect_timeout``, ``deadline``, the ssh settings, ``batch_mode``, ``preserve_times``,
    ``on_progress(host, done, total)``, ``batch``/``max_fail``/``canary`` (rolling batches, as
    ``run_many``'s: ``put_many(hosts, "app.tgz", "/srv/app.tgz", batch="25%", max_fail=0)``).
    A bad path, token or keyword raises before any host starts (a missing ``local`` without
    ``%h``: ``FileNotFoundError``).  On Ctrl-C every host is stopped first, then
    :class:`CopyInterrupted` is raised.
    """
    return run_sync(_copy("put_many", "put", hosts, local, remote, options))


def get_many(
    hosts: Hosts,
    remote: str,
    local_dir: str | os.PathLike[str],
    **options: Unpack[CopyOptions],
) -> list[CopyResult]:
    """Copy remote file or directory ``remote`` from every host into ``local_dir/HOST/``.

    ``get_many(hosts, "/etc/os-release", "collected")`` gives ``collected/web1/os-release``
    and so on.  When ``local_dir`` holds ``%h`` it is each host's exact destination instead
    (``get_many(hosts, "/etc/hostname", "names/%h.txt")``).  Two hosts that would write the same
    local path raise ``ValueError``.  Results, keywords and Ctrl-C as for :func:`put_many`.
    """
    return run_sync(_copy("get_many", "get", hosts, remote, local_dir, options))


async def put_many_async(
    hosts: Hosts,
    local: str | os.PathLike[str],
    remote: str,
    **options: Unpack[CopyOptions],
) -> list[CopyResult]:
    """``sshwrap.aio.put_many``: :func:`put_many` on the running loop (cancelling it stops
    every host as Ctrl-C does, then the cancellation goes on)."""
    return await run_async(_copy("put_many", "put", hosts, local, remote, options))


async def get_many_async(
    hosts: Hosts,
    remote: str,
    local_dir: str | os.PathLike[str],
    **options: Unpack[CopyOptions],
) -> list[CopyResult]:
    """``sshwrap.aio.get_many``: :func:`get_many` on the running loop."""
    return await run_async(_copy("get_many", "get", hosts, remote, local_dir, options))
