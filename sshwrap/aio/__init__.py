"""The asyncio face of sshwrap: ``await sshwrap.aio.run(host, cmd)``.

A facade: nothing inside the library imports it.  Each name is the async twin of a sync one,
with the same arguments, results, errors and bounds:

- :func:`run`, :func:`create_process`, :class:`Process`: :mod:`sshwrap.process` over asyncio
  (:mod:`sshwrap.aio.process`), ``tty=True``/``size`` included;  ``send_signal``/``terminate``
  /``kill`` are plain methods on every async process, as in :mod:`asyncio.subprocess`
  (``send_signal``/``terminate`` return a :class:`SignalDelivery`: await it or drop it);
- :func:`connect`, :func:`attach`, :class:`AsyncConnection`: :class:`sshwrap.Connection`
  (:mod:`sshwrap.aio.connection`);
- :func:`run_many`: :func:`sshwrap.run_many` (``sshwrap.fanout.run_many_async``);
- :func:`put_many`, :func:`get_many`: :func:`sshwrap.put_many`/:func:`sshwrap.get_many`
  (``sshwrap.fleet``);
- :mod:`sshwrap.aio.filesystem` (imported by name: fsspec is needed):
  ``SSHWrapAsyncFileSystem``, :class:`sshwrap.filesystem.SSHWrapFileSystem` as an fsspec
  ``AsyncFileSystem``.

::

    r = await sshwrap.aio.run("web1", ["uname", "-a"], capture_output=True, text=True)
    async with await sshwrap.aio.connect("web1") as c:
        r = await c.run("uptime", capture_output=True)
        p = await c.create_process("exec sleep 60")
        p.terminate()                 # the signal goes at once; awaiting it is optional
        await p.wait()                # -15
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .process import (
    DEVNULL,
    PIPE,
    STDOUT,
    Process,
    ProcessOptions,
    SignalDelivery,
    TerminalWriter,
    create_process,
    getoutput,
    getstatusoutput,
    run,
)

__all__ = [
    "DEVNULL",
    "PIPE",
    "STDOUT",
    "AsyncConnection",
    "Process",
    "ProcessOptions",
    "SignalDelivery",
    "TerminalWriter",
    "attach",
    "connect",
    "create_process",
    "get_many",
    "getoutput",
    "getstatusoutput",
    "put_many",
    "run",
    "run_many",
]

# imported on first use: a script that only runs commands does not load the Connection code
_LAZY: dict[str, tuple[str, str]] = {
    "connect": (".connection", "connect"),
    "attach": (".connection", "attach"),
    "AsyncConnection": (".connection", "AsyncConnection"),
    "run_many": ("..fanout", "run_many_async"),
    "put_many": ("..fleet", "put_many_async"),
    "get_many": ("..fleet", "get_many_async"),
}

if TYPE_CHECKING:
    from ..fanout import run_many_async as run_many
    from ..fleet import get_many_async as get_many
    from ..fleet import put_many_async as put_many
    from .connection import AsyncConnection as AsyncConnection
    from .connection import attach as attach
    from .connection import connect as connect


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'sshwrap.aio' has no attribute {name!r}")
    module, attr = target
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value
