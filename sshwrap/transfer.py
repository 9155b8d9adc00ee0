"""File transfer over an ssh connection (usually a ControlMaster): ``put`` and ``get``.

Design: sshwrap runs ``ssh <args> -s <destination> sftp`` (over the master when ``ssh_args``
carry its ``ControlPath``/``-S``, so no new key exchange) and speaks SFTP version 3 to the
remote ``sftp-server`` itself, through that ssh's stdin/stdout (a socketpair).  OpenSSH still
does all of SSH; sshwrap does only what the ``sftp``/``scp`` programs would do on top of the
channel.  We chose this over driving ``sftp -b -`` or ``scp`` because:

- progress is exact (bytes acknowledged by the server, against the total known up front), where
  scp/sftp print a human progress meter only to a terminal, about once a second;
- errors are typed from SFTP status codes (``RemoteFileNotFoundError`` is a
  ``FileNotFoundError``, ``RemotePermissionError`` a ``PermissionError``) instead of being parsed
  out of localised messages, and a failure names the exact remote path;
- it is as fast: requests are pipelined (several MiB in flight, large reads/writes when the
  server's ``limits@openssh.com`` extension allows) exactly as OpenSSH's own sftp client does,
  and the bytes take the same path (one ssh passenger on the master, one sftp-server).

Layers: the SFTP v3 codec is :mod:`sshwrap.protocol.sftp` (pure: bytes in, values out), the
session over ssh :mod:`sshwrap.io.sftp_session` (requests and replies, bounded cleanup, abort,
the transfer exceptions), the pipelined whole-file reads and writes
:mod:`sshwrap.io.sftp_pipeline`.  This module is the public face (``put``/``get``, whose names
the exceptions and ``Abort`` are re-exported under) and the procedures over a session: the tree
walks, and each file's private temporary file, checks and rename.

Semantics (close to ``scp -rp``): a directory is copied recursively; when the destination is an
existing directory the source goes inside it under its own name; permission bits (and, by
default, modification times) are kept; symbolic links are followed.  Remote relative paths are
relative to the login directory, and so are ``~`` and ``~/...``.

Nothing lost (each file of a recursive copy on its own):

- A download is written to a private temporary file in the destination's directory
  (``.<name>.sshwrap-<random>.part``, mode 0600, same filesystem), every ``os.pwrite`` count is
  checked (a short write is retried for the rest; a failure such as ENOSPC is raised), the
  bytes received must cover the file contiguously up to the end-of-file the server agreed to, and
  the file's size on disk must be that; only then are mode and times applied and the file
  ``os.replace``-d into place.  On any failure the temporary file is removed, so nothing is left
  under the destination's name and an existing copy there keeps its content and mode.
- An upload is written to ``<dir>/.<name>.sshwrap-<random>.part`` on the remote side (created
  exclusively, mode 0600), its size checked with ``fstat`` against the bytes sent, the handle's
  close checked, then renamed into place with the ``posix-rename@openssh.com`` extension (an
  atomic replace of an existing file).  A server without that extension gets the plain SFTP
  rename, which refuses an existing target: the old file is then removed first (not atomic, a
  window in which neither exists).  On failure the remote temporary file is removed within a
  bounded time: by the session, else (its stream cut by ``abort``, or its cleanup out of time
  behind the writes still in flight) through a new session over the same connection
  (:data:`FRESH_REMOVE_TIMEOUT`).  It may remain only when the connection itself is gone, the
  host does not answer in time, or after Ctrl-C (the final name is untouched either way).
- ``KeyboardInterrupt`` and exceptions raised by the ``progress`` callback propagate as
  themselves; the SFTP session is closed and its ssh reaped before they do.
- The connection dying mid-session (the master or the remote sftp process killed: ssh then
  exits 255 without a word) raises ``SSHConnectionError``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import secrets
import stat
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Required, TypedDict, Unpack

from .core.argv import find_ssh
from .core.options import check_keywords
from .errors import SSHError
from .io.sftp_files import close_later
from .io.sftp_pipeline import read_into, remove_within, write_from
from .io.sftp_session import (
    Abort,
    RemoteFileNotFoundError,
    RemotePermissionError,
    SFTPProtocolError,
    SFTPSession,
    TransferCancelled,
    TransferError,
)
from .protocol import sftp
from .protocol.sftp import Attrs

__all__ = [
    "FRESH_REMOVE_TIMEOUT",
    "Abort",
    "AbortableCopyOptions",
    "CopyOptions",
    "ProgressCallback",
    "RemoteFileNotFoundError",
    "RemotePermissionError",
    "SFTPProtocolError",
    "TransferCancelled",
    "TransferError",
    "TransferOptions",
    "download_file",
    "get",
    "put",
    "to_thread_abortable",
    "upload_file",
]

#: ``progress(bytes_done, bytes_total)``, called as the server acknowledges data.
ProgressCallback = Callable[[int, int], None]

FRESH_REMOVE_TIMEOUT = 0.4
"""Seconds an upload cut short gets to remove its remote temporary file through a new
session, when its own session could not (its ssh then killed and reaped within 0.3 s)."""


class CopyOptions(TypedDict, total=False):
    """The keywords of a copy that every face's ``put``/``get`` takes after the two paths:
    ``progress(done, total)`` (bytes, as the server acknowledges them; default None) and
    ``preserve_times`` (default True: modification times are kept with the modes)."""

    progress: ProgressCallback | None
    preserve_times: bool


class AbortableCopyOptions(CopyOptions, total=False):
    """:class:`CopyOptions` and ``abort`` (an :class:`Abort`: another thread stops the copy
    with ``TransferCancelled``; default None), as ``Connection.put``/``get`` take them."""

    abort: Abort | None


class TransferOptions(AbortableCopyOptions, total=False):
    """The keywords of :func:`put` and :func:`get`: ``destination`` (the host; required),
    ``ssh_args`` (ssh options placed before it; default none), ``ssh`` (the client; default
    the one on ``PATH``), ``control_path`` (a ControlMaster's socket that runs the SFTP session
    itself; default none: ``ssh ... -s DESTINATION sftp``), then the copy's own
    (:class:`AbortableCopyOptions`)."""

    destination: Required[str]
    ssh_args: Sequence[str]
    ssh: str | None
    control_path: str | None


async def to_thread_abortable(func: Callable[[Abort], None]) -> None:
    """Run ``func(abort)`` (a ``put``/``get`` passing ``abort=abort``) in a worker thread;
    cancelling the awaiting task aborts it and waits for the thread to finish (promptly), so
    a cancelled transfer neither completes later in the background nor keeps the thread."""
    import asyncio

    abort = Abort()
    fut: Awaitable[None] = asyncio.ensure_future(asyncio.to_thread(func, abort))
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        abort.abort()
        with contextlib.suppress(BaseException):
            await fut
        raise


# -- one file, atomically ---------------------------------------------------------------------
def upload_file(
    session: SFTPSession,
    local: str,
    remote: str,
    st: os.stat_result,
    tick: Callable[[int], None],
    preserve_times: bool,
    remove_afresh: Callable[[str], bool] | None = None,
) -> None:
    """Copy local file ``local`` to ``remote`` atomically, with its mode (and times).

    Written to a private temporary file next to ``remote``, checked (size), closed
    (checked), renamed into place; the temporary file is removed on failure (bounded): by
    this session, else (its stream cut by ``abort``, or its cleanup out of time behind the
    writes still in flight) by ``remove_afresh`` (a new session over the same master).  Only
    a connection that is gone (``SSHError``), or Ctrl-C, leaves it; ``remote`` is untouched.
    """
    fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
    try:
        tmp = _temp_name(remote)
        flags = sftp.FXF_WRITE | sftp.FXF_CREAT | sftp.FXF_EXCL | sftp.FXF_TRUNC
        handle: bytes | None = session.open_handle(tmp, flags, Attrs(perm=0o600), "writing", remote)
        try:
            assert handle is not None
            sent = write_from(session, fd, remote, handle, tick)
            size = session.fstat(handle, remote).size
            if size is not None and size != sent:
                raise TransferError(
                    f"{session.destination}:{remote}: wrote {sent} bytes but the remote file "
                    f"has {size}"
                )
            # the server's umask applied at open: set the exact mode afterwards
            attrs = Attrs(perm=stat.S_IMODE(st.st_mode))
            if preserve_times:
                attrs.atime, attrs.mtime = int(st.st_atime), int(st.st_mtime)
            session.fsetstat(handle, attrs, remote)
            h, handle = handle, None
            session.close_written(h, remote)  # a close can report a write error the writes did not
            session.rename(tmp, remote)
        except BaseException as exc:
            removed = False
            with session.cleaning_up(exc) as go:
                if go:
                    if handle is not None:
                        session.close_handle(handle)
                    session.remove(tmp)
                    removed = True
            gone = isinstance(exc, SSHError | KeyboardInterrupt)  # (no time / no connection)
            if remove_afresh is not None and not removed and not gone:
                remove_afresh(tmp)
            raise
    finally:
        os.close(fd)


def download_file(
    session: SFTPSession,
    remote: str,
    local: str,
    attrs: Attrs,
    tick: Callable[[int], None],
    preserve_times: bool,
) -> None:
    """Copy remote file ``remote`` to local path ``local`` atomically, with mode and times.

    Written to a private temporary file in ``local``'s directory, verified (every byte up
    to the end of file received and written), then mode and times set and the file
    ``os.replace``-d over ``local``.  On failure the temporary file is removed and
    ``local`` is untouched.  Local write errors (ENOSPC ...) raise ``OSError`` naming
    ``local``.
    """
    handle = session.open_handle(remote, sftp.FXF_READ, Attrs(), "reading")
    try:
        mode = stat.S_IMODE(attrs.perm) if attrs.perm is not None else 0o644
        # write next to the file a symbolic link points to: the link itself stays
        target = os.path.realpath(local) if os.path.islink(local) else local
        fd, tmp = _local_temp(target)
        try:
            try:
                read_into(session, fd, remote, handle, tick, target)
                os.fchmod(fd, mode)
                if preserve_times and attrs.mtime is not None and attrs.atime is not None:
                    os.utime(fd, (attrs.atime, attrs.mtime))
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except BaseException as exc:
        # (the session ends with this exception: the handle goes with it; no waiting for
        # the replies still in flight)
        if isinstance(exc, Exception) and session.settled():
            with session.cleaning_up(exc) as go:
                if go:
                    session.close_handle(handle)
        raise
    close_later(session, handle)  # (a read handle: its close's reply tells nothing)


def _temp_name(path: str) -> str:
    """``<dir>/.<name>.sshwrap-<random>.part`` next to ``path`` (local and remote paths are
    both POSIX paths); the name part is cut to stay within NAME_MAX."""
    head, name = posixpath.split(path)
    short = os.fsdecode(os.fsencode(name)[:200])
    return posixpath.join(head, f".{short}.sshwrap-{secrets.token_hex(6)}.part")


def _local_temp(path: str) -> tuple[int, str]:
    """A new private (0600) file next to ``path``: (fd, its path)."""
    for _ in range(10):
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", path)


# -- planning and the public functions --------------------------------------------------------
@dataclass
class _Item:
    src: str
    dst: str
    is_dir: bool
    size: int = 0
    local_stat: os.stat_result | None = None
    remote_attrs: Attrs | None = None


def _walk_local(src: str, dst: str) -> Iterator[_Item]:
    seen: set[tuple[int, int]] = set()

    def rec(s: str, d: str) -> Iterator[_Item]:
        st = os.stat(s)
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen:
                return  # a link back into the tree
            seen.add(key)
            yield _Item(s, d, True, local_stat=st)
            with os.scandir(s) as it:
                names = sorted(e.name for e in it)
            for name in names:
                yield from rec(os.path.join(s, name), posixpath.join(d, name))
        elif stat.S_ISREG(st.st_mode):
            yield _Item(s, d, False, st.st_size, local_stat=st)
        # other kinds (sockets, fifos, devices) are skipped, like scp does

    yield from rec(src, dst)


def _walk_remote(session: SFTPSession, src: str, dst: str, attrs: Attrs) -> Iterator[_Item]:
    if attrs.is_dir():
        yield _Item(src, dst, True, remote_attrs=attrs)
        for name, a in sorted(session.listdir(src), key=lambda x: x[0]):
            yield from _walk_remote(session, posixpath.join(src, name), os.path.join(dst, name), a)
    elif attrs.perm is None or stat.S_ISREG(attrs.perm):
        yield _Item(src, dst, False, attrs.size or 0, remote_attrs=attrs)


def _remote_path(path: str) -> str:
    """SFTP paths are relative to the login directory: ``~`` and ``~/x`` mean just that."""
    if path in ("", "~", "~/"):
        return "."
    if path.startswith("~/"):
        return path[2:]
    return path


def _ticker(total: int, progress: ProgressCallback | None) -> Callable[[int], None]:
    done = 0
    if progress is not None:
        progress(0, total)

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None and n:
            progress(done, total)

    return tick


@dataclass(frozen=True)
class _Copy:
    """One ``put`` or ``get``: its keywords (:class:`TransferOptions`) with the defaults."""

    destination: str
    ssh: str
    ssh_args: Sequence[str]
    progress: ProgressCallback | None
    preserve_times: bool
    abort: Abort | None
    control_path: str | None

    @classmethod
    def of(cls, func: str, options: TransferOptions) -> _Copy:
        """The copy ``func`` was called for (TypeError, as Python's, for a wrong keyword)."""
        check_keywords(func, options, TransferOptions)
        if "destination" not in options:
            raise TypeError(f"{func}() missing required keyword-only argument: 'destination'")
        return cls(
            options["destination"],
            options.get("ssh") or find_ssh(),
            options.get("ssh_args", ()),
            options.get("progress"),
            options.get("preserve_times", True),
            options.get("abort"),
            options.get("control_path"),
        )

    def session(self) -> SFTPSession:
        """A new SFTP session to the destination (``ssh <ssh_args> -s <destination> sftp``)."""
        return SFTPSession(
            self.destination,
            ssh=self.ssh,
            ssh_args=self.ssh_args,
            abort=self.abort,
            control_path=self.control_path,
        )

    def remove_afresh(self, path: str) -> bool:
        """Remove remote ``path`` through a new session, within ``FRESH_REMOVE_TIMEOUT``."""
        return remove_within(self.destination, self.ssh, self.ssh_args, path, FRESH_REMOVE_TIMEOUT)


def put(local: str | os.PathLike[str], remote: str, **options: Unpack[TransferOptions]) -> None:
    """Copy local file or directory ``local`` to ``remote`` on ``destination``.

    ``ssh_args`` are ssh options placed before the destination (``-F cfg``, ``-S socket`` or
    ``-o ControlPath=...`` to go over a master).  Directories are copied recursively; if
    ``remote`` is an existing directory, ``local`` goes inside it under its own name.  Modes are
    kept, and modification times unless ``preserve_times=False``.  ``progress(done, total)`` is
    called with byte counts as the server acknowledges data.

    Raises ``FileNotFoundError``/``PermissionError`` for local problems,
    ``RemoteFileNotFoundError``/``RemotePermissionError`` (subclasses of those and of
    ``TransferError``) for remote ones, ``TransferError`` for other SFTP failures, and the
    ``SSHError`` subclass ``classify_ssh_failure`` picks (``SSHConnectionError``,
    ``AuthenticationError`` ...) when ssh itself failed; ``SSHConnectionError`` also when the
    connection ends mid-transfer.  Local write errors (ENOSPC ...) are ``OSError`` naming the
    local path.  ``KeyboardInterrupt`` and exceptions from ``progress`` propagate as
    themselves.  ``abort`` (an :class:`Abort`) lets another thread stop the transfer
    (``TransferCancelled``).  ``control_path``: a ControlMaster's socket that runs the SFTP
    session itself (no ``ssh -S`` process; ``ssh_args`` still serve a cleanup's fresh
    session).  See the module docstring for the atomicity guarantees.
    """
    copy = _Copy.of("put", options)
    src = os.fspath(local)
    os.stat(src)  # a missing source fails before any connection is made
    with copy.session() as session:
        target = _remote_path(remote)
        st = session.stat(target)
        if st is not None and st.is_dir():
            target = posixpath.join(target, os.path.basename(os.path.normpath(src)))
        items = list(_walk_local(src, target))
        tick = _ticker(sum(i.size for i in items), copy.progress)
        dirs: list[_Item] = []
        for item in items:
            assert item.local_stat is not None
            if item.is_dir:
                session.mkdir(item.dst)
                dirs.append(item)
            else:
                upload_file(
                    session,
                    item.src,
                    item.dst,
                    item.local_stat,
                    tick,
                    copy.preserve_times,
                    remove_afresh=copy.remove_afresh,
                )
        # directory modes last, so a read-only directory can still be filled first
        for item in reversed(dirs):
            assert item.local_stat is not None
            attrs = Attrs(perm=stat.S_IMODE(item.local_stat.st_mode))
            if copy.preserve_times:
                attrs.atime = int(item.local_stat.st_atime)
                attrs.mtime = int(item.local_stat.st_mtime)
            session.setstat(item.dst, attrs)


def get(remote: str, local: str | os.PathLike[str], **options: Unpack[TransferOptions]) -> None:
    """Copy remote file or directory ``remote`` on ``destination`` to ``local``.

    The mirror of ``put``: recursive for directories, into ``local`` if it is an existing
    directory, modes (and times) kept, same progress callback and exceptions.
    """
    copy = _Copy.of("get", options)
    dst = os.fspath(local)
    with copy.session() as session:
        src = _remote_path(remote)
        attrs = session.stat(src)
        if attrs is None:
            where = f"{copy.destination}:{src}"
            raise RemoteFileNotFoundError(errno.ENOENT, "no such remote file", where)
        if os.path.isdir(dst):
            dst = os.path.join(dst, posixpath.basename(posixpath.normpath(src)))
        items = list(_walk_remote(session, src, dst, attrs))
        tick = _ticker(sum(i.size for i in items), copy.progress)
        dirs: list[_Item] = []
        for item in items:
            assert item.remote_attrs is not None
            if item.is_dir:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(item.dst, 0o700)
                if not os.path.isdir(item.dst):
                    raise FileExistsError(errno.EEXIST, "not a directory", item.dst)
                dirs.append(item)
            else:
                download_file(
                    session, item.src, item.dst, item.remote_attrs, tick, copy.preserve_times
                )
        for item in reversed(dirs):
            a = item.remote_attrs
            assert a is not None
            if a.perm is not None:
                os.chmod(item.dst, stat.S_IMODE(a.perm))
            if copy.preserve_times and a.atime is not None and a.mtime is not None:
                os.utime(item.dst, (a.atime, a.mtime))
