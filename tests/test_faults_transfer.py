"""Transfers under faults (issue 9 items 1, 2, 8): full disks, a killed master or sshd, Ctrl-C,
a raising progress callback.  Nothing may be reported as success with data lost, nothing partial
may appear under the destination's name, an old copy there survives any failure, and
KeyboardInterrupt / the callback's own exception propagate as themselves.

The sshd is local: the "remote" filesystem is this machine's, so the tests look at remote files
directly (as root) instead of asking over a connection that the test may have just killed.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faults import InProcessLeaks, cmdline, describe, freeze, leftovers, start_child, thaw, tmpfs
from faults import small_disk as small_disk  # a fixture

from sshwrap import aio, transfer
from sshwrap.connection import Connection, connect
from sshwrap.errors import SSHConnectionError
from sshwrap.testing import LocalSSHD
from sshwrap.transfer import SFTPProtocolError, TransferError

MB = 1_000_000
Progress = Callable[[int, int], None]  # a transfer's progress callback
OLD = b"the old, good copy\n" * 100
# Each failure twice: with no file at the destination, and with an old copy there to keep.
OLD_OR_NOT = pytest.mark.parametrize("old", [False, True], ids=["no-old-copy", "old-copy"])


@pytest.fixture
def conn(local_sshd: LocalSSHD) -> Iterator[Connection]:
    """A Connection of its own (tests here kill masters)."""
    with connect(local_sshd.host, config=local_sshd.config) as c:
        yield c


@pytest.fixture
def remote_dir(local_sshd: LocalSSHD) -> Iterator[Path]:
    """A directory the remote user owns (on this machine), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="sshwrap-remote-"))
    os.chmod(d, 0o755)
    os.chown(d, *_uid_gid(local_sshd.user))
    yield d
    subprocess.run(["rm", "-rf", "--", str(d)], check=False, timeout=60)


def _uid_gid(user: str) -> tuple[int, int]:
    import pwd

    e = pwd.getpwnam(user)
    return e.pw_uid, e.pw_gid


