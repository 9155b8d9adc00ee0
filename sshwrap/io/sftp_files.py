"""Files and directories over SFTP sessions: what ``sshwrap.filesystem`` needs beyond put/get.

- ``SessionPool``: up to ``size`` SFTP sessions (one ``ssh -s ... sftp`` each, over the
  master) shared by the threads of one filesystem; a session is taken for one operation and
  given back.  A session that broke (its byte stream cut, its ssh gone) is closed, never given
  out again; an idle one whose ssh exited meanwhile (the master died) is dropped when taken,
  and so is every idle one once the master's process is gone (its sessions' ssh may not
  have noticed yet): the next session starts over a new master.
  The pool never holds more than ``size`` sessions, so a server's ``MaxSessions`` is kept to
  when ``size`` is below it.
- ``bounded``: during one call on a session, every wait for the server (a reply, room to
  send) ends within ``timeout`` (``SFTPTimeout`` naming the host and path; the session is
  broken, so the pool drops it); inside ``abortable(abort, op)`` (the async face's worker
  thread), ``abort`` interrupts the session (``TransferCancelled``) too.
- Requests on paths: ``lstat``, ``readdir`` (entries as the server lists them: links not
  followed), ``mkdir`` (the server's default mode), ``rmdir``.
- ``Upload``: a file's new content written to a temporary name next to it, renamed over it
  on ``commit`` (atomic), removed on ``discard``; ``makedirs`` with Python's errors.
- ``Leftovers``: temporary names a failed upload could not remove in its own time bound (its
  server frozen): removed later by one background thread, each attempt and the whole retry
  bounded, so the failing call keeps its own bound.
- ``read_range`` and ``write_at``: pipelined reads and writes of a byte range at an offset of
  an open handle (random access), up to ``sftp_pipeline.IN_FLIGHT`` bytes in flight, in the
  session's chunk size.  A short read is completed by asking for the rest; the end of file
  ends a range early; every byte below the end is checked to have arrived.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from ..protocol import sftp
from ..protocol.sftp import Attrs, StatusError
from ..protocol.wire import pack_string
from .attach import pid_alive
from .sftp_pipeline import IN_FLIGHT, write_failed
from .sftp_session import Abort, SFTPSession, TransferError
from .threads import start_daemon

__all__ = [
    "Leftovers",
    "MasterProcess",
    "SessionPool",
    "Upload",
    "abortable",
    "bounded",
    "close_later",
    "lstat",
    "makedirs",
    "mkdir",
    "mkdir_failed",
    "os_error",
    "read_range",
    "readdir",
    "rmdir",
    "temp_name",
    "write_at",
]


_T = TypeVar("_T")


class MasterProcess(Protocol):
    """What the pool reads of the master its sessions go over (``io.master.Master``)."""

    pid: int  # (0: not started)


class SessionPool:
    """Up to ``size`` SFTP sessions made by ``open_session()``, lent out one at a time; with
    ``master``, no idle session is lent once that master's process is gone."""

    def __init__(
        self,
        open_session: Callable[[], SFTPSession],
        size: int = 4,
        master: MasterProcess | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a session pool needs a size of at least 1")
        self._open = open_session
        self._size = size
        self._master = master
        self._idle: list[SFTPSession] = []
        self._count = 0  # sessions lent out or idle
        self._cond = threading.Condition()
        self._closed = False

    def _take(self, prefer: SFTPSession | None = None) -> SFTPSession:
        dead: list[SFTPSession] = []
        try:
            with self._cond:
                if self._idle and not self._master_runs():
                    dead, self._idle = self._idle, []  # (their ssh end, noticed or not)
                if prefer in self._idle and not self._closed and not prefer.exited():
                    self._idle.remove(prefer)
                    return prefer
                while True:
                    if self._closed:
                        raise TransferError("the filesystem's SFTP sessions are closed")
                    while self._idle:
                        s = self._idle.pop()
                        if not s.exited():
                            self._drop(dead)
                            return s
                        dead.append(s)
                    self._drop(dead)
                    if self._count < self._size:
                        self._count += 1
                        break
                    self._cond.wait()
        finally:
            for s in dead:  # (outside the lock: a close waits a moment for ssh's exit)
                s.close()
        try:
            return self._open()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _master_runs(self) -> bool:
        m = self._master
        return m is None or not m.pid or pid_alive(m.pid)

    def _drop(self, dead: list[SFTPSession]) -> None:
        """Count the sessions of ``dead`` not yet counted off as gone (under the lock)."""
        for s in dead:
            if not s.broken:
                s.broken = True
                self._count -= 1

    def _give(self, s: SFTPSession, keep: bool) -> None:
        with self._cond:
            if keep and not s.broken and not self._closed:
                self._idle.append(s)
                self._cond.notify()
                return
            self._count -= 1
            self._cond.notify()
        s.close()

    @contextlib.contextmanager
    def session(self, prefer: SFTPSession | None = None) -> Iterator[SFTPSession]:
        """A session for one operation (given back after it, closed if it broke): ``prefer``
        when it is idle (it holds the caller's open handle), else any."""
        with self._lent(self._take(prefer)) as s:
            yield s

    @contextlib.contextmanager
    def idle(self, s: SFTPSession) -> Iterator[SFTPSession | None]:
        """``s`` if it is idle (lent for the block), None if it is busy or gone."""
        with self._cond:
            free = s in self._idle and not self._closed
            if free:
                self._idle.remove(s)
        if not free:
            yield None
            return
        with self._lent(s) as lent:
            yield lent

    @contextlib.contextmanager
    def _lent(self, s: SFTPSession) -> Iterator[SFTPSession]:
        """``s`` for the block, then given back: kept after an error of the operation, closed
        after an interrupt (it may be mid-request)."""
        try:
            yield s
        except BaseException as exc:
            self._give(s, keep=isinstance(exc, Exception))
            raise
        self._give(s, keep=True)

    def close(self) -> None:
        """Close the idle sessions now and each lent one when it comes back."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for s in idle:
            s.close()


_CALL = threading.local()  # .abort: the Abort of the ``abortable`` call of this thread


def abortable(abort: Abort, op: Callable[[], _T]) -> _T:
    """``op()``, every session ``bounded`` lends it in this thread interruptible by
    ``abort`` (from another thread: the call then raises ``TransferCancelled``)."""
    _CALL.abort = abort
    try:
        return op()
    finally:
        _CALL.abort = None


@contextlib.contextmanager
def bounded(session: SFTPSession, timeout: float | None, path: str) -> Iterator[SFTPSession]:
    """``session`` for one call on ``path`` in which every wait for the server ends within
    ``timeout`` seconds (None: no bound), else raises ``SFTPTimeout`` naming host and path
    (and which the ``abortable`` call of this thread, if any, can interrupt)."""
    session.call_timeout = timeout
    session.call_path = path
    abort: Abort | None = getattr(_CALL, "abort", None)
    if abort is not None:
        abort.attach(session)
    try:
        yield session
    finally:
        if abort is not None:
            abort.attach(None)
        session.call_timeout = None
        session.call_path = ""


def lstat(session: SFTPSession, path: str) -> Attrs | None:
    """Attributes of ``path`` itself (a link not followed), None if it does not exist."""
    return session.stat(path, follow=False)


def readdir(session: SFTPSession, path: str) -> list[tuple[str, Attrs]]:
    """Entries of directory ``path`` (without ``.``/``..``), attributes of each entry itself
    (links not followed).  Raises ``StatusError`` when the directory cannot be opened (the
    caller tells a missing path from a file)."""
    p = os.fsencode(path)
    _, r = session.call(lambda rid: sftp.path_request(sftp.FXP_OPENDIR, rid, p))
    return session.read_dir(r.string(), path, follow=False)


def mkdir(session: SFTPSession, path: str) -> None:
    """Create directory ``path`` with the server's default mode; raises ``StatusError``."""
    p = os.fsencode(path)
    session.call(lambda rid: sftp.path_request(sftp.FXP_MKDIR, rid, p, Attrs()))


def close_later(session: SFTPSession, handle: bytes) -> None:
    """Close ``handle`` without waiting for the reply (skipped when it comes)."""
    rid = session.new_id()
    session.abandon((rid,))
    session.send(sftp.handle_request(sftp.FXP_CLOSE, rid, handle))


def rmdir(session: SFTPSession, path: str) -> None:
    """Remove the empty directory ``path``; raises ``StatusError``."""
    p = os.fsencode(path)
    session.call(lambda rid: sftp.path_request(sftp.FXP_RMDIR, rid, p))


def read_range(session: SFTPSession, handle: bytes, offset: int, length: int, path: str) -> bytes:
    """Up to ``length`` bytes at ``offset`` of ``handle`` (fewer at the end of file), each
    reply's data received straight into its place in the result (``reply_into``)."""
    if length <= 0:
        return b""
    out = bytearray(length)
    view = memoryview(out)
    chunk = session.read_chunk
    depth = max(4, IN_FLIGHT // chunk)
    hs = pack_string(handle)
    todo: deque[tuple[int, int]] = deque(
        (o, min(chunk, length - o)) for o in range(0, length, chunk)
    )
    pending: dict[int, tuple[int, int]] = {}

    def place(rid: int) -> memoryview:
        o, n = pending[rid]
        return view[o : o + n]

    end = length  # lowered to the end of file when a read meets it
    failed: StatusError | None = None
    try:
        while True:
            batch: list[bytes] = []
            # (refilled in batches from half the depth: fewer wake-ups, as read_into does)
            while todo and failed is None and len(pending) < (depth if batch else depth // 2 + 1):
                o, n = todo.popleft()
                if o < end:
                    rid = session.new_id()
                    pending[rid] = (o, n)
                    batch.append(sftp.read_request(rid, hs, offset + o, n))
            if batch:
                session.send(b"".join(batch))
            if not pending:
                break
            ptype, rid, r, k = session.reply_into(pending, place)
            o, n = pending.pop(rid)
            if ptype == sftp.FXP_DATA:
                if r is not None:  # (behind a skipped reply: it came through the buffer)
                    data = r.view()
                    k = len(data)
                    if k > n:
                        raise session.protocol_error(f"{k} bytes for a read of {n}", path)
                    out[o : o + k] = data
                if k == 0:
                    end = min(end, o)
                elif k < n:
                    todo.appendleft((o + k, n - k))  # a short read: ask for the rest
            elif ptype == sftp.FXP_STATUS and r is not None:
                code = r.u32()
                if code == sftp.FX_EOF:
                    end = min(end, o)
                elif failed is None:
                    failed = StatusError(code, r.text())
            else:
                raise session.protocol_error(f"SFTP reply of type {ptype} to a read", path)
    except BaseException:
        session.abandon(pending)
        raise
    finally:
        view.release()
    if failed is not None:
        raise session.error(failed, path, "reading")
    del out[end:]
    return bytes(out)


def write_at(session: SFTPSession, handle: bytes, data: memoryview, offset: int, path: str) -> None:
    """Write all of ``data`` at ``offset`` of ``handle``; the first failure raises (with the
    "No space left on device" hint when the remote filesystem is full)."""
    chunk = session.write_chunk
    depth = max(4, IN_FLIGHT // chunk)
    hs = pack_string(handle)
    pending: set[int] = set()
    pos = 0
    failed: StatusError | None = None
    try:
        while True:
            while failed is None and pos < len(data) and len(pending) < depth:
                n = min(chunk, len(data) - pos)
                rid = session.new_id()
                pending.add(rid)
                session.send(sftp.write_head(rid, hs, offset + pos, n), data[pos : pos + n])
                pos += n
            if not pending:
                break
            ptype, rid, r = session.reply_for(pending)
            pending.discard(rid)
            if ptype != sftp.FXP_STATUS:
                raise session.protocol_error(f"SFTP reply of type {ptype} to a write", path)
            status = r.status()
            if status is not None and failed is None:
                failed = status
    except BaseException:
        session.abandon(pending)
        raise
    if failed is not None:
        raise write_failed(session, failed, path)


_WRITE = sftp.FXF_WRITE | sftp.FXF_CREAT | sftp.FXF_EXCL | sftp.FXF_TRUNC


def temp_name(path: str) -> str:
    """``<dir>/.<name>.sshwrap-<random>.part``: a private temporary name next to ``path``."""
    head, name = posixpath.split(path)
    short = os.fsdecode(os.fsencode(name)[:200])
    return posixpath.join(head, f".{short}.sshwrap-{secrets.token_hex(6)}.part")


def os_error(cls: type[OSError], code: int, path: str) -> OSError:
    """``cls(code, strerror(code), path)``."""
    return cls(code, os.strerror(code), path)


def mkdir_failed(s: SFTPSession, e: StatusError, path: str) -> OSError:
    """The ``OSError`` for a failed mkdir of ``path``."""
    if s.stat(path) is not None:
        return os_error(FileExistsError, errno.EEXIST, path)
    parent = s.stat(posixpath.dirname(path) or ".")
    if parent is None:
        return os_error(FileNotFoundError, errno.ENOENT, path)
    if not parent.is_dir():
        return os_error(NotADirectoryError, errno.ENOTDIR, path)
    err = s.error(e, path, "mkdir")
    return err if isinstance(err, OSError) else OSError(errno.EIO, str(err), path)


def makedirs(s: SFTPSession, path: str, exist_ok: bool) -> None:
    """Make directory ``path`` and its missing parents."""
    a = s.stat(path)
    if a is not None:
        if exist_ok and a.is_dir():
            return
        raise os_error(FileExistsError, errno.EEXIST, path)
    missing = [path]
    while (up := posixpath.dirname(missing[-1])) not in ("", "/") and s.stat(up) is None:
        missing.append(up)
    for d in reversed(missing):
        try:
            mkdir(s, d)
        except StatusError as e:
            done = s.stat(d)
            if done is None or not done.is_dir():  # (not made meanwhile by another)
                raise mkdir_failed(s, e, d) from None


class Upload:
    """A new content for ``path`` written to a temporary name next to it and renamed over
    it by ``commit`` (``append``: starting from a remote copy of the old content)."""

    def __init__(self, s: SFTPSession, path: str, *, append: bool, exclusive: bool) -> None:
        self.s, self.path, self.exclusive = s, path, exclusive
        self.tmp = temp_name(path)
        old = s.stat(path)
        if old is not None and old.is_dir():
            raise os_error(IsADirectoryError, errno.EISDIR, path)
        if exclusive and old is not None:
            raise os_error(FileExistsError, errno.EEXIST, path)
        self.perm = old.perm if old is not None else None
        self.pos = 0
        parent = posixpath.dirname(path)
        if old is None and parent not in ("", "/"):
            makedirs(s, parent, exist_ok=True)  # as a local open would not; fsspec expects it
        self.handle: bytes | None = s.open_handle(
            self.tmp, _WRITE, Attrs(perm=0o666), "writing", path
        )
        if append and old is not None:
            self.pos = self._copy_old(old.size or 0)

    def _copy_old(self, size: int) -> int:
        assert self.handle is not None
        offset = 0
        with self._old_handle() as h:
            while offset < size:
                data = read_range(self.s, h, offset, min(8 << 20, size - offset), self.path)
                if not data:
                    break
                write_at(self.s, self.handle, memoryview(data), offset, self.path)
                offset += len(data)
        return offset

    @contextlib.contextmanager
    def _old_handle(self) -> Iterator[bytes]:
        h = self.s.open_handle(self.path, sftp.FXF_READ, Attrs(), "reading")
        try:
            yield h
        finally:
            self.s.close_handle(h)

    def write(self, data: memoryview) -> None:
        """Append ``data`` to the temporary file."""
        assert self.handle is not None
        write_at(self.s, self.handle, data, self.pos, self.path)
        self.pos += len(data)

    def commit(self) -> None:
        """Check the size, keep the old mode, close (checked) and rename into place."""
        s, handle = self.s, self.handle
        assert handle is not None
        size = s.fstat(handle, self.path).size
        if size is not None and size != self.pos:
            raise TransferError(f"{s.destination}:{self.path}: wrote {self.pos} bytes, has {size}")
        if self.perm is not None:
            s.fsetstat(handle, Attrs(perm=stat.S_IMODE(self.perm)), self.path)
        self.handle = None
        s.close_written(handle, self.path)
        if not self.exclusive:
            s.rename(self.tmp, self.path)
            return
        t, p = os.fsencode(self.tmp), os.fsencode(self.path)
        try:
            s.call(lambda rid: sftp.rename_request(rid, t, p))
        except StatusError as e:  # OpenSSH's plain rename refuses an existing target
            if s.stat(self.path) is not None:
                raise os_error(FileExistsError, errno.EEXIST, self.path) from None
            raise s.error(e, self.path, "renaming to") from None

    def discard(self, exc: BaseException) -> bool:
        """After ``exc``: close and remove the temporary file (best effort, bounded); True
        when it is removed."""
        with self.s.cleaning_up(exc) as go:
            if go:
                if self.handle is not None:
                    self.s.close_handle(self.handle)
                with contextlib.suppress(StatusError, TransferError):
                    self.s.remove(self.tmp)
                    return True
        return False


class Leftovers:
    """Remote temporary files a failed upload left, removed later in the background.

    ``add(path)`` returns at once; one daemon thread calls ``remove(path)`` (True: gone;
    each call bounded by the remover) for every path left, again after 0.2 s, 0.4 s ... up to
    5 s between rounds, until each is gone or ``give_up_after`` seconds have passed since it
    was added; it ends when nothing is left (or on ``close``), another starts with the next
    ``add``.  ``remove`` must not hold the owner alive (its finalizer calls ``close``).
    """

    def __init__(self, remove: Callable[[str], bool], give_up_after: float = 300.0) -> None:
        self._remove = remove
        self._give_up_after = give_up_after
        self._paths: dict[str, float] = {}  # path -> when to give up on it
        self._cond = threading.Condition()
        self._running = False
        self._closed = False

    def add(self, path: str) -> None:
        """Remove ``path`` later (retried, bounded)."""
        with self._cond:
            if self._closed:
                return
            self._paths[path] = time.monotonic() + self._give_up_after
            self._cond.notify()
            if not self._running:
                self._running = True
                start_daemon(self._run, "sshwrap-leftovers")

    def pending(self) -> list[str]:
        """The paths not removed yet (and not given up on)."""
        with self._cond:
            return list(self._paths)

    def close(self) -> None:
        """Stop retrying (an attempt under way ends within its own bound)."""
        with self._cond:
            self._closed = True
            self._paths.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        pause = 0.2
        while True:
            with self._cond:
                now = time.monotonic()
                self._paths = {p: end for p, end in self._paths.items() if end > now}
                if self._closed or not self._paths:
                    self._running = False
                    return
                paths = list(self._paths)
            for path in paths:
                if self._remove(path):
                    with self._cond:
                        self._paths.pop(path, None)
            with self._cond:
                if self._paths and not self._closed:
                    self._cond.wait(pause)
            pause = min(2 * pause, 5.0)
