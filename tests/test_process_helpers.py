"""Helpers for tests: find and await processes of the LocalSSHD login user on this machine."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

from waiting import wait_until

from sshwrap.errors import TimeoutExpired
from sshwrap.testing import wait_exited


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


def wait_user_processes(user: str, marker: str, timeout: float = 10.0) -> list[int]:
    """``user_processes``, waiting (bounded) until there is one: the remote shell may be
    between its fork and the ``exec`` of the marked command, when no command line matches."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: user_processes(user, marker), timeout, "the remote process")
    return user_processes(user, marker)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (on pidfds, no polling) until every pid has exited; return those still alive."""
    return wait_exited(pids, timeout)


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


@contextlib.contextmanager
def control_master(config: str, host: str) -> Iterator[dict[str, str | int]]:
    """ssh options that share one ControlMaster (as a user's ssh_config could), then stop it.

    Time-sensitive tests use it so that a key exchange on a loaded machine is not what they
    measure.
    """
    d = tempfile.mkdtemp(prefix="swm")  # short: ControlPath must fit sun_path
    os.chmod(d, 0o700)
    options: dict[str, str | int] = {
        "ControlMaster": "auto",
        "ControlPath": f"{d}/%C",
        "ControlPersist": 120,
    }
    try:
        # Start the master now, so the first measured call does not pay for it.
        subprocess.run(
            ["ssh", "-F", config, *(f"-o{k}={v}" for k, v in options.items()), host, "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
            timeout=60,
        )
        yield options
    finally:
        subprocess.run(
            ["ssh", "-F", config, "-o", f"ControlPath={d}/%C", "-O", "exit", host],
            capture_output=True,
            timeout=30,
        )
        shutil.rmtree(d, ignore_errors=True)


def marker_seconds() -> str:
    """A unique ``sleep`` argument, so a test finds exactly its own remote process."""
    return f"{100 + secrets.randbelow(10**6) / 10**7:.7f}"


def timeout_case(
    call: Callable[[str], object], user: str, attempts: int = 3
) -> tuple[float, list[int]]:
    """Run ``call(marker)`` (which must raise TimeoutExpired) while watching for the remote
    process tagged by ``marker``; return (seconds until the exception, pids seen).

    On a loaded machine a fresh connection can take longer than the timeout, and then no
    remote command ever started: such an attempt proves nothing, so it is repeated.
    """
    for _ in range(attempts):
        marker = marker_seconds()
        watcher = Watcher(user, marker)
        watcher.start()
        start = time.monotonic()
        try:
            try:
                call(marker)
            except TimeoutExpired:
                elapsed = time.monotonic() - start
            else:
                raise AssertionError("no TimeoutExpired")
            # The process appears within the timeout if the command started at all.
            seen = watcher.seen.wait(1)
        finally:
            watcher.stop()
        if seen:
            return elapsed, watcher.pids
        assert elapsed < 2
    raise AssertionError(f"the remote command never started in {attempts} attempts")