def _remote_file(local_sshd: LocalSSHD, path: Path, size: int) -> None:
    """A file of ``size`` random bytes owned by the remote user."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
    os.chown(path, *_uid_gid(local_sshd.user))
    os.chmod(path, 0o644)


def _get_setup(
    local_sshd: LocalSSHD, remote_dir: Path, tmp_path: Path, size: int, old: bool
) -> tuple[Path, Path]:
    """(source, destination) of a get: a remote file of ``size`` random bytes, and a path in a
    fresh local directory (holding the old copy if ``old``)."""
    src = remote_dir / "big.bin"
    _remote_file(local_sshd, src, size)
    dst = tmp_path / "out" / "big.bin"
    dst.parent.mkdir()
    if old:
        _old_copy(dst)
    return src, dst


def _old_copy(path: Path, owner: tuple[int, int] | None = None) -> None:
    path.write_bytes(OLD)
    os.chmod(path, 0o640)
    if owner is not None:
        os.chown(path, *owner)


def _assert_old_copy(path: Path) -> None:
    assert path.read_bytes() == OLD
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def _assert_old_copy_or_none(path: Path, old: bool) -> None:
    """After a failure: the old copy intact if there was one, else nothing under ``path``."""
    if old:
        _assert_old_copy(path)
    else:
        assert not path.exists()


def _temps(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if ".sshwrap-" in n]


# -- item 1: full disks -------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1_100_000, 3 * MB])
@OLD_OR_NOT
def test_get_into_a_full_disk_raises_enospc(
    conn: Connection,
    local_sshd: LocalSSHD,
    remote_dir: Path,
    small_disk: Path,
    size: int,
    old: bool,
) -> None:
    src = remote_dir / "big.bin"
    _remote_file(local_sshd, src, size)
    dst = small_disk / "big.bin"
    if old:
        _old_copy(dst)
    conn.ssh_args()  # (the master is up before the snapshot)
    with InProcessLeaks() as leaks:
        with pytest.raises(OSError) as info:
            conn.get(str(src), dst)
        leaks.assert_clean(2)  # the session is closed and its ssh reaped
    err = info.value
    assert err.errno == errno.ENOSPC, repr(err)
    assert "No space left on device" in str(err) and str(dst) in str(err)
    _assert_old_copy_or_none(dst, old)
    assert _temps(small_disk) == []


def test_put_to_a_full_remote_disk_raises_with_the_sftp_status(
    conn: Connection, local_sshd: LocalSSHD, tmp_path: Path
) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 * MB))
    with tmpfs("1m", mode=0o777) as disk:
        final = disk / "big.bin"
        _old_copy(final, _uid_gid(local_sshd.user))
        with pytest.raises(TransferError) as info:
            conn.put(src, str(final))
        msg = str(info.value)
        assert "SSH_FX_FAILURE" in msg and "No space left on device" in msg, msg
        assert str(final) in msg
        _assert_old_copy(final)
        assert _temps(disk) == []  # the connection lives: the temporary file was removed
        final.unlink()
        with pytest.raises(TransferError):
            conn.put(src, str(final))
        assert os.listdir(disk) == []


# -- item 2: the master or sshd killed mid-transfer -----------------------------------------------
def _victim(kind: str, conn: Connection, local_sshd: LocalSSHD, before: set[int]) -> int:
    """The pid to SIGKILL: the master, the server's sftp process (the one that is new since
    ``before``), or the server's process of the whole connection (that one's parent)."""
    if kind == "master":
        return conn.master_pid
    sftp = [
        p for p in local_sshd.session_pids() if p not in before and b"internal-sftp" in cmdline(p)
    ]
    assert len(sftp) == 1, f"not one new internal-sftp process: {describe(sftp)}"
    pid = sftp[0]
    if kind == "sftp-server":
        return pid
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _killer(pid_of: Callable[[], int]) -> Callable[[int, int], None]:
    """A progress callback that SIGKILLs ``pid_of()`` once bytes are moving."""
    done = False

    def progress(n: int, total: int) -> None:
        nonlocal done
        if n and not done:
            done = True
            os.kill(pid_of(), signal.SIGKILL)

    return progress


def _killed_mid_transfer(
    victim: str,
    conn: Connection,
    local_sshd: LocalSSHD,
    move: Callable[[Progress], object],
) -> Exception:
    """``move(progress)`` (a get or put) with ``victim`` SIGKILLed once bytes are moving: the
    error it raised (an ``SSHConnectionError`` when the master was killed)."""
    conn.ssh_args()  # (the master is up)
    before = set(local_sshd.session_pids())
    kill = _killer(lambda: _victim(victim, conn, local_sshd, before))
    with pytest.raises((SSHConnectionError, TransferError)) as info:
        move(kill)
    if victim == "master":
        assert type(info.value) is SSHConnectionError, repr(info.value)
    return info.value


VICTIMS = ["master", "sftp-server", "sshd-connection"]


@pytest.mark.parametrize("victim", VICTIMS)
@OLD_OR_NOT
def test_get_when_the_connection_dies(
    conn: Connection,
    local_sshd: LocalSSHD,
    remote_dir: Path,
    tmp_path: Path,
    victim: str,
    old: bool,
) -> None:
    src, dst = _get_setup(local_sshd, remote_dir, tmp_path, 50 * MB, old)
    err = _killed_mid_transfer(
        victim, conn, local_sshd, lambda kill: conn.get(str(src), dst, progress=kill)
    )
    assert "said nothing" not in str(err) or "connection ended" in str(err)
    _assert_old_copy_or_none(dst, old)
    assert os.listdir(dst.parent) == ([dst.name] if old else [])


@pytest.mark.parametrize("victim", VICTIMS)
@OLD_OR_NOT
def test_put_when_the_connection_dies(
    conn: Connection,
    local_sshd: LocalSSHD,
    remote_dir: Path,
    tmp_path: Path,
    victim: str,
    old: bool,
) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(50 * MB))
    final = remote_dir / "big.bin"
    if old:
        _old_copy(final, _uid_gid(local_sshd.user))
    _killed_mid_transfer(
        victim, conn, local_sshd, lambda kill: conn.put(src, str(final), progress=kill)
    )
    _assert_old_copy_or_none(final, old)
    # (the remote temporary file may remain: the link that would remove it is dead)
    assert [n for n in os.listdir(remote_dir) if ".sshwrap-" not in n] == (
        [final.name] if old else []
    )


# -- item 8: Ctrl-C and the progress callback -----------------------------------------------------
class Boom(Exception):
    pass


def _raiser(exc: BaseException) -> Callable[[int, int], None]:
    def progress(n: int, total: int) -> None:
        if n:
            raise exc

    return progress


def _raises_itself(exc: BaseException, move: Callable[[Progress], object]) -> None:
    """``move(progress)`` with a callback raising ``exc``: ``exc`` itself, nothing left."""
    with InProcessLeaks() as leaks:
        with pytest.raises(type(exc)) as info:
            move(_raiser(exc))
        assert info.value is exc
        leaks.assert_clean(2)


@pytest.mark.parametrize("exc", [Boom("from the callback"), KeyboardInterrupt()])
@OLD_OR_NOT
def test_callback_exception_propagates_as_itself(
    conn: Connection,
    local_sshd: LocalSSHD,
    remote_dir: Path,
    tmp_path: Path,
    exc: BaseException,
    old: bool,
) -> None:
    src, dst = _get_setup(local_sshd, remote_dir, tmp_path, 20 * MB, old)
    conn.ssh_args()  # (the master is up before the snapshot)
    _raises_itself(exc, lambda progress: conn.get(str(src), dst, progress=progress))
    _assert_old_copy_or_none(dst, old)
    assert os.listdir(dst.parent) == ([dst.name] if old else [])

    # and the other way
    local = tmp_path / "up.bin"
    local.write_bytes(os.urandom(20 * MB))
    final = remote_dir / "up.bin"
    if old:
        _old_copy(final, _uid_gid(local_sshd.user))
    _raises_itself(exc, lambda progress: conn.put(local, str(final), progress=progress))
    _assert_old_copy_or_none(final, old)
    assert _temps(remote_dir) == []  # the link lives: the temporary file was removed


CTRL_C_CHILD = """
import os, sys, time
from sshwrap.connection import connect
host, config, op, src, dst = sys.argv[1:]
with connect(host, config=config) as c:
    said = False
    def progress(n, total):
        global said
        if n and not said:
            said = True
            sys.stdout.write("MOVING\\n")  # one write: a SIGINT cannot land inside the line
            sys.stdout.flush()
    try:
        if op == "get":
            c.get(src, dst, progress=progress)
        else:
            c.put(src, dst, progress=progress)
        print("COMPLETED", flush=True)
    except KeyboardInterrupt as e:
        print("KI", time.monotonic(), type(e).__name__, repr(e.__context__), flush=True)
    except BaseException as e:
        print("OTHER", repr(e), flush=True)
    def parent(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return 0
    kids = [p for p in os.listdir("/proc") if p.isdigit() and parent(p) == os.getpid()]
    print("SESSIONS", [p for p in kids if p != str(c.master_pid)], flush=True)
print("EXITED", flush=True)
"""


def _sparse(path: Path, size: int) -> None:
    """A sparse file: quick to make and to read, still ``size`` bytes to send."""
    with open(path, "wb") as f:
        f.truncate(size)
    os.chmod(path, 0o644)


def _abortable_setup(
    op: str, local_sshd: LocalSSHD, remote_dir: Path, tmp_path: Path
) -> tuple[Path, Path]:
    """(source, destination) of a 400 MB transfer; the destination holds an old copy."""
    if op == "get":
        src = remote_dir / "big.bin"
        _sparse(src, 400 * MB)
        os.chown(src, *_uid_gid(local_sshd.user))
        dst = tmp_path / "out" / "big.bin"
        dst.parent.mkdir()
        _old_copy(dst)
    else:
        src = tmp_path / "big.bin"
        _sparse(src, 400 * MB)
        dst = remote_dir / "big.bin"
        _old_copy(dst, _uid_gid(local_sshd.user))
    return src, dst


@pytest.mark.parametrize("op", ["get", "put"])
@pytest.mark.parametrize("stalled", [False, True], ids=["moving", "stalled"])
def test_ctrl_c_during_a_transfer(
    local_sshd: LocalSSHD, remote_dir: Path, tmp_path: Path, op: str, stalled: bool
) -> None:
    """SIGINT once bytes move (and, stalled: once the server is frozen mid-transfer too):
    KeyboardInterrupt within ~1 s, nothing under the destination, no process left."""
    src, dst = _abortable_setup(op, local_sshd, remote_dir, tmp_path)
    code = CTRL_C_CHILD.replace(
        "sys.argv[1:]", repr([local_sshd.host, local_sshd.config, op, str(src), str(dst)])
    )
    frozen: list[int] = []
    with start_child(textwrap.dedent(code)) as child:
        try:
            child.wait_line("MOVING", 60)
            if stalled:
                frozen = freeze(local_sshd)
            sent = time.monotonic()
            child.send_signal(signal.SIGINT)
            child.wait_line("SESSIONS", 10)
        finally:
            if frozen:
                thaw(local_sshd, frozen)
        child.wait(60)
        out = child.stdout
        assert "COMPLETED" not in out, "the transfer ended before the signal: make it longer"
        ki = [ln for ln in out.splitlines() if ln.startswith("KI ")]
        assert ki, out + child.stderr
        elapsed = float(ki[0].split()[1]) - sent
        print(f"KeyboardInterrupt {elapsed:.3f} s after SIGINT")
        assert elapsed < 1.5, f"KeyboardInterrupt {elapsed:.2f} s after SIGINT"
        assert "SESSIONS []" in out, out
        assert "EXITED" in out
        left = leftovers(child.mark)
        assert left == [], describe(left)
    _assert_old_copy(dst)
    if op == "get":
        assert os.listdir(dst.parent) == [dst.name]


# -- the async face: the same code, the same guarantees ---------------------------------------
def test_async_get_put_same_guarantees(
    local_sshd: LocalSSHD, remote_dir: Path, small_disk: Path, tmp_path: Path
) -> None:
    src = remote_dir / "big.bin"
    _remote_file(local_sshd, src, 3 * MB)
    dst = small_disk / "big.bin"
    _old_copy(dst)
    boom = Boom("async callback")

    async def main() -> None:
        async with await aio.connect(local_sshd.host, config=local_sshd.config) as c:
            with pytest.raises(OSError) as info:
                await c.get(str(src), dst)
            assert info.value.errno == errno.ENOSPC and str(dst) in str(info.value)
            _assert_old_copy(dst)
            out = tmp_path / "out.bin"
            with pytest.raises(Boom) as binfo:
                await c.get(str(src), out, progress=_raiser(boom))
            assert binfo.value is boom and not out.exists()
            final = remote_dir / "up.bin"
            with pytest.raises(Boom):
                await c.put(src, str(final), progress=_raiser(boom))
            assert not final.exists() and _temps(remote_dir) == []

    asyncio.run(main())
    assert _temps(small_disk) == []


@pytest.mark.parametrize("op", ["get", "put"])
@pytest.mark.parametrize("stalled", [False, True], ids=["moving", "stalled"])
def test_cancelling_an_async_transfer_stops_it(
    conn: Connection,
    local_sshd: LocalSSHD,
    remote_dir: Path,
    tmp_path: Path,
    op: str,
    stalled: bool,
) -> None:
    """``to_thread_abortable``: cancelling the task stops the transfer in its thread within
    ~1 s (also against a frozen server); it does not complete later in the background."""
    src, dst = _abortable_setup(op, local_sshd, remote_dir, tmp_path)
    args = conn.ssh_args()
    frozen: list[int] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()
        moving = asyncio.Event()

        def progress(n: int, total: int) -> None:
            if n:
                loop.call_soon_threadsafe(moving.set)

        def work(abort: transfer.Abort) -> None:
            d, a = conn.destination, args
            if op == "get":
                transfer.get(
                    str(src), dst, destination=d, ssh_args=a, progress=progress, abort=abort
                )
            else:
                transfer.put(
                    src, str(dst), destination=d, ssh_args=a, progress=progress, abort=abort
                )

        task = asyncio.ensure_future(transfer.to_thread_abortable(work))
        await moving.wait()
        if stalled:
            frozen.extend(freeze(local_sshd))
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    with InProcessLeaks() as leaks:
        try:
            elapsed = asyncio.run(main())
        finally:
            if frozen:
                thaw(local_sshd, frozen)
        leaks.assert_clean(2)  # the worker thread, the ssh, the socket: all gone
    print(f"cancelled in {elapsed:.3f} s")
    assert elapsed < 1.5, f"cancel took {elapsed:.2f} s"
    _assert_old_copy(dst)
    if op == "get":
        assert os.listdir(dst.parent) == [dst.name]
    elif not stalled:  # the cut session's temporary file, removed through a fresh session
        assert _temps(remote_dir) == []


def test_cancelling_async_connection_get_stops_it(
    local_sshd: LocalSSHD, remote_dir: Path, tmp_path: Path
) -> None:
    """The async face itself (needs ``Connection.get(..., abort=)`` wired through
    ``to_thread_abortable`` in ``AsyncConnection.get``)."""
    if "abort" not in inspect.signature(Connection.get).parameters:
        pytest.skip("Connection.get has no abort= yet (AsyncConnection cannot stop its thread)")
    src, dst = _abortable_setup("get", local_sshd, remote_dir, tmp_path)

    async def main() -> float:
        async with await aio.connect(local_sshd.host, config=local_sshd.config) as c:
            loop = asyncio.get_running_loop()
            moving = asyncio.Event()

            def progress(n: int, total: int) -> None:
                if n:
                    loop.call_soon_threadsafe(moving.set)

            task = asyncio.ensure_future(c.get(str(src), dst, progress=progress))
            await moving.wait()
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            elapsed = time.monotonic() - t0
            # the Connection stays up: a transfer still running would land its file now
            assert await c.alive()
            _assert_old_copy(dst)
            assert os.listdir(dst.parent) == [dst.name]
            return elapsed

    assert asyncio.run(main()) < 1.5


# -- a server whose replies break the protocol ------------------------------------------------
TAMPER = r"""
import os, struct, subprocess, sys, threading
MODE = {mode!r}
p = subprocess.Popen(["ssh", *sys.argv[1:]], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
def up():
    while b := os.read(0, 65536):
        p.stdin.write(b)
        p.stdin.flush()
    p.stdin.close()
threading.Thread(target=up, daemon=True).start()
def readn(k):
    buf = b""
    while len(buf) < k:
        c = p.stdout.read(k - len(buf))
        if not c:
            sys.exit(p.wait())
        buf += c
    return buf
n = 0
while True:
    (ln,) = struct.unpack(">I", readn(4))
    body = readn(ln)
    if body[0] == 103:  # SSH_FXP_DATA: type, id, string data
        n += 1
        if n == 3:
            rid, dlen = struct.unpack_from(">II", body, 1)
            data = body[9:]
            if MODE == "wrong-id":
                body = body[:1] + struct.pack(">I", (rid + 7777) & 0xFFFFFFFF) + body[5:]
            elif MODE == "truncated":
                body = body[:9] + data[:100]  # the string claims more than the packet holds
            elif MODE == "short":
                data = data[: len(data) // 3]
                body = body[:1] + struct.pack(">II", rid, len(data)) + data
    os.write(1, struct.pack(">I", len(body)) + body)
"""


@pytest.mark.parametrize("mode", ["wrong-id", "truncated", "short"])
def test_replies_that_break_the_protocol(
    conn: Connection, local_sshd: LocalSSHD, remote_dir: Path, tmp_path: Path, mode: str
) -> None:
    """A relay between ssh and sshwrap alters the third data reply: a reply to a request never
    sent and a truncated reply are ``SFTPProtocolError`` (nothing written under the final name,
    the old copy intact); a short read (legal) is completed by asking for the rest."""
    src = remote_dir / "data.bin"
    _remote_file(local_sshd, src, 5 * MB)
    relay = tmp_path / "ssh-relay.py"
    relay.write_text(TAMPER.replace("{mode!r}", repr(mode)))
    fake = tmp_path / "ssh-relay"
    # sh, not a #! line naming the interpreter: its path may hold spaces (a checkout's venv)
    fake.write_text("#!/bin/sh\nexec " + shlex.join([sys.executable, str(relay)]) + ' "$@"\n')
    fake.chmod(0o755)
    dst = tmp_path / "out" / "data.bin"
    dst.parent.mkdir()
    _old_copy(dst)
    args = conn.ssh_args()
    with InProcessLeaks() as leaks:
        if mode == "short":
            transfer.get(str(src), dst, destination=conn.destination, ssh_args=args, ssh=str(fake))
        else:
            with pytest.raises(SFTPProtocolError) as info:
                transfer.get(
                    str(src), dst, destination=conn.destination, ssh_args=args, ssh=str(fake)
                )
            assert ("never sent" if mode == "wrong-id" else "malformed") in str(info.value)
        leaks.assert_clean(5)
    if mode == "short":
        assert dst.read_bytes() == src.read_bytes()
    else:
        _assert_old_copy(dst)
    assert _temps(dst.parent) == []


def test_recursive_copies_are_atomic_per_file(
    conn: Connection, local_sshd: LocalSSHD, remote_dir: Path, small_disk: Path, tmp_path: Path
) -> None:
    """A tree whose second file does not fit: the first arrives whole, the second not at all
    (both ways)."""
    tree = remote_dir / "tree"
    tree.mkdir()
    os.chown(tree, *_uid_gid(local_sshd.user))
    _remote_file(local_sshd, tree / "a.bin", 100_000)
    _remote_file(local_sshd, tree / "b.bin", 3 * MB)
    with pytest.raises(OSError) as info:
        conn.get(str(tree), small_disk)
    assert info.value.errno == errno.ENOSPC
    assert (small_disk / "tree" / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
    assert sorted(os.listdir(small_disk / "tree")) == ["a.bin"]

    local = tmp_path / "tree"
    local.mkdir()
    (local / "a.bin").write_bytes(os.urandom(100_000))
    (local / "b.bin").write_bytes(os.urandom(3 * MB))
    with tmpfs("1m", mode=0o777) as disk:
        with pytest.raises(TransferError) as terr:
            conn.put(local, str(disk))
        assert "No space left on device" in str(terr.value)
        assert (disk / "tree" / "a.bin").read_bytes() == (local / "a.bin").read_bytes()
        assert sorted(os.listdir(disk / "tree")) == ["a.bin"]
