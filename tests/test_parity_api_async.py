"""Parity of the process API's signals and repr through every face, one body each (issue 11).

``terminate``/``send_signal``/``kill`` are plain methods on every async process, as in
:class:`asyncio.subprocess.Process`: called without ``await`` the signal still goes (it used
to be a coroutine on ``sshwrap.aio.Process`` that only warned, the remote command running
on), and a delivery that failed is reported by ``wait()``, as the sync face raises it from
``terminate()``.  Faces: tests/parity.py (read-only here); an async face's process is driven
on its loop, the handle the signal returns dropped.  Real sshd, real ssh; bounded waits.
"""

from __future__ import annotations

import gc
import inspect
import signal
import subprocess
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from parity import FLAVOURS, MODES, AsyncFace, Face, Outcome, open_face, remote_sleeps, token
from waiting import wait_until

from sshwrap.testing import LocalSSHD

PIPE = subprocess.PIPE
GONE = 10.0  # how long the remote command may take to go once signalled (a loaded machine)
SLACK = 1.0  # what a bound may be overrun by on a loaded 2-core machine


def _faces(modes: tuple[str, ...] = MODES, flavours: tuple[str, ...] = FLAVOURS) -> list[Any]:
    return [pytest.param((m, f), id=f"{m}-{f}") for m in modes for f in flavours]


FACES = _faces()


def _call(f: Face, method: Callable[[], Any]) -> Any:
    """``method()`` where the face's processes live (an async face: on its loop, inside a
    coroutine that does not await what it returns); what it returned."""
    if isinstance(f, AsyncFace):

        async def call() -> Any:
            return method()

        return f.lt.call(call())
    return method()


def _started(f: Face, sshd: LocalSSHD, tok: str) -> Any:
    """``echo up; exec sleep TOK`` started and running (the sleep exec'd): the face's own
    process object (``Popen``, ``ChannelPopen``, ``aio.Process``, ``AsyncChannelProcess``)."""
    p = f.start(f"echo up; exec sleep {tok}", stdout=PIPE)
    assert p.readline() == b"up\n"
    wait_until(lambda: remote_sleeps(sshd, tok), 30, f"the remote sleep {tok}")
    return p


@pytest.fixture(autouse=True)
def _earlier_garbage_collected() -> None:
    """What earlier tests left to the collector is collected before this one looks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()


def _quiet_loop(f: Face, p: Any) -> None:
    """Nothing left unretrieved or unawaited on the face's loop (a sync face's stdout, a
    file object, is closed first, as a ``with`` block would)."""
    if f.flavour == "sync":
        p.p.stdout.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(w.message) for w in caught] == []
    assert f.loop_errors() == []


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize(("how", "want"), [("terminate", -15), ("send_signal", -2)])
def test_signal_not_awaited_stops_the_remote_command(
    local_sshd: LocalSSHD, face: tuple[str, str], how: str, want: int
) -> None:
    """``p.terminate()`` / ``p.send_signal(SIGINT)`` as plain calls: the remote command dies
    of the signal, ``wait()`` says which, and nothing warns about an unawaited coroutine."""
    tok = token()
    with open_face(*face, local_sshd) as f:
        p = _started(f, local_sshd, tok)
        args = (signal.SIGINT,) if how == "send_signal" else ()
        t0 = time.monotonic()
        returned = _call(f, lambda: getattr(p.p, how)(*args))
        if f.flavour == "async":
            assert time.monotonic() - t0 < SLACK  # returns at once, the delivery under way
            assert not inspect.iscoroutine(returned)
            del returned
        wait_until(lambda: not remote_sleeps(local_sshd, tok), GONE, f"the sleep {tok} to go")
        assert p.wait() == want
        _quiet_loop(f, p)


@pytest.mark.parametrize("face", _faces(flavours=("async",)))
def test_async_signals_are_plain_methods_and_still_awaitable(
    local_sshd: LocalSSHD, face: tuple[str, str]
) -> None:
    """Every async process has ``send_signal``/``terminate``/``kill`` as plain methods, as
    asyncio's ``Process``; ``await p.terminate()`` keeps working (it waits for the delivery)."""
    tok = token()
    with open_face(*face, local_sshd) as f:
        p = _started(f, local_sshd, tok)
        for name in ("send_signal", "terminate", "kill"):
            assert not inspect.iscoroutinefunction(getattr(p.p, name)), name

        async def terminate_awaited() -> None:
            await p.p.terminate(timeout=5.0)

        assert isinstance(f, AsyncFace)
        f.lt.call(terminate_awaited())
        if face[0] == "plain":  # delivered before the await ends (SIGNAL_TIMEOUT)
            assert remote_sleeps(local_sshd, tok) == []
        assert p.wait() == -15
        _quiet_loop(f, p)


@pytest.mark.parametrize("face", _faces(("plain",)))
def test_a_failed_delivery_is_reported_not_lost(own_sshd: LocalSSHD, face: tuple[str, str]) -> None:
    """The host takes no new connection (its listener stopped; the command's session goes
    on), so the second ssh that carries the signal cannot: the sync ``terminate`` raises
    after its ``timeout``; the async one returns at once and ``wait()`` raises the same
    error; the command is still there to kill afterwards."""
    tok = token()
    with open_face(*face, own_sshd) as f:
        p = _started(f, own_sshd, tok)
        own_sshd.suspend()
        try:
            t0 = time.monotonic()
            got = _outcome(lambda: _call(f, lambda: p.p.terminate(timeout=1.0)))
            if f.flavour == "async":
                assert got.kind == "result", got
                got = _outcome(lambda: p.wait())
            took = time.monotonic() - t0
        finally:
            own_sshd.resume()
        assert got.kind == "SSHConnectionError", got
        assert "could not deliver the signal" in got.message, got.message
        assert 1.0 <= took < 1.0 + SLACK, took
        assert remote_sleeps(own_sshd, tok) != []  # the command runs on: it was no result
        p.kill()
        assert p.wait() == -9
        _quiet_loop(f, p)


@pytest.fixture
def own_sshd(local_sshd_factory: Callable[..., LocalSSHD]) -> LocalSSHD:
    """An sshd of this test's own (its listener is suspended)."""
    return local_sshd_factory()


def _outcome(call: Callable[[], Any]) -> Outcome:
    try:
        call()
    except Exception as e:
        return Outcome(error=e)
    return Outcome()


@pytest.mark.parametrize("face", FACES)
def test_repr_says_host_command_and_state(local_sshd: LocalSSHD, face: tuple[str, str]) -> None:
    """Every face's process shows its command and its state as ``subprocess``'s repr does;
    the async ones also the host and the pid, as ``<Kind: host: H pid: P running args: A>``."""
    tok = token()
    cmd = f"echo up; exec sleep {tok}"
    with open_face(*face, local_sshd) as f:
        p = _started(f, local_sshd, tok)
        running = _call(f, lambda: repr(p.p))
        p.kill()
        p.wait()
        ended = _call(f, lambda: repr(p.p))
    assert repr(cmd) in running and repr(cmd) in ended
    assert "-9" not in running and "-9" in ended
    if f.flavour == "async":
        kind = type(p.p).__name__
        head = f"<{kind}: host: {p.p.host!r} pid: {p.p.pid}"
        assert p.p.host == local_sshd.host
        assert running == f"{head} running args: {cmd!r}>", running
        assert ended == f"{head} returncode: -9 args: {cmd!r}>", ended
