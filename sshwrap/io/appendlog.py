"""An append-only file written in large aligned blocks, past the page cache where it can be.

A recording of a bulk transfer writes about as many bytes as the relay moves.  Through the
page cache each written byte costs a copy into a fresh cache page (and on a virtual machine
whose free memory goes back to the host, a host fault for that page): more than all the
other work of recording.  :class:`AppendLog` keeps what is appended in one page-aligned
buffer (an anonymous ``mmap``) and writes it with ``O_DIRECT``: the disk reads it from that
buffer, which is reused, and no cache page is taken.

- ``O_DIRECT`` needs the buffer's address, the file offset and the length to be multiples of
  the block size (4096 here): :meth:`AppendLog.flush` writes whole blocks that way, and the
  last, partial block (``whole=True``) through the page cache (``O_DIRECT`` cleared for that
  one ``pwrite``).  That block stays in the buffer; the next direct write covers it again,
  with more after it (the kernel writes back and drops the cached page first).  So the
  file's bytes are always exactly what was appended and written, in order: a reader (a
  player, ``tail -f``) never sees padding, and after a crash the file ends at the last
  write.
- A filesystem that refuses ``O_DIRECT`` (``fcntl`` or the first write says ``EINVAL``: tmpfs
  before Linux 6.6, some FUSE filesystems) gets plain writes of the same buffer.
- Writes are ``pwrite`` at the log's own offset, so the descriptor's position does not matter.
- Errors (``OSError``) go to the caller; the log is then unusable.  :meth:`AppendLog.close`
  only frees the buffer (write first with :meth:`AppendLog.flush`).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

__all__ = ["AppendLog"]

_BLOCK = 4096  # O_DIRECT's alignment: a multiple of every device's logical block size here
_DIRECT = getattr(os, "O_DIRECT", 0)


class AppendLog:
    """Bytes appended to ``fd`` (from offset 0), held in a ``capacity``-byte aligned buffer.

    :meth:`add` copies into the buffer and writes the full buffer's blocks itself;
    :meth:`flush` writes on request.  ``direct`` says whether ``O_DIRECT`` is in use.
    """

    def __init__(self, fd: int, capacity: int = 1 << 20) -> None:
        if capacity <= 0 or capacity % _BLOCK:
            raise ValueError(f"capacity must be a positive multiple of {_BLOCK}")
        self._fd = fd
        self._cap = capacity
        self._mem = mmap.mmap(-1, capacity)
        self._view = memoryview(self._mem)
        self._fill = 0  # bytes in the buffer
        self._done = 0  # of those, already in the file (the partial block written buffered)
        self._base = 0  # file offset of the buffer's first byte (a multiple of _BLOCK)
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL) & ~_DIRECT
        self.direct = False
        if _DIRECT:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, self._flags | _DIRECT)
                self.direct = True
            except OSError:
                pass

    @property
    def pending(self) -> int:
        """Bytes appended and not yet written."""
        return self._fill - self._done

    def add(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (a full buffer is written on the way, whole blocks)."""
        n = len(data)
        fill = self._fill
        if n <= self._cap - fill:
            self._mem[fill : fill + n] = data
            self._fill = fill + n
            return
        view = memoryview(data)
        while view:
            room = self._cap - self._fill
            if not room:
                self.flush(whole=False)
                continue
            part = view[:room]
            self._mem[self._fill : self._fill + len(part)] = part
            self._fill += len(part)
            view = view[room:]

    def flush(self, whole: bool = True) -> None:
        """Write what is pending: its whole blocks, and with ``whole`` the partial last one."""
        if not self.direct:
            self._plain()
            return
        aligned = self._fill - self._fill % _BLOCK
        if aligned and aligned > self._done:
            try:
                n = os.pwrite(self._fd, self._view[:aligned], self._base)
            except OSError as e:
                if e.errno != errno.EINVAL:  # this file takes no direct writes after all
                    raise
                n = 0
            if n != aligned:  # refused or short (a full disk): plain writes from here on
                self._done = max(self._done, n)
                self._stop_direct()
                self._plain()
                return
            self._shift(aligned)
        if whole and self._fill > self._done:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags)
            try:
                self._write_rest()
            finally:
                fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags | _DIRECT)

    def close(self) -> None:
        """Free the buffer; what :meth:`flush` did not write is dropped (the descriptor is
        the caller's: not closed, not synced)."""
        self._view.release()
        self._mem.close()

    # -- inside -------------------------------------------------------------------------
    def _stop_direct(self) -> None:
        if self.direct:
            self.direct = False
            fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags)

    def _write_rest(self) -> None:
        """Write bytes ``_done`` to ``_fill`` (through the page cache), short writes too."""
        while self._done < self._fill:
            self._done += os.pwrite(
                self._fd, self._view[self._done : self._fill], self._base + self._done
            )

    def _plain(self) -> None:
        self._write_rest()
        self._shift(self._fill)

    def _shift(self, n: int) -> None:
        """The buffer's first ``n`` bytes are in the file: drop them, keep the rest."""
        rest = self._fill - n
        if rest:
            self._mem.move(0, n, rest)
        self._base += n
        self._fill = rest
        self._done = max(0, self._done - n)
