"""An fsspec filesystem over sshwrap: ``fsspec.filesystem("sshwrap", host="web1")`` and
``sshwrap://[user@]host[:port]/path`` URLs for pandas, xarray, dask and the rest.

Why fsspec: it is the interface the Python data libraries open remote files through; an
implementation of ``fsspec.AbstractFileSystem`` gives them ``open``/``ls``/``put``/``get``/globs
over the user's own OpenSSH (its config, agent, ProxyJump) with sshwrap's master.

Design:

- **One master per host and settings.**  ``SSHWrapFileSystem(host=..., **connect options)``
  (the keywords of ``sshwrap.connect``) shares one ``Connection`` with every other instance
  made with the same host and settings (fsspec's own instance cache returns the same instance
  for the same arguments; the share covers ``skip_instance_cache=True`` too).  The master is
  closed when the last instance using it is gone, or at interpreter exit.
- **Files over SFTP on that master**: a pool of up to ``pool_size`` SFTP sessions
  (``sshwrap.io.sftp_files.SessionPool``, one ssh channel each) serves the operations of all
  threads; requests are pipelined inside a session.  A file opened for reading keeps a read
  handle on the session it last used and prefers that session (a random read is one SFTP
  READ round trip; fsspec's read-ahead cache in front); a file opened for writing has its own
  session (not counted in the pool) while it is open.
- **Commands for what SFTP lacks**: ``cp_file`` runs ``cp -p`` on the remote side (no bytes
  through the client), ``rm(recursive=True)`` of one directory runs ``rm -rf``.
- **Nothing partial**: ``put_file``/``get_file`` use ``sshwrap.transfer``'s atomic copy (a
  private temporary name, verified, renamed); ``open(..., "wb"/"ab"/"xb")`` and ``pipe_file``
  write a temporary name next to the target, renamed over it on close (``posix-rename``); a
  failure (the master killed ...) removes it, best effort, and leaves the target untouched;
  one the call could not remove in its bound (a frozen server) is removed in the background
  once the server answers again (``sftp_files.Leftovers``; not when the connection is gone).
  ``"xb"`` and ``pipe_file(mode="create")`` rename with SFTP's plain rename, which refuses an
  existing target: ``FileExistsError``, atomically.
- **Never a hang**: ``timeout`` (default 60 s; None: no bound) bounds every wait of a call
  for the server (each SFTP reply, room to send, a session's start, a remote command) and
  the master's start (``start_timeout``, unless given): a frozen server raises
  ``sshwrap.io.sftp_session.SFTPTimeout`` (a ``TimeoutError``) naming host and path; that
  session is dropped, the next call starts a new one.
- **Errors** are Python's: ``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``,
  ``NotADirectoryError``, ``FileExistsError`` (and ``OSError`` with ``ENOTEMPTY``), with the
  path; the connection failing raises sshwrap's ``SSHConnectionError``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import os
import posixpath
import shlex
import stat
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem  # type: ignore[import-untyped]
from fsspec.utils import infer_storage_options, tokenize  # type: ignore[import-untyped]

from .connection import Connection, ConnectOptions
from .core.argv import find_ssh
from .core.options import keys_of
from .errors import SSHError
from .io.sftp_files import (
    Leftovers,
    SessionPool,
    Upload,
    bounded,
    close_later,
    lstat,
    makedirs,
    mkdir,
    mkdir_failed,
    os_error,
    read_range,
    readdir,
    rmdir,
)
from .io.sftp_pipeline import remove_within
from .io.sftp_session import SFTPSession, SFTPTimeout
from .protocol import sftp
from .protocol.sftp import Attrs, StatusError
from .transfer import FRESH_REMOVE_TIMEOUT, download_file, upload_file

__all__ = ["SSHWrapFile", "SSHWrapFileSystem"]

_FSSPEC_KEYS = {
    "use_listings_cache",
    "listings_expiry_time",
    "max_paths",
    "skip_instance_cache",
    "asynchronous",
    "loop",
}


def _new_session(conn: Connection, timeout: float | None) -> SFTPSession:
    """An SFTP session over ``conn``'s master (started again first if it died).

    Its ssh is kept off a login of its own (the ``ProxyCommand`` that fails at once, as for
    ``ssh -S``): a session goes over the master or fails, so a master killed later ends it.
    Failing to start because the master died just now, it is tried once more on a new one.
    ``timeout`` bounds each wait of the master's restart and of the SFTP handshake.
    """
    for attempt in (1, 2):
        conn.master.ensure(None if timeout is None else time.monotonic() + timeout)
        ssh, args = _session_argv(conn)
        try:
            return SFTPSession(conn.destination, ssh=ssh, ssh_args=args, timeout=timeout)
        except SSHError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _session_argv(conn: Connection) -> tuple[str, list[str]]:
    """The ssh and its options for an SFTP session over ``conn``'s master, kept off a login of
    its own (see :func:`_new_session`)."""
    master = conn.master
    opts = master.fallback_settings(direct_login=False)["options"]
    no_login = ["-o", f"ProxyCommand={opts['ProxyCommand']}"] if "ProxyCommand" in opts else []
    return master.ssh or find_ssh(), no_login + conn.ssh_args()


def _remove_afresh(conn: Connection, path: str, timeout: float = FRESH_REMOVE_TIMEOUT) -> bool:
    """Remove an upload's temporary file through a new session over the master (not started
    again), within ``timeout`` (the upload's own session could not: its stream cut, or its
    cleanup out of time)."""
    if conn.closed:
        return False
    ssh, args = _session_argv(conn)
    return remove_within(conn.destination, ssh, args, path, timeout)


def _close(conn: Connection, pool: SessionPool, leftovers: Leftovers) -> None:
    leftovers.close()
    pool.close()
    conn.close()


class _Shared:
    """The master and SFTP sessions of one (host, settings)."""

    def __init__(
        self, host: str, options: ConnectOptions, pool_size: int, timeout: float | None
    ) -> None:
        self.connection = Connection(host, **options).open()
        self.new_session = functools.partial(_new_session, self.connection, timeout)
        self.pool = SessionPool(self.new_session, pool_size, self.connection.master)
        # (temporary files failed uploads could not remove in time: retried, 2 s a try)
        self.leftovers = Leftovers(functools.partial(_remove_afresh, self.connection, timeout=2.0))
        weakref.finalize(self, _close, self.connection, self.pool, self.leftovers)

    def discarded(self, up: Upload, exc: BaseException) -> None:
        """``up.discard(exc)``; what it could not remove is left to ``leftovers`` (unless the
        connection is gone or the call was interrupted, as ``transfer.upload_file`` does)."""
        if not up.discard(exc) and isinstance(exc, Exception) and not isinstance(exc, SSHError):
            self.leftovers.add(up.tmp)


_SHARED: weakref.WeakValueDictionary[str, _Shared] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def _shared_for(
    host: str, options: ConnectOptions, pool_size: int, timeout: float | None
) -> _Shared:
    key = tokenize(host, sorted(options.items(), key=lambda kv: kv[0]), pool_size, timeout)
    with _SHARED_LOCK:
        shared = _SHARED.get(key)
        if shared is None or shared.connection.closed:  # (a closed one is not reused)
            shared = _SHARED[key] = _Shared(host, options, pool_size, timeout)
        return shared


def _kind(a: Attrs) -> str:
    if a.perm is None or stat.S_ISREG(a.perm):
        return "file"
    return "directory" if a.is_dir() else "other"


class SSHWrapFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """fsspec filesystem of one ssh host over an sshwrap master (see the module docstring).

    ``host`` is the ssh destination; the other keywords are ``sshwrap.connect``'s
    (``config``, ``user``, ``port``, ``identity``, ``jump``, ``options``, ``password`` ...)
    and fsspec's (``skip_instance_cache`` ...); ``pool_size`` bounds the SFTP sessions
    (channels on the master) its operations use at once.  ``timeout`` (seconds, default 60;
    None: no bound) bounds each wait of a call for the server, and the master's start
    (``start_timeout`` when not given): a server that does not answer raises ``SFTPTimeout``
    (a ``TimeoutError``) naming host and path.
    """

    protocol = "sshwrap"
    root_marker = "/"

    def __init__(
        self, host: str, pool_size: int = 4, timeout: float | None = 60.0, **options: Any
    ) -> None:
        super().__init__(host=host, pool_size=pool_size, timeout=timeout, **options)
        connect = {k: v for k, v in options.items() if k not in _FSSPEC_KEYS}
        unknown = set(connect) - keys_of(ConnectOptions)
        if unknown:
            raise TypeError(f"SSHWrapFileSystem() got an unexpected keyword {min(unknown)!r}")
        if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
            raise ValueError(
                f"SSHWrapFileSystem(timeout=) must be a positive number or None, not {timeout!r}"
            )
        if timeout is not None:
            connect.setdefault("start_timeout", timeout)
        self.host = host
        self.timeout = timeout
        self._shared = _shared_for(host, ConnectOptions(**connect), pool_size, timeout)  # type: ignore[typeddict-item]
        self._pool = self._shared.pool

    @contextlib.contextmanager
    def _session(self, path: str, prefer: SFTPSession | None = None) -> Iterator[SFTPSession]:
        """A session of the pool for one call on ``path``, its waits bounded by ``timeout``."""
        with contextlib.ExitStack() as stack:
            try:
                s = stack.enter_context(self._pool.session(prefer))
            except SFTPTimeout as e:  # starting a session: name the path too
                where = f"{self.connection.destination}:{path}"
                raise SFTPTimeout(f"{where}: no SFTP session started in time ({e})") from None
            with bounded(s, self.timeout, path):
                yield s

    @property
    def connection(self) -> Connection:
        """The ``sshwrap.Connection`` (master) the filesystem works over."""
        return self._shared.connection

    # -- paths ------------------------------------------------------------------------------
    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = os.fspath(path)
        if path.startswith("sshwrap://"):
            path = infer_storage_options(path)["path"]
        return path.rstrip("/") or cls.root_marker

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        opts = infer_storage_options(path)
        out: dict[str, Any] = {"host": opts["host"]}
        if opts.get("username"):
            out["user"] = opts["username"]
        if opts.get("port"):
            out["port"] = int(opts["port"])
        return out

    # -- listing ----------------------------------------------------------------------------
    def _entry(self, s: SFTPSession, path: str, a: Attrs) -> dict[str, Any]:
        followed = s.stat(path) if a.is_link() else a
        st = followed or a
        return {
            "name": path,
            "size": st.size or 0,
            "type": _kind(st) if followed is not None else "other",
            "mode": st.perm,
            "mtime": st.mtime,
            "atime": st.atime,
            "islink": a.is_link(),
        }

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """Size, type (file/directory/other), mode, times of ``path`` (links followed)."""
        path = self._strip_protocol(path)
        with self._session(path) as s:
            a = lstat(s, path)
            if a is None:
                raise os_error(FileNotFoundError, errno.ENOENT, path)
            return self._entry(s, path, a)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """Entries of directory ``path`` (full paths, sorted); ``[info(path)]`` for a file."""
        path = self._strip_protocol(path)
        with self._session(path) as s:
            try:
                entries = readdir(s, path)
            except StatusError as e:
                a = lstat(s, path)
                if a is None:
                    raise os_error(FileNotFoundError, errno.ENOENT, path) from None
                if not a.is_dir():
                    out = [self._entry(s, path, a)]
                    return out if detail else [path]
                raise s.error(e, path, "listing") from None
            out = [
                self._entry(s, posixpath.join(path, name), a)
                for name, a in sorted(entries, key=lambda x: x[0])
            ]
        return out if detail else [e["name"] for e in out]

    def modified(self, path: str) -> datetime.datetime:
        """The modification time of ``path`` (UTC)."""
        mtime = self.info(path)["mtime"]
        return datetime.datetime.fromtimestamp(mtime or 0, tz=datetime.UTC)

    def ukey(self, path: str) -> str:
        """A key that changes when the file does (path, size, mtime, mode)."""
        i = self.info(path)
        return str(tokenize(i["name"], i["size"], i["mtime"], i["mode"]))

    def checksum(self, path: str) -> int:
        """``ukey`` as an int (fsspec's cache keys)."""
        return int(self.ukey(path), 16)

    # -- directories and removal ----------------------------------------------------------
    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Create directory ``path`` (and its parents unless ``create_parents=False``)."""
        path = self._strip_protocol(path)
        if create_parents:
            self.makedirs(path, exist_ok=False)
            return
        with self._session(path) as s:
            try:
                mkdir(s, path)
            except StatusError as e:
                raise mkdir_failed(s, e, path) from None

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Create ``path`` and missing parents; ``FileExistsError`` unless ``exist_ok``."""
        path = self._strip_protocol(path)
        with self._session(path) as s:
            makedirs(s, path, exist_ok)

    def rmdir(self, path: str) -> None:
        """Remove the empty directory ``path``."""
        path = self._strip_protocol(path)
        with self._session(path) as s:
            try:
                rmdir(s, path)
            except StatusError as e:
                a = s.stat(path)
                if a is None:
                    raise os_error(FileNotFoundError, errno.ENOENT, path) from None
                if not a.is_dir():
                    raise os_error(NotADirectoryError, errno.ENOTDIR, path) from None
                if e.code == sftp.FX_FAILURE and readdir(s, path):
                    raise os_error(OSError, errno.ENOTEMPTY, path) from None
                raise s.error(e, path, "rmdir") from None

    def _rm(self, path: str) -> None:
        path = self._strip_protocol(path)
        with self._session(path) as s:
            a = lstat(s, path)
            if a is None:
                raise os_error(FileNotFoundError, errno.ENOENT, path)
        if a.is_dir():
            self.rmdir(path)
            return
        with self._session(path) as s:
            s.remove(path)

    def rm_file(self, path: str) -> None:
        """Remove file ``path`` (a directory: it must be empty)."""
        self._rm(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Remove files, or directories with ``recursive=True`` (one directory: ``rm -rf`` on
        the remote side)."""
        if isinstance(path, str) and recursive and maxdepth is None:
            p = self._strip_protocol(path)
            if p not in ("/", ".", "") and not any(c in p for c in "*?["):
                self.info(p)  # FileNotFoundError
                self._command(["rm", "-rf", "--", p], p)
                return
        super().rm(path, recursive=recursive, maxdepth=maxdepth)

    # -- remote-side copy and move -------------------------------------------------------
    def _command(self, argv: list[str], path: str, then: list[str] | None = None) -> None:
        """Run ``argv`` (and ``then`` if it succeeds) on the host; a failure raised as the
        ``OSError`` its message says."""
        line = shlex.join(argv) + (" && " + shlex.join(then) if then else "")
        r = self.connection.run(
            line, capture_output=True, env={"LC_ALL": "C"}, timeout=self.timeout
        )
        if r.returncode == 0:
            return
        msg = r.stderr.decode(errors="replace").strip()
        for words, cls, code in (
            ("No such file", FileNotFoundError, errno.ENOENT),
            ("Permission denied", PermissionError, errno.EACCES),
            ("Is a directory", IsADirectoryError, errno.EISDIR),
            ("Not a directory", NotADirectoryError, errno.ENOTDIR),
        ):
            if words in msg:
                raise cls(code, msg, path)
        raise OSError(errno.EIO, f"{argv[0]} failed ({r.returncode}): {msg}", path)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copy ``path1`` to ``path2`` on the remote side (``cp -p``: no bytes through the
        client), parents of ``path2`` made; a directory ``path1`` makes directory ``path2``."""
        p1, p2 = self._strip_protocol(path1), self._strip_protocol(path2)
        if self.info(p1)["type"] == "directory":
            self.makedirs(p2, exist_ok=True)
            return
        parent = self._parent(p2)
        self._command(["mkdir", "-p", "--", parent], p2, ["cp", "-p", "--", p1, p2])

    def mv(self, path1: Any, path2: Any, recursive: bool = False, **kwargs: Any) -> None:
        """Move with one SFTP rename when a single path moves (a file, or a directory with
        ``recursive=True`` to a new name); fsspec's copy-and-remove otherwise."""
        single = isinstance(path1, str) and isinstance(path2, str)
        if single and not any(c in path1 for c in "*?["):
            p1, p2 = self._strip_protocol(path1), self._strip_protocol(path2)
            src = self.info(p1)
            dst = self.info(p2) if self.exists(p2) else None
            if dst is not None and dst["type"] == "directory":
                p2 = posixpath.join(p2, posixpath.basename(p1))
                dst = self.info(p2) if self.exists(p2) else None
            if src["type"] != "directory" or (recursive and dst is None):
                with self._session(p1) as s:
                    s.rename(p1, p2)
                return
        super().mv(path1, path2, recursive=recursive, **kwargs)

    # -- bytes ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reading(self, s: SFTPSession, path: str) -> Iterator[tuple[bytes, int]]:
        """An open read handle of ``path`` and its size; ``IsADirectoryError`` for a dir."""
        handle = s.open_handle(path, sftp.FXF_READ, Attrs(), "reading")
        try:
            a = s.fstat(handle, path)
            if a.is_dir():
                raise os_error(IsADirectoryError, errno.EISDIR, path)
            yield handle, a.size or 0
        except BaseException as exc:
            with s.cleaning_up(exc) as go:
                if go:
                    s.close_handle(handle)
            raise
        close_later(s, handle)

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        """The bytes of ``path`` in ``[start, end)`` (negative: from the end), one pipelined
        read at that offset."""
        path = self._strip_protocol(path)
        with self._session(path) as s, self._reading(s, path) as (handle, size):
            lo = 0 if start is None else (max(0, size + start) if start < 0 else start)
            hi = size if end is None else (max(0, size + end) if end < 0 else end)
            if end is None:  # to the real end, should the file have grown
                return read_range(s, handle, lo, max(hi - lo, 0) + (1 << 20), path)
            return read_range(s, handle, lo, hi - lo, path)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        """Write ``value`` to ``path`` atomically; ``mode="create"``: ``FileExistsError``
        if ``path`` exists."""
        path = self._strip_protocol(path)
        with self._session(path) as s:
            up = Upload(s, path, append=False, exclusive=mode == "create")
            try:
                up.write(memoryview(value))
                up.commit()
            except BaseException as exc:
                self._shared.discarded(up, exc)
                raise

    def put_file(self, lpath: str, rpath: str, callback: Any = None, **kwargs: Any) -> None:
        """Upload local file ``lpath`` to ``rpath`` (parents made) with sshwrap.transfer's
        atomic copy; a directory ``lpath`` makes directory ``rpath``."""
        rpath = self._strip_protocol(rpath)
        if os.path.isdir(lpath):
            self.makedirs(rpath, exist_ok=True)
            return
        st = os.stat(lpath)
        self.makedirs(self._parent(rpath), exist_ok=True)
        if callback is not None:
            callback.set_size(st.st_size)
        tick = (lambda n: callback.relative_update(n)) if callback is not None else _no_tick

        def remove(tmp: str) -> bool:  # now (bounded) or, failing that, later
            if _remove_afresh(self.connection, tmp):
                return True
            self._shared.leftovers.add(tmp)
            return False

        with self._session(rpath) as s:
            upload_file(s, os.fspath(lpath), rpath, st, tick, True, remove_afresh=remove)

    def get_file(self, rpath: str, lpath: str, callback: Any = None, **kwargs: Any) -> None:
        """Download ``rpath`` to local file ``lpath`` (parents made) with sshwrap.transfer's
        atomic copy; a directory ``rpath`` makes directory ``lpath``."""
        rpath = self._strip_protocol(rpath)
        with self._session(rpath) as s:
            a = s.stat(rpath)
            if a is None:
                raise os_error(FileNotFoundError, errno.ENOENT, rpath)
            if a.is_dir():
                os.makedirs(lpath, exist_ok=True)
                return
            if callback is not None:
                callback.set_size(a.size or 0)
            tick = (lambda n: callback.relative_update(n)) if callback is not None else _no_tick
            os.makedirs(os.path.dirname(os.path.abspath(lpath)), exist_ok=True)
            download_file(s, rpath, os.fspath(lpath), a, tick, True)

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | str | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SSHWrapFile:
        path = self._strip_protocol(path)
        if mode == "xb" and self.exists(path):
            raise os_error(FileExistsError, errno.EEXIST, path)
        if mode == "rb":
            info = self.info(path)
            if info["type"] == "directory":
                raise os_error(IsADirectoryError, errno.EISDIR, path)
            kwargs["size"] = info["size"]
        return SSHWrapFile(
            self,
            path,
            mode,
            block_size=block_size or "default",
            autocommit=autocommit,
            cache_options=cache_options,
            **kwargs,
        )


def _no_tick(n: int) -> None:
    pass


class SSHWrapFile(AbstractBufferedFile):  # type: ignore[misc]
    """A file of an ``SSHWrapFileSystem``: reads are pipelined SFTP reads at offsets (through
    fsspec's read-ahead cache); writes go to a temporary name renamed over the file on
    close (``discard``/an error removes it)."""

    _handles: list[tuple[SFTPSession, bytes]]

    def _fetch_range(self, start: int, end: int) -> bytes:
        # One read request round trip: the file keeps a read handle open on a session of
        # the pool and prefers that session; on another one it opens another handle.
        if not hasattr(self, "_handles"):
            self._handles = []
        last = self._handles[-1] if self._handles else None
        with self.fs._session(self.path, last[0] if last else None) as s:
            if last is None or last[0] is not s:
                h = s.open_handle(self.path, sftp.FXF_READ, Attrs(), "reading")
                last = (s, h)
                self._handles.append(last)
            return read_range(s, last[1], start, end - start, self.path)

    def close(self) -> None:
        """Close the file: commit what was written (see ``commit``), or release the read
        handles."""
        super().close()
        pool = self.fs._pool
        for s, h in getattr(self, "_handles", ()):
            with pool.idle(s) as free:
                if free is not None:
                    with bounded(free, self.fs.timeout, self.path):
                        close_later(free, h)
        self._handles = []

    def _initiate_upload(self) -> None:
        self._session = self.fs._shared.new_session()
        self._session.call_timeout = self.fs.timeout  # (its own session: bounded while open)
        self._session.call_path = self.path
        try:
            self._upload = Upload(
                self._session, self.path, append=self.mode == "ab", exclusive=self.mode == "xb"
            )
        except BaseException:
            self._session.close()
            raise

    def _upload_chunk(self, final: bool = False) -> bool:
        try:
            self._upload.write(self.buffer.getbuffer())
            if final and self.autocommit:
                self.commit()
        except BaseException as exc:
            self.fs._shared.discarded(self._upload, exc)
            self._session.close()
            self.closed = True  # the error is raised once; closing after it does nothing
            raise
        return True

    def commit(self) -> None:
        """Rename the written temporary file over the target."""
        try:
            self._upload.commit()
        finally:
            self._session.close()

    def discard(self) -> None:
        """Remove the written temporary file (the target is untouched)."""
        self._upload.discard(Exception("discarded"))
        self._session.close()
