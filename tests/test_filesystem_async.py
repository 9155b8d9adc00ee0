"""sshwrap.aio.filesystem: the fsspec filesystem's asyncio face, against a real sshd (fsspec's
copy/get/put abstract tests through its sync mirror, then coroutines in a running loop)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import posixpath
import time
from collections.abc import Iterator

import pytest
from fsspec.callbacks import Callback  # type: ignore[import-untyped]
from fsspec.tests.abstract import (  # type: ignore[import-untyped]
    AbstractCopyTests,
    AbstractGetTests,
    AbstractPutTests,
)
from test_filesystem import SSHWrapFixtures
from waiting import wait_until

from sshwrap.aio.filesystem import SSHWrapAsyncFileSystem
from sshwrap.testing import LocalSSHD


@pytest.fixture(scope="module")
def afs(local_sshd: LocalSSHD) -> Iterator[SSHWrapAsyncFileSystem]:
    fs = SSHWrapAsyncFileSystem(host=local_sshd.host, config=local_sshd.config)
    yield fs
    # fsspec's instance cache keeps the filesystem: its master and SFTP sessions (ssh children
    # of this process) would outlive the module, and later tests count this process's ssh
    fs.sync_fs.connection.close()


@pytest.fixture
def rdir(afs: SSHWrapAsyncFileSystem) -> Iterator[str]:
    conn = afs.sync_fs.connection
    path = conn.check_output("mktemp -d", text=True).strip()
    yield path
    conn.run(["rm", "-rf", "--", path])


class AsyncFixtures(SSHWrapFixtures):
    """fsspec's fixtures as for the sync face, ``fs`` the async face (its sync mirror)."""

    @pytest.fixture
    def fs(self, afs: SSHWrapAsyncFileSystem) -> SSHWrapAsyncFileSystem:
        return afs


# fsspec's copy, get and put test classes over the async face
TestAsyncCopy = type("TestAsyncCopy", (AsyncFixtures, AbstractCopyTests), {})
TestAsyncGet = type("TestAsyncGet", (AsyncFixtures, AbstractGetTests), {})
TestAsyncPut = type("TestAsyncPut", (AsyncFixtures, AbstractPutTests), {})


def test_coroutines_in_a_running_loop(
    local_sshd: LocalSSHD, rdir: str, tmp_path: pathlib.Path
) -> None:
    """With ``asynchronous=True`` the ``_`` methods are awaited in the caller's loop: many
    files at once through fsspec's ``_put``/``_get``, the same bytes back."""
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i:02d}": os.urandom(1000 + i) for i in range(20)}
    for name, data in files.items():
        (src / name).write_bytes(data)

    async def main() -> None:
        fs = SSHWrapAsyncFileSystem(
            host=local_sshd.host, config=local_sshd.config, asynchronous=True
        )
        await fs._pipe_file(f"{rdir}/one", b"hello")
        assert await fs._cat_file(f"{rdir}/one") == b"hello"
        assert (await fs._info(f"{rdir}/one"))["size"] == 5
        await fs._put(str(src), f"{rdir}/tree", recursive=True)
        names = await fs._ls(f"{rdir}/tree", detail=False)
        assert sorted(posixpath.basename(n) for n in names) == sorted(files)
        await fs._get(f"{rdir}/tree", str(tmp_path / "back"), recursive=True)
        for name, data in files.items():
            assert (tmp_path / "back" / name).read_bytes() == data
        await fs._rm(f"{rdir}/tree", recursive=True)
        assert not await fs._exists(f"{rdir}/tree")

    asyncio.run(main())


class _Moved(Callback):  # type: ignore[misc]
    """Sets ``event`` (in ``loop``) when the first bytes have moved."""

    def __init__(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        super().__init__()
        self.loop, self.event = loop, event

    def relative_update(self, inc: int = 1) -> None:
        if inc:
            self.loop.call_soon_threadsafe(self.event.set)


def test_a_cancelled_upload_stops(local_sshd: LocalSSHD, rdir: str, tmp_path: pathlib.Path) -> None:
    """Cancelling ``_put_file`` of 256 MiB after its first bytes: CancelledError within 3 s,
    the upload stopped in its thread (never completed later), nothing left remotely."""
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        f.truncate(256 << 20)  # (sparse: quick to make, as long to send)

    async def main() -> float:
        fs = SSHWrapAsyncFileSystem(
            host=local_sshd.host, config=local_sshd.config, asynchronous=True
        )
        moved = asyncio.Event()
        cb = _Moved(asyncio.get_running_loop(), moved)
        task = asyncio.create_task(fs._put_file(str(src), f"{rdir}/big.bin", callback=cb))
        await asyncio.wait_for(moved.wait(), 60)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    took = asyncio.run(main())
    assert took < 3.0, took
    assert not os.path.exists(f"{rdir}/big.bin")  # (the server is this machine)
    wait_until(lambda: not os.listdir(rdir), 10.0, f"{rdir} emptied")
