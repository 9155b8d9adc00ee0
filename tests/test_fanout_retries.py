"""Fan-out retries (issue 12): ``retries=N`` starts a host's ssh again only when it failed
before its session with a connection-level failure; ``HostResult.attempts`` counts them.

Real sshd, real ssh.  A host is reached through a loopback forwarder of the test's
(:class:`Forwarder`): it counts the TCP connections (one per ssh started) and resets the
first ``reset_first`` of them (ssh: ``Connection reset by peer``) before passing the rest
to sshd, so "down on the first try, up on the second" needs no timing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_fanout_hosts import run_many

import sshwrap
import sshwrap.aio
from sshwrap.errors import AuthenticationError, SSHConnectionError
from sshwrap.testing import LocalSSHD

EXE = str(Path(sys.executable).with_name("sshwrap-many"))
FACES = ("sync", "async")


class Forwarder:
    """A loopback TCP port that resets its first ``reset_first`` connections and forwards
    the others to ``target``; :attr:`count` is how many it accepted."""

    def __init__(self, target: tuple[str, int], reset_first: int, hold_first: int = 0) -> None:
        self.target = target
        self.reset_first = reset_first
        self.hold_first = hold_first
        self.count = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self.closed = False
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.count += 1
            if self.count <= self.reset_first:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # an RST: ssh reads "Connection reset by peer"
                continue
            if self.count <= self.reset_first + self.hold_first:
                self.conns.append(conn)  # held open, silent: ssh waits for a banner
                continue
            up = socket.create_connection(self.target)
            self.conns += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                self.threads.append(t)
                t.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop accepting, close every connection, join every thread (bounded)."""
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._accepter.join(5)
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        for t in self.threads:
            t.join(5)


@pytest.fixture
def forwarder(local_sshd: LocalSSHD) -> Iterator[Any]:
    made: list[Forwarder] = []

    def make(reset_first: int = 0, hold_first: int = 0) -> Forwarder:
        f = Forwarder(("127.0.0.1", local_sshd.port), reset_first, hold_first)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def via(sshd: LocalSSHD, port: int) -> dict[str, Any]:
    """Keywords that send ssh for ``sshd.host`` to ``port``, host key checked as sshd's."""
    alias = f"[{sshd.addresses[0]}]:{sshd.port}"
    return {"config": sshd.config, "options": {"Port": str(port), "HostKeyAlias": alias}}


@pytest.mark.parametrize("face", FACES)
def test_reset_then_up_is_retried(local_sshd: LocalSSHD, forwarder: Any, face: str) -> None:
    fw = forwarder(reset_first=1)
    [r] = run_many(
        face, [local_sshd.host], "echo hi", retries=2, timeout=30, **via(local_sshd, fw.port)
    )
    assert (r.status, r.returncode, r.stdout) == ("ok", 0, b"hi\n"), r
    assert r.attempts == 2
    assert fw.count == 2
    assert r.started is not None and r.duration >= (r.connect_time or 0.0)


def test_connect_timeout_is_retried(local_sshd: LocalSSHD, forwarder: Any) -> None:
    fw = forwarder(hold_first=1)  # the first attempt never sees a banner
    [r] = sshwrap.run_many(
        [local_sshd.host], "echo hi", retries=1, connect_timeout=1, **via(local_sshd, fw.port)
    )
    assert (r.status, r.stdout, r.attempts, fw.count) == ("ok", b"hi\n", 2, 2), r
    assert r.duration >= 1.0  # the first attempt's connect_timeout is in it


@pytest.mark.parametrize("face", FACES)
def test_retries_zero_is_one_attempt(local_sshd: LocalSSHD, forwarder: Any, face: str) -> None:
    fw = forwarder(reset_first=1)
    [r] = run_many(face, [local_sshd.host], "echo hi", **via(local_sshd, fw.port))
    assert r.status == "ssh_error" and isinstance(r.error, SSHConnectionError), r
    assert (r.attempts, fw.count) == (1, 1)


