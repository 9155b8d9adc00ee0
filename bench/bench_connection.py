"""Issue 4: commands over a Connection (mux proxy channels) against the ways people do it now.

- 200 sequential ``c.run("true")`` against plain ``ssh -S sock host true`` (a subprocess over
  a master of its own), a fresh ``ssh host true``, paramiko ``exec_command`` on an open client
  (TCP_NODELAY set: its best case) and asyncssh ``conn.run`` on an open connection;
- 100 concurrent ``c.run("true")`` over one Connection, from threads and from
  ``sshwrap.aio.connection`` (``asyncio.gather``), against 100 concurrent asyncssh
  ``conn.run`` on one connection.

All against the same LocalSSHD.  This machine is shared, so its load changes during a run: the
contenders take turns in small rounds (sequential: rounds of 10 calls each; concurrent: best of
3 rounds each) and the table compares medians (sequential) or bests (concurrent).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from common import Row, fmt_s, median

from sshwrap.aio.connection import connect as aconnect
from sshwrap.connection import Connection, connect
from sshwrap.testing import LocalSSHD

Call = Callable[[], object]


@contextmanager
def _ssh_s(sshd: LocalSSHD) -> Iterator[Call]:
    """``ssh -S sock host true`` over a master started by plain ssh."""
    d = tempfile.mkdtemp(prefix="swb-")
    path = os.path.join(d, "m")
    subprocess.run(
        sshd.ssh("-M", "-N", "-f", "-o", f"ControlPath={path}", sshd.host),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        check=True,
    )
    argv = sshd.ssh("-S", path, "-o", "ControlMaster=no", sshd.host, "true")
    try:
        yield lambda: subprocess.run(argv, stdin=subprocess.DEVNULL, check=True)
    finally:
        subprocess.run(sshd.ssh("-S", path, "-O", "exit", sshd.host), capture_output=True)
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


@contextmanager
def _paramiko(sshd: LocalSSHD) -> Iterator[Call | None]:
    try:
        import paramiko
    except ImportError:
        yield None
        return
    client = paramiko.SSHClient()
    client.load_host_keys(sshd.known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        sshd.addresses[0],
        port=sshd.port,
        username=sshd.user,
        key_filename=sshd.identity,
        look_for_keys=False,
        allow_agent=False,
    )
    transport = client.get_transport()
    assert transport is not None
    transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def one() -> None:
        _, stdout, _ = client.exec_command("true")
        if stdout.channel.recv_exit_status() != 0:
            raise RuntimeError("paramiko: true failed")

    try:
        yield one
    finally:
        client.close()


async def _asyncssh_conn(sshd: LocalSSHD) -> Any:
    import asyncssh

    return await asyncssh.connect(
        sshd.addresses[0],
        port=sshd.port,
        username=sshd.user,
        client_keys=[sshd.identity],
        known_hosts=sshd.known_hosts,
        agent_path=None,
    )


@contextmanager
def _asyncssh_seq(sshd: LocalSSHD) -> Iterator[Call | None]:
    """asyncssh ``conn.run`` on an open connection, driven from a private event loop."""
    try:
        import asyncssh  # noqa: F401
    except ImportError:
        yield None
        return
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(_asyncssh_conn(sshd))
    try:
        yield lambda: loop.run_until_complete(conn.run("true", check=True))
    finally:
        conn.close()
        loop.run_until_complete(conn.wait_closed())
        loop.close()


def _interleaved(contenders: dict[str, Call], n: int, round_size: int = 10) -> dict[str, float]:
    """Median seconds per call of each contender, calling them in turns of ``round_size``."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()  # warm up
    for _ in range(max(1, n // round_size)):
        for name, fn in contenders.items():
            for _ in range(round_size):
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
    return {name: median(xs) for name, xs in samples.items()}


def _asyncssh_concurrent(sshd: LocalSSHD, n: int) -> float | None:
    try:
        import asyncssh  # noqa: F401
    except ImportError:
        return None

    async def main() -> float:
        conn = await _asyncssh_conn(sshd)
        try:
            await conn.run("true", check=True)
            t = time.perf_counter()
            await asyncio.gather(*(conn.run("true", check=True) for _ in range(n)))
            return time.perf_counter() - t
        finally:
            conn.close()
            await conn.wait_closed()

    return asyncio.run(main())


def _threads_concurrent(c: Connection, n: int) -> float:
    barrier = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def one() -> None:
        barrier.wait()
        try:
            c.run("true", check=True)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall


def _aio_concurrent(sshd: LocalSSHD, n: int) -> float:
    async def main() -> float:
        async with await aconnect(sshd.host, config=sshd.config) as c:
            await c.run("true", check=True)
            t = time.perf_counter()
            await asyncio.gather(*(c.run("true", check=True) for _ in range(n)))
            return time.perf_counter() - t

    return asyncio.run(main())


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """The benchmark rows for the shared table."""
    n = 30 if quick else 200
    n_fresh = 5 if quick else 20
    n_conc = 20 if quick else 100
    rows: list[Row] = []
    fresh_argv = sshd.ssh(sshd.host, "true")
    with (
        connect(sshd.host, config=sshd.config) as c,
        _ssh_s(sshd) as ssh_s,
        _paramiko(sshd) as pm,
        _asyncssh_seq(sshd) as asq,
    ):
        contenders: dict[str, Call] = {"ours": lambda: c.run("true"), "ssh -S": ssh_s}
        if pm is not None:
            contenders["paramiko"] = pm
        if asq is not None:
            contenders["asyncssh"] = asq
        seq = _interleaved(contenders, n)
        fresh = _interleaved(
            {
                "ours": lambda: c.run("true"),
                "fresh": lambda: subprocess.run(fresh_argv, stdin=subprocess.DEVNULL, check=True),
            },
            n_fresh,
            round_size=5,
        )
        ours_conc = ours_aio = acc = float("inf")
        for _ in range(3):
            ours_conc = min(ours_conc, _threads_concurrent(c, n_conc))
            ours_aio = min(ours_aio, _aio_concurrent(sshd, n_conc))
            got = _asyncssh_concurrent(sshd, n_conc)
            if got is not None:
                acc = min(acc, got)
    ours = seq["ours"]
    label = f"c.run('true') x{n} seq (median/call)"
    rows.append(
        Row(
            label + " vs ssh -S",
            fmt_s(ours),
            fmt_s(seq["ssh -S"]),
            ours / seq["ssh -S"],
            "<= 0.40x",
            ours / seq["ssh -S"] <= 0.4,
        )
    )
    ratio = fresh["ours"] / fresh["fresh"]
    rows.append(
        Row(
            f"c.run('true') x{n_fresh} vs fresh ssh (median/call)",
            fmt_s(fresh["ours"]),
            fmt_s(fresh["fresh"]),
            ratio,
            "<= 1/60 (0.017x)",
            ratio <= 1 / 60,
            note=f"{1 / ratio:.0f}x faster than a fresh connection",
        )
    )
    if "paramiko" in seq:
        rows.append(
            Row(
                label + " vs paramiko",
                fmt_s(ours),
                fmt_s(seq["paramiko"]),
                ours / seq["paramiko"],
                "< 1.00x",
                ours < seq["paramiko"],
                note="paramiko exec_command on an open client, TCP_NODELAY",
            )
        )
    if "asyncssh" in seq:
        rows.append(
            Row(
                label + " vs asyncssh",
                fmt_s(ours),
                fmt_s(seq["asyncssh"]),
                ours / seq["asyncssh"],
                "< 1.00x",
                ours < seq["asyncssh"],
                note="asyncssh conn.run on an open connection",
            )
        )
    if acc != float("inf"):
        rows.append(
            Row(
                f"aio c.run('true') x{n_conc} gather (wall)",
                fmt_s(ours_aio),
                fmt_s(acc),
                ours_aio / acc,
                "< 1.00x",
                ours_aio < acc,
                note="sshwrap.aio.connection on one Connection vs asyncssh on one connection",
            )
        )
        rows.append(
            Row(
                f"c.run('true') x{n_conc} threads (wall)",
                fmt_s(ours_conc),
                fmt_s(acc),
                ours_conc / acc,
                "< 1.00x",
                ours_conc < acc,
                note="threads over one Connection vs asyncio.gather on one asyncssh connection",
            )
        )
    return rows
