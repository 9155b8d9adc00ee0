"""Plain run()/Popen/aio.run against hosts that stop answering: every bound kept, nothing left.

The host is a real sshd that hangs mid-session (``freeze``: SIGSTOP of its listeners and
session processes) or sits behind a cable this test pulls (``netns_sshd`` + ``cut``).  The
calls run in a fresh interpreter marked with a random environment variable (``run_child`` /
``start_child``), so that after the program's own exit every process it started can be
looked for (``leftovers``): the second ssh that stops the remote command used to have no
``ConnectTimeout`` and a 60 s daemon thread, and was orphaned at exit.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest
from faults import (
    InProcessLeaks,
    NetnsSSHD,
    describe,
    freeze,
    frozen,
    leftovers,
    netns_sshd,
    start_child,
    thaw,
)
from waiting import wait_until

import sshwrap
import sshwrap.aio
from sshwrap.process import SIGNAL_TIMEOUT, STOP_MARGIN
from sshwrap.testing import LocalSSHD

SLACK = 1.0  # the bound is what is measured: "within the bound + 1 s"
START = 10.0  # interpreter start and imports on a loaded machine (not measured)


@pytest.fixture
def own_sshd(local_sshd_factory: Callable[..., LocalSSHD]) -> LocalSSHD:
    """An sshd of this test's own: freezing it disturbs no other test."""
    return local_sshd_factory()


@pytest.fixture
def cut_box() -> Iterator[NetnsSSHD]:
    with netns_sshd() as box:
        yield box


# -- the child program: one call against a host that stops answering mid-session -------------
CHILD = """
import asyncio, sys, time
import sshwrap, sshwrap.aio
host, config, face, bound = {host!r}, {config!r}, {face!r}, {bound!r}
cmd = "echo ready; sleep 60"
t0 = time.monotonic()
try:
    if face == "run":
        sshwrap.run(host, cmd, timeout=bound, config=config)
    elif face == "Popen":
        with sshwrap.Popen(host, cmd, config=config) as p:
            try:
                p.wait(timeout=bound)
            except sshwrap.TimeoutExpired:
                p.kill()
                raise
    elif face == "aio.run":
        asyncio.run(sshwrap.aio.run(host, cmd, timeout=bound, config=config))
    elif face == "ctrl-c":
        sshwrap.run(host, cmd, config=config)
except sshwrap.TimeoutExpired:
    print(f"timeout after {{time.monotonic() - t0:.3f}}", flush=True)
except KeyboardInterrupt:
    print(f"interrupted at {{time.monotonic():.3f}}", flush=True)
"""

FACES = ["run", "Popen", "aio.run"]


def _child_code(sshd: LocalSSHD, face: str, bound: float) -> str:
    return CHILD.format(host=sshd.host, config=sshd.config, face=face, bound=bound)


def _run_against(sshd: LocalSSHD, face: str, hang: Callable[[], None], bound: float) -> None:
    """The call returns within bound + 1 s; the program exits within its margin after; nothing
    it started is left alive."""
    with start_child(_child_code(sshd, face, bound)) as child:
        child.wait_line("ready", timeout=START + 30)
        hang()
        child.wait_line("timeout after", timeout=bound + START)
        m = re.search(r"timeout after ([\d.]+)", child.stdout)
        assert m is not None
        took = float(m.group(1))
        assert bound <= took <= bound + SLACK, child.stdout
        seen = time.monotonic()
        assert child.wait(STOP_MARGIN + 5) == 0, child.stderr
        exited = time.monotonic() - seen
        left = leftovers(child.mark)
        assert left == [], f"left after the program's exit: {describe(left)}"
        # the program's exit waited at most the stop's margin (plus interpreter teardown)
        assert exited <= STOP_MARGIN + SLACK, exited


@pytest.mark.parametrize("face", FACES)
def test_timeout_against_a_frozen_host_leaves_nothing(own_sshd: LocalSSHD, face: str) -> None:
    pids: list[int] = []
    try:
        _run_against(own_sshd, face, lambda: pids.extend(freeze(own_sshd)), bound=3.0)
    finally:
        thaw(own_sshd, pids)


@pytest.mark.parametrize("face", FACES)
def test_timeout_against_a_cut_link_leaves_nothing(cut_box: NetnsSSHD, face: str) -> None:
    _run_against(cut_box.sshd, face, cut_box.cut, bound=3.0)


