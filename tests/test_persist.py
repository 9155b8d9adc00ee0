"""Masters that outlive a run: ``run_many(persist=...)`` and ``close_persisted``.

Every test that starts masters gets a directory of its own (``XDG_RUNTIME_DIR`` pointed at a
fresh short one), and its teardown closes them and kills, by pid, any master left.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sshwrap
from sshwrap.fanout import PERSIST_DEFAULT, PersistDirError, close_persisted
from sshwrap.io.mux_control import MuxControl
from sshwrap.io.persist import persist_dir, persist_seconds, persisted_sockets
from sshwrap.testing import LocalSSHD, wait_exited

ACCEPTED = "Accepted publickey"


@pytest.fixture(scope="module")
def sshd() -> Iterator[LocalSSHD]:
    with LocalSSHD(hosts=4) as s:
        yield s


def master_pids(directory: str) -> list[int]:
    """This user's processes titled as a master of a socket in ``directory``."""
    want = f"ssh: {directory}/".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read()
        except OSError:
            continue
        if title.startswith(want) and b"[mux]" in title:
            found.append(int(entry))
    return found


def master_pid(path: str) -> int:
    with MuxControl(path) as m:
        return m.alive_check()


@pytest.fixture
def cm(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private runtime directory for this test's masters; the masters' directory in it."""
    runtime = tempfile.mkdtemp(prefix="p-", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    directory = f"{runtime}/sshwrap/cm"
    try:
        yield directory
    finally:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("XDG_RUNTIME_DIR", runtime)
            if os.path.isdir(directory):
                close_persisted()
        left = master_pids(directory)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        wait_exited(left, 5)
        shutil.rmtree(runtime, ignore_errors=True)
        assert not left, f"masters left running: {left}"


# -- values and the directory -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("10m", 600),
        ("1h", 3600),
        ("30s", 30),
        ("1h30m", 5400),
        ("600", 600),
        (45, 45),
        (2.5, 3),
        ("0.2", 1),
        (True, PERSIST_DEFAULT),
    ],
)
def test_persist_values(value: object, seconds: int) -> None:
    assert persist_seconds(value) == seconds


@pytest.mark.parametrize("value", ["", "0", "-5", "10x", "forever", "yes", 0, -1, float("nan")])
def test_bad_persist_values_are_refused_before_any_ssh(value: object, cm: str) -> None:
    with pytest.raises(ValueError, match="persist"):
        persist_seconds(value)
    with pytest.raises(ValueError, match="persist"):
        sshwrap.run_many(["nosuchhost.invalid"], "true", persist=value)  # type: ignore[arg-type]
    assert not os.path.exists(cm)  # refused before anything was made
    with pytest.raises(TypeError, match="persist must be"):
        persist_seconds([1])
    assert PERSIST_DEFAULT == 600


def test_ssh_options_that_would_fight_persist_are_refused(cm: str) -> None:
    for key in ("ControlPath", "controlmaster", "ControlPersist"):
        with pytest.raises(ValueError, match="do not give it"):
            sshwrap.run_many(["h1"], "true", persist="1m", options={key: "no"})


def test_the_directory_is_private_and_checked(cm: str) -> None:
    assert persist_dir(create=False) is None
    assert persist_dir() == cm
    top = os.path.dirname(cm)
    for d in (top, cm):
        st = os.lstat(d)
        assert (st.st_mode & 0o777, st.st_uid) == (0o700, os.geteuid())
    os.chmod(cm, 0o750)
    with pytest.raises(PersistDirError, match=r"0750 gives others access.*chmod 700"):
        persist_dir()
    os.chmod(cm, 0o700)
    os.chmod(top, 0o711)
    with pytest.raises(PersistDirError, match="0711"):
        sshwrap.run_many(["h1"], "true", persist="1m")
    with pytest.raises(PersistDirError, match="0711"):
        close_persisted()
    os.chmod(top, 0o700)
    # A symbolic link to a private directory is still not ours to trust.
    shutil.rmtree(top)
    elsewhere = tempfile.mkdtemp(dir=os.path.dirname(top))
    os.symlink(elsewhere, top)
    with pytest.raises(PersistDirError, match="symbolic link"):
        persist_dir()
    os.unlink(top)
    os.rmdir(elsewhere)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_directory_of_another_users_is_refused(cm: str) -> None:
    assert persist_dir() == cm
    os.chown(cm, 65534, 65534)
    with pytest.raises(PersistDirError, match=r"owned by uid 65534.*never shared"):
        persist_dir()
    os.chown(cm, 0, 0)


def test_without_a_short_runtime_dir_it_is_tmpdir_sshwrap_uid(
    cm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = os.path.dirname(os.path.dirname(cm))
    long = Path(runtime, "r" * 60)
    long.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(long))  # no room for the socket names
    monkeypatch.setenv("TMPDIR", runtime)
    assert persist_dir() == f"{runtime}/sshwrap-{os.geteuid()}/cm"
    # A parent that others may write (and not sticky) is refused; /tmp (sticky) is not.
    os.chmod(runtime, 0o777)
    with pytest.raises(PersistDirError, match="writable by others and not sticky"):
        persist_dir()
    os.chmod(runtime, 0o1777)
    assert persist_dir() == f"{runtime}/sshwrap-{os.geteuid()}/cm"
    os.chmod(runtime, 0o700)
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.delenv("TMPDIR")
    assert persist_dir(create=False) in (None, f"/tmp/sshwrap-{os.geteuid()}/cm")


# -- against a real sshd ----------------------------------------------------------------


def test_a_persist_run_ends_at_once_with_complete_results(sshd: LocalSSHD, cm: str) -> None:
    big = 200_000
    cmd = f'echo "out $(hostname)"; head -c {big} /dev/zero | tr "\\\\0" x; echo; echo err >&2'
    results = sshwrap.run_many(sshd.hosts, cmd, config=sshd.config, persist="10m")
    returned = time.time()
    assert [r.status for r in results] == ["ok"] * 4, [r.error for r in results]
    for r in results:
        lines = r.stdout.split(b"\n")
        assert lines[0].startswith(b"out ") and lines[1] == b"x" * big and lines[2] == b""
        assert r.stderr == b"err\n"
    # The run did not wait for the masters: no host's pipes were held open after its ssh
    # exited (that would show as the 2 s drain grace between the last exit and the return).
    last_exit = max(r.started + r.duration for r in results if r.started is not None)
    assert returned - last_exit < 1.5
    sockets = persisted_sockets(cm)
    assert len(sockets) == 4
    for path in sockets:
        pid = master_pid(path)
        # Pitfall 8: the master holds none of the run's stdio, and lives in its own session.
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        assert os.getsid(pid) != os.getsid(0)


def test_a_second_persist_run_makes_no_new_connection(sshd: LocalSSHD, cm: str) -> None:
    first = sshwrap.run_many(sshd.hosts, "echo one", config=sshd.config, persist=60)
    assert [r.stdout for r in first] == [b"one\n"] * 4
    logins = sshd.read_log().count(ACCEPTED)
    pids = sorted(master_pid(p) for p in persisted_sockets(cm))
    second = sshwrap.run_many(sshd.hosts, "echo two", config=sshd.config, persist=60)
    assert [r.stdout for r in second] == [b"two\n"] * 4
    assert [r.status for r in second] == ["ok"] * 4
    assert sshd.read_log().count(ACCEPTED) == logins  # no new login at all
    assert sorted(master_pid(p) for p in persisted_sockets(cm)) == pids
    # channels of sshwrap's own mux client over those masters: no ssh ran, so no ssh log
    assert all(r.ssh_log == "" and r.connect_time == 0.0 for r in second)


def test_a_killed_master_is_replaced_not_a_failure(sshd: LocalSSHD, cm: str) -> None:
    hosts = sshd.hosts[:2]
    assert all(r.ok for r in sshwrap.run_many(hosts, "true", config=sshd.config, persist=60))
    sockets = persisted_sockets(cm)
    victim = master_pid(sockets[0])
    os.kill(victim, signal.SIGKILL)
    assert wait_exited([victim], 10) == []
    assert os.path.exists(sockets[0])  # the stale socket stays behind
    logins = sshd.read_log().count(ACCEPTED)
    results = sshwrap.run_many(hosts, "echo back", config=sshd.config, persist=60)
    assert [(r.status, r.stdout) for r in results] == [("ok", b"back\n")] * 2
    assert sshd.read_log().count(ACCEPTED) == logins + 1  # only the dead one logged in anew
    assert persisted_sockets(cm) == sockets
    assert master_pid(sockets[0]) != victim  # ssh unlinked the stale socket and took its place


def test_close_persisted_ends_the_masters_by_their_pids(sshd: LocalSSHD, cm: str) -> None:
    assert all(r.ok for r in sshwrap.run_many(sshd.hosts, "true", config=sshd.config, persist=60))
    by_host = {}
    for path in persisted_sockets(cm):
        by_host[path] = master_pid(path)
    assert len(by_host) == 4
    # Only the hosts named: the hash of each one's settings names its socket.
    assert close_persisted(sshd.hosts[:2], config=sshd.config) == 2
    assert len(persisted_sockets(cm)) == 2
    gone = [pid for path, pid in by_host.items() if not os.path.exists(path)]
    assert len(gone) == 2 and wait_exited(gone, 5) == []
    # A master stopped (it cannot answer on its socket) is found by its title, and ends.
    stopped = master_pid(persisted_sockets(cm)[0])
    os.kill(stopped, signal.SIGSTOP)
    assert close_persisted(timeout=5) == 2
    assert persisted_sockets(cm) == [] and os.listdir(cm) == []
    assert master_pids(cm) == []
    assert close_persisted() == 0


def test_close_removes_a_stale_socket_and_counts_the_live(sshd: LocalSSHD, cm: str) -> None:
    hosts = sshd.hosts[:2]
    assert all(r.ok for r in sshwrap.run_many(hosts, "true", config=sshd.config, persist=60))
    sockets = persisted_sockets(cm)
    victim = master_pid(sockets[1])
    os.kill(victim, signal.SIGKILL)
    assert wait_exited([victim], 10) == []
    assert close_persisted() == 1
    assert os.listdir(cm) == [] and master_pids(cm) == []


def test_without_persist_nothing_persists(sshd: LocalSSHD, cm: str) -> None:
    for persist in (None, False):
        results = sshwrap.run_many(sshd.hosts[:2], "true", config=sshd.config, persist=persist)
        assert all(r.ok for r in results)
    assert not os.path.exists(cm) and master_pids(os.path.dirname(cm)) == []


def test_the_async_face_persists_too(sshd: LocalSSHD, cm: str) -> None:
    hosts = sshd.hosts[:2]

    async def main(cmd: str) -> list[bytes]:
        gen = sshwrap.aio.run_many(hosts, cmd, config=sshd.config, persist="1m")
        return sorted([r.stdout async for r in gen])

    assert asyncio.run(main("echo a")) == [b"a\n"] * 2
    logins = sshd.read_log().count(ACCEPTED)
    assert asyncio.run(main("echo b")) == [b"b\n"] * 2
    assert sshd.read_log().count(ACCEPTED) == logins
    assert len(persisted_sockets(cm)) == 2
