"""sshwrap.filesystem: the fsspec filesystem, against a real sshd (fsspec's own abstract
test suite, then what it does not cover)."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import pathlib
import posixpath
import signal
import threading
import time
from collections.abc import Callable, Iterator

import fsspec  # type: ignore[import-untyped]
import pytest
from faults import cmdline, freeze, frozen, thaw
from fsspec.callbacks import Callback  # type: ignore[import-untyped]
from fsspec.tests.abstract import (  # type: ignore[import-untyped]
    AbstractCopyTests,
    AbstractFixtures,
    AbstractGetTests,
    AbstractOpenTests,
    AbstractPipeTests,
    AbstractPutTests,
)
from waiting import wait_until

from sshwrap.errors import SSHConnectionError
from sshwrap.filesystem import SSHWrapFileSystem
from sshwrap.io.sftp_session import SFTPTimeout
from sshwrap.testing import LocalSSHD, descendants, wait_exited

# Until the entry point in pyproject.toml is installed.
fsspec.register_implementation("sshwrap", SSHWrapFileSystem, clobber=True)


def _filesystem(sshd: LocalSSHD) -> SSHWrapFileSystem:
    fs = fsspec.filesystem("sshwrap", host=sshd.host, config=sshd.config)
    assert isinstance(fs, SSHWrapFileSystem)
    return fs


@pytest.fixture(scope="module")
def sfs(local_sshd: LocalSSHD) -> Iterator[SSHWrapFileSystem]:
    fs = _filesystem(local_sshd)
    yield fs
    fs.connection.close()  # (fsspec's cache keeps it: its ssh children would outlive the module)


@pytest.fixture
def rdir(sfs: SSHWrapFileSystem) -> Iterator[str]:
    path = sfs.connection.check_output("mktemp -d", text=True).strip()
    yield path
    sfs.connection.run(["rm", "-rf", "--", path])


class SSHWrapFixtures(AbstractFixtures):  # type: ignore[misc]
    """The fixtures fsspec's abstract tests take: a remote temporary directory per test."""

    @pytest.fixture
    def fs(self, sfs: SSHWrapFileSystem) -> SSHWrapFileSystem:
        return sfs

    @pytest.fixture
    def fs_join(self) -> Callable[..., str]:
        return posixpath.join

    @pytest.fixture
    def fs_path(self, rdir: str) -> str:
        return rdir


class TestSSHWrapCopy(SSHWrapFixtures, AbstractCopyTests):  # type: ignore[misc]
    pass


class TestSSHWrapGet(SSHWrapFixtures, AbstractGetTests):  # type: ignore[misc]
    pass


class TestSSHWrapPut(SSHWrapFixtures, AbstractPutTests):  # type: ignore[misc]
    pass


class TestSSHWrapOpen(SSHWrapFixtures, AbstractOpenTests):  # type: ignore[misc]
    pass


class TestSSHWrapPipe(SSHWrapFixtures, AbstractPipeTests):  # type: ignore[misc]
    pass


# -- beyond fsspec's suite ---------------------------------------------------------------------
def test_url_form(local_sshd: LocalSSHD, sfs: SSHWrapFileSystem, rdir: str) -> None:
    assert SSHWrapFileSystem._strip_protocol("sshwrap://h/a/b/") == "/a/b"
    assert SSHWrapFileSystem._strip_protocol("sshwrap://h/") == "/"
    assert SSHWrapFileSystem._get_kwargs_from_urls("sshwrap://u@h:2222/x") == {
        "host": "h",
        "user": "u",
        "port": 2222,
    }
    sfs.pipe_file(f"{rdir}/u.txt", b"by url")
    url = f"sshwrap://{local_sshd.host}{rdir}/u.txt"
    with fsspec.open(url, "rb", config=local_sshd.config) as f:
        assert f.read() == b"by url"
    fs, path = fsspec.core.url_to_fs(url, config=local_sshd.config)
    assert fs is sfs  # fsspec's instance cache: the same filesystem for the same settings
    assert path == f"{rdir}/u.txt"


