"""The asyncio face of Connection, against the real sshd."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sshwrap.aio.connection import AsyncConnection, connect
from sshwrap.errors import CalledProcessError, TimeoutExpired
from sshwrap.testing import LocalSSHD


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _remote(sshd: LocalSSHD, needle: str) -> list[int]:
    # Starts with: the remote shell has exec'd the program (see test_connection._remote).
    return [p for p in sshd.session_pids() if _cmdline(p).startswith(needle)]


async def _wait_for_remote(sshd: LocalSSHD, needle: str, present: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while bool(_remote(sshd, needle)) != present:
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} present={not present} after {timeout} s")
        await asyncio.sleep(0.01)


def test_async_run_results_and_concurrency(local_sshd: LocalSSHD) -> None:
    async def main() -> None:
        async with await connect(local_sshd.host, config=local_sshd.config) as c:
            assert isinstance(c, AsyncConnection)
            r = await c.run(["printf", "%s", "a b"], capture_output=True, text=True)
            assert (r.returncode, r.stdout, r.host) == (0, "a b", local_sshd.host)
            assert (await c.run("kill -9 $$")).returncode == -9
            assert (await c.run("kill -TERM $$")).returncode == -15
            r = await c.run("tty", tty=True, capture_output=True)
            assert r.stdout.startswith(b"/dev/pts/")
            assert (await c.run("kill -9 $$", tty=True)).returncode == -9
            assert await c.check_output(["cat"], input=b"xyz") == b"xyz"
            with pytest.raises(subprocess.CalledProcessError) as info:
                await c.run("exit 3", check=True)
            assert isinstance(info.value, CalledProcessError)
            rs = await asyncio.gather(
                *(c.run(["echo", str(i)], capture_output=True) for i in range(100))
            )
            assert [x.stdout for x in rs] == [f"{i}\n".encode() for i in range(100)]
            assert await c.alive()
            path = c.control_path
        assert not os.path.exists(path)

    asyncio.run(main())


def test_async_timeout_and_cancel_stop_the_remote_command(local_sshd: LocalSSHD) -> None:
    async def main() -> None:
        async with await connect(local_sshd.host, config=local_sshd.config) as c:
            t = time.monotonic()
            with pytest.raises(TimeoutExpired):
                await c.run(["sleep", "2001"], timeout=0.5)
            assert time.monotonic() - t < 4
            await _wait_for_remote(local_sshd, "sleep 2001", False, 5)
            task = asyncio.ensure_future(c.run(["sleep", "2002"]))
            await _wait_for_remote(local_sshd, "sleep 2002", True, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _wait_for_remote(local_sshd, "sleep 2002", False, 5)

    asyncio.run(main())


def test_async_reconnects_after_master_death(local_sshd: LocalSSHD) -> None:
    async def main() -> None:
        async with await connect(local_sshd.host, config=local_sshd.config) as c:
            old = c.master_pid
            os.kill(old, signal.SIGKILL)
            r = await c.run("echo again", capture_output=True)
            assert r.stdout == b"again\n"
            assert c.master_pid != old

    asyncio.run(main())


def test_async_gather_beyond_server_max_sessions(
    local_sshd_factory: Callable[..., LocalSSHD],
) -> None:
    sshd = local_sshd_factory(extra_sshd_config=["Match all", "MaxSessions 3"])

    async def main() -> None:
        async with await connect(sshd.host, config=sshd.config) as c:
            rs = await asyncio.gather(
                *(
                    c.run(["sh", "-c", "sleep 0.1; echo $0", str(i)], capture_output=True)
                    for i in range(15)
                )
            )
            assert [r.stdout for r in rs] == [f"{i}\n".encode() for i in range(15)]

    asyncio.run(main())


def test_async_create_process_streams_and_signals(local_sshd: LocalSSHD) -> None:
    async def main() -> None:
        async with await connect(local_sshd.host, config=local_sshd.config) as c:
            p = await c.create_process(
                "echo first; read x; echo got $x", stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            assert p.stdout is not None and p.stdin is not None
            assert await p.stdout.readline() == b"first\n"  # before the command ends
            p.stdin.write(b"abc\n")
            await p.stdin.drain()
            assert await p.stdout.readline() == b"got abc\n"
            assert await p.wait() == 0 and p.returncode == 0
            data = os.urandom(4 * 1024 * 1024)
            p = await c.create_process(
                "cat; echo done >&2",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = await p.communicate(data)
            assert (out, err, p.returncode) == (data, b"done\n", 0)
            p = await c.create_process(["sleep", "2003"])
            await _wait_for_remote(local_sshd, "sleep 2003", True, 10)
            p.send_signal(signal.SIGINT)
            assert await p.wait() == -2

    asyncio.run(main())


def test_exposed_as_sshwrap_aio_connect() -> None:
    import sshwrap
    import sshwrap.aio.connection

    assert sshwrap.aio.connect is sshwrap.aio.connection.connect
    assert sshwrap.aio.AsyncConnection is AsyncConnection


def test_async_put_get(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(100_000))

    async def main() -> None:
        async with await connect(local_sshd.host, config=local_sshd.config) as c:
            remote = (await c.check_output("mktemp", text=True)).strip()
            await c.put(src, remote)
            await c.get(remote, tmp_path / "back.bin")
            await c.run(["rm", "-f", remote], check=True)

    asyncio.run(main())
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("proxy", [True, False], ids=["channel", "ssh-S"])
def test_async_create_process_tty_over_both_paths(local_sshd: LocalSSHD, proxy: bool) -> None:
    """tty/size reach the command over a channel and over the ssh -S fallback (which used to
    refuse them with TypeError); resize() reaches the remote terminal; stderr is merged."""

    async def main() -> tuple[list[bytes], bytes, int, object, str]:
        async with await connect(local_sshd.host, config=local_sshd.config, proxy=proxy) as c:
            p = await c.create_process(
                "stty size; read x; stty size; exit 7",
                tty=True,
                size=(21, 71),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert p.stdout is not None and p.stdin is not None
            first = [await asyncio.wait_for(p.stdout.readline(), 30)]
            p.resize(32, 98)
            p.stdin.write(b"go\n")
            await p.stdin.drain()
            rest = await asyncio.wait_for(p.stdout.read(), 30)
            return first, rest, await asyncio.wait_for(p.wait(), 30), p.stderr, repr(p)

    first, rest, rc, stderr, shown = asyncio.run(main())
    assert first == [b"21 71\r\n"]
    assert rest.endswith(b"32 98\r\n"), rest
    assert (rc, stderr) == (7, None)
    assert shown.endswith("returncode: 7 args: 'stty size; read x; stty size; exit 7'>"), shown