def test_ctrl_c_against_a_frozen_host(own_sshd: LocalSSHD) -> None:
    """^C during run() on a host that hangs: KeyboardInterrupt within ~1 s, nothing left."""
    pids: list[int] = []
    try:
        with start_child(_child_code(own_sshd, "ctrl-c", 0.0)) as child:
            child.wait_line("ready", timeout=START + 30)
            pids += freeze(own_sshd)
            sent = time.monotonic()
            child.send_signal(signal.SIGINT)
            child.wait_line("interrupted at", timeout=10)
            got = time.monotonic()
            assert got - sent <= SLACK, got - sent
            assert child.wait(STOP_MARGIN + 5) == 0, child.stderr
            left = leftovers(child.mark)
            assert left == [], describe(left)
    finally:
        thaw(own_sshd, pids)


def test_twenty_timeouts_leave_no_ssh_and_no_thread(own_sshd: LocalSSHD) -> None:
    """20 x run(timeout=0.5) against a frozen host: each returns in time, and within the stop
    margin no ssh, thread or fd of theirs remains (was: 20 ssh and 20 threads for 60 s)."""
    with frozen(own_sshd), InProcessLeaks() as leaks:
        for _ in range(20):
            t0 = time.monotonic()
            with pytest.raises(sshwrap.TimeoutExpired):
                sshwrap.run(own_sshd.host, "true", timeout=0.5, config=own_sshd.config)
            assert time.monotonic() - t0 <= 0.5 + SLACK
        leaks.assert_clean(0.5)  # the call reaped its stop before returning


def test_aio_timeouts_leave_no_ssh_and_no_thread(own_sshd: LocalSSHD) -> None:
    async def main() -> None:
        for _ in range(5):
            t0 = time.monotonic()
            with pytest.raises(sshwrap.TimeoutExpired):
                await sshwrap.aio.run(own_sshd.host, "true", timeout=0.5, config=own_sshd.config)
            assert time.monotonic() - t0 <= 0.5 + SLACK

    with frozen(own_sshd), InProcessLeaks() as leaks:
        asyncio.run(main())
        leaks.assert_clean(0.5)  # the call reaped its stop before returning


# -- terminate() / send_signal() on a host that stopped answering ------------------------------
def _started(p: sshwrap.Popen) -> None:
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"


def test_terminate_on_a_frozen_host_is_bounded_and_says_so(own_sshd: LocalSSHD) -> None:
    """Was: blocked 60 s and returned as if delivered, the command running on."""
    with sshwrap.Popen(
        own_sshd.host, "echo ready; sleep 60", stdout=subprocess.PIPE, config=own_sshd.config
    ) as p:
        _started(p)
        with frozen(own_sshd), InProcessLeaks() as leaks:
            t0 = time.monotonic()
            with pytest.raises(sshwrap.SSHConnectionError) as info:
                p.terminate()
            took = time.monotonic() - t0
            assert took <= SIGNAL_TIMEOUT + SLACK, took
            assert "could not deliver the signal" in info.value.message
            leaks.assert_clean(SLACK)
        p.kill()
        p.wait(30)


def test_send_signal_on_a_cut_link_is_bounded_and_says_so(cut_box: NetnsSSHD) -> None:
    sshd = cut_box.sshd
    with sshwrap.Popen(
        sshd.host, "echo ready; sleep 60", stdout=subprocess.PIPE, config=sshd.config
    ) as p:
        _started(p)
        cut_box.cut()
        t0 = time.monotonic()
        with pytest.raises(sshwrap.SSHConnectionError):
            p.send_signal(signal.SIGUSR1, timeout=2)
        assert time.monotonic() - t0 <= 2 + SLACK
        p.kill()
        p.wait(30)


def test_aio_terminate_on_a_frozen_host_is_bounded(own_sshd: LocalSSHD) -> None:
    async def main() -> None:
        p = await sshwrap.aio.create_process(
            own_sshd.host, "echo ready; sleep 60", stdout=subprocess.PIPE, config=own_sshd.config
        )
        assert p.stdout is not None
        assert await p.stdout.readline() == b"ready\n"
        pids = freeze(own_sshd)
        try:
            t0 = time.monotonic()
            with pytest.raises(sshwrap.SSHConnectionError):
                await p.terminate(timeout=2)
            assert time.monotonic() - t0 <= 2 + SLACK
        finally:
            thaw(own_sshd, pids)
        p.kill()
        await p.wait()
        p.close()

    asyncio.run(main())


