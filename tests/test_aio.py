"""sshwrap.aio against the real sshd: the same semantics as the sync API, on asyncio."""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

import pytest
from faults import InProcessLeaks
from test_process_helpers import (
    control_master,
    marker_seconds,
    timeout_case,
    wait_gone,
    wait_user_processes,
)

import sshwrap
import sshwrap.aio
from sshwrap.aio import PIPE
from sshwrap.errors import UNKNOWN_SIGNAL
from sshwrap.process import STOP_MARGIN
from sshwrap.testing import LocalSSHD


def test_importable_as_attribute() -> None:
    assert sshwrap.aio.run is not None
    import importlib

    assert importlib.import_module("sshwrap").aio is sshwrap.aio


def test_run(local_sshd: LocalSSHD) -> None:
    async def main() -> sshwrap.CompletedProcess:
        return await sshwrap.aio.run(
            local_sshd.host,
            ["printf", "%s\n", "a b", "$HOME"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            config=local_sshd.config,
        )

    r = asyncio.run(main())
    assert (r.args, r.returncode, r.stdout, r.stderr, r.host) == (
        ["printf", "%s\n", "a b", "$HOME"], 0, "a b\n$HOME\n", "", local_sshd.host
    )  # fmt: skip


def test_exit_status_signal_and_errors(local_sshd: LocalSSHD) -> None:
    cfg = local_sshd.config

    async def main() -> None:
        r = await sshwrap.aio.run(local_sshd.host, "exit 255", config=cfg)
        assert r.returncode == 255
        r = await sshwrap.aio.run(local_sshd.host, "kill -9 $$", config=cfg)
        assert r.returncode == UNKNOWN_SIGNAL
        with pytest.raises(subprocess.CalledProcessError) as info:
            await sshwrap.aio.run(
                local_sshd.host, "echo x; exit 3", config=cfg, check=True, capture_output=True
            )
        assert info.value.returncode == 3 and info.value.output == b"x\n"
        with pytest.raises(sshwrap.SSHConnectionError) as err:
            await sshwrap.aio.run(local_sshd.host, "true", config=cfg, port=1, capture_output=True)
        assert "Connection refused" in err.value.message

    asyncio.run(main())


def test_input_and_env_cwd(local_sshd: LocalSSHD) -> None:
    async def main() -> sshwrap.CompletedProcess:
        return await sshwrap.aio.run(
            local_sshd.host,
            'cd "$D" && pwd && cat',
            input=b"in",
            env={"D": "/tmp"},
            cwd="/",
            capture_output=True,
            config=local_sshd.config,
        )

    r = asyncio.run(main())
    assert r.stdout == b"/tmp\nin"


def test_timeout_stops_remote(local_sshd: LocalSSHD) -> None:
    def call(marker: str) -> None:
        asyncio.run(
            sshwrap.aio.run(
                local_sshd.host,
                f"exec sleep {marker}",
                timeout=1,
                capture_output=True,
                config=local_sshd.config,
            )
        )

    elapsed, pids = timeout_case(call, local_sshd.user)
    assert elapsed < 2
    assert wait_gone(pids, 5) == []


def test_timeout_output_so_far(local_sshd: LocalSSHD) -> None:
    with control_master(local_sshd.config, local_sshd.host) as mux:

        async def main() -> None:
            await sshwrap.aio.run(
                local_sshd.host,
                "echo started; exec sleep 30",
                timeout=1,
                capture_output=True,
                config=local_sshd.config,
                options=mux,
            )

        with pytest.raises(sshwrap.TimeoutExpired) as info:
            asyncio.run(main())
    assert info.value.output == b"started\n"
    assert info.value.stderr == b""
    assert info.value.host == local_sshd.host


def test_create_process_line_by_line_and_terminate(local_sshd: LocalSSHD) -> None:
    marker = marker_seconds()

    async def main(mux: dict[str, str | int]) -> tuple[float, int, list[int]]:
        start = time.monotonic()
        p = await sshwrap.aio.create_process(
            local_sshd.host,
            f"echo a; exec sleep {marker}",
            stdout=PIPE,
            config=local_sshd.config,
            options=mux,
        )
        assert p.stdout is not None
        assert await p.stdout.readline() == b"a\n"
        first = time.monotonic() - start
        pids = wait_user_processes(local_sshd.user, marker)
        await p.terminate()
        rc = await asyncio.wait_for(p.wait(), 30)
        return first, rc, pids

    with control_master(local_sshd.config, local_sshd.host) as mux:
        first, rc, pids = asyncio.run(main(mux))
    assert first < 1.0
    assert rc == -15
    assert pids and wait_gone(pids, 5) == []


def test_kill(local_sshd: LocalSSHD) -> None:
    async def main() -> int:
        p = await sshwrap.aio.create_process(
            local_sshd.host, "echo a; exec sleep 60", stdout=PIPE, config=local_sshd.config
        )
        assert p.stdout is not None
        await p.stdout.readline()
        p.kill()
        return await asyncio.wait_for(p.wait(), 10)

    assert asyncio.run(main()) == -9


def test_twenty_at_once(local_sshd: LocalSSHD) -> None:
    async def main() -> list[sshwrap.CompletedProcess]:
        sem = asyncio.Semaphore(20)

        async def one(i: int) -> sshwrap.CompletedProcess:
            async with sem:
                return await sshwrap.aio.run(
                    local_sshd.host,
                    ["echo", str(i)],
                    capture_output=True,
                    config=local_sshd.config,
                    timeout=120,
                )

        return await asyncio.gather(*(one(i) for i in range(40)))

    results = asyncio.run(main())
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(40)]


