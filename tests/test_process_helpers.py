"""Helpers for tests: find and await processes of the LocalSSHD login user on this machine."""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import threading
import time


def user_processes(user: str, marker: str) -> list[int]:
    """Live (non-zombie) pids owned by ``user`` whose command line contains ``marker``."""
    uid = pwd.getpwnam(user).pw_uid
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] == b"Z":
            continue
        if marker in cmdline:
            out.append(int(entry))
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (on pidfds, no polling) until every pid has exited; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                alive.append(pid)
        finally:
            os.close(fd)
    return alive


class Watcher(threading.Thread):
    """Watch for a marker process to appear (bounded), remembering its pids."""

    def __init__(self, user: str, marker: str, timeout: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.user = user
        self.marker = marker
        self.timeout = timeout
        self.pids: list[int] = []
        self.seen = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not self._stop_event.is_set():
            pids = user_processes(self.user, self.marker)
            if pids:
                self.pids = pids
                self.seen.set()
                return
            # /proc has no event for "a process appeared"; this bounds the scan rate only.
            self._stop_event.wait(0.02)

    def stop(self) -> None:
        """Stop watching."""
        self._stop_event.set()
        with contextlib.suppress(RuntimeError):
            self.join(5)
