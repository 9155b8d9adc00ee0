"""Whole files over an SFTP session, pipelined: the bulk reads and writes of ``put``/``get``.

As OpenSSH's own sftp client does, requests are pipelined: up to ``IN_FLIGHT`` bytes requested
(or sent) and not yet acknowledged, in chunks as large as the server's ``limits@openssh.com``
allows (``SFTPSession.read_chunk``/``write_chunk``).  Read requests go out in batches, one
send for several, so the master and sftp-server wake up less often; write data is sent from
one reused buffer, unjoined from its request head.  A pipeline cut short by an error or an
interrupt abandons its requests (``SFTPSession.abandon``): their replies are skipped later.

Checks (nothing lost):

- writes: the first failure stops sending and the replies still due are collected; a write
  failed with ``SSH_FX_FAILURE`` says "No space left on device" when ``statvfs@openssh.com``
  shows the remote filesystem full;
- reads: every ``os.pwrite`` count is checked (a short write is retried for the rest, an error
  such as ENOSPC is raised as ``OSError`` naming the local destination); a short read is
  completed by asking for the rest; the pieces must cover the file contiguously up to the
  end of file the server agreed to, and the file on disk must be that long.

:func:`remove_within` removes one remote file through a fresh session over the same master,
within a bound: how an upload whose own session was cut (or too slow to clean up) still
removes its temporary file.
"""

from __future__ import annotations

import errno
import os
import posixpath
import threading
from collections.abc import Callable, Sequence

from ..errors import SSHWrapError
from ..protocol import sftp
from ..protocol.sftp import StatusError
from ..protocol.wire import pack_string
from .sftp_session import Abort, RemoteFileNotFoundError, SFTPSession, TransferError

__all__ = ["IN_FLIGHT", "read_into", "remove_within", "write_failed", "write_from"]

IN_FLIGHT = 4 << 20
"""Bytes requested (read) or sent (write) but not yet acknowledged."""


