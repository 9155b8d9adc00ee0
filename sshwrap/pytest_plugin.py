"""pytest plugin (entry point ``sshwrap``): real throwaway sshd fixtures.

- ``local_sshd``: one ``LocalSSHD`` with a single host, shared by the whole session.
- ``local_sshd_factory``: call it to start more (``local_sshd_factory(hosts=20)``); each is
  stopped at the end of the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from .testing import LocalSSHD


@pytest.fixture(scope="session")
def local_sshd() -> Iterator[LocalSSHD]:
    """A real OpenSSH sshd on 127.0.0.1 with throwaway keys, for the whole test session."""
    with LocalSSHD() as sshd:
        yield sshd


@pytest.fixture
def local_sshd_factory() -> Iterator[Callable[..., LocalSSHD]]:
    """Start extra ``LocalSSHD`` servers inside a test: ``local_sshd_factory(hosts=3)``."""
    started: list[LocalSSHD] = []

    def make(*args: object, **kwargs: object) -> LocalSSHD:
        sshd = LocalSSHD(*args, **kwargs)  # type: ignore[arg-type]
        started.append(sshd)
        sshd.start()
        return sshd

    yield make
    for sshd in reversed(started):
        sshd.stop()
