"""A ``persist=`` run over the masters a run before left up: channels, no ssh process a host.

``ssh=`` is a wrapper script that logs each start, then runs the real ssh: a warm run must
start none.  The masters live in a directory of each test's own (``cm`` of test_persist).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_persist
from test_persist import ACCEPTED, master_pid
from waiting import wait_until

import sshwrap
from sshwrap.core.host_result import HostResult
from sshwrap.io.persist import MasterIndex, persist_dir, persisted_sockets
from sshwrap.protocol.sshlog import UNKNOWN_SIGNAL
from sshwrap.testing import LocalSSHD, wait_exited

EXE = str(Path(sys.executable).with_name("sshwrap-many"))
cm = test_persist.cm  # the fixture: a private masters' directory for each test


@pytest.fixture(scope="module")
def sshd() -> Iterator[LocalSSHD]:
    with LocalSSHD(hosts=3) as s:
        yield s


@pytest.fixture
def counted_ssh(tmp_path: Path) -> tuple[str, Path]:
    """An ``ssh`` that appends a line to a log at each start, then execs the real one."""
    real = shutil.which("ssh")
    assert real is not None
    log = tmp_path / "starts"
    log.write_text("")
    script = tmp_path / "ssh"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    script.chmod(0o755)
    return str(script), log


def _starts(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if ln.strip() and ln.strip() != "-V"]


def _shape(r: HostResult) -> tuple[object, ...]:
    return (r.host, r.status, r.returncode, r.signalled, r.stdout, r.stderr, r.attempts)


def test_a_warm_run_starts_no_ssh_and_makes_no_connection(
    sshd: LocalSSHD, cm: str, counted_ssh: tuple[str, Path]
) -> None:
    ssh, log = counted_ssh
    cmd = "echo out %h; echo err >&2; exit 3"
    first = sshwrap.run_many(sshd.hosts, cmd, config=sshd.config, persist=60, ssh=ssh)
    assert [r.returncode for r in first] == [3] * 3
    assert len(_starts(log)) >= 3  # each host's ssh (and the ssh -G that fill the index)
    logins = sshd.read_log().count(ACCEPTED)
    pids = sorted(master_pid(p) for p in persisted_sockets(cm))
    log.write_text("")
    second = sshwrap.run_many(sshd.hosts, cmd, config=sshd.config, persist=60, ssh=ssh)
    assert _starts(log) == []  # no ssh process at all
    assert sshd.read_log().count(ACCEPTED) == logins  # no new connection
    assert [_shape(r) for r in second] == [_shape(r) for r in first]
    assert sorted(master_pid(p) for p in persisted_sockets(cm)) == pids
    # The same through the command line.
    p = os.popen(
        f"{EXE} -F {sshd.config} --persist 1m -H {','.join(sshd.hosts)} -- echo %h 2>/dev/null"
    )
    lines = sorted(p.read().splitlines())
    assert p.close() is None
    assert lines == [f"{h} | {h}" for h in sshd.hosts]
    assert sshd.read_log().count(ACCEPTED) == logins


def test_a_signal_death_reads_as_a_plain_run_warm(sshd: LocalSSHD, cm: str) -> None:
    # The same result but for the number: ssh never says which signal (UNKNOWN_SIGNAL), a
    # channel of the master does (as for a host given as a Connection).
    hosts = sshd.hosts[:1]
    plain = sshwrap.run_many(hosts, "kill -TERM $$", config=sshd.config)
    assert sshwrap.run_many(hosts, "true", config=sshd.config, persist=60)[0].ok
    warm = sshwrap.run_many(hosts, "kill -TERM $$", config=sshd.config, persist=60)
    assert warm[0].connect_time == 0.0
    assert plain[0].returncode == UNKNOWN_SIGNAL
    assert warm[0].returncode == -signal.SIGTERM and warm[0].signalled
    same = dataclasses.replace(warm[0], returncode=UNKNOWN_SIGNAL)
    assert _shape(same) == _shape(plain[0])


def test_a_killed_master_is_replaced_with_one_ssh(
    sshd: LocalSSHD, cm: str, counted_ssh: tuple[str, Path]
) -> None:
    ssh, log = counted_ssh
    hosts = sshd.hosts[:2]
    first = sshwrap.run_many(hosts, "true", config=sshd.config, persist=60, ssh=ssh)
    assert all(r.ok for r in first)
    log.write_text("")
    sockets = persisted_sockets(cm)
    victim = master_pid(sockets[0])
    os.kill(victim, signal.SIGKILL)
    assert wait_exited([victim], 10) == []
    logins = sshd.read_log().count(ACCEPTED)
    results = sshwrap.run_many(hosts, "echo back", config=sshd.config, persist=60, ssh=ssh)
    assert [(r.status, r.stdout) for r in results] == [("ok", b"back\n")] * 2
    assert len(_starts(log)) == 1  # the dead one's ssh, which took the socket over
    assert sshd.read_log().count(ACCEPTED) == logins + 1
    assert master_pid(sockets[0]) not in (0, victim)
    log.write_text("")
    again = sshwrap.run_many(hosts, "echo again", config=sshd.config, persist=60, ssh=ssh)
    assert [r.stdout for r in again] == [b"again\n"] * 2 and _starts(log) == []


def test_a_timeout_stops_the_remote_command_over_a_warm_master(sshd: LocalSSHD, cm: str) -> None:
    host = sshd.hosts[2]
    assert sshwrap.run_many([host], "true", config=sshd.config, persist=60)[0].ok
    shared = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))
    shared.chmod(0o777)  # the remote user writes there
    pidfile = shared / "pid"
    cmd = f"echo $$ > {pidfile}; echo started; exec sleep 60"
    t0 = time.monotonic()
    (r,) = sshwrap.run_many([host], cmd, config=sshd.config, persist=60, timeout=1.0)
    elapsed = time.monotonic() - t0
    assert r.status == "timeout" and r.connect_time == 0.0, r
    assert r.stdout == b"started\n"
    assert elapsed < 3.0
    pid = int(pidfile.read_text())
    try:
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 5, "the remote sleep to end")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_the_index_names_sockets_of_its_directory_only(cm: str) -> None:
    assert persist_dir() == cm  # (made, private)
    inside = os.path.join(cm, "a" * 40)
    entries = {"k1": {"path": inside, "env": []}, "k2": {"path": "/tmp/" + "b" * 40, "env": []}}
    path = os.path.join(cm, "index")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        json.dump(entries, f)
    index = MasterIndex(cm)
    assert index.get("k1") is not None and index.get("k2") is None
    os.chmod(path, 0o644)  # not private: not read
    assert MasterIndex(cm).get("k1") is None
