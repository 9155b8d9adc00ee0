"""Issue 4: commands over a Connection (mux proxy channels) against the ways people do it now.

- 200 sequential ``c.run("true")`` against plain ``ssh -S sock host true`` (a subprocess over
  the same kind of master), a fresh ``ssh host true``, paramiko ``exec_command`` on an open
  client (TCP_NODELAY set: its best case) and asyncssh ``conn.run`` on an open connection;
- 100 concurrent ``c.run("true")`` (threads) over one Connection against 100 concurrent
  asyncssh ``conn.run`` on one connection (``asyncio.gather``).

Everything runs against the same LocalSSHD, one after the other, medians of per-call times.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from common import Row, fmt_s, median

from sshwrap.connection import connect
from sshwrap.testing import LocalSSHD


def _per_call(fn: Callable[[], object], n: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def _ssh_s(sshd: LocalSSHD, n: int) -> float:
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
        return _per_call(lambda: subprocess.run(argv, stdin=subprocess.DEVNULL, check=True), n)
    finally:
        subprocess.run(sshd.ssh("-S", path, "-O", "exit", sshd.host), capture_output=True)
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


def _fresh(sshd: LocalSSHD, n: int) -> float:
    argv = sshd.ssh(sshd.host, "true")
    return _per_call(lambda: subprocess.run(argv, stdin=subprocess.DEVNULL, check=True), n)


def _paramiko(sshd: LocalSSHD, n: int) -> float | None:
    try:
        import paramiko
    except ImportError:
        return None
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
        return _per_call(one, n)
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


def _asyncssh_seq(sshd: LocalSSHD, n: int) -> float | None:
    try:
        import asyncssh  # noqa: F401
    except ImportError:
        return None

    async def main() -> float:
        conn = await _asyncssh_conn(sshd)
        try:
            await conn.run("true", check=True)
            times = []
            for _ in range(n):
                t = time.perf_counter()
                await conn.run("true", check=True)
                times.append(time.perf_counter() - t)
            return median(times)
        finally:
            conn.close()
            await conn.wait_closed()

    return asyncio.run(main())


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


def _threads_concurrent(c: Any, n: int) -> float:
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


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """The benchmark rows for the shared table."""
    n = 30 if quick else 200
    n_fresh = 5 if quick else 20
    n_conc = 20 if quick else 100
    rows: list[Row] = []
    with connect(sshd.host, config=sshd.config) as c:
        ours = _per_call(lambda: c.run("true"), n)
        ours_conc = _threads_concurrent(c, n_conc)
        ours_conc = min(ours_conc, _threads_concurrent(c, n_conc))
    ssh_s = _ssh_s(sshd, n)
    fresh = _fresh(sshd, n_fresh)
    label = f"c.run('true') x{n} seq (median/call)"
    rows.append(
        Row(
            label + " vs ssh -S",
            fmt_s(ours),
            fmt_s(ssh_s),
            ours / ssh_s,
            "<= 0.40x",
            ours / ssh_s <= 0.4,
        )
    )
    rows.append(
        Row(
            label + " vs fresh ssh",
            fmt_s(ours),
            fmt_s(fresh),
            ours / fresh,
            "<= 1/60 (0.017x)",
            ours / fresh <= 1 / 60,
            note=f"{fresh / ours:.0f}x faster than a fresh connection",
        )
    )
    pm = _paramiko(sshd, n)
    if pm is not None:
        rows.append(
            Row(
                label + " vs paramiko",
                fmt_s(ours),
                fmt_s(pm),
                ours / pm,
                "< 1.00x",
                ours < pm,
                note="paramiko exec_command on an open client, TCP_NODELAY",
            )
        )
    asq = _asyncssh_seq(sshd, n)
    if asq is not None:
        rows.append(
            Row(
                label + " vs asyncssh",
                fmt_s(ours),
                fmt_s(asq),
                ours / asq,
                "< 1.00x",
                ours < asq,
                note="asyncssh conn.run on an open connection",
            )
        )
    acc = _asyncssh_concurrent(sshd, n_conc)
    if acc is not None:
        rows.append(
            Row(
                f"c.run('true') x{n_conc} concurrent (wall)",
                fmt_s(ours_conc),
                fmt_s(acc),
                ours_conc / acc,
                "< 1.00x",
                ours_conc < acc,
                note="threads over one Connection vs asyncio.gather on one asyncssh connection",
            )
        )
    return rows
