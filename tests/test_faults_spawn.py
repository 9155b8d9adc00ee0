"""Faults under ``spawn``: a host that stops answering mid-session, a cut link, and Ctrl-C.

``expect``'s timeout holds, ``close()`` ends ssh promptly, and a program interrupted while
it waits leaves no ssh behind once it has exited.  (Lost connections over a Connection are in
``test_faults_connection.py``.)
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
from faults import (
    describe,
    freeze,
    frozen,
    leftovers,
    netns_sshd,
    ssh_descendants,
    start_child,
    thaw,
)

from sshwrap.spawn import ExpectTimeout, Spawned
from sshwrap.testing import LocalSSHD

MARGIN = 1.0


@pytest.fixture
def sshd() -> Iterator[LocalSSHD]:
    with LocalSSHD() as s:
        yield s


def _expect_times_out_then_close(sp: Spawned[str]) -> None:
    t0 = time.monotonic()
    with pytest.raises(ExpectTimeout):
        sp.expect("never printed", timeout=2)
    assert time.monotonic() - t0 <= 2 + MARGIN
    t0 = time.monotonic()
    sp.close()
    assert time.monotonic() - t0 <= 2 + MARGIN  # SIGHUP, SIGKILL after 2 s at the latest
    assert ssh_descendants() == [], describe(ssh_descendants())


def test_expect_timeout_and_close_against_a_frozen_host(sshd: LocalSSHD) -> None:
    sp = Spawned("echo hi; sleep 30", destination=sshd.host, ssh_args=["-F", sshd.config])
    try:
        sp.expect("hi", timeout=30)
        with frozen(sshd):
            _expect_times_out_then_close(sp)
    finally:
        sp.close()


def test_expect_timeout_and_close_over_a_cut_link() -> None:
    with netns_sshd() as box:
        s = box.sshd
        sp = Spawned("echo hi; sleep 30", destination=s.host, ssh_args=["-F", s.config])
        try:
            sp.expect("hi", timeout=30)
            box.cut()
            _expect_times_out_then_close(sp)
        finally:
            sp.close()


def test_ctrl_c_while_expecting_from_a_frozen_host_leaves_nothing(sshd: LocalSSHD) -> None:
    code = f"""
from sshwrap.spawn import Spawned
sp = Spawned("echo hi; sleep 30", destination={sshd.host!r}, ssh_args=["-F", {sshd.config!r}])
sp.expect("hi", timeout=30)
print("ready", flush=True)
sp.expect("never printed", timeout=60)
"""
    with start_child(code) as child:
        child.wait_line("ready", 60)
        pids = freeze(sshd)
        try:
            t0 = time.monotonic()
            child.send_signal(signal.SIGINT)
            child.wait(10)
            assert time.monotonic() - t0 <= MARGIN
            assert "KeyboardInterrupt" in child.stderr
            assert leftovers(child.mark) == [], describe(leftovers(child.mark))
        finally:
            thaw(sshd, pids)
