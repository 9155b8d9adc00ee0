"""pytest plugin (entry point ``sshwrap``): real throwaway sshd fixtures.

- ``local_sshd``: one ``LocalSSHD`` with a single host, shared by the whole session.
- ``local_sshd_factory``: call it to start more (``local_sshd_factory(hosts=20)``); it takes
  ``LocalSSHD``'s arguments (``extra_sshd_config="MaxSessions 2"``: a str of one or more lines
  or a list of lines), and each server is stopped at the end of the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .testing import LocalSSHD


@pytest.fixture(scope="session")
def local_sshd() -> Iterator[LocalSSHD]:
    """A real OpenSSH sshd on 127.0.0.1 with throwaway keys, for the whole test session."""
    with LocalSSHD() as sshd:
        yield sshd


@pytest.fixture
def local_sshd_factory() -> Iterator[Callable[..., LocalSSHD]]:
    """Start extra ``LocalSSHD`` servers inside a test: ``local_sshd_factory(hosts=3)``.

    The arguments are ``LocalSSHD``'s; a bad one raises there, before anything starts."""
    started: list[LocalSSHD] = []

    def make(*args: Any, **kwargs: Any) -> LocalSSHD:
        sshd = LocalSSHD(*args, **kwargs)
        started.append(sshd)
        sshd.start()
        return sshd

    yield make
    for sshd in reversed(started):
        sshd.stop()
