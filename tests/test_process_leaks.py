"""No leaks: 1,000 calls leave our fd count and child count unchanged, and no zombies.

The 1,000 calls go through a ControlMaster set up by ssh options (``ControlMaster=auto``),
as a user's ssh_config would, so each call is a full sshwrap call (argv, private log, pipes,
exit interpretation) at ~10 ms rather than a fresh key exchange.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Iterator

import pytest
from test_process_helpers import control_master

import sshwrap
import sshwrap.aio
from sshwrap.process import PIPE
from sshwrap.testing import LocalSSHD, proc_stat


def _settle() -> None:
    """Let earlier work finish: background remote-stop threads, garbage (other tests' objects)."""
    for t in threading.enumerate():
        if t.name == "sshwrap-remote-signal":
            t.join(60)
    gc.collect()


def _fds() -> int:
    """Open fds of this process, once things have settled."""
    _settle()
    return len(os.listdir("/proc/self/fd"))


def _children() -> tuple[int, int]:
    """(children of this process, of which zombies)."""
    me = os.getpid()
    kids = zombies = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (rest := proc_stat(int(entry))) is None:
            continue
        if int(rest[1]) == me:
            kids += 1
            zombies += rest[0] == b"Z"
    return kids, zombies


@pytest.fixture
def mux(local_sshd: LocalSSHD) -> Iterator[dict[str, str | int]]:
    with control_master(local_sshd.config, local_sshd.host) as options:
        yield options


def _one(sshd: LocalSSHD, i: int, options: dict[str, str | int]) -> None:
    kind = i % 5
    cfg = sshd.config
    if kind == 0:
        r = sshwrap.run(
            sshd.host, ["echo", str(i)], capture_output=True, config=cfg, options=options
        )
        assert r.stdout == f"{i}\n".encode()
    elif kind == 1:
        with sshwrap.Popen(
            sshd.host, "cat", stdin=PIPE, stdout=PIPE, stderr=PIPE, config=cfg, options=options
        ) as p:
            assert p.communicate(b"x", timeout=60) == (b"x", b"")
    elif kind == 2:
        assert sshwrap.call(sshd.host, "exit 3", config=cfg, options=options) == 3
    elif kind == 3:
        r = sshwrap.run(sshd.host, "kill -9 $$", config=cfg, options=options)
        assert r.returncode < 0
    else:
        out = sshwrap.check_output(sshd.host, "echo ok", text=True, config=cfg, options=options)
        assert out == "ok\n"


def test_thousand_calls_leak_nothing(local_sshd: LocalSSHD, mux: dict[str, str | int]) -> None:
    for i in range(5):  # warm up: the master, the private log directory, lazy imports
        _one(local_sshd, i, mux)
    fds, (kids, zombies) = _fds(), _children()
    for i in range(1000):
        _one(local_sshd, i, mux)
    # Not ==: objects and threads of earlier tests in this process may close fds or reap
    # children meanwhile; a leak of ours shows as growth (one per call or more).
    assert _fds() <= fds
    after, after_zombies = _children()
    assert after <= kids and after_zombies <= zombies


def test_aio_calls_leak_nothing(local_sshd: LocalSSHD, mux: dict[str, str | int]) -> None:
    async def batch(n: int) -> None:
        sem = asyncio.Semaphore(20)

        async def one(i: int) -> None:
            async with sem:
                r = await sshwrap.aio.run(
                    local_sshd.host,
                    ["echo", str(i)],
                    capture_output=True,
                    config=local_sshd.config,
                    options=mux,
                    timeout=120,
                )
                assert r.stdout == f"{i}\n".encode()

        await asyncio.gather(*(one(i) for i in range(n)))

    async def main() -> tuple[int, tuple[int, int], int, tuple[int, int]]:
        await batch(5)
        before = _fds(), _children()
        await batch(300)
        return (*before, _fds(), _children())

    fds, kids, fds_after, kids_after = asyncio.run(main())
    assert fds_after <= fds
    assert kids_after[0] <= kids[0] and kids_after[1] <= kids[1]


def test_timeouts_and_errors_leak_nothing(local_sshd: LocalSSHD) -> None:
    def once() -> None:
        with pytest.raises(sshwrap.TimeoutExpired):
            sshwrap.run(
                local_sshd.host,
                "exec sleep 30",
                timeout=0.5,
                capture_output=True,
                config=local_sshd.config,
            )
        with pytest.raises(sshwrap.SSHConnectionError):
            sshwrap.run(
                local_sshd.host, "true", port=1, capture_output=True, config=local_sshd.config
            )

    def join_cleanups() -> None:
        for t in threading.enumerate():
            if t.name == "sshwrap-remote-signal":
                t.join(60)

    once()
    join_cleanups()
    fds, kids = _fds(), _children()
    for _ in range(10):
        once()
    join_cleanups()
    assert _fds() <= fds
    after = _children()
    assert after[0] <= kids[0] and after[1] <= kids[1]