def test_same_core_as_sync(local_sshd: LocalSSHD) -> None:
    async def main() -> list[str]:
        p = await sshwrap.aio.create_process(
            local_sshd.host, ["echo", "x y"], env={"A": "1"}, config=local_sshd.config, stdout=PIPE
        )
        await p.communicate()
        return p.ssh_args

    aio_argv = asyncio.run(main())
    with sshwrap.Popen(
        local_sshd.host, ["echo", "x y"], env={"A": "1"}, config=local_sshd.config, stdout=PIPE
    ) as p:
        p.communicate()
        sync_argv = p.ssh_args

    def norm(argv: list[str]) -> list[str]:
        # the private log path and the random session id differ per call
        return [
            a.split("SSHWRAP_SESSION=")[0]
            if "SSHWRAP_SESSION=" in a
            else ("LOG" if a.endswith(".log") else a)
            for a in argv
        ]

    assert norm(aio_argv) == norm(sync_argv)
    assert aio_argv[-1].endswith("\nexport A=1\necho 'x y'")


def test_other_async_faces_are_wired(local_sshd: LocalSSHD) -> None:
    from sshwrap import fanout
    from sshwrap.aio import connection as aio_connection

    assert sshwrap.aio.connect is aio_connection.connect
    assert sshwrap.aio.AsyncConnection is aio_connection.AsyncConnection
    assert sshwrap.aio.run_many is fanout.run_many_async

    async def main() -> list[tuple[str, bytes]]:
        return [
            (r.host, r.stdout)
            async for r in sshwrap.aio.run_many(
                [local_sshd.host], ["echo", "a b"], config=local_sshd.config
            )
        ]

    assert asyncio.run(main()) == [(local_sshd.host, b"a b\n")]


def test_cancel_stops_the_remote_command_and_leaves_nothing(local_sshd: LocalSSHD) -> None:
    """A cancelled aio.run is ^C of the sync one: the local ssh killed and reaped at once, the
    remote command stopped within the stop's margin, no fd, thread or child left."""
    marker = marker_seconds()

    async def main() -> tuple[float, list[int]]:
        task = asyncio.ensure_future(
            sshwrap.aio.run(
                local_sshd.host,
                f"exec sleep {marker}",
                capture_output=True,
                config=local_sshd.config,
            )
        )
        pids = await asyncio.to_thread(wait_user_processes, local_sshd.user, marker)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0, pids

    with InProcessLeaks() as leaks:
        took, pids = asyncio.run(main())
        assert took < 0.5, took
        assert pids
        leaks.assert_clean(STOP_MARGIN + 1.0)
    assert wait_gone(pids, 5) == []


def test_create_process_refuses_a_keyword_it_does_not_take() -> None:
    """Was: a typo silently ignored.  (``tty``/``size`` are taken now: see the tty tests.)"""
    for bad in ({"text": True}, {"cdw": "/"}):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            asyncio.run(sshwrap.aio.create_process("host", "true", **bad))
    with pytest.raises(ValueError, match="size= needs tty=True"):  # as sshwrap.Popen
        asyncio.run(sshwrap.aio.create_process("host", "true", size=(24, 80)))


