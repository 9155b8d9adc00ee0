"""An SFTP v3 client session over ``ssh -s <destination> sftp``: the IO under ``put``/``get``.

``SFTPSession`` starts ``ssh <args> -s -- <destination> sftp`` (over the master when the args
carry its ``ControlPath``; with ``control_path`` the master runs the session itself, no ssh
process: :class:`~sshwrap.io.mux_control.MuxSession`) and speaks SFTP to ``sftp-server``
through a socketpair, as OpenSSH's sftp/scp do (larger buffers than a pipe's).  The packets
are built and parsed by the pure codec :mod:`sshwrap.protocol.sftp`; this module sends and
receives them, matches replies to requests and turns failures into the transfer exceptions.

- Replies are received into one fixed 4 MiB buffer and handed out as views of it (no copy per
  packet; a view is valid until the next receive); ``reply_into`` receives a read's data
  straight into the caller's buffer instead (the header alone goes through the buffer).  A
  receive first takes what has come without waiting (no ``select`` while data streams in).
- Each request has its own id; a request nobody waits for any more (a pipeline cut short by
  an error, see :mod:`.sftp_pipeline`) is abandoned: its reply is skipped when it comes.  A
  reply to any other id is a protocol error (``SFTPProtocolError``), never taken for success.
- Cleanup after a failure (closing a handle, removing a temporary file) is bounded: every
  wait inside ``cleaning_up`` has a deadline (shorter after ``KeyboardInterrupt`` or a
  callback's exception).  ``close`` gives ssh a moment to exit, then kills and reaps it.
- ssh ending under the session (the master or the remote sftp process killed: ssh exits 255
  without a word) raises ``SSHConnectionError``; ``interrupt`` (``Abort.abort`` from another
  thread) cuts the byte stream and the waiting call raises ``TransferCancelled``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import select
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence

from ..errors import SSHConnectionError, SSHError, SSHWrapError, classify_ssh_failure
from ..protocol import sftp
from ..protocol.sftp import Attrs, StatusError
from .mux_control import MuxSession
from .sftp_errors import (
    RemoteFileNotFoundError,
    RemotePermissionError,
    ReplyReader,
    SFTPProtocolError,
    SFTPTimeout,
    TransferCancelled,
    TransferError,
)

__all__ = [
    "Abort",
    "RemoteFileNotFoundError",
    "RemotePermissionError",
    "SFTPProtocolError",
    "SFTPSession",
    "SFTPTimeout",
    "TransferCancelled",
    "TransferError",
]

_RBUF_SIZE = 4 << 20  # the receive buffer; replies are at most ~256 KiB
_SOCK_BUF = 2 << 20  # ssh's send buffer towards us
_CLEANUP_TIMEOUT = 2.0  # the bound of cleanup after an error
_INTERRUPT_CLEANUP_TIMEOUT = 0.4  # ... after KeyboardInterrupt or a callback's exception
_CLOSE_WAIT = 2.0  # then ssh's time to exit on its own before it is killed
_ABORT_CLOSE_WAIT = 0.3  # ... after a failure or an interrupt
_U32 = struct.Struct(">I")
_DATA_HEAD = struct.Struct(">IBII")  # a data reply up to its data: length, type, id, size
# What scp/sftp pass: no forwarding, no tty, no remote command, just the subsystem.
_SUBSYSTEM_OPTIONS = tuple(
    "-x -a -T -o ClearAllForwardings=yes -o RemoteCommand=none -o RequestTTY=no "  # noqa: SIM905
    "-o PermitLocalCommand=no".split()
)


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

    def attach(self, session: SFTPSession | None) -> None:
        """Make ``abort()`` interrupt ``session`` (None: no session), at once if requested."""
        with self._lock:
            self._session = session
            requested = self.requested
        if requested and session is not None:
            session.interrupt()


class SFTPSession:
    """An SFTP v3 client over ``ssh -s <destination> sftp``; a context manager.

    Low level; ``put``/``get`` are the public interface.  ``ssh`` is the ssh program,
    ``ssh_args`` its options before the destination.  ``abort`` (an :class:`Abort`) can
    interrupt it from another thread from the start (the handshake included).  ``timeout`` bounds
    the handshake's waits, ``call_timeout`` each later one: ``SFTPTimeout`` naming ``call_path``.
    """

    def __init__(
        self,
        destination: str,
        *,
        ssh: str,
        ssh_args: Sequence[str] = (),
        abort: Abort | None = None,
        timeout: float | None = None,
        control_path: str | None = None,
    ) -> None:
        self.destination = destination
        self.call_timeout = timeout
        self.call_path = ""
        argv = [ssh, *ssh_args, *_SUBSYSTEM_OPTIONS, "-s", "--", destination, "sftp"]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # (replies come in larger pieces, fewer wake-ups: ssh's send buffer, within wmem_max)
        child.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
        fd, err = child.fileno(), self._stderr
        try:
            self._proc: subprocess.Popen[bytes] | MuxSession = (
                MuxSession(control_path, "sftp", fd, err, host=destination)
                if control_path
                else subprocess.Popen(argv, stdin=fd, stdout=fd, stderr=err, start_new_session=True)
            )
        except BaseException:
            self._sock.close()
            self._stderr.close()
            raise
        finally:
            child.close()
        self._rbuf = bytearray(_RBUF_SIZE)
        self._rview = memoryview(self._rbuf)
        self._start = 0  # unread bytes are _rbuf[_start:_end]
        self._end = 0
        self._next_id = 0
        self._abandoned: set[int] = set()  # ids whose replies are skipped when they come
        self._deadline: float | None = None  # set while cleaning up: every wait is bounded
        self.broken = False  # the byte stream can no longer be trusted (or ssh is gone)
        self._closed = False
        self._sock_lock = threading.Lock()  # close() against interrupt() from another thread
        self._interrupted = False
        self.extensions: dict[str, bytes] = {}
        self.read_chunk = sftp.DEFAULT_CHUNK
        self.write_chunk = sftp.DEFAULT_CHUNK
        self._established = False
        self._abort = abort
        try:
            if abort is not None:
                abort.attach(self)
            self._init()
        except BaseException:
            self.broken = True
            self.close()
            raise
        self._established = True
        self.call_timeout = None

    # -- plumbing ----------------------------------------------------------------------
    def __enter__(self) -> SFTPSession:
        return self

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if exc is not None and not isinstance(exc, Exception):
            self.broken = True  # KeyboardInterrupt & co: do not linger
        self.close()

    def close(self) -> None:
        """End the session (closing stdin ends sftp-server) and reap ssh.

        ssh gets 2 s to exit on its own (0.3 s after a failure or an interrupt), then is
        killed: every reply the caller needed has been received, nothing is lost by that.
        """
        if self._closed:
            return
        self._closed = True
        if self._abort is not None:
            self._abort.attach(None)
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

    def exited(self) -> bool:
        """True when the session's ssh has exited (the master or the remote sftp died)."""
        return self._proc.poll() is not None

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
        """While cleaning up or with a ``call_timeout``, wait (bounded) for the socket."""
        t = self.call_timeout
        ends = [d for d in (self._deadline, None if t is None else time.monotonic() + t) if d]
        if not ends:
            return
        left = min(ends) - time.monotonic()
        r, w = ([], [self._sock]) if write else ([self._sock], [])
        if left <= 0 or not any(select.select(r, w, [], left)[:2]):
            self.broken = True
            where = f"{self.destination}:{self.call_path}".rstrip(":")
            raise SFTPTimeout(f"{where}: the SFTP server did not answer in time")

    def send(self, *parts: bytes | memoryview) -> None:
        """Send ``parts`` (one or more requests, or a request's head and its data) in order."""
        bufs = [memoryview(p) for p in parts]
        while bufs:
            self._wait_io(write=True)
            bounded = self._deadline is not None or self.call_timeout is not None
            try:  # (bounded: a full socket does not block)
                n = self._sock.sendmsg(bufs, (), socket.MSG_DONTWAIT if bounded else 0)
            except BlockingIOError:
                n = 0
            except OSError:  # EPIPE / ECONNRESET: ssh went away
                raise self._ssh_failure("the connection closed") from None
            while n:
                if n >= len(bufs[0]):
                    n -= len(bufs[0])
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][n:]
                    n = 0

    def _recv_some(self, view: memoryview) -> int:
        """Receive into ``view`` what has come (waiting for something, bounded): the count."""
        try:  # (first without waiting: no select() while the data streams in)
            n = self._sock.recv_into(view, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            self._wait_io(write=False)
            try:
                n = self._sock.recv_into(view)
            except OSError:
                n = 0
        except OSError:
            n = 0
        if not n:
            raise self._ssh_failure("the connection closed")
        return n

    def _fill(self, want: int, most: int = _RBUF_SIZE) -> None:
        """Make ``want`` unread bytes available in the receive buffer, receiving no more than
        ``most`` bytes at a time (a data reply's header without its data, see ``reply_into``)."""
        if self._end - self._start >= want:
            return
        if want > _RBUF_SIZE:
            raise self.protocol_error(f"SFTP reply too large ({want} bytes)")
        if self._start + want > _RBUF_SIZE:  # no room after the unread part: move it first
            left = bytes(self._rview[self._start : self._end])
            self._rbuf[: len(left)] = left
            self._start, self._end = 0, len(left)
        while self._end - self._start < want:
            self._end += self._recv_some(self._rview[self._end : self._end + most])

    def _recv(self) -> tuple[int, memoryview]:
        """Next reply: (type, payload after the type byte), a view valid until the next one."""
        self._fill(4)
        (n,) = _U32.unpack_from(self._rbuf, self._start)
        if n < 5:
            raise self.protocol_error("malformed SFTP reply")
        self._fill(4 + n)
        p = self._start + 4
        self._start = p + n
        if self._start == self._end:
            self._start = self._end = 0  # empty: start over at the front
        return self._rbuf[p], self._rview[p + 1 : p + n]

    def reply_for(self, pending: Container[int]) -> tuple[int, int, sftp.Reader]:
        """The next reply to one of ``pending``'s request ids: (type, id, reader after the id).

        Replies to abandoned requests are skipped; a reply to anything else breaks the
        protocol (``SFTPProtocolError``: never mistaken for success).
        """
        while True:
            ptype, payload = self._recv()
            r = ReplyReader(payload, self.destination)
            rid = r.u32()
            if rid in pending:
                return ptype, rid, r
            if rid in self._abandoned:
                self._abandoned.discard(rid)
                continue
            raise self.protocol_error(
                f"SFTP reply (type {ptype}) to request {rid}, "
                "which was never sent or already answered"
            )

    def reply_into(
        self, pending: Container[int], place: Callable[[int], memoryview]
    ) -> tuple[int, int, sftp.Reader | None, int]:
        """``reply_for``, but the data of an ``SSH_FXP_DATA`` reply is received straight into
        ``place(id)`` (as long as that read asked for): (type, id, None, bytes received); any
        other reply comes as from ``reply_for``, with a count of -1."""
        self._fill(4, _DATA_HEAD.size)
        (n,) = _U32.unpack_from(self._rbuf, self._start)
        self._fill(min(4 + n, _DATA_HEAD.size), _DATA_HEAD.size)
        if n < _DATA_HEAD.size - 4:
            return (*self.reply_for(pending), -1)
        _, ptype, rid, k = _DATA_HEAD.unpack_from(self._rbuf, self._start)
        if ptype != sftp.FXP_DATA or rid not in pending:
            return (*self.reply_for(pending), -1)
        dest = place(rid)
        if n != k + 9 or k > len(dest):
            raise self.protocol_error(f"SFTP data reply of {k} bytes for a read of {len(dest)}")
        p = self._start + _DATA_HEAD.size
        got = min(k, self._end - p)  # (what came with the header is copied)
        dest[:got] = self._rview[p : p + got]
        self._start = p + got
        if self._start == self._end:
            self._start = self._end = 0
        while got < k:
            got += self._recv_some(dest[got:k])
        return ptype, rid, None, k

    def new_id(self) -> int:
        """A request id for the next request."""
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return self._next_id

    def _call(self, build: Callable[[int], bytes]) -> tuple[int, sftp.Reader]:
        """Send the request ``build(id)`` and wait for its reply: (type, reader after the id);
        a status other than OK raises ``StatusError``."""
        rid = self.new_id()
        try:
            self.send(build(rid))
            ptype, _, r = self.reply_for((rid,))
        except BaseException:
            self.abandon((rid,))
            raise
        if ptype == sftp.FXP_STATUS:
            failed = r.status()
            if failed is not None:
                raise failed
        return ptype, r

    def _init(self) -> None:
        self.send(sftp.init_request())
        ptype, payload = self._recv()
        if ptype != sftp.FXP_VERSION:
            raise TransferError(f"{self.destination}: not an SFTP server")
        self.extensions = exts = ReplyReader(payload, self.destination).version().extensions
        if sftp.LIMITS in exts:
            with contextlib.suppress(StatusError):
                ptype, r = self._call(sftp.limits_request)
                if ptype == sftp.FXP_EXTENDED_REPLY:
                    limits = r.limits()
                    self.read_chunk = sftp.chunk_size(limits.max_read)
                    self.write_chunk = sftp.chunk_size(limits.max_write)

    @contextlib.contextmanager
    def cleaning_up(self, exc: BaseException) -> Iterator[bool]:
        """Best-effort cleanup after ``exc`` (what the caller will re-raise).

        Yields whether to try at all (not when the stream is broken); every wait inside is
        bounded, and any failure of the cleanup itself is swallowed so ``exc`` propagates.
        """
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

    def abandon(self, ids: Iterable[int]) -> None:
        """Nobody waits for the replies to ``ids`` any more: skip them when they come."""
        self._abandoned.update(ids)

    def protocol_error(self, message: str, path: str = "") -> SFTPProtocolError:
        """``SFTPProtocolError`` naming the destination (and ``path``, when given); the
        session is broken from now on."""
        self.broken = True
        where = f"{self.destination}:{path}" if path else self.destination
        return SFTPProtocolError(f"{where}: {message}")

    def settled(self) -> bool:
        """True when the byte stream is sound and no abandoned request's reply is still due
        (a cleanup request would not have to wait behind a pipeline)."""
        return not self.broken and not self._abandoned

    # -- operations --------------------------------------------------------------------
    def error(self, e: StatusError, path: str, what: str) -> TransferError:
        """A typed exception for a failed SFTP request on ``path``."""
        where = f"{self.destination}:{path}"
        if e.code == sftp.FX_NO_SUCH_FILE:
            return RemoteFileNotFoundError(errno.ENOENT, f"{what}: no such remote file", where)
        if e.code == sftp.FX_PERMISSION_DENIED:
            return RemotePermissionError(errno.EACCES, f"{what}: remote permission denied", where)
        return TransferError(f"{where}: {what} failed: {e.message} ({sftp.status_name(e.code)})")

    def call(self, build: Callable[[int], bytes]) -> tuple[int, sftp.Reader]:
        """Send the request ``build(id)`` and wait for its reply: (type, reader after the id);
        a status other than OK raises ``StatusError`` (``error`` types it)."""
        return self._call(build)

    def _do(self, build: Callable[[int], bytes], path: str, what: str) -> sftp.Reader:
        """``_call``, a failed status raised as ``self.error(..., path, what)``."""
        try:
            return self._call(build)[1]
        except StatusError as e:
            raise self.error(e, path, what) from None

    def stat(self, path: str, *, follow: bool = True) -> Attrs | None:
        """Attributes of ``path`` (following links; ``follow=False``: of a link itself,
        ``lstat``), None if it does not exist."""
        p = os.fsencode(path)
        kind, what = (sftp.FXP_STAT, "stat") if follow else (sftp.FXP_LSTAT, "lstat")
        try:
            _, r = self._call(lambda rid: sftp.path_request(kind, rid, p))
        except StatusError as e:
            if e.code == sftp.FX_NO_SUCH_FILE:
                return None
            raise self.error(e, path, what) from None
        return r.attrs()

    def mkdir(self, path: str) -> None:
        """Create directory ``path`` (an existing directory is fine)."""
        p = os.fsencode(path)
        try:
            self._call(lambda rid: sftp.path_request(sftp.FXP_MKDIR, rid, p, Attrs(perm=0o700)))
        except StatusError as e:
            st = self.stat(path)
            if st is None or not st.is_dir():
                raise self.error(e, path, "mkdir") from None

    def setstat(self, path: str, attrs: Attrs) -> None:
        """Set permissions/times of ``path``."""
        p = os.fsencode(path)
        self._do(
            lambda rid: sftp.path_request(sftp.FXP_SETSTAT, rid, p, attrs),
            path,
            "setting attributes of",
        )

    def fsetstat(self, handle: bytes, attrs: Attrs, path: str) -> None:
        """Set permissions/times of the open ``handle`` (of ``path``)."""
        self._do(
            lambda rid: sftp.handle_request(sftp.FXP_FSETSTAT, rid, handle, attrs),
            path,
            "setting attributes of",
        )

    def remove(self, path: str) -> None:
        """Remove remote file ``path``."""
        p = os.fsencode(path)
        self._do(lambda rid: sftp.path_request(sftp.FXP_REMOVE, rid, p), path, "removing")

    def rename(self, old: str, new: str) -> None:
        """Rename ``old`` to ``new``, replacing an existing ``new``.

        Atomic with the ``posix-rename@openssh.com`` extension.  Without it the plain SFTP
        rename refuses an existing target, so that is removed first (not atomic).
        """
        o, n = os.fsencode(old), os.fsencode(new)
        try:
            if sftp.POSIX_RENAME in self.extensions:
                self._call(lambda rid: sftp.posix_rename_request(rid, o, n))
                return
            if self.stat(new) is not None:
                self.remove(new)
            self._call(lambda rid: sftp.rename_request(rid, o, n))
        except StatusError as e:
            raise self.error(e, new, f"renaming {old} to") from None

    def fstat(self, handle: bytes, path: str) -> Attrs:
        """Attributes of an open handle (of ``path``)."""
        return self._do(
            lambda rid: sftp.handle_request(sftp.FXP_FSTAT, rid, handle), path, "fstat"
        ).attrs()

    def listdir(self, path: str) -> list[tuple[str, Attrs]]:
        """Entries of a remote directory (without ``.``/``..``), attributes follow links."""
        p = os.fsencode(path)
        handle = self._do(
            lambda rid: sftp.path_request(sftp.FXP_OPENDIR, rid, p), path, "listing"
        ).string()
        return self.read_dir(handle, path, follow=True)

    def read_dir(self, handle: bytes, path: str, *, follow: bool) -> list[tuple[str, Attrs]]:
        """The entries of the open directory ``handle`` of ``path`` (without ``.``/``..``),
        then the handle closed (also on an error, bounded).  ``follow``: a link's attributes
        are its target's (a dangling link is left out); else the link's own."""
        out: list[tuple[str, Attrs]] = []
        try:
            while True:
                try:
                    _, r = self._call(
                        lambda rid: sftp.handle_request(sftp.FXP_READDIR, rid, handle)
                    )
                except StatusError as e:
                    if e.code == sftp.FX_EOF:
                        break
                    raise self.error(e, path, "listing") from None
                for raw, attrs in r.names():  # (parsed first: a stat reuses the reply buffer)
                    name = os.fsdecode(raw)
                    if name in (".", ".."):
                        continue
                    if follow and attrs.is_link():
                        followed = self.stat(posixpath.join(path, name))
                        if followed is None:
                            continue  # a dangling link: nothing to copy
                        attrs = followed
                    out.append((name, attrs))
        except BaseException as exc:
            with self.cleaning_up(exc) as go:
                if go:
                    self.close_handle(handle)
            raise
        self.close_handle(handle)
        return out

    def close_handle(self, handle: bytes) -> None:
        """Close ``handle``, ignoring a failure status (cleanup: nothing was written)."""
        with contextlib.suppress(StatusError):
            self._call(lambda rid: sftp.handle_request(sftp.FXP_CLOSE, rid, handle))

    def close_written(self, handle: bytes, path: str) -> None:
        """Close the written ``handle`` of ``path``: a failure (the server reports a write
        error the writes did not) raises."""
        self._do(lambda rid: sftp.handle_request(sftp.FXP_CLOSE, rid, handle), path, "closing")

    def open_handle(
        self, path: str, pflags: int, attrs: Attrs, what: str, where: str = ""
    ) -> bytes:
        """Open ``path`` with ``pflags`` (``sftp.FXF_*``): its handle.  A failure names
        ``where`` (default: ``path``) and says ``what`` was being done."""
        p = os.fsencode(path)
        reply = self._do(lambda rid: sftp.open_request(rid, p, pflags, attrs), where or path, what)
        return reply.string()
