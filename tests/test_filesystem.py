"""sshwrap.filesystem: the fsspec filesystem, against a real sshd (fsspec's own abstract
test suite, then what it does not cover)."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator

import fsspec  # type: ignore[import-untyped]
import pytest
from fsspec.tests.abstract import (  # type: ignore[import-untyped]
    AbstractCopyTests,
    AbstractFixtures,
    AbstractGetTests,
    AbstractOpenTests,
    AbstractPipeTests,
    AbstractPutTests,
)

from sshwrap.filesystem import SSHWrapFileSystem
from sshwrap.testing import LocalSSHD

# Until the entry point in pyproject.toml is installed.
fsspec.register_implementation("sshwrap", SSHWrapFileSystem, clobber=True)


def _filesystem(sshd: LocalSSHD) -> SSHWrapFileSystem:
    fs = fsspec.filesystem("sshwrap", host=sshd.host, config=sshd.config)
    assert isinstance(fs, SSHWrapFileSystem)
    return fs


@pytest.fixture(scope="module")
def sfs(local_sshd: LocalSSHD) -> SSHWrapFileSystem:
    return _filesystem(local_sshd)


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
