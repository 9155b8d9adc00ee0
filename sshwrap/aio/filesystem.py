"""The asyncio face of the fsspec filesystem: :class:`SSHWrapAsyncFileSystem`, an
``fsspec.asyn.AsyncFileSystem`` over :class:`sshwrap.filesystem.SSHWrapFileSystem`.

One implementation: each ``_op`` coroutine runs the sync filesystem's ``op`` in a worker
thread, as :mod:`sshwrap.aio.connection` runs ``put``/``get``; fsspec's own async code
(``_put``/``_get``/``_cat``/``_rm`` of many paths, ``_find``, ``_glob``, ``_walk`` ...) runs
many at once over the one master and its bounded session pool.  The bounds are the sync
face's (``timeout``).  Cancelling an awaiting task interrupts the SFTP session its thread is
working on (``sshwrap.io.sftp_files.abortable``) and waits for the thread, so a cancelled
upload never completes later in the background (a remote command, ``cp_file`` or ``rm`` of a
tree, is bounded by ``timeout`` only).  ``open`` returns the sync face's file.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fsspec.asyn import AsyncFileSystem  # type: ignore[import-untyped]

from ..filesystem import SSHWrapFileSystem
from ..io.sftp_files import abortable
from ..transfer import to_thread_abortable

__all__ = ["SSHWrapAsyncFileSystem"]

_DELEGATED = (
    *("info", "ls", "cat_file", "pipe_file", "put_file", "get_file"),
    *("rm_file", "rm", "cp_file", "mkdir", "makedirs"),
)
_ASYNC_KEYS = ("asynchronous", "loop", "batch_size")


class SSHWrapAsyncFileSystem(AsyncFileSystem):  # type: ignore[misc]
    """``SSHWrapFileSystem``'s operations as coroutines (``asynchronous=True``: await its
    ``_`` methods in your loop; otherwise fsspec runs them on its own loop thread).  The
    keywords are ``SSHWrapFileSystem``'s, plus fsspec's ``asynchronous``, ``loop`` and
    ``batch_size``; ``sync_fs`` is the sync filesystem it runs (sharing its master with every
    other instance for the same host and settings)."""

    protocol = "sshwrap"
    root_marker = "/"
    _strip_protocol = SSHWrapFileSystem._strip_protocol
    _get_kwargs_from_urls = SSHWrapFileSystem._get_kwargs_from_urls

    def __init__(self, host: str, **options: Any) -> None:
        super().__init__(host=host, **options)
        sync = {k: v for k, v in options.items() if k not in (*_ASYNC_KEYS, "skip_instance_cache")}
        self.sync_fs = SSHWrapFileSystem(host, skip_instance_cache=True, **sync)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        return self.sync_fs._open(path, mode, **kwargs)


def _delegate(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def call(self: SSHWrapAsyncFileSystem, *args: Any, **kwargs: Any) -> Any:
        op = getattr(self.sync_fs, name)
        out: list[Any] = []
        await to_thread_abortable(
            lambda abort: out.append(abortable(abort, lambda: op(*args, **kwargs)))
        )
        return out[0]

    call.__name__ = call.__qualname__ = f"_{name}"
    call.__doc__ = f"``SSHWrapFileSystem.{name}`` in a worker thread (cancellable)."
    return call


for _name in _DELEGATED:
    setattr(SSHWrapAsyncFileSystem, f"_{_name}", _delegate(_name))
