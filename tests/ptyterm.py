"""A real outer terminal for tests: a program in a pty, read through the pyte emulator.

Everything waits on an event (text on the screen, bytes in the output, EOF) with a bound.
"""

from __future__ import annotations

import os
import re
import select
import sys
import time
from collections.abc import Sequence

import pyte
from ptyprocess import PtyProcess

from sshwrap.testing import wait_exited

DEFAULT_TIMEOUT = 30.0


class Term:
    """A program running in a real pty of ``rows`` x ``cols``, with a pyte screen."""

    def __init__(
        self,
        argv: Sequence[str],
        rows: int = 24,
        cols: int = 80,
        env: dict[str, str] | None = None,
        screen: bool = True,
    ) -> None:
        self.proc = PtyProcess.spawn(list(argv), dimensions=(rows, cols), env=env)
        self.fd: int = self.proc.fd
        os.set_blocking(self.fd, False)
        self.raw = bytearray()
        self.eof = False
        self.use_screen = screen
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)

    # -- reading ----------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self.raw += data
        if self.use_screen:
            self.stream.feed(data)

    def pump(self, timeout: float) -> bool:
        """Read what is available within ``timeout``; False once EOF was seen."""
        if self.eof:
            return False
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return False
        self._feed(data)
        return True

    def display(self) -> str:
        """The screen's text, one line per row, trailing spaces stripped."""
        return "\n".join(line.rstrip() for line in self.screen.display)

    def wait_raw(
        self, pattern: bytes | re.Pattern[bytes], timeout: float = DEFAULT_TIMEOUT, start: int = 0
    ) -> re.Match[bytes]:
        """Wait until ``pattern`` appears in the raw output (from offset ``start``)."""
        rx = re.compile(re.escape(pattern)) if isinstance(pattern, bytes) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.raw, start)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0 or (not self.pump(min(left, 0.5)) and not rx.search(self.raw, start)):
                if self.eof:
                    raise AssertionError(
                        f"EOF before {rx.pattern!r}; output: {bytes(self.raw[-2000:])!r}"
                    )
                if left <= 0:
                    raise AssertionError(
                        f"timeout waiting for {rx.pattern!r}; output: {bytes(self.raw[-2000:])!r}"
                    )

    def wait_screen(self, text: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait until ``text`` is on the screen; return the screen."""
        deadline = time.monotonic() + timeout
        while text not in self.display():
            left = deadline - time.monotonic()
            if left <= 0 or (not self.pump(min(left, 0.5)) and text not in self.display()):
                raise AssertionError(f"{text!r} not on screen:\n{self.display()}")
        return self.display()

    def read_to_eof(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Read until the pty reports EOF; return all output."""
        deadline = time.monotonic() + timeout
        while self.pump(0.5):
            if time.monotonic() > deadline:
                raise AssertionError(f"no EOF; output: {bytes(self.raw[-2000:])!r}")
        return bytes(self.raw)

    # -- writing ----------------------------------------------------------------------
    def send(self, data: bytes | str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Type ``data``; keeps reading output meanwhile so a large paste cannot deadlock."""
        view = memoryview(data.encode() if isinstance(data, str) else data)
        deadline = time.monotonic() + timeout
        while view:
            _, w, _ = select.select([], [self.fd], [], 0.5)
            if w:
                try:
                    n = os.write(self.fd, view[:4096])
                    view = view[n:]
                except BlockingIOError:
                    pass
            # drain output so the program never blocks writing to us
            while self.pump(0):
                r, _, _ = select.select([self.fd], [], [], 0)
                if not r:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("timeout while sending")

    def resize(self, rows: int, cols: int) -> None:
        """Resize the terminal (the program gets SIGWINCH) and the emulator."""
        self.screen.resize(rows, cols)
        self.proc.setwinsize(rows, cols)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int | None, int | None]:
        """Read to EOF, reap, return (exitstatus, signalstatus)."""
        self.read_to_eof(timeout)
        if wait_exited([self.proc.pid], timeout):
            raise AssertionError("program did not exit")
        self.proc.wait()
        return self.proc.exitstatus, self.proc.signalstatus

    def close(self) -> None:
        """Kill the program if it still runs and close the pty."""
        if self.proc.isalive():
            self.proc.kill(9)
            self.proc.wait()
        self.proc.close(force=True)


def sshwrap_argv(*args: str) -> list[str]:
    """argv that runs this checkout's ``sshwrap`` command."""
    return [sys.executable, "-m", "sshwrap", *args]
