"""File transfer over an ssh connection (usually a ControlMaster): ``put`` and ``get``.

Design: sshwrap runs ``ssh <args> -s <destination> sftp`` (over the master when ``ssh_args``
carry its ``ControlPath``/``-S``, so no new key exchange) and speaks SFTP version 3 to the
remote ``sftp-server`` itself, through that ssh's stdin/stdout pipes.  OpenSSH still does all of
SSH; sshwrap does only what the ``sftp``/``scp`` programs would do on top of the channel.  We
chose this over driving ``sftp -b -`` or ``scp`` because:

- progress is exact (bytes acknowledged by the server, against the total known up front), where
  scp/sftp print a human progress meter only to a terminal, about once a second;
- errors are typed from SFTP status codes (``RemoteFileNotFoundError`` is a
  ``FileNotFoundError``, ``RemotePermissionError`` a ``PermissionError``) instead of being parsed
  out of localised messages, and a failure names the exact remote path;
- it is as fast: requests are pipelined (several MiB in flight, large reads/writes when the
  server's ``limits@openssh.com`` extension allows) exactly as OpenSSH's own sftp client does,
  and the bytes take the same path (one ssh passenger on the master, one sftp-server).

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
  window in which neither exists).  On failure the remote temporary file is removed, best effort
  within a bounded time; if the connection itself is gone it may remain (the final name is
  untouched either way).
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
import select
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

from .core.argv import find_ssh
from .errors import SSHConnectionError, SSHError, SSHWrapError, classify_ssh_failure
from .protocol import wire
from .protocol.wire import pack_string, pack_u32, pack_u64

__all__ = [
    "Abort",
    "ProgressCallback",
    "RemoteFileNotFoundError",
    "RemotePermissionError",
    "SFTPProtocolError",
    "TransferCancelled",
    "TransferError",
    "get",
    "put",
    "to_thread_abortable",
]

#: ``progress(bytes_done, bytes_total)``, called as the server acknowledges data.
ProgressCallback = Callable[[int, int], None]

# -- SFTP v3 (draft-ietf-secsh-filexfer-02) -------------------------------------------------
_INIT, _VERSION, _OPEN, _CLOSE, _READ, _WRITE = 1, 2, 3, 4, 5, 6
_LSTAT, _FSTAT, _SETSTAT, _FSETSTAT, _OPENDIR, _READDIR = 7, 8, 9, 10, 11, 12
_REMOVE, _MKDIR, _STAT, _RENAME = 13, 14, 17, 18
_STATUS, _HANDLE, _DATA, _NAME, _ATTRS = 101, 102, 103, 104, 105
_EXTENDED, _EXTENDED_REPLY = 200, 201
_FX_OK, _FX_EOF, _FX_NO_SUCH_FILE, _FX_PERMISSION_DENIED = 0, 1, 2, 3
_A_SIZE, _A_UIDGID, _A_PERM, _A_TIME, _A_EXT = 0x1, 0x2, 0x4, 0x8, 0x80000000
_O_READ, _O_WRITE, _O_CREAT, _O_TRUNC, _O_EXCL = 0x1, 0x2, 0x8, 0x10, 0x20
_STATUS_NAMES = {
    1: "SSH_FX_EOF",
    2: "SSH_FX_NO_SUCH_FILE",
    3: "SSH_FX_PERMISSION_DENIED",
    4: "SSH_FX_FAILURE",
    5: "SSH_FX_BAD_MESSAGE",
    6: "SSH_FX_NO_CONNECTION",
    7: "SSH_FX_CONNECTION_LOST",
    8: "SSH_FX_OP_UNSUPPORTED",
}

_DEFAULT_CHUNK = 32768  # what every SFTP server must accept
_MAX_CHUNK = 255 * 1024
_IN_FLIGHT = 4 << 20  # bytes requested but not yet acknowledged
_RBUF_SIZE = 4 << 20  # the receive buffer; replies are at most ~256 KiB
# Cleanup after a failure (closing a handle, removing a remote temporary file) is bounded: after
# an error, and (shorter) after KeyboardInterrupt or a callback's exception, which must take
# effect promptly.  Then ssh gets _CLOSE_WAIT to exit on its own before it is killed.
_CLEANUP_TIMEOUT = 2.0
_INTERRUPT_CLEANUP_TIMEOUT = 0.4
_CLOSE_WAIT = 2.0
_ABORT_CLOSE_WAIT = 0.3


class TransferError(SSHWrapError):
    """A file transfer failed (the message says which path and why)."""


class RemoteFileNotFoundError(TransferError, FileNotFoundError):
    """A remote file or directory does not exist (``errno.ENOENT``)."""


class RemotePermissionError(TransferError, PermissionError):
    """The remote side refused access to a path (``errno.EACCES``)."""


class TransferCancelled(TransferError):
    """The transfer was stopped by :meth:`Abort.abort` (from another thread)."""


class SFTPProtocolError(TransferError):
    """The server's replies break the SFTP protocol (a malformed reply, or one answering a
    request that was never sent): the session cannot be trusted and is closed."""


@dataclass
class _Attrs:
    size: int | None = None
    perm: int | None = None
    atime: int | None = None
    mtime: int | None = None

    def is_dir(self) -> bool:
        return self.perm is not None and stat.S_ISDIR(self.perm)

    def is_link(self) -> bool:
        return self.perm is not None and stat.S_ISLNK(self.perm)

    def pack(self) -> bytes:
        flags = 0
        out = b""
        if self.size is not None:
            flags |= _A_SIZE
            out += pack_u64(self.size)
        if self.perm is not None:
            flags |= _A_PERM
            out += pack_u32(self.perm)
        if self.atime is not None and self.mtime is not None:
            flags |= _A_TIME
            out += pack_u32(self.atime) + pack_u32(self.mtime)
        return pack_u32(flags) + out


# The per-request headers of the upload and download pumps, packed in one call each.
_HEAD = struct.Struct(">IBI")  # uint32 length, byte type, uint32 request id
_OFFSET_LEN = struct.Struct(">QI")  # uint64 offset, uint32 length
_U32 = struct.Struct(">I")


class _Reader(wire.Reader):
    """Parses one SFTP reply payload; a truncated one raises ``SFTPProtocolError``."""

    __slots__ = ("who",)

    def __init__(self, data: bytes | memoryview, who: str = "") -> None:
        # (wire.Reader's fields set directly: one reader per reply, no super() call per reply)
        self.buf = data
        self.pos = 0
        self.who = who

    def truncated(self) -> Exception:
        """``SFTPProtocolError`` naming the destination."""
        return SFTPProtocolError(f"{self.who}: malformed SFTP reply (truncated)")

    def attrs(self) -> _Attrs:
        a = _Attrs()
        flags = self.u32()
        if flags & _A_SIZE:
            a.size = self.u64()
        if flags & _A_UIDGID:
            self.u32()
            self.u32()
        if flags & _A_PERM:
            a.perm = self.u32()
        if flags & _A_TIME:
            a.atime = self.u32()
            a.mtime = self.u32()
        if flags & _A_EXT:
            for _ in range(self.u32()):
                self.view()
                self.view()
        return a


class _StatusError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SFTPSession:
    """An SFTP v3 client over ``ssh -s <destination> sftp``; a context manager.

    Low level; ``put``/``get`` are the public interface.
    """

    def __init__(
        self,
        destination: str,
        *,
        ssh_args: Sequence[str] = (),
        ssh: str | None = None,
        abort: Abort | None = None,
    ) -> None:
        self.destination = destination
        argv = [
            ssh or find_ssh(),
            *ssh_args,
            # What scp/sftp pass: no forwarding, no tty, no remote command, just the subsystem.
            "-x",
            "-a",
            "-T",
            "-o",
            "ClearAllForwardings=yes",
            "-o",
            "RemoteCommand=none",
            "-o",
            "RequestTTY=no",
            "-o",
            "PermitLocalCommand=no",
            "-s",
            "--",
            destination,
            "sftp",
        ]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        # A socketpair, as OpenSSH's sftp/scp use: its buffers are larger than a pipe's, so
        # ssh (or the master, which receives these fds) and we block each other less.
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=child.fileno(),
                stdout=child.fileno(),
                stderr=self._stderr,
                start_new_session=True,
            )
        except BaseException:
            self._sock.close()
            self._stderr.close()
            raise
        finally:
            child.close()
        self._wfd = self._rfd = self._sock.fileno()
        # Replies are received into one fixed buffer and handed out as views of it (no copy
        # per packet); a view is valid until the next receive.
        self._rbuf = bytearray(_RBUF_SIZE)
        self._rview = memoryview(self._rbuf)
        self._start = 0  # unread bytes are _rbuf[_start:_end]
        self._end = 0
        self._next_id = 0
        # Requests whose replies nobody waits for any more (a pipeline cut short by an error):
        # their replies are skipped when they come.  Any other unexpected id is a protocol error.
        self._abandoned: set[int] = set()
        self._deadline: float | None = None  # set while cleaning up: every wait is bounded
        self.broken = False  # the byte stream can no longer be trusted (or ssh is gone)
        self._closed = False
        self._sock_lock = threading.Lock()  # close() against interrupt() from another thread
        self._interrupted = False
        self.extensions: dict[str, bytes] = {}
        self.read_chunk = _DEFAULT_CHUNK
        self.write_chunk = _DEFAULT_CHUNK
        self.preserve_times = True
        self._established = False
        self._abort = abort
        try:
            if abort is not None:
                abort._attach(self)
            self._init()
        except BaseException:
            self.broken = True
            self.close()
            raise
        self._established = True

    # -- plumbing ----------------------------------------------------------------------
    def __enter__(self) -> SFTPSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, Exception):
            self.broken = True  # KeyboardInterrupt & co: do not linger
        self.close()

    def close(self) -> None:
        """End the session (closing stdin ends sftp-server) and reap ssh.

        ssh gets ``_CLOSE_WAIT`` seconds to exit on its own (``_ABORT_CLOSE_WAIT`` after a
        failure or an interrupt) and is killed after that: every reply the caller needed has
        been received by then, so nothing is lost by not waiting longer.
        """
        if self._closed:
            return
        self._closed = True
        if self._abort is not None:
            self._abort._attach(None)
        proc = self._proc
        try:
            with self._sock_lock:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)
                self._sock.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_ABORT_CLOSE_WAIT if self.broken else _CLOSE_WAIT)
        finally:  # (also when a KeyboardInterrupt lands in the wait above)
            if proc.poll() is None:
                proc.kill()
            proc.wait()  # SIGKILLed (or exited): prompt
            self._stderr.close()

    def interrupt(self) -> None:
        """Stop the session from another thread: what it is waiting for fails at once and it
        raises ``TransferCancelled`` (with no remote cleanup: its byte stream is cut)."""
        with self._sock_lock:
            self._interrupted = True
            if not self._closed:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def _ssh_failure(self, what: str) -> SSHWrapError:
        """The error for ssh ending under us: typed from ssh's messages when ssh failed.

        Once the session was up, ssh exiting 255 without a recognisable message means its
        channel was cut from under it (the master or the remote sftp process died): that is
        an ``SSHConnectionError``, whatever else ssh said is attached.
        """
        self.broken = True
        if self._interrupted:
            return TransferCancelled(f"{self.destination}: transfer cancelled")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        try:
            self._stderr.seek(0)
            log = self._stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            log = ""
        rc = self._proc.returncode
        if rc == 255:
            err: SSHError = classify_ssh_failure(self.destination, log, rc)
            if self._established and type(err) is SSHError:
                msg = "the ssh connection ended during the SFTP session"
                if err.stderr.strip():
                    msg += ": " + err.message
                else:
                    msg += " (ssh exited with status 255 and said nothing)"
                err = SSHConnectionError(self.destination, msg, err.stderr, rc)
            return err
        msg = f"{self.destination}: {what} (ssh exit status {rc})"
        if log:
            msg += ": " + log.splitlines()[-1]
        return TransferError(msg)

    def _wait_io(self, write: bool) -> None:
        """While cleaning up, wait (bounded) until the socket is ready."""
        if self._deadline is None:
            return
        left = self._deadline - time.monotonic()
        r, w = ([], [self._sock]) if write else ([self._sock], [])
        if left <= 0 or not any(select.select(r, w, [], left)[:2]):
            self.broken = True
            raise TransferError(f"{self.destination}: the SFTP server did not answer in time")

    def _send(self, *parts: bytes | memoryview) -> None:
        bufs = [memoryview(p) for p in parts]
        while bufs:
            self._wait_io(write=True)
            try:
                n = os.writev(self._wfd, bufs)
            except OSError:  # EPIPE / ECONNRESET: ssh went away
                raise self._ssh_failure("the connection closed") from None
            while n:
                if n >= len(bufs[0]):
                    n -= len(bufs[0])
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][n:]
                    n = 0

    def _fill(self, want: int) -> None:
        """Make ``want`` unread bytes available in the receive buffer."""
        if self._end - self._start >= want:
            return
        if want > _RBUF_SIZE:
            self.broken = True
            raise SFTPProtocolError(f"{self.destination}: SFTP reply too large ({want} bytes)")
        if self._start + want > _RBUF_SIZE:  # no room after the unread part: move it first
            left = bytes(self._rview[self._start : self._end])
            self._rbuf[: len(left)] = left
            self._start, self._end = 0, len(left)
        while self._end - self._start < want:
            self._wait_io(write=False)
            try:
                n = self._sock.recv_into(self._rview[self._end :])
            except OSError:
                n = 0
            if not n:
                raise self._ssh_failure("the connection closed")
            self._end += n

    def _recv(self) -> tuple[int, memoryview]:
        """Next reply: (type, payload after the type byte), a view valid until the next one."""
        self._fill(4)
        (n,) = _U32.unpack_from(self._rbuf, self._start)
        if n < 5:
            self.broken = True
            raise SFTPProtocolError(f"{self.destination}: malformed SFTP reply")
        self._fill(4 + n)
        p = self._start + 4
        self._start = p + n
        if self._start == self._end:
            self._start = self._end = 0  # empty: start over at the front
        return self._rbuf[p], self._rview[p + 1 : p + n]

    def _recv_for(self, pending: Container[int]) -> tuple[int, int, _Reader]:
        """The next reply to one of ``pending``'s request ids: (type, id, reader after the id).

        Replies to abandoned requests are skipped; a reply to anything else breaks the
        protocol (``SFTPProtocolError``: never mistaken for success).
        """
        while True:
            ptype, payload = self._recv()
            r = _Reader(payload, self.destination)
            rid = r.u32()
            if rid in pending:
                return ptype, rid, r
            if rid in self._abandoned:
                self._abandoned.discard(rid)
                continue
            self.broken = True
            raise SFTPProtocolError(
                f"{self.destination}: SFTP reply (type {ptype}) to request {rid}, "
                "which was never sent or already answered"
            )

    def _abandon(self, ids: Iterable[int]) -> None:
        self._abandoned.update(ids)

    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return self._next_id

    def _request(self, ptype: int, *parts: bytes | memoryview) -> int:
        rid = self._new_id()
        body_len = 1 + 4 + sum(len(p) for p in parts)
        self._send(_HEAD.pack(body_len, ptype, rid), *parts)
        return rid

    def _reply(self, rid: int) -> tuple[int, _Reader]:
        try:
            ptype, _, r = self._recv_for((rid,))
        except BaseException:
            self._abandon((rid,))
            raise
        if ptype == _STATUS:
            code = r.u32()
            message = r.text()
            if code != _FX_OK:
                raise _StatusError(code, message)
        return ptype, r

    def _call(self, ptype: int, *parts: bytes | memoryview) -> tuple[int, _Reader]:
        return self._reply(self._request(ptype, *parts))

    def _init(self) -> None:
        self._send(_HEAD.pack(5, _INIT, 3))
        ptype, payload = self._recv()
        if ptype != _VERSION:
            raise TransferError(f"{self.destination}: not an SFTP server")
        r = _Reader(payload, self.destination)
        r.u32()
        exts = self.extensions
        while not r.at_end():
            name = r.text()
            exts[name] = r.string()
        if "limits@openssh.com" in exts:
            with contextlib.suppress(_StatusError):
                ptype, rr = self._call(_EXTENDED, pack_string(b"limits@openssh.com"))
                if ptype == _EXTENDED_REPLY:
                    rr.u64()  # max packet length
                    max_read, max_write = rr.u64(), rr.u64()
                    if max_read:
                        self.read_chunk = max(_DEFAULT_CHUNK, min(_MAX_CHUNK, max_read))
                    if max_write:
                        self.write_chunk = max(_DEFAULT_CHUNK, min(_MAX_CHUNK, max_write))

    @contextlib.contextmanager
    def _cleaning_up(self, exc: BaseException | None) -> Iterator[bool]:
        """Best-effort cleanup after ``exc`` (None: after success, errors propagate).

        Yields whether to try at all (not when the stream is broken); every wait inside is
        bounded, and any failure of the cleanup itself is swallowed so ``exc`` propagates.
        """
        if exc is None:
            yield True
            return
        if self.broken:
            yield False
            return
        interrupted = not isinstance(exc, Exception)
        budget = _INTERRUPT_CLEANUP_TIMEOUT if interrupted else _CLEANUP_TIMEOUT
        self._deadline = time.monotonic() + budget
        try:
            yield True
        except Exception:
            self.broken = True  # it may have left requests half-answered
        finally:
            self._deadline = None

    # -- operations --------------------------------------------------------------------
    def error(self, e: _StatusError, path: str, what: str) -> TransferError:
        """A typed exception for a failed SFTP request on ``path``."""
        where = f"{self.destination}:{path}"
        if e.code == _FX_NO_SUCH_FILE:
            return RemoteFileNotFoundError(errno.ENOENT, f"{what}: no such remote file", where)
        if e.code == _FX_PERMISSION_DENIED:
            return RemotePermissionError(errno.EACCES, f"{what}: remote permission denied", where)
        name = _STATUS_NAMES.get(e.code, f"status {e.code}")
        return TransferError(f"{where}: {what} failed: {e.message} ({name})")

    def stat(self, path: str) -> _Attrs | None:
        """Attributes of ``path`` (following links), None if it does not exist."""
        try:
            _, r = self._call(_STAT, pack_string(os.fsencode(path)))
        except _StatusError as e:
            if e.code == _FX_NO_SUCH_FILE:
                return None
            raise self.error(e, path, "stat") from None
        return r.attrs()

    def mkdir(self, path: str) -> None:
        """Create directory ``path`` (an existing directory is fine)."""
        try:
            self._call(_MKDIR, pack_string(os.fsencode(path)), _Attrs(perm=0o700).pack())
        except _StatusError as e:
            st = self.stat(path)
            if st is None or not st.is_dir():
                raise self.error(e, path, "mkdir") from None

    def setstat(self, path: str, attrs: _Attrs) -> None:
        """Set permissions/times of ``path``."""
        try:
            self._call(_SETSTAT, pack_string(os.fsencode(path)), attrs.pack())
        except _StatusError as e:
            raise self.error(e, path, "setting attributes of") from None

    def remove(self, path: str) -> None:
        """Remove remote file ``path``."""
        try:
            self._call(_REMOVE, pack_string(os.fsencode(path)))
        except _StatusError as e:
            raise self.error(e, path, "removing") from None

    def rename(self, old: str, new: str) -> None:
        """Rename ``old`` to ``new``, replacing an existing ``new``.

        Atomic with the ``posix-rename@openssh.com`` extension.  Without it the plain SFTP
        rename refuses an existing target, so that is removed first (not atomic).
        """
        o, n = pack_string(os.fsencode(old)), pack_string(os.fsencode(new))
        try:
            if "posix-rename@openssh.com" in self.extensions:
                self._call(_EXTENDED, pack_string(b"posix-rename@openssh.com"), o, n)
                return
            if self.stat(new) is not None:
                self.remove(new)
            self._call(_RENAME, o, n)
        except _StatusError as e:
            raise self.error(e, new, f"renaming {old} to") from None

    def fstat(self, handle: bytes, path: str) -> _Attrs:
        """Attributes of an open handle."""
        try:
            _, r = self._call(_FSTAT, pack_string(handle))
        except _StatusError as e:
            raise self.error(e, path, "fstat") from None
        return r.attrs()

    def free_space(self, path: str) -> tuple[int, int] | None:
        """(bytes, inodes) available to the user on ``path``'s filesystem, if the server says
        (``statvfs@openssh.com``); None otherwise."""
        if "statvfs@openssh.com" not in self.extensions:
            return None
        try:
            ptype, r = self._call(
                _EXTENDED, pack_string(b"statvfs@openssh.com"), pack_string(os.fsencode(path))
            )
        except _StatusError:
            return None
        if ptype != _EXTENDED_REPLY:
            return None
        _bsize, frsize, _blocks, _bfree, bavail = (r.u64() for _ in range(5))
        _files, _ffree, favail = (r.u64() for _ in range(3))
        return bavail * frsize, favail

    def _no_space_hint(self, path: str) -> str:
        """`` [No space left on device: ...]`` when ``path``'s remote filesystem is full."""
        free = self.free_space(posixpath.dirname(path) or ".")
        if free is None:
            return ""
        space, inodes = free
        if space < 2 * self.write_chunk or inodes == 0:
            return f" [No space left on device: {space} bytes, {inodes} inodes free remotely]"
        return ""

    def listdir(self, path: str) -> list[tuple[str, _Attrs]]:
        """Entries of a remote directory (without ``.``/``..``), attributes follow links."""
        try:
            _, r = self._call(_OPENDIR, pack_string(os.fsencode(path)))
        except _StatusError as e:
            raise self.error(e, path, "listing") from None
        handle = r.string()
        out: list[tuple[str, _Attrs]] = []
        try:
            while True:
                try:
                    _, r = self._call(_READDIR, pack_string(handle))
                except _StatusError as e:
                    if e.code == _FX_EOF:
                        break
                    raise self.error(e, path, "listing") from None
                batch = []
                for _ in range(r.u32()):
                    name = os.fsdecode(r.string())
                    r.view()  # the longname
                    batch.append((name, r.attrs()))
                for name, attrs in batch:  # (parsed first: a stat reuses the reply buffer)
                    if name in (".", ".."):
                        continue
                    if attrs.is_link():
                        followed = self.stat(posixpath.join(path, name))
                        if followed is None:
                            continue  # a dangling link: nothing to copy
                        attrs = followed
                    out.append((name, attrs))
        except BaseException as exc:
            with self._cleaning_up(exc) as go:
                if go:
                    self._close_handle(handle)
            raise
        self._close_handle(handle)
        return out

    def _close_handle(self, handle: bytes) -> None:
        with contextlib.suppress(_StatusError):
            self._call(_CLOSE, pack_string(handle))

    def _open(self, path: str, pflags: int, attrs: _Attrs, what: str, where: str = "") -> bytes:
        try:
            _, r = self._call(_OPEN, pack_string(os.fsencode(path)), pack_u32(pflags), attrs.pack())
        except _StatusError as e:
            raise self.error(e, where or path, what) from None
        return r.string()

    def upload(
        self, local: str, remote: str, st: os.stat_result, tick: Callable[[int], None]
    ) -> None:
        """Copy local file ``local`` to ``remote`` atomically, with its mode (and times).

        Written to a private temporary file next to ``remote``, checked (size), closed
        (checked), renamed into place; the temporary file is removed on failure (best effort,
        bounded: if the connection is gone it remains, and ``remote`` is untouched).
        """
        fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
        try:
            mode = stat.S_IMODE(st.st_mode)
            tmp = _temp_name(remote)
            handle: bytes | None = self._open(
                tmp, _O_WRITE | _O_CREAT | _O_EXCL | _O_TRUNC, _Attrs(perm=0o600), "writing", remote
            )
            try:
                assert handle is not None
                sent = self._pump_upload(fd, remote, handle, tick)
                size = self.fstat(handle, remote).size
                if size is not None and size != sent:
                    raise TransferError(
                        f"{self.destination}:{remote}: wrote {sent} bytes but the remote file "
                        f"has {size}"
                    )
                # the server's umask applied at open: set the exact mode afterwards
                attrs = _Attrs(perm=mode)
                if self.preserve_times:
                    attrs.atime, attrs.mtime = int(st.st_atime), int(st.st_mtime)
                try:
                    self._call(_FSETSTAT, pack_string(handle), attrs.pack())
                except _StatusError as e:
                    raise self.error(e, remote, "setting attributes of") from None
                h, handle = handle, None
                try:  # a close can report a write error the writes did not
                    self._call(_CLOSE, pack_string(h))
                except _StatusError as e:
                    raise self.error(e, remote, "closing") from None
                self.rename(tmp, remote)
            except BaseException as exc:
                with self._cleaning_up(exc) as go:
                    if go:
                        if handle is not None:
                            self._close_handle(handle)
                        self.remove(tmp)
                raise
        finally:
            os.close(fd)

    def _pump_upload(self, fd: int, remote: str, handle: bytes, tick: Callable[[int], None]) -> int:
        """Write ``fd``'s content (to its end) through ``handle``; returns the bytes written."""
        chunk = self.write_chunk
        depth = max(4, _IN_FLIGHT // chunk)
        hs = pack_string(handle)
        pending: dict[int, int] = {}
        offset = 0
        eof = False
        first_error: _StatusError | None = None
        block = memoryview(bytearray(chunk))  # reused: writev has copied it on return
        try:
            while True:
                while not eof and len(pending) < depth:
                    got = os.readv(fd, [block])
                    if not got:
                        eof = True
                        break
                    rid = self._new_id()
                    pending[rid] = got  # before sending: a failed send abandons it too
                    head = _HEAD.pack(1 + 4 + len(hs) + 12 + got, _WRITE, rid)
                    self._send(head, hs, _OFFSET_LEN.pack(offset, got), block[:got])
                    offset += got
                if not pending:
                    break
                ptype, rid, r = self._recv_for(pending)
                n = pending.pop(rid)
                if ptype != _STATUS:
                    self.broken = True
                    raise SFTPProtocolError(
                        f"{self.destination}: SFTP reply of type {ptype} to a write"
                    )
                code = r.u32()
                if code != _FX_OK and first_error is None:
                    first_error = _StatusError(code, r.text())
                    eof = True  # stop sending; collect the replies still due
                if first_error is None:
                    tick(n)
        except BaseException:
            self._abandon(pending)
            raise
        if first_error is not None:
            err = self.error(first_error, remote, "writing")
            if first_error.code == 4:  # SSH_FX_FAILURE: say so when the disk is full
                hint = self._no_space_hint(remote)
                if hint:
                    err = TransferError(str(err) + hint)
            raise err
        return offset

    def download(self, remote: str, local: str, attrs: _Attrs, tick: Callable[[int], None]) -> None:
        """Copy remote file ``remote`` to local path ``local`` atomically, with mode and times.

        Written to a private temporary file in ``local``'s directory, verified (every byte up
        to the end of file received and written), then mode and times set and the file
        ``os.replace``-d over ``local``.  On failure the temporary file is removed and
        ``local`` is untouched.  Local write errors (ENOSPC ...) raise ``OSError`` naming
        ``local``.
        """
        handle = self._open(remote, _O_READ, _Attrs(), "reading")
        try:
            mode = stat.S_IMODE(attrs.perm) if attrs.perm is not None else 0o644
            # write next to the file a symbolic link points to: the link itself stays
            target = os.path.realpath(local) if os.path.islink(local) else local
            fd, tmp = _local_temp(target)
            try:
                try:
                    self._pump_download(fd, remote, handle, tick, target)
                    os.fchmod(fd, mode)
                    if self.preserve_times and attrs.mtime is not None and attrs.atime is not None:
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
            if isinstance(exc, Exception) and not self.broken and not self._abandoned:
                with self._cleaning_up(exc) as go:
                    if go:
                        self._close_handle(handle)
            raise
        self._close_handle(handle)

    def _pump_download(
        self, fd: int, remote: str, handle: bytes, tick: Callable[[int], None], local: str
    ) -> int:
        """Read ``handle`` to its end into ``fd``; returns the size (checked on disk)."""
        chunk = self.read_chunk
        depth = max(4, _IN_FLIGHT // chunk)
        hs = pack_string(handle)
        pending: dict[int, tuple[int, int]] = {}
        retry: list[tuple[int, int]] = []  # ranges a short read left over
        got: list[tuple[int, int]] = []  # (offset, length) of every piece written
        next_offset = 0
        eof_at: int | None = None
        first_error: _StatusError | None = None
        try:
            while True:
                # Refill in batches, one write for several requests: fewer wake-ups for the
                # master and sftp-server than a request per reply.
                if first_error is None and len(pending) <= depth // 2:
                    batch: list[bytes] = []
                    ids: list[int] = []
                    while len(pending) + len(ids) < depth:
                        if retry:
                            off, length = retry.pop()
                        elif eof_at is None:
                            off, length = next_offset, chunk
                            next_offset += chunk
                        else:
                            break
                        rid = self._new_id()
                        batch.append(_HEAD.pack(1 + 4 + len(hs) + 12, _READ, rid))
                        batch.append(hs)
                        batch.append(_OFFSET_LEN.pack(off, length))
                        pending[rid] = (off, length)
                        ids.append(rid)
                    if batch:
                        self._send(b"".join(batch))
                if not pending:
                    break
                ptype, rid, r = self._recv_for(pending)
                off, length = pending.pop(rid)
                if ptype == _DATA:
                    data = r.view()  # zero-copy: written out before the next reply
                    n = len(data)
                    if n > length:
                        self.broken = True
                        raise SFTPProtocolError(
                            f"{self.destination}:{remote}: {n} bytes for a read of {length}"
                        )
                    if n:
                        _pwrite_all(fd, data, off, local)
                        got.append((off, n))
                        tick(n)
                    if 0 < n < length and (eof_at is None or off + n < eof_at):
                        retry.append((off + n, length - n))
                    elif n == 0 and (eof_at is None or off < eof_at):
                        eof_at = off
                elif ptype == _STATUS:
                    code = r.u32()
                    if code == _FX_EOF:
                        if eof_at is None or off < eof_at:
                            eof_at = off
                        retry = [(o, n) for o, n in retry if o < eof_at]
                    elif first_error is None:
                        first_error = _StatusError(code, r.text())
                else:
                    self.broken = True
                    raise SFTPProtocolError(
                        f"{self.destination}: SFTP reply of type {ptype} to a read"
                    )
        except BaseException:
            self._abandon(pending)
            raise
        if first_error is not None:
            raise self.error(first_error, remote, "reading")
        assert eof_at is not None  # no request left and no error: the end was found
        # Verify: the pieces cover [0, eof_at) without a gap, and the file is that long.
        covered = 0
        for o, n in sorted(got):
            if o > covered:
                break
            covered = max(covered, o + n)
        if covered < eof_at:
            raise TransferError(
                f"{self.destination}:{remote}: received {covered} contiguous bytes of {eof_at}"
            )
        size = os.fstat(fd).st_size
        if size > eof_at:
            os.ftruncate(fd, eof_at)  # only ever shrinks: the file shrank while read
        elif size < eof_at:
            raise TransferError(f"{local}: {size} bytes on disk, expected {eof_at}")
        return eof_at


def _pwrite_all(fd: int, data: memoryview, offset: int, path: str) -> None:
    """``os.pwrite`` all of ``data`` (a short count is retried for the rest); an error (ENOSPC
    ...) is raised as ``OSError`` naming ``path``, the destination."""
    while data:
        try:
            n = os.pwrite(fd, data, offset)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        data = data[n:]
        offset += n


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


class Abort:
    """Lets another thread stop a ``put``/``get`` (pass it as ``abort=``): after ``abort()``
    the transfer raises ``TransferCancelled`` within moments, even when it is waiting for a
    server that does not answer, with the usual guarantee (nothing partial under the final
    name; a remote temporary file of an upload may remain, its byte stream being cut)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._session: SFTPSession | None = None
        self.requested = False

    def abort(self) -> None:
        """Stop the transfer (now, or as soon as it starts)."""
        with self._lock:
            self.requested = True
            session = self._session
        if session is not None:
            session.interrupt()

    def _attach(self, session: SFTPSession | None) -> None:
        with self._lock:
            self._session = session
            requested = self.requested
        if requested and session is not None:
            session.interrupt()


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


# -- planning and the public functions --------------------------------------------------------
@dataclass
class _Item:
    src: str
    dst: str
    is_dir: bool
    size: int = 0
    local_stat: os.stat_result | None = None
    remote_attrs: _Attrs | None = None


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


def _walk_remote(sftp: SFTPSession, src: str, dst: str, attrs: _Attrs) -> Iterator[_Item]:
    if attrs.is_dir():
        yield _Item(src, dst, True, remote_attrs=attrs)
        for name, a in sorted(sftp.listdir(src), key=lambda x: x[0]):
            yield from _walk_remote(sftp, posixpath.join(src, name), os.path.join(dst, name), a)
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


def put(
    local: str | os.PathLike[str],
    remote: str,
    *,
    destination: str,
    ssh_args: Sequence[str] = (),
    ssh: str | None = None,
    progress: ProgressCallback | None = None,
    preserve_times: bool = True,
    abort: Abort | None = None,
) -> None:
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
    (``TransferCancelled``).  See the module docstring for the atomicity guarantees.
    """
    src = os.fspath(local)
    os.stat(src)  # a missing source fails before any connection is made
    with SFTPSession(destination, ssh_args=ssh_args, ssh=ssh, abort=abort) as sftp:
        sftp.preserve_times = preserve_times
        target = _remote_path(remote)
        st = sftp.stat(target)
        if st is not None and st.is_dir():
            target = posixpath.join(target, os.path.basename(os.path.normpath(src)))
        items = list(_walk_local(src, target))
        tick = _ticker(sum(i.size for i in items), progress)
        dirs: list[_Item] = []
        for item in items:
            assert item.local_stat is not None
            if item.is_dir:
                sftp.mkdir(item.dst)
                dirs.append(item)
            else:
                sftp.upload(item.src, item.dst, item.local_stat, tick)
        # directory modes last, so a read-only directory can still be filled first
        for item in reversed(dirs):
            assert item.local_stat is not None
            attrs = _Attrs(perm=stat.S_IMODE(item.local_stat.st_mode))
            if preserve_times:
                attrs.atime = int(item.local_stat.st_atime)
                attrs.mtime = int(item.local_stat.st_mtime)
            sftp.setstat(item.dst, attrs)


def get(
    remote: str,
    local: str | os.PathLike[str],
    *,
    destination: str,
    ssh_args: Sequence[str] = (),
    ssh: str | None = None,
    progress: ProgressCallback | None = None,
    preserve_times: bool = True,
    abort: Abort | None = None,
) -> None:
    """Copy remote file or directory ``remote`` on ``destination`` to ``local``.

    The mirror of ``put``: recursive for directories, into ``local`` if it is an existing
    directory, modes (and times) kept, same progress callback and exceptions.
    """
    dst = os.fspath(local)
    with SFTPSession(destination, ssh_args=ssh_args, ssh=ssh, abort=abort) as sftp:
        sftp.preserve_times = preserve_times
        src = _remote_path(remote)
        attrs = sftp.stat(src)
        if attrs is None:
            where = f"{destination}:{src}"
            raise RemoteFileNotFoundError(errno.ENOENT, "no such remote file", where)
        if os.path.isdir(dst):
            dst = os.path.join(dst, posixpath.basename(posixpath.normpath(src)))
        items = list(_walk_remote(sftp, src, dst, attrs))
        tick = _ticker(sum(i.size for i in items), progress)
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
                sftp.download(item.src, item.dst, item.remote_attrs, tick)
        for item in reversed(dirs):
            a = item.remote_attrs
            assert a is not None
            if a.perm is not None:
                os.chmod(item.dst, stat.S_IMODE(a.perm))
            if preserve_times and a.atime is not None and a.mtime is not None:
                os.utime(item.dst, (a.atime, a.mtime))