def test_instances_share_one_master(local_sshd: LocalSSHD, sfs: SSHWrapFileSystem) -> None:
    other = SSHWrapFileSystem(
        host=local_sshd.host, config=local_sshd.config, skip_instance_cache=True
    )
    assert other is not sfs
    assert other.connection is sfs.connection
    with pytest.raises(TypeError, match="colour"):
        SSHWrapFileSystem(host=local_sshd.host, colour="red")


def test_listing_and_info(sfs: SSHWrapFileSystem, rdir: str) -> None:
    sfs.pipe_file(f"{rdir}/a/one.txt", b"1")
    sfs.pipe_file(f"{rdir}/a/b/two.bin", b"22")
    sfs.connection.check_call(["ln", "-s", "a/one.txt", f"{rdir}/link"])
    assert sfs.ls(rdir, detail=False) == [f"{rdir}/a", f"{rdir}/link"]
    entries = {e["name"]: e for e in sfs.ls(f"{rdir}/a")}
    assert entries[f"{rdir}/a/b"]["type"] == "directory"
    assert entries[f"{rdir}/a/one.txt"]["type"] == "file"
    assert entries[f"{rdir}/a/one.txt"]["size"] == 1
    link = sfs.info(f"{rdir}/link")
    assert (link["type"], link["size"], link["islink"]) == ("file", 1, True)
    assert sfs.ls(f"{rdir}/a/one.txt", detail=False) == [f"{rdir}/a/one.txt"]
    assert sfs.exists(f"{rdir}/a") and not sfs.exists(f"{rdir}/nope")
    assert sfs.isdir(f"{rdir}/a/b") and not sfs.isdir(f"{rdir}/a/one.txt")
    assert sfs.isfile(f"{rdir}/a/b/two.bin") and not sfs.isfile(f"{rdir}/a")
    assert sfs.find(rdir) == [f"{rdir}/a/b/two.bin", f"{rdir}/a/one.txt", f"{rdir}/link"]
    assert sfs.glob(f"{rdir}/a/**/*.bin") == [f"{rdir}/a/b/two.bin"]
    assert [(d, sorted(fs)) for d, _, fs in sfs.walk(f"{rdir}/a")] == [
        (f"{rdir}/a", ["one.txt"]),
        (f"{rdir}/a/b", ["two.bin"]),
    ]
    assert sfs.du(f"{rdir}/a", withdirs=False) == 3
    before = sfs.ukey(f"{rdir}/a/one.txt")
    assert sfs.modified(f"{rdir}/a/one.txt").tzinfo is not None
    sfs.connection.check_call(["touch", "-d", "2001-01-01", f"{rdir}/a/one.txt"])
    assert sfs.modified(f"{rdir}/a/one.txt").year == 2001
    assert sfs.ukey(f"{rdir}/a/one.txt") != before
    assert sfs.checksum(f"{rdir}/a/one.txt") == int(sfs.ukey(f"{rdir}/a/one.txt"), 16)


def test_errors_are_pythons_with_the_path(sfs: SSHWrapFileSystem, rdir: str) -> None:
    sfs.pipe_file(f"{rdir}/f", b"x")
    sfs.pipe_file(f"{rdir}/d/inner", b"y")
    cases: list[tuple[type[OSError], Callable[[], object], str]] = [
        (FileNotFoundError, lambda: sfs.info(f"{rdir}/missing"), "missing"),
        (FileNotFoundError, lambda: sfs.ls(f"{rdir}/missing"), "missing"),
        (FileNotFoundError, lambda: sfs.cat_file(f"{rdir}/missing"), "missing"),
        (FileNotFoundError, lambda: sfs.open(f"{rdir}/missing", "rb"), "missing"),
        (FileNotFoundError, lambda: sfs.rm(f"{rdir}/missing"), "missing"),
        (FileNotFoundError, lambda: sfs.rm_file(f"{rdir}/missing"), "missing"),
        (IsADirectoryError, lambda: sfs.cat_file(f"{rdir}/d"), "d"),
        (IsADirectoryError, lambda: sfs.open(f"{rdir}/d", "rb"), "d"),
        (IsADirectoryError, lambda: sfs.pipe_file(f"{rdir}/d", b"z"), "d"),
        (FileExistsError, lambda: sfs.mkdir(f"{rdir}/d"), "d"),
        (FileExistsError, lambda: sfs.makedirs(f"{rdir}/f", exist_ok=True), "f"),
        (FileExistsError, lambda: sfs.open(f"{rdir}/f", "xb"), "f"),
        (NotADirectoryError, lambda: sfs.mkdir(f"{rdir}/f/sub", create_parents=False), "sub"),
        (NotADirectoryError, lambda: sfs.rmdir(f"{rdir}/f"), "f"),
        (FileNotFoundError, lambda: sfs.mkdir(f"{rdir}/no/sub", create_parents=False), "sub"),
    ]
    for cls, call, name in cases:
        with pytest.raises(cls) as info:
            call()
        assert name in str(info.value), (cls, info.value)
    with pytest.raises(OSError) as info:
        sfs.rmdir(f"{rdir}/d")
    assert info.value.errno == errno.ENOTEMPTY
    sfs.connection.check_call(["chmod", "0", f"{rdir}/d"])
    try:
        with pytest.raises(PermissionError, match=r"/d"):
            sfs.ls(f"{rdir}/d")
        with pytest.raises(PermissionError):
            sfs.cat_file(f"{rdir}/d/inner")
    finally:
        sfs.connection.check_call(["chmod", "700", f"{rdir}/d"])