def test_terminate_on_a_healthy_host_still_works(local_sshd: LocalSSHD) -> None:
    with sshwrap.Popen(
        local_sshd.host, "echo ready; sleep 60", stdout=subprocess.PIPE, config=local_sshd.config
    ) as p:
        _started(p)
        p.terminate()
        assert p.wait(30) == -signal.SIGTERM


# -- the remote stop script returns as soon as the command is gone -------------------------------
def test_remote_stop_returns_when_the_group_is_gone(own_sshd: LocalSSHD) -> None:
    """``sleep`` forked by the remote shell dies at SIGTERM; the stop must not wait its ~2 s
    before SIGKILL.  (A child whose parent died is a zombie until PID 1 reaps it, and some PID
    1s never do: the old poll's ``kill -0`` saw such a zombie as alive.)"""
    with sshwrap.Popen(
        own_sshd.host, "echo ready; sleep 60; true", stdout=subprocess.PIPE, config=own_sshd.config
    ) as p:
        _started(p)
        connect = time.monotonic()
        sshwrap.run(own_sshd.host, "true", config=own_sshd.config)  # what a connection costs
        connect = time.monotonic() - connect
        argv = p._call.signal_argv(signal.SIGTERM, escalate=True)
        t0 = time.monotonic()
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=True)
        took = time.monotonic() - t0
        assert took <= connect + 1.0, (took, connect)
        assert p.wait(30) < 0
        wait_until(lambda: not own_sshd.session_pids(), 10, "the session's end")


# -- E2BIG ----------------------------------------------------------------------------------------
BIG = ["echo", "y" * 1_000_000]


def test_oversized_command_is_a_clear_error_before_ssh_starts(local_sshd: LocalSSHD) -> None:
    """Was: a raw OSError(E2BIG) from exec."""
    with InProcessLeaks() as leaks:
        for call in (
            lambda: sshwrap.run(local_sshd.host, BIG, config=local_sshd.config),
            lambda: sshwrap.Popen(local_sshd.host, BIG, config=local_sshd.config),
            lambda: asyncio.run(sshwrap.aio.run(local_sshd.host, BIG, config=local_sshd.config)),
        ):
            with pytest.raises(sshwrap.CommandTooLongError) as info:
                call()
            e = info.value
            assert isinstance(e, ValueError) and isinstance(e, sshwrap.SSHWrapError)
            assert "131072" in str(e) and e.limit == 131072 and e.size > 1_000_000
        leaks.assert_clean(SLACK)


def test_command_just_under_the_limit_runs(local_sshd: LocalSSHD) -> None:
    arg = "y" * 120_000
    r = sshwrap.run(
        local_sshd.host, ["printf", "%s", arg], capture_output=True, config=local_sshd.config
    )
    assert r.stdout == arg.encode()


def test_messages_reach_the_users_stderr_as_they_come(local_sshd: LocalSSHD) -> None:
    """The stderr relay passes the remote command's stderr on while it runs (not at exit)."""
    code = textwrap.dedent(
        f"""
        import sshwrap, sys
        sshwrap.run({local_sshd.host!r}, "echo early >&2; sleep 60", timeout=30,
                    config={local_sshd.config!r})
        """
    )
    with start_child(code) as child:
        t0 = time.monotonic()
        deadline = t0 + 30
        while b"early" not in child.err:
            assert time.monotonic() < deadline, child.stderr
            child._pump(deadline)
        # ^C, not a SIGKILL: the program ends its ssh (a killed one would orphan it)
        child.send_signal(signal.SIGINT)
        child.wait(10)
        assert leftovers(child.mark) == [], describe(leftovers(child.mark))


def test_timeout_still_kills_a_command_that_ignores_sigterm(own_sshd: LocalSSHD) -> None:
    """The stop's escalation (SIGKILL ~2 s after SIGTERM) runs on the remote side even when
    the local stop ssh is past its margin: the call returned long before."""
    t0 = time.monotonic()
    with pytest.raises(sshwrap.TimeoutExpired):
        sshwrap.run(
            own_sshd.host, "trap '' TERM; sleep 60; true", timeout=1, config=own_sshd.config
        )
    assert time.monotonic() - t0 <= 1 + SLACK
    wait_until(lambda: not own_sshd.session_pids(), 15, "the remote command's end")
