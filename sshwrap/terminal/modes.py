"""The user's terminal: raw mode that is always restored, window sizes, tty checks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
import time
import tty
from collections.abc import Callable, Iterator

__all__ = [
    "check_size",
    "get_size",
    "isatty",
    "maps_newlines",
    "raw_mode",
    "set_size",
    "wait_for_raw",
]

# termios attributes as tcgetattr returns them.
Attrs = list[int | list[bytes | int]]


def isatty(fd: int) -> bool:
    """True if ``fd`` is a terminal (False for a closed fd)."""
    try:
        return os.isatty(fd)
    except OSError:
        return False


def get_size(fd: int) -> tuple[int, int] | None:
    """``(rows, cols)`` of the terminal on ``fd``, or None if it is not a terminal.

    Note the order: termios and ptyprocess use (rows, cols) while
    ``os.get_terminal_size`` gives (columns, lines).
    """
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None
    rows, cols = struct.unpack("HHHH", packed)[:2]
    return rows, cols


def check_size(size: object) -> None:
    """``ValueError`` unless ``size`` is a terminal's ``(rows, cols)``: two ints, 1 to 65535."""
    if not (
        isinstance(size, tuple | list)
        and len(size) == 2
        and all(type(n) is int and 0 < n < 65536 for n in size)
    ):
        raise ValueError(f"size must be (rows, cols), two ints from 1 to 65535: {size!r}")


def maps_newlines(fd: int) -> bool:
    """Whether what is written to the terminal on ``fd`` (a pty master: its slave) now has
    each ``\\n`` turned into ``\\r\\n`` (``OPOST`` and ``ONLCR``: cooked, not raw)."""
    attrs = get_attrs(fd)
    both = termios.OPOST | termios.ONLCR
    return attrs is not None and isinstance(attrs[1], int) and (attrs[1] & both) == both


def set_size(fd: int, rows: int, cols: int) -> None:
    """Set the window size of the terminal (or pty master) on ``fd``; the kernel sends SIGWINCH."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_attrs(fd: int) -> Attrs | None:
    """``termios.tcgetattr(fd)``, or None if ``fd`` is not a terminal."""
    try:
        return termios.tcgetattr(fd)
    except (termios.error, OSError):
        return None


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[Attrs | None]:
    """Put the terminal on ``fd`` in raw mode for the block; restore it on every exit path.

    Changes are made with TCSADRAIN, never TCSAFLUSH, so keys typed ahead are not discarded.
    Yields the saved attributes (None if ``fd`` is not a terminal: then nothing is changed).
    """
    saved = get_attrs(fd)
    if saved is None:
        yield None
        return
    tty.setraw(fd, termios.TCSADRAIN)
    try:
        yield saved
    finally:
        # The terminal may be gone (hang-up): then there is nothing to restore.
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def wait_for_raw(fd: int, timeout: float, pump: Callable[[float], bool]) -> bool:
    """Wait up to ``timeout`` seconds until the terminal on ``fd`` (a pty master: its slave's
    modes) has left canonical mode, as a program putting it in raw mode does; True if it has
    (or ``fd`` is no terminal any more).

    A change of modes raises no event to wait on: ``pump(seconds)`` is called between checks
    and waits at most that long (for output to read, say); it returns False to stop waiting.
    """
    deadline = time.monotonic() + timeout
    while True:
        attrs = get_attrs(fd)
        if attrs is None or not attrs[3] & termios.ICANON:  # type: ignore[operator]
            return True
        left = deadline - time.monotonic()
        if left <= 0 or not pump(min(left, 0.005)):
            return False