def test_ranges_and_random_access(sfs: SSHWrapFileSystem, rdir: str) -> None:
    data = os.urandom(3_000_000)
    sfs.pipe_file(f"{rdir}/big", data)
    assert sfs.cat_file(f"{rdir}/big") == data
    for start, end in [
        (0, 10),
        (1_000_000, 2_500_000),
        (-100, None),
        (-100, -10),
        (2_999_990, 4_000_000),
        (None, 5),
        (10, 10),
    ]:
        assert sfs.cat_file(f"{rdir}/big", start=start, end=end) == data[start:end], (start, end)
    with sfs.open(f"{rdir}/big", "rb", block_size=65536) as f:
        f.seek(2_000_000)
        assert f.read(4096) == data[2_000_000:2_004_096]
        f.seek(10)
        assert f.read(5) == data[10:15]
        f.seek(-3, 2)
        assert f.read() == data[-3:]


def test_writes_are_atomic_and_keep_the_mode(sfs: SSHWrapFileSystem, rdir: str) -> None:
    target = f"{rdir}/w.bin"
    sfs.pipe_file(target, b"old")
    sfs.connection.check_call(["chmod", "640", target])
    big = os.urandom(7 << 20)  # more than a block: a chunk goes out before close
    with sfs.open(target, "wb", block_size=1 << 20) as f:
        f.write(big)
        f.flush()
        assert sfs.cat_file(target) == b"old"  # the target untouched until close
        assert any(".sshwrap-" in n for n in sfs.ls(rdir, detail=False))
    assert sfs.cat_file(target) == big
    assert sfs.ls(rdir, detail=False) == [target]  # no temporary file left
    assert sfs.info(target)["mode"] & 0o777 == 0o640
    with sfs.open(target, "ab") as f:
        f.write(b"tail")
    assert sfs.cat_file(target) == big + b"tail"
    assert sfs.info(target)["mode"] & 0o777 == 0o640
    with sfs.transaction:
        with sfs.open(target, "wb") as f:
            f.write(b"in a transaction")
        assert sfs.cat_file(target) == big + b"tail"
    assert sfs.cat_file(target) == b"in a transaction"
    sfs.touch(f"{rdir}/new/empty")
    assert sfs.cat_file(f"{rdir}/new/empty") == b""


def test_remote_copy_move_and_remove(sfs: SSHWrapFileSystem, rdir: str) -> None:
    sfs.pipe_file(f"{rdir}/src/a.txt", b"A")
    sfs.pipe_file(f"{rdir}/src/sub/b.txt", b"B")
    sfs.connection.check_call(["touch", "-d", "2001-01-01", f"{rdir}/src/a.txt"])
    sfs.cp_file(f"{rdir}/src/a.txt", f"{rdir}/copy/a.txt")
    assert sfs.cat_file(f"{rdir}/copy/a.txt") == b"A"
    assert sfs.modified(f"{rdir}/copy/a.txt").year == 2001  # cp -p: on the remote side
    sfs.mv(f"{rdir}/copy/a.txt", f"{rdir}/moved.txt")
    assert sfs.cat_file(f"{rdir}/moved.txt") == b"A" and not sfs.exists(f"{rdir}/copy/a.txt")
    sfs.mv(f"{rdir}/moved.txt", f"{rdir}/copy")  # into an existing directory
    assert sfs.cat_file(f"{rdir}/copy/moved.txt") == b"A"
    sfs.mv(f"{rdir}/src", f"{rdir}/dst", recursive=True)
    assert sfs.find(f"{rdir}/dst") == [f"{rdir}/dst/a.txt", f"{rdir}/dst/sub/b.txt"]
    sfs.rm(f"{rdir}/dst", recursive=True)
    assert not sfs.exists(f"{rdir}/dst")
    sfs.rm(f"{rdir}/copy/moved.txt")
    sfs.rmdir(f"{rdir}/copy")
    assert sfs.ls(rdir) == []


