"""Issue 3: the subprocess-style API against plain ``subprocess`` + ssh.

- ``sshwrap.run(host, "true")`` against ``subprocess.run(["ssh", ..., host, "true"])``, both on
  fresh connections (full key exchange each time), samples interleaved, medians compared;
- 200 calls through ``sshwrap.aio.run`` with 20 at a time, against the same through
  ``asyncio.create_subprocess_exec("ssh", ...)``;
- 32 MB in and out at once through ``Popen(...).communicate()`` against ``subprocess.Popen``
  running ``ssh host cat``.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import time

from common import Row, fmt_s, median

import sshwrap
import sshwrap.aio
from sshwrap.process import PIPE
from sshwrap.testing import LocalSSHD


def _pair(a: float, b: float, goal: float | None) -> tuple[float, bool | None]:
    ratio = a / b
    return ratio, (None if goal is None else ratio <= goal)


def _cpu() -> float:
    """CPU seconds of this process plus its reaped children (ssh), user + system."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class _Meter:
    """Wall and CPU seconds of the samples of one side."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t = self._c = 0.0

    def __enter__(self) -> None:
        self._t, self._c = time.perf_counter(), _cpu()

    def __exit__(self, *exc: object) -> None:
        self.wall.append(time.perf_counter() - self._t)
        self.cpu.append(_cpu() - self._c)


def _note(ours: _Meter, base: _Meter, what: str) -> str:
    return (
        f"{what}; min wall ratio {min(ours.wall) / min(base.wall):.2f}x, "
        f"CPU (ours+ssh) ratio {sum(ours.cpu) / sum(base.cpu):.2f}x"
    )


def _fresh_true(sshd: LocalSSHD, n: int) -> Row:
    argv = ["ssh", *sshd.ssh_args, sshd.host, "true"]
    ours, base = _Meter(), _Meter()
    for i in range(n):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                with ours:
                    sshwrap.run(sshd.host, "true", config=sshd.config, check=True)
            else:
                with base:
                    subprocess.run(argv, stdin=subprocess.DEVNULL, check=True)
    a, b = median(ours.wall), median(base.wall)
    ratio, ok = _pair(a, b, 1.05)
    return Row(
        "run(host, 'true') fresh connection",
        fmt_s(a),
        f"{fmt_s(b)} subprocess+ssh",
        ratio,
        "<= 1.05x",
        ok,
        _note(ours, base, f"median of {n} interleaved calls each"),
    )


async def _aio_ours(sshd: LocalSSHD, n: int, limit: int) -> None:
    sem = asyncio.Semaphore(limit)

    async def one() -> None:
        async with sem:
            await sshwrap.aio.run(sshd.host, "true", config=sshd.config, check=True)

    await asyncio.gather(*(one() for _ in range(n)))


async def _aio_base(sshd: LocalSSHD, n: int, limit: int) -> None:
    sem = asyncio.Semaphore(limit)
    argv = ["ssh", *sshd.ssh_args, sshd.host, "true"]

    async def one() -> None:
        async with sem:
            p = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL)
            if await p.wait() != 0:
                raise RuntimeError("ssh failed")

    await asyncio.gather(*(one() for _ in range(n)))


def _aio(sshd: LocalSSHD, n: int, rounds: int) -> Row:
    ours, base = _Meter(), _Meter()
    for i in range(rounds):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            if which == 0:
                with ours:
                    asyncio.run(_aio_ours(sshd, n, 20))
            else:
                with base:
                    asyncio.run(_aio_base(sshd, n, 20))
    a, b = median(ours.wall), median(base.wall)
    ratio, ok = _pair(a, b, 1.05)
    return Row(
        f"aio.run x{n}, 20 at a time",
        fmt_s(a),
        f"{fmt_s(b)} asyncio+ssh",
        ratio,
        "<= 1.05x",
        ok,
        _note(ours, base, f"fresh connections; median of {rounds} rounds"),
    )


def _bulk(sshd: LocalSSHD, size: int, rounds: int) -> Row:
    data = os.urandom(size)
    argv = ["ssh", *sshd.ssh_args, sshd.host, "cat"]
    ours, base = _Meter(), _Meter()
    for i in range(rounds):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            if which == 0:
                with (
                    ours,
                    sshwrap.Popen(
                        sshd.host, "cat", stdin=PIPE, stdout=PIPE, config=sshd.config
                    ) as p,
                ):
                    out, _ = p.communicate(data)
            else:
                with base, subprocess.Popen(argv, stdin=PIPE, stdout=PIPE) as q:
                    out, _ = q.communicate(data)
            if out != data:
                raise RuntimeError("data corrupted")
    a, b = median(ours.wall), median(base.wall)
    ratio, ok = _pair(a, b, 1.05)
    mb = size >> 20
    return Row(
        f"Popen.communicate {mb} MB in+out",
        f"{fmt_s(a)} ({2 * size / a / 1e6:.0f} MB/s)",
        f"{fmt_s(b)} subprocess+ssh",
        ratio,
        "<= 1.05x",
        ok,
        _note(ours, base, f"fresh connection each; median of {rounds} rounds"),
    )


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """The issue 3 rows of the benchmark table."""
    # Warm-up: imports, the private log directory, page cache for ssh.
    sshwrap.run(sshd.host, "true", config=sshd.config, check=True)
    return [
        _fresh_true(sshd, 6 if quick else 30),
        _aio(sshd, 40 if quick else 200, 1 if quick else 3),
        _bulk(sshd, (8 if quick else 32) << 20, 2 if quick else 5),
    ]