def test_create_process_tty_stdin_resize_and_exact_returncode(local_sshd: LocalSSHD) -> None:
    """tty=True as sshwrap.Popen has it: the terminal of the size given, stdout and stderr
    merged with CR LF ends (p.stderr None), stdin typed after ssh's raw mode, resize()
    reaching the remote terminal, the returncode exact, ssh's closing line dropped."""

    async def main() -> tuple[list[bytes], bytes, int, Any]:
        p = await sshwrap.aio.create_process(
            local_sshd.host,
            "tty; stty size; echo err >&2; read x; echo got $x; stty size; exit 3",
            tty=True,
            size=(20, 70),
            stdin=PIPE,
            stdout=PIPE,
            config=local_sshd.config,
        )
        assert p.stdout is not None and p.stdin is not None
        lines = [await asyncio.wait_for(p.stdout.readline(), 30) for _ in range(3)]
        p.resize(31, 99)
        p.stdin.write(b"abc\n")
        await p.stdin.drain()
        rest = await asyncio.wait_for(p.stdout.read(), 30)
        return lines, rest, await asyncio.wait_for(p.wait(), 30), p.stderr

    lines, rest, rc, stderr = asyncio.run(main())
    assert lines[0].startswith(b"/dev/pts/") and lines[0].endswith(b"\r\n"), lines
    assert lines[1:] == [b"20 70\r\n", b"err\r\n"]
    assert rest == b"abc\r\ngot abc\r\n31 99\r\n"  # echoed by the remote terminal
    assert (rc, stderr) == (3, None)


def test_create_process_tty_communicate_types_input_then_eof(local_sshd: LocalSSHD) -> None:
    async def main() -> tuple[tuple[bytes | None, bytes | None], int | None]:
        p = await sshwrap.aio.create_process(
            local_sshd.host,
            "cat; echo done",
            tty=True,
            stdin=PIPE,
            stdout=PIPE,
            config=local_sshd.config,
        )
        got = await asyncio.wait_for(p.communicate(b"line\n"), 30)
        return got, p.returncode

    (out, err), rc = asyncio.run(main())
    assert out is not None and out.endswith(b"done\r\n"), out
    assert out.count(b"line\r\n") == 2  # echoed, then cat's copy
    assert (err, rc) == (None, 0)


def test_create_process_tty_kill_is_bounded_and_leaves_nothing(local_sshd: LocalSSHD) -> None:
    marker = marker_seconds()

    async def main() -> tuple[int, float]:
        p = await sshwrap.aio.create_process(
            local_sshd.host,
            f"echo up; exec sleep {marker}",
            tty=True,
            stdout=PIPE,
            config=local_sshd.config,
        )
        assert p.stdout is not None
        assert await asyncio.wait_for(p.stdout.readline(), 30) == b"up\r\n"
        t0 = time.monotonic()
        p.kill()
        rc = await asyncio.wait_for(p.wait(), 10)
        assert await asyncio.wait_for(p.stdout.read(), 10) == b""  # the terminal's end
        return rc, time.monotonic() - t0

    with InProcessLeaks() as leaks:
        rc, took = asyncio.run(main())
        assert rc == -9 and took < 2.0, (rc, took)
        leaks.assert_clean(STOP_MARGIN + 1.0)


def test_create_process_tty_ssh_failure_has_ssh_words(local_sshd: LocalSSHD) -> None:
    """ssh's own early words reach the terminal: the error carries them, as in the sync face."""

    async def main() -> None:
        p = await sshwrap.aio.create_process(
            local_sshd.host, "true", tty=True, stdout=PIPE, config=local_sshd.config, port=1
        )
        await p.wait()

    with pytest.raises(sshwrap.SSHConnectionError) as info:
        asyncio.run(main())
    assert "Connection refused" in info.value.message


def test_process_repr(local_sshd: LocalSSHD) -> None:
    async def main() -> tuple[str, str, int]:
        p = await sshwrap.aio.create_process(
            local_sshd.host, ["exit", "4"], config=local_sshd.config
        )
        running = repr(p)
        await p.wait()
        return running, repr(p), p.pid

    running, ended, pid = asyncio.run(main())
    head = f"<Process: host: {local_sshd.host!r} pid: {pid}"
    assert running == f"{head} running args: ['exit', '4']>"
    assert ended == f"{head} returncode: 4 args: ['exit', '4']>"


def test_create_process_tty_output_larger_than_the_stream_limit(local_sshd: LocalSSHD) -> None:
    """The terminal is read through the loop with the stream's flow control (a small
    ``limit`` pauses and resumes the reading many times): every byte arrives, in order."""

    async def main() -> tuple[bytes, int]:
        p = await sshwrap.aio.create_process(
            local_sshd.host,
            "seq 1 60000",
            tty=True,
            stdout=PIPE,
            limit=1024,
            config=local_sshd.config,
        )
        assert p.stdout is not None
        chunks = []
        while chunk := await asyncio.wait_for(p.stdout.read(700), 30):
            chunks.append(chunk)
        return b"".join(chunks), await asyncio.wait_for(p.wait(), 30)

    out, rc = asyncio.run(main())
    assert rc == 0
    assert out == b"".join(b"%d\r\n" % i for i in range(1, 60001))