def test_pandas_round_trip(local_sshd: LocalSSHD, sfs: SSHWrapFileSystem, rdir: str) -> None:
    pd = pytest.importorskip("pandas", reason="pandas is a test-only extra")
    pytest.importorskip("pyarrow", reason="pyarrow is a test-only extra")
    df = pd.DataFrame({"n": [1, 2, 3], "s": ["x", "y", "z"], "f": [0.5, 1.5, 2.5]})
    options = {"config": local_sshd.config}
    base = f"sshwrap://{local_sshd.host}{rdir}"
    df.to_csv(f"{base}/m.csv", index=False, storage_options=options)
    assert pd.read_csv(f"{base}/m.csv", storage_options=options).equals(df)
    df.to_parquet(f"{base}/m.parquet", storage_options=options)
    assert pd.read_parquet(f"{base}/m.parquet", storage_options=options).equals(df)
    assert sfs.ls(rdir, detail=False) == [f"{rdir}/m.csv", f"{rdir}/m.parquet"]


class _KillOnFirstBytes(Callback):  # type: ignore[misc]
    """An fsspec callback that SIGKILLs ``pid`` once bytes are moving."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.killed = False

    def relative_update(self, inc: int = 1) -> None:
        if inc and not self.killed:
            self.killed = True
            os.kill(self.pid, signal.SIGKILL)


def test_master_killed_mid_transfer(
    sfs: SSHWrapFileSystem, rdir: str, tmp_path: pathlib.Path
) -> None:
    """put_file/get_file with the master SIGKILLed mid-transfer: SSHConnectionError, nothing
    at the destination (the target untouched), and the next call works on a new master."""
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(50 << 20))
    sfs.pipe_file(f"{rdir}/keep", b"old")
    kill = _KillOnFirstBytes(sfs.connection.master_pid)
    with pytest.raises(SSHConnectionError):
        sfs.put_file(str(src), f"{rdir}/keep", callback=kill)
    assert kill.killed
    assert sfs.cat_file(f"{rdir}/keep") == b"old"  # (a new master)
    sfs.connection.check_call(f"head -c 50000000 /dev/urandom > {rdir}/remote.bin")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep").write_bytes(b"local")
    kill = _KillOnFirstBytes(sfs.connection.master_pid)
    with pytest.raises(SSHConnectionError):
        sfs.get_file(f"{rdir}/remote.bin", str(tmp_path / "dst" / "keep"), callback=kill)
    assert kill.killed
    assert sorted(os.listdir(tmp_path / "dst")) == ["keep"]  # no partial or temporary file
    assert (tmp_path / "dst" / "keep").read_bytes() == b"local"
    sfs.get_file(f"{rdir}/remote.bin", str(tmp_path / "dst" / "keep"))
    assert (tmp_path / "dst" / "keep").stat().st_size == 50_000_000


def test_many_threads_share_a_bounded_pool(
    local_sshd_factory: Callable[..., LocalSSHD],
) -> None:
    """16 threads at once over one filesystem with ``pool_size=2``: all succeed, and the
    server never had more than 2 SFTP sessions (they stay open, idle, in the pool: every
    session ever opened at once is still there to count)."""
    sshd = local_sshd_factory()
    fs = SSHWrapFileSystem(host=sshd.host, config=sshd.config, pool_size=2)
    try:
        rdir = fs.connection.check_output("mktemp -d", text=True).strip()
        blobs = {f"{rdir}/f{i}": os.urandom(200_000 + i) for i in range(16)}
        errors: list[BaseException] = []
        start = threading.Barrier(len(blobs))

        def work(path: str, data: bytes) -> None:
            try:
                start.wait(30)
                fs.pipe_file(path, data)
                for _ in range(3):
                    assert fs.cat_file(path) == data
                    assert fs.cat_file(path, start=1000, end=2000) == data[1000:2000]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=item) for item in blobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert sorted(fs.ls(rdir, detail=False)) == sorted(blobs)
        sftp = [p for p in sshd.session_pids() if b"internal-sftp" in cmdline(p)]
        assert 1 <= len(sftp) <= 2, sftp
    finally:
        fs.connection.close()


def test_the_master_goes_with_the_last_instance(local_sshd: LocalSSHD) -> None:
    fs = SSHWrapFileSystem(
        host=local_sshd.host, config=local_sshd.config, pool_size=1, skip_instance_cache=True
    )
    again = SSHWrapFileSystem(
        host=local_sshd.host, config=local_sshd.config, pool_size=1, skip_instance_cache=True
    )
    assert fs.ls("/", detail=False) and again.connection is fs.connection
    pid = fs.connection.master_pid
    del fs
    gc.collect()
    assert wait_exited([pid], 0.5) == [pid]  # another instance still uses it
    del again
    gc.collect()
    assert wait_exited([pid], 30) == []


def test_a_closed_connection_is_not_shared_again(local_sshd: LocalSSHD) -> None:
    """Once a filesystem's Connection is closed, a new filesystem of the same host and settings
    gets a new master (not the closed one, which would raise ValueError on every call)."""

    def new() -> SSHWrapFileSystem:
        return SSHWrapFileSystem(
            host=local_sshd.host, config=local_sshd.config, pool_size=1, skip_instance_cache=True
        )

    fs = new()
    assert fs.ls("/", detail=False)
    fs.connection.close()
    again = new()
    try:
        assert again.connection is not fs.connection and again.ls("/", detail=False)
    finally:
        again.connection.close()


def test_master_killed_while_a_file_is_written(sfs: SSHWrapFileSystem, rdir: str) -> None:
    """open(..., "wb") with the master SIGKILLed between two uploaded blocks: the next block's
    upload raises SSHConnectionError (once: closing the file then does nothing) and the target
    keeps its old content (the temporary name was never renamed over it)."""
    target = f"{rdir}/t.bin"
    sfs.pipe_file(target, b"old")
    with pytest.raises(SSHConnectionError), sfs.open(target, "wb", block_size=1 << 20) as f:
        f.write(os.urandom(2 << 20))
        f.flush()  # a block is out, on the file's own session
        os.kill(sfs.connection.master_pid, signal.SIGKILL)
        f.write(os.urandom(2 << 20))
    assert f.closed
    assert sfs.cat_file(target) == b"old"  # (on a new master)


def test_idle_sessions_of_a_killed_master_are_not_lent(local_sshd: LocalSSHD) -> None:
    """The master SIGKILLed (and gone) while the pool's idle session has not noticed (its ssh
    SIGSTOPped: it cannot): cat_file, info and ls go over a new master at once, none waits on
    the dead session (without the pool's check of the master: SFTPTimeout after 5 s)."""
    fs = SSHWrapFileSystem(
        host=local_sshd.host, config=local_sshd.config, timeout=5.0, skip_instance_cache=True
    )
    stopped: list[int] = []
    try:
        rdir = fs.connection.check_output("mktemp -d", text=True).strip()
        fs.pipe_file(f"{rdir}/f", b"data")  # its session is idle in the pool now
        where = fs.connection.control_path.encode()
        stopped = [p for p in descendants(os.getpid()) if where in cmdline(p)]
        assert stopped, "no SFTP session over the master"
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        master = fs.connection.master_pid
        os.kill(master, signal.SIGKILL)
        assert wait_exited([master], 10) == []
        t0 = time.monotonic()
        assert fs.cat_file(f"{rdir}/f") == b"data"
        assert fs.info(f"{rdir}/f")["size"] == 4
        assert fs.ls(rdir, detail=False) == [f"{rdir}/f"]
        assert time.monotonic() - t0 < 4.0
        assert fs.connection.restarts == 1
        fs.connection.run(["rm", "-rf", "--", rdir])
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        fs.connection.close()
    assert wait_exited(stopped, 10) == []


def test_a_frozen_server_times_out_and_the_next_call_works(
    local_sshd_factory: Callable[..., LocalSSHD], tmp_path: pathlib.Path
) -> None:
    """With the server frozen (SIGSTOP), cat_file, ls and put_file each raise a TimeoutError
    naming host and path within ``timeout`` + 1.5 s, nothing is left under the destination,
    and after thawing the next call works (on a new session)."""
    sshd = local_sshd_factory()
    fs = SSHWrapFileSystem(
        host=sshd.host, config=sshd.config, timeout=2.0, pool_size=1, skip_instance_cache=True
    )
    try:
        rdir = fs.connection.check_output("mktemp -d", text=True).strip()
        fs.pipe_file(f"{rdir}/f", b"data")
        src = tmp_path / "src.bin"
        src.write_bytes(os.urandom(1 << 20))
        calls: list[tuple[str, Callable[[], object]]] = [
            (f"{rdir}/f", lambda: fs.cat_file(f"{rdir}/f")),
            (rdir, lambda: fs.ls(rdir)),
            (f"{rdir}/up/new.bin", lambda: fs.put_file(str(src), f"{rdir}/up/new.bin")),
        ]
        with frozen(sshd):
            for path, call in calls:
                t0 = time.monotonic()
                with pytest.raises(TimeoutError) as e:
                    call()
                assert time.monotonic() - t0 < 2.0 + 1.5, path
                assert isinstance(e.value, SFTPTimeout), e.value
                assert str(e.value).startswith(f"{sshd.host}:{rdir}"), e.value
        assert fs.ls(rdir, detail=False) == [f"{rdir}/f"]  # nothing partial, a new session
        assert fs.cat_file(f"{rdir}/f") == b"data"
        fs.put_file(str(src), f"{rdir}/up/new.bin")
        assert fs.cat_file(f"{rdir}/up/new.bin") == src.read_bytes()
    finally:
        fs.connection.close()


class _FreezeOnFirstBytes(Callback):  # type: ignore[misc]
    """A put/get callback that freezes ``sshd`` when the first bytes have moved."""

    def __init__(self, sshd: LocalSSHD) -> None:
        super().__init__()
        self.sshd = sshd
        self.pids: list[int] | None = None
        self.at = 0.0

    def relative_update(self, inc: int = 1) -> None:
        if inc and self.pids is None:
            self.pids = freeze(self.sshd)
            self.at = time.monotonic()


def test_an_upload_frozen_midway_times_out(
    local_sshd_factory: Callable[..., LocalSSHD], tmp_path: pathlib.Path
) -> None:
    """put_file of 64 MiB with the server frozen after the first bytes: SFTPTimeout within
    ``timeout`` + 1.5 s (the writes' waits bounded too: a full socket does not block them),
    the target never appears; once the server is thawed, the hidden temporary file the call
    could not remove in its bound goes too (removed in the background), nothing else left."""
    sshd = local_sshd_factory()
    fs = SSHWrapFileSystem(
        host=sshd.host, config=sshd.config, timeout=2.0, pool_size=1, skip_instance_cache=True
    )
    freezer = _FreezeOnFirstBytes(sshd)
    try:
        rdir = fs.connection.check_output("mktemp -d", text=True).strip()
        src = tmp_path / "big.bin"
        src.write_bytes(os.urandom(64 << 20))
        with pytest.raises(SFTPTimeout):
            fs.put_file(str(src), f"{rdir}/big.bin", callback=freezer)
        assert freezer.pids is not None and time.monotonic() - freezer.at < 2.0 + 1.5
        left = os.listdir(rdir)  # (the server is this machine: its directory, read directly)
        assert len(left) == 1 and left[0].startswith(".big.bin.sshwrap-"), left
        assert left[0].endswith(".part"), left  # (the fresh removal met the frozen server)
        thaw(sshd, freezer.pids)
        wait_until(lambda: not os.listdir(rdir), 30.0, f"{rdir} emptied of {left}")
        assert not fs.exists(f"{rdir}/big.bin")
    finally:
        thaw(sshd, freezer.pids)
        fs.connection.close()
