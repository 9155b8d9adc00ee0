"""A persistent remote shell (issue 14, part 2): ``Connection.shell()``, ``await
AsyncConnection.shell()`` and ``sshwrap.shell(host)``, against the real sshd.

Each behaviour is one test body run through both faces (the ``face`` fixture): the sync
``Shell`` in this thread, and the ``AsyncShell`` on an event loop in a thread of its own.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from waiting import wait_until

from sshwrap import Shell, ShellError, shell
from sshwrap.aio.connection import AsyncConnection, AsyncShell
from sshwrap.connection import Connection, connect
from sshwrap.core.completed import CompletedProcess
from sshwrap.errors import CalledProcessError, TimeoutExpired
from sshwrap.testing import LocalSSHD, wait_exited

T = TypeVar("T")


class Face:
    """One way of using a shell: ``run`` and ``close`` as plain calls."""

    def __init__(self, name: str, conn: Connection) -> None:
        self.name = name
        self.conn = conn
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync: Shell | None = None
        self._async: AsyncShell | None = None
        if name == "sync":
            self._sync = conn.shell()
            self.pid = self._sync.pid
        else:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, daemon=True)
            self._thread.start()
            self._loop = loop
            self._async = self.call(AsyncConnection(conn).shell())
            self.pid = self._async.pid

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def run(self, command: str | list[str], **options: Any) -> CompletedProcess:
        if self._sync is not None:
            return self._sync.run(command, **options)
        assert self._async is not None
        return self.call(self._async.run(command, **options))

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
        else:
            assert self._async is not None and self._loop is not None
            try:
                self.call(self._async.close())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
                self._loop.close()


@pytest.fixture
def conn(local_sshd: LocalSSHD) -> Iterator[Connection]:
    with connect(local_sshd.host, config=local_sshd.config) as c:
        yield c


@pytest.fixture(params=["sync", "async"])
def face(request: pytest.FixtureRequest, conn: Connection) -> Iterator[Face]:
    f = Face(request.param, conn)
    try:
        yield f
    finally:
        f.close()
    assert wait_exited([f.pid], 10) == []  # the remote shell is gone with close()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _remote(sshd: LocalSSHD, needle: str) -> list[int]:
    return [p for p in sshd.session_pids() if _cmdline(p).startswith(needle)]


def test_state_persists(face: Face) -> None:
    face.run("cd /tmp && export SW_VAR='a b'")
    face.run('sw_plain=kept; sw_f() { echo "f:$1"; }')
    r = face.run('pwd; echo "$SW_VAR"; echo "$sw_plain"; sw_f x; sh -c \'echo "$SW_VAR"\'')
    assert (r.returncode, r.stdout, r.stderr) == (0, b"/tmp\na b\nkept\nf:x\na b\n", b"")
    assert face.run("echo $$").stdout == f"{face.pid}\n".encode()  # one shell throughout


def test_streams_apart_and_status(face: Face) -> None:
    r = face.run("echo out; echo err >&2; printf x; printf y >&2; exit_3() { return 3; }; exit_3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\nx", b"err\ny")
    r = face.run(["printf", "%s|", "a b", "'q'", "$HOME"], text=True)
    assert (r.stdout, r.stderr) == ("a b|'q'|$HOME|", "")
    with pytest.raises(CalledProcessError) as info:
        face.run("echo no; false", check=True)
    e = info.value
    assert (e.returncode, e.stdout, e.host) == (1, b"no\n", face.conn.host)
    r = face.run("if then", text=True)  # a syntax error ends the command, not the shell
    assert r.returncode != 0 and "syntax error" in r.stderr.lower()
    assert face.run("echo alive").stdout == b"alive\n"


def test_fake_markers_do_not_end_a_command(face: Face) -> None:
    fake = secrets.token_hex(16)
    # marker-looking lines in both streams, whole lines and at the end, then more output
    cmd = (
        f"printf '\\n{fake} 0\\n'; printf '\\n{fake}\\n' >&2; printf '\\n%s 0\\n' {fake}; "
        f"sleep 0.2; echo tail; echo etail >&2"
    )
    r = face.run(cmd)
    assert r.stdout == f"\n{fake} 0\n\n{fake} 0\ntail\n".encode()
    assert r.stderr == f"\n{fake}\netail\n".encode()
    assert r.returncode == 0


def test_input_and_default_stdin(face: Face) -> None:
    data = b"a\0b'c\"$HOME\\\n\nno newline at the end"
    assert face.run("cat", input=data).stdout == data
    assert face.run("wc -c", input="héllo", encoding="utf-8").stdout.strip() == "6"
    assert face.run("cat; echo done").stdout == b"done\n"  # /dev/null: no wait for input
    assert face.run("ls -a ${TMPDIR:-/tmp} | grep -c '^.sshwrap-shell-' || true").stdout == b"0\n"


def test_timeout_stops_only_the_command(face: Face, local_sshd: LocalSSHD) -> None:
    needle = f"sleep {100 + secrets.randbelow(1000)}"
    t = time.monotonic()
    with pytest.raises(TimeoutExpired) as info:
        face.run(f"echo started; {needle}", timeout=1)
    assert time.monotonic() - t < 5
    assert info.value.stdout == b"started\n" and info.value.host == face.conn.host
    wait_until(lambda: not _remote(local_sshd, needle), 10, "the timed-out sleep to go")
    wait_until(lambda: not _remote(local_sshd, "sh -c n=0"), 10, "the killer to go")
    r = face.run("echo $$; pwd")
    assert r.stdout.split(b"\n")[0] == str(face.pid).encode()
    assert face.run("echo next").stdout == b"next\n"


def test_no_fd_leak(face: Face) -> None:
    face.run("true")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(1000):
        assert face.run("true").returncode == 0
    assert len(os.listdir("/proc/self/fd")) == before


def test_killed_shell_is_a_clear_error(face: Face) -> None:
    os.kill(face.pid, signal.SIGKILL)  # the sshd is local: the remote shell is our user's
    with pytest.raises(ShellError) as info:
        face.run("true")
    assert info.value.host == face.conn.host and "shell" in str(info.value)
    with pytest.raises(ShellError):
        face.run("true")
    assert face.conn.run("echo ok", capture_output=True).stdout == b"ok\n"


def test_builtin_loop_past_its_timeout_stops_the_shell(face: Face) -> None:
    t = time.monotonic()
    with pytest.raises(TimeoutExpired):
        face.run("while :; do :; done", timeout=0.5)  # nothing to kill but the shell
    assert time.monotonic() - t < 5  # timeout + kill_after + 2.5 s at most
    assert wait_exited([face.pid], 10) == []
    with pytest.raises(ShellError, match="did not end"):
        face.run("true")


def test_exit_ends_the_shell(face: Face) -> None:
    with pytest.raises(ShellError, match="exit status 4") as info:
        face.run("echo bye >&2; exit 4")
    assert (info.value.returncode, info.value.stderr) == (4, "bye\n")


def test_lost_master_is_a_clear_error(face: Face) -> None:
    pid = face.conn.master_pid
    os.kill(pid, signal.SIGKILL)
    assert wait_exited([pid], 10) == []
    with pytest.raises(ShellError, match="control master") as info:
        face.run("true")
    assert info.value.host == face.conn.host
    assert face.conn.run("echo ok", capture_output=True).stdout == b"ok\n"  # a new master


def test_ctrl_c_stops_only_the_command(conn: Connection, local_sshd: LocalSSHD) -> None:
    needle = f"sleep {100 + secrets.randbelow(1000)}"
    main = threading.get_ident()
    with conn.shell() as sh:
        sh.run("cd /tmp")

        sent: list[float] = []

        def ctrl_c() -> None:
            wait_until(lambda: _remote(local_sshd, needle), 30, "the remote sleep")
            sent.append(time.monotonic())
            signal.pthread_kill(main, signal.SIGINT)

        t = threading.Thread(target=ctrl_c)
        t.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                sh.run(needle)
            ended = time.monotonic()
        finally:
            t.join()
        assert ended - sent[0] < 5
        assert not _remote(local_sshd, needle)
        assert sh.run("pwd").stdout == b"/tmp\n"


def test_cancel_keeps_the_shell(conn: Connection, local_sshd: LocalSSHD) -> None:
    needle = f"sleep {100 + secrets.randbelow(1000)}"

    async def main() -> None:
        async with await AsyncConnection(conn).shell() as sh:
            await sh.run("cd /tmp")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sh.run(needle), 1)
            assert not _remote(local_sshd, needle)
            assert (await sh.run("pwd")).stdout == b"/tmp\n"

    asyncio.run(main())


def test_sshwrap_shell_owns_its_connection(local_sshd: LocalSSHD) -> None:
    with pytest.raises(ValueError, match="tty=True"):
        shell(local_sshd.host, config=local_sshd.config, tty=True)
    with shell(local_sshd.host, config=local_sshd.config) as sh:
        assert sh.connection is not None
        pid = sh.connection.master_pid
        assert sh.run("echo hi", text=True).stdout == "hi\n"
    assert sh.closed
    assert wait_exited([pid], 10) == []
    import sshwrap

    with sshwrap.shell(local_sshd.host, config=local_sshd.config) as sh2:
        assert sh2.run("echo $$").stdout == f"{sh2.pid}\n".encode()
    with pytest.raises(ShellError, match="closed"):
        sh.run("true")


def test_busy_and_bad_keywords(conn: Connection, local_sshd: LocalSSHD) -> None:
    needle = f"sleep {100 + secrets.randbelow(1000)}"
    with conn.shell() as sh:
        with pytest.raises(TypeError, match="stdout"):
            sh.run("true", stdout=subprocess.PIPE)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="program"):
            conn.shell(program="sh; rm")
        with conn.shell(program="bash") as bash:
            assert bash.run("echo ${BASH_VERSION:+bash}").stdout == b"bash\n"
        got: list[CompletedProcess] = []
        t = threading.Thread(target=lambda: got.append(sh.run(needle)))
        t.start()
        wait_until(lambda: _remote(local_sshd, needle), 30, "the remote sleep")
        with pytest.raises(RuntimeError, match="one at a time"):
            sh.run("true")
        for pid in _remote(local_sshd, needle):
            os.kill(pid, signal.SIGTERM)
        t.join(30)
        assert got[0].returncode == 128 + signal.SIGTERM
        assert sh.run("echo x").stdout == b"x\n"


def test_fallback_master_has_no_shell(local_sshd: LocalSSHD) -> None:
    with connect(local_sshd.host, config=local_sshd.config, proxy=False) as c:
        with pytest.raises(ShellError, match="proxy mode") as info:
            c.shell()
        assert info.value.host == local_sshd.host