def write_from(
    session: SFTPSession, fd: int, remote: str, handle: bytes, tick: Callable[[int], None]
) -> int:
    """Write ``fd``'s content (to its end) through ``handle``; returns the bytes written.

    ``tick(n)`` is called as the server acknowledges ``n`` bytes.  A failed write raises
    (with the "No space left on device" hint when the remote filesystem is full).
    """
    chunk = session.write_chunk
    depth = max(4, IN_FLIGHT // chunk)
    hs = pack_string(handle)
    pending: dict[int, int] = {}
    offset = 0
    eof = False
    first_error: StatusError | None = None
    block = memoryview(bytearray(chunk))  # reused: writev has copied it on return
    try:
        while True:
            while not eof and len(pending) < depth:
                got = os.readv(fd, [block])
                if not got:
                    eof = True
                    break
                rid = session.new_id()
                pending[rid] = got  # before sending: a failed send abandons it too
                session.send(sftp.write_head(rid, hs, offset, got), block[:got])
                offset += got
            if not pending:
                break
            ptype, rid, r = session.reply_for(pending)
            n = pending.pop(rid)
            if ptype != sftp.FXP_STATUS:
                raise session.protocol_error(f"SFTP reply of type {ptype} to a write")
            failed = r.status()
            if failed is not None and first_error is None:
                first_error = failed
                eof = True  # stop sending; collect the replies still due
            if first_error is None:
                tick(n)
    except BaseException:
        session.abandon(pending)
        raise
    if first_error is not None:
        raise write_failed(session, first_error, remote)
    return offset


def write_failed(session: SFTPSession, failed: StatusError, path: str) -> TransferError:
    """The error for a write to ``path`` the server failed: "No space left on device" said
    when ``statvfs@openssh.com`` shows the remote filesystem full."""
    err = session.error(failed, path, "writing")
    if failed.code != sftp.FX_FAILURE or sftp.STATVFS not in session.extensions:
        return err
    p = os.fsencode(posixpath.dirname(path) or ".")
    try:
        ptype, r = session.call(lambda rid: sftp.statvfs_request(rid, p))
    except StatusError:
        return err
    if ptype == sftp.FXP_EXTENDED_REPLY:
        space, inodes = r.statvfs()
        if space < 2 * session.write_chunk or inodes == 0:
            hint = f" [No space left on device: {space} bytes, {inodes} inodes free remotely]"
            return TransferError(str(err) + hint)
    return err


def read_into(
    session: SFTPSession,
    fd: int,
    remote: str,
    handle: bytes,
    tick: Callable[[int], None],
    local: str,
) -> int:
    """Read ``handle`` to its end into ``fd`` (the file ``local``); returns the size.

    Every byte up to the end of file is checked to have arrived and been written, and the
    file on disk to be that long.  ``tick(n)`` is called as ``n`` bytes are written.
    """
    chunk = session.read_chunk
    depth = max(4, IN_FLIGHT // chunk)
    hs = pack_string(handle)
    pending: dict[int, tuple[int, int]] = {}
    retry: list[tuple[int, int]] = []  # ranges a short read left over
    got: list[tuple[int, int]] = []  # (offset, length) of every piece written
    next_offset = 0
    eof_at: int | None = None
    first_error: StatusError | None = None
    try:
        while True:
            # Refill in batches, one write for several requests: fewer wake-ups for the
            # master and sftp-server than a request per reply.
            if first_error is None and len(pending) <= depth // 2:
                batch: list[bytes] = []
                # (pending holds the batch's requests too: they count twice here, which
                # keeps between half and three quarters of ``depth`` in flight)
                while len(pending) + len(batch) < depth:
                    if retry:
                        off, length = retry.pop()
                    elif eof_at is None:
                        off, length = next_offset, chunk
                        next_offset += chunk
                    else:
                        break
                    rid = session.new_id()
                    batch.append(sftp.read_request(rid, hs, off, length))
                    pending[rid] = (off, length)
                if batch:
                    session.send(b"".join(batch))
            if not pending:
                break
            ptype, rid, r = session.reply_for(pending)
            off, length = pending.pop(rid)
            if ptype == sftp.FXP_DATA:
                data = r.view()  # zero-copy: written out before the next reply
                n = len(data)
                if n > length:
                    raise session.protocol_error(f"{n} bytes for a read of {length}", remote)
                if n:
                    _pwrite_all(fd, data, off, local)
                    got.append((off, n))
                    tick(n)
                if 0 < n < length and (eof_at is None or off + n < eof_at):
                    retry.append((off + n, length - n))
                elif n == 0 and (eof_at is None or off < eof_at):
                    eof_at = off
            elif ptype == sftp.FXP_STATUS:
                code = r.u32()
                if code == sftp.FX_EOF:
                    if eof_at is None or off < eof_at:
                        eof_at = off
                    retry = [(o, n) for o, n in retry if o < eof_at]
                elif first_error is None:  # (even OK: a read is answered by data)
                    first_error = StatusError(code, r.text())
            else:
                raise session.protocol_error(f"SFTP reply of type {ptype} to a read")
    except BaseException:
        session.abandon(pending)
        raise
    if first_error is not None:
        raise session.error(first_error, remote, "reading")
    assert eof_at is not None  # no request left and no error: the end was found
    # Verify: the pieces cover [0, eof_at) without a gap, and the file is that long.
    covered = 0
    for o, n in sorted(got):
        if o > covered:
            break
        covered = max(covered, o + n)
    if covered < eof_at:
        raise TransferError(
            f"{session.destination}:{remote}: received {covered} contiguous bytes of {eof_at}"
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


def remove_within(
    destination: str, ssh: str, ssh_args: Sequence[str], path: str, timeout: float
) -> bool:
    """Remove remote file ``path`` through a new SFTP session (``ssh <ssh_args> -s
    <destination> sftp``: over the master when the args name it), giving up after
    ``timeout`` seconds (the session is then cut; its ssh is killed and reaped within
    another 0.3 s).  True when the file is gone (removed, or not there).

    Used after an upload's own session was cut or its cleanup ran out of time: a fresh session
    does not wait behind the replies still due on the old one."""
    abort = Abort()
    timer = threading.Timer(timeout, abort.abort)
    timer.daemon = True
    timer.start()
    try:
        with SFTPSession(destination, ssh=ssh, ssh_args=ssh_args, abort=abort) as session:
            try:
                session.remove(path)
            except RemoteFileNotFoundError:
                pass
            finally:
                session.broken = True  # nothing more to say: do not wait for ssh to linger
        return True
    except (SSHWrapError, OSError):
        return False
    finally:
        timer.cancel()
        timer.join()
