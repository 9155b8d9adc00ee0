"""A file of lines, appended in large aligned blocks past the page cache where it can be.

A recording of a bulk transfer writes about as many bytes as the relay moves.  Through the
page cache each written byte costs a copy into a fresh cache page (and on a virtual machine
whose free memory goes back to the host, a host fault for that page): more than all the
other work of recording.  :class:`AppendLog` keeps what is appended in one page-aligned
buffer (an anonymous ``mmap``) and writes large flushes with ``O_DIRECT``: the disk reads
the buffer, which is reused, and no cache page is taken.

Every write ends at the end of a line (``\\n``), so the file is at all times a sequence of
whole lines (what a crash of the writer leaves included):

- A flush writes the complete lines appended so far; an incomplete last line stays in the
  buffer.  :meth:`AppendLog.add` flushes by itself when the buffer is full (and grows it for
  a line longer than the buffer).
- ``O_DIRECT`` needs the buffer's address, the file offset and the length to be multiples of
  the block size (4096 here).  A flush of at least ``direct_min`` bytes is written that way:
  it starts at the block where the file ends (that block's bytes are still in the buffer and
  are written again as they are) and its last line gets spaces before its ``\\n`` up to the
  block's end (whitespace after a JSON value: the line means the same).  Smaller flushes
  (a quiet session's once a second) and the final one go through the page cache, with no
  padding.  So the file only grows, by whole lines, and what is in it never changes.
- A filesystem that refuses ``O_DIRECT`` (``fcntl`` or a write says ``EINVAL``: tmpfs before
  Linux 6.6, some FUSE filesystems) gets plain writes.
- Writes are ``pwrite`` at the log's own offset: the descriptor's position does not matter.
- Errors (``OSError``) go to the caller; the log is then unusable.  :meth:`AppendLog.close`
  only frees the buffer.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

__all__ = ["AppendLog"]

_BLOCK = 4096  # O_DIRECT's alignment: a multiple of every device's logical block size here
_DIRECT = getattr(os, "O_DIRECT", 0)


def _round_up(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


class AppendLog:
    """Lines appended to ``fd`` from offset 0, held in a ``capacity``-byte aligned buffer
    (see the module docstring).  ``direct`` says whether ``O_DIRECT`` is in use."""

    def __init__(self, fd: int, capacity: int = 1 << 20, direct_min: int = 64 << 10) -> None:
        if capacity <= 0 or capacity % _BLOCK:
            raise ValueError(f"capacity must be a positive multiple of {_BLOCK}")
        self._fd = fd
        self._direct_min = direct_min
        self._mem = mmap.mmap(-1, capacity)
        self._done = 0  # bytes of the buffer already in the file (the start of its last block)
        self._base = 0  # file offset of the buffer's first byte (a multiple of _BLOCK if direct)
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL) & ~_DIRECT
        self.direct = False
        if _DIRECT:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, self._flags | _DIRECT)
                self.direct = True
            except OSError:
                pass

    # The bytes in the buffer: the mmap's own position, so that :meth:`add` is one
    # ``mmap.write`` (it runs for every pty read of a recorded relay).
    @property
    def _fill(self) -> int:
        return self._mem.tell()

    @_fill.setter
    def _fill(self, n: int) -> None:
        self._mem.seek(n)

    @property
    def pending(self) -> int:
        """Bytes appended and not yet written (an incomplete last line included)."""
        return self._fill - self._done

    @property
    def end(self) -> int:
        """How many bytes the file will hold once all that was appended is written (a
        direct write's padding included: it only grows)."""
        return self._base + self._mem.tell()

    def add(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (a full buffer is flushed on the way)."""
        try:
            self._mem.write(data)  # ValueError, and nothing written, if it does not fit
        except ValueError:
            if self._mem.closed:
                raise
            self.flush()
            if len(data) > len(self._mem) - self._fill:  # a line longer than the buffer
                self._grow(self._fill + len(data))
            self._mem.write(data)

    def flush(self, final: bool = False) -> None:
        """Write the complete lines not yet written (``final``: through the page cache, no
        padding, as the file's end should be)."""
        end = self._mem.rfind(b"\n", self._done, self._fill) + 1
        if end <= self._done:
            return
        if self.direct and not final and end - self._done >= self._direct_min:
            self._write_direct(end)
        else:
            self._write_plain(end)

    def close(self) -> None:
        """Free the buffer; what :meth:`flush` did not write is dropped (the descriptor is
        the caller's: not closed, not synced)."""
        self._mem.close()

    # -- inside -------------------------------------------------------------------------
    def _write_direct(self, end: int) -> None:
        size = _round_up(end)
        # The start of the incomplete line after ``end`` that the padding overwrites (less
        # than a block; the rest of it stays where it is, no copy of a long open line).
        tail = self._mem[end : min(size, self._fill)]
        if size > end:  # pad the last line to the block's end: spaces before its "\n"
            self._mem[end - 1 : size] = b" " * (size - end) + b"\n"
        try:
            n = os.pwrite(self._fd, memoryview(self._mem)[:size], self._base)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._set_direct(False)  # this file takes no direct writes after all
            self._write_plain(size)
        else:
            if n != size:  # a full disk, most likely: the file may end in a cut line
                raise OSError(errno.ENOSPC, f"short write ({n} of {size} bytes)")
            self._shift(size)
        # The buffer now starts with what followed the padded block: put the tail before it.
        if tail:
            if self._fill:
                self._mem.move(len(tail), 0, self._fill)
            self._mem[: len(tail)] = tail
            self._fill += len(tail)

    def _write_plain(self, end: int) -> None:
        direct = self.direct
        if direct:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags)
        try:
            view = memoryview(self._mem)
            try:
                while self._done < end:
                    self._done += os.pwrite(
                        self._fd, view[self._done : end], self._base + self._done
                    )
            finally:
                view.release()
        finally:
            if direct:
                fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags | _DIRECT)
        # Direct writes start at a block: keep the start of the file's last block.
        self._shift(end - end % _BLOCK if self.direct else end)

    def _set_direct(self, on: bool) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags | (_DIRECT if on else 0))
        self.direct = on

    def _shift(self, n: int) -> None:
        """The buffer's first ``n`` bytes are in the file: drop them, keep the rest."""
        rest = self._fill - n
        if rest > 0:
            self._mem.move(0, n, rest)
        self._base += n
        self._fill = max(rest, 0)
        self._done = max(0, self._done - n)

    def _grow(self, need: int) -> None:
        fill = self._fill
        mem = mmap.mmap(-1, _round_up(max(need, 2 * len(self._mem))))  # doubled: no n^2
        mem[:fill] = self._mem[:fill]
        self._mem.close()
        self._mem = mem
        self._fill = fill
