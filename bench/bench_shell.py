"""Issue 14: a command in a persistent remote shell against a command on a channel of its own.

``sh.run("true")`` in one ``Connection.shell()`` (the command written to a running ``sh``,
its framed output read back: one round trip, no channel open, no exec, no login shell
started) against ``c.run("true")`` over the same Connection (a channel opened, ``exec``, the
remote user's shell started for each command).  Goal: <= 0.5x.  The two take turns in rounds
of 10 calls (the machine is shared), and the table compares the medians per call; the async
face (``await AsyncShell.run``) is measured the same way against ``await ac.run``.
"""

from __future__ import annotations

import asyncio
import time

from bench_connection import _interleaved
from common import Row, fmt_s, median

from sshwrap.aio.connection import AsyncConnection
from sshwrap.connection import Connection, connect
from sshwrap.testing import LocalSSHD

GOAL = 0.5


def _aio_medians(conn: Connection, n: int) -> tuple[float, float]:
    """(median s per ``await sh.run('true')``, per ``await ac.run('true')``), in turns."""

    async def main() -> tuple[float, float]:
        ac = AsyncConnection(conn)
        shell_s: list[float] = []
        run_s: list[float] = []
        async with await ac.shell() as sh:
            await sh.run("true")
            await ac.run("true")
            for _ in range(max(1, n // 10)):
                for _ in range(10):
                    t = time.perf_counter()
                    await sh.run("true")
                    shell_s.append(time.perf_counter() - t)
                for _ in range(10):
                    t = time.perf_counter()
                    await ac.run("true")
                    run_s.append(time.perf_counter() - t)
        return median(shell_s), median(run_s)

    return asyncio.run(main())


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """The benchmark rows for the shared table."""
    n = 30 if quick else 300
    rows: list[Row] = []
    with connect(sshd.host, config=sshd.config) as c, c.shell() as sh:
        seq = _interleaved({"shell": lambda: sh.run("true"), "run": lambda: c.run("true")}, n)
        a_shell, a_run = _aio_medians(c, n)
    for label, ours, base in (
        (f"sh.run('true') x{n} vs c.run('true') (median/call)", seq["shell"], seq["run"]),
        (f"await sh.run('true') x{n} vs await ac.run('true')", a_shell, a_run),
    ):
        ratio = ours / base
        rows.append(
            Row(
                label,
                fmt_s(ours),
                fmt_s(base),
                ratio,
                f"<= {GOAL}x",
                ratio <= GOAL,
                note="one persistent sh on one channel vs a channel + exec per command",
            )
        )
    return rows