@pytest.mark.parametrize("code", [255, 1])
def test_remote_failure_is_not_retried(local_sshd: LocalSSHD, forwarder: Any, code: int) -> None:
    fw = forwarder()
    [r] = sshwrap.run_many(
        [local_sshd.host], f"exit {code}", retries=3, timeout=30, **via(local_sshd, fw.port)
    )
    assert (r.status, r.returncode, r.error) == ("failed", code, None), r
    assert (r.attempts, fw.count) == (1, 1)


def test_auth_failure_is_not_retried(local_sshd: LocalSSHD, forwarder: Any) -> None:
    fw = forwarder()
    user = f"nosuch{os.getpid()}x{time.monotonic_ns() % 100000}"
    [r] = sshwrap.run_many(
        [local_sshd.host], "true", retries=3, user=user, **via(local_sshd, fw.port)
    )
    assert r.status == "ssh_error" and isinstance(r.error, AuthenticationError), r
    assert (r.attempts, fw.count) == (1, 1)
    assert local_sshd.read_log().count(f"Invalid user {user} ") == 1


def test_deadline_bounds_the_retries(local_sshd: LocalSSHD) -> None:
    # A port nobody listens on: every attempt is refused at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = s.getsockname()[1]
        t0 = time.monotonic()
        [r] = sshwrap.run_many(
            [local_sshd.host], "true", retries=1000, deadline=2.0, **via(local_sshd, port)
        )
        elapsed = time.monotonic() - t0
    assert elapsed < 3.0, elapsed
    assert r.status in ("ssh_error", "timeout"), r
    assert 2 <= r.attempts < 1000, r
    assert r.status == "timeout" or "refused" in str(r.error)


def test_retries_must_be_a_count() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="retries"):
            sshwrap.run_many(["h"], "true", retries=bad)  # type: ignore[arg-type]


def test_cli_retries(local_sshd: LocalSSHD, forwarder: Any) -> None:
    fw = forwarder(reset_first=1)
    alias = f"[{local_sshd.addresses[0]}]:{local_sshd.port}"
    argv = [EXE, "-H", local_sshd.host, "-F", local_sshd.config, "-o", f"Port={fw.port}"]
    argv += ["-o", f"HostKeyAlias={alias}", "--retries", "1", "--", "echo", "hi"]
    p = subprocess.run(argv, capture_output=True, timeout=60)
    assert p.returncode == 0, p
    assert b"hi" in p.stdout
    assert fw.count == 2
    fw2 = forwarder(reset_first=1)  # --json says how many ssh a host took
    argv[argv.index(f"Port={fw.port}")] = f"Port={fw2.port}"
    p = subprocess.run([*argv[:-3], "--json", "--", "true"], capture_output=True, timeout=60)
    assert p.returncode == 0, p
    assert json.loads(p.stdout)["attempts"] == 2
    bad = subprocess.run([*argv[:-3], "--retries", "-1", "--", "true"], capture_output=True)
    assert bad.returncode == 64 and b"--retries" in bad.stderr


def _ssh_children() -> list[int]:
    """Pids of this process's ``ssh`` children (from /proc)."""
    me, kids = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        if comm == "ssh" and int(rest.split()[1]) == me:
            kids.append(int(d.name))
    return kids


def test_cancel_during_retries_ends_at_once(local_sshd: LocalSSHD) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # refused, again and again
        port = s.getsockname()[1]

        async def consume() -> None:
            async for _ in sshwrap.aio.run_many(
                [local_sshd.host], "true", retries=1000, **via(local_sshd, port)
            ):
                pass

        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            asyncio.run(asyncio.wait_for(consume(), 1.5))
        elapsed = time.monotonic() - t0
    assert elapsed < 1.5 + 1.0, elapsed
    assert _ssh_children() == []
