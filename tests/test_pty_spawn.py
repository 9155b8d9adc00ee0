"""The one pty spawn path (``sshwrap.io.pty``): a controlling terminal, and safe with threads.

The program started on a pty must have it as its controlling terminal (the kernel's
SIGWINCH on a resize, ``/dev/tty`` prompts, the hang-up when the master closes), and no
Python may run in the child: a forked copy of a threaded process holds the locks other
threads held at the fork.  Each property is shown against a control that lacks it (a child
started without a controlling terminal; ptyprocess's fork), so the tests fail if the property
goes.  Real programs, real ssh against the local sshd.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from ptyprocess import PtyProcess

from sshwrap import connect
from sshwrap.io.pty import SETSID, PtyReader, TtyOutput, open_pty, spawn_in_pty
from sshwrap.terminal.modes import set_size
from sshwrap.testing import LocalSSHD

WAIT = 30.0
SETSIDS = pytest.mark.parametrize(
    "setsid", [SETSID, None], ids=["setsid-program", "fresh-interpreter"]
)


def read_until(master: int, pattern: bytes, timeout: float = WAIT) -> bytes:
    """Read the pty master until ``pattern`` (a regex) matches what arrived; return it all."""
    out = b""
    deadline = time.monotonic() + timeout
    while re.search(pattern, out) is None:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([master], [], [], left)[0]:
            raise AssertionError(f"{pattern!r} not seen within {timeout} s: {out!r}")
        try:
            data = os.read(master, 65536)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            data = b""
        if not data:
            raise AssertionError(f"EOF before {pattern!r}: {out!r}")
        out += data
    return out


def _stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` fields after the command name: [state, ppid, pgrp, session, tty_nr]."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[bytes], master: int) -> Iterator[None]:
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)


@SETSIDS
def test_the_pty_is_the_controlling_terminal_and_closing_hangs_up(setsid: str | None) -> None:
    proc, master = spawn_in_pty(
        ["sh", "-c", "echo started; exec sleep 600"], size=(33, 111), setsid=setsid
    )
    with _reaped(proc, master):
        read_until(master, rb"started")
        fields = _stat_fields(proc.pid)
        slave = os.readlink(f"/proc/{proc.pid}/fd/0")
        assert fields[3] == str(proc.pid)  # the session leader (pid = the program's)
        assert int(fields[4]) == os.stat(slave).st_rdev  # ... of the pty, its terminal
        assert os.tcgetpgrp(master) == proc.pid  # the terminal's foreground group
        os.close(master)  # sleep reads nothing: only the hang-up's SIGHUP can end it
        assert proc.wait(WAIT) == -signal.SIGHUP


def test_control_a_child_on_a_pty_without_setsid_has_no_terminal() -> None:
    # what Popen(tty=True) did before: the pty as stdin/stdout/stderr, a new session
    master, slave = open_pty((24, 80))
    proc = subprocess.Popen(
        ["sh", "-c", "echo started; exec sleep 600"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    with _reaped(proc, master):
        read_until(master, rb"started")
        assert _stat_fields(proc.pid)[4] == "0"  # no controlling terminal: no SIGWINCH, no
        # /dev/tty, no hang-up


@SETSIDS
def test_a_resize_signals_the_program_and_dev_tty_is_the_pty(setsid: str | None) -> None:
    script = (
        "stty size; trap 'stty size' WINCH; printf 'question? ' >/dev/tty; "
        'read a </dev/tty; echo "answer=$a"; while :; do sleep 0.05; done'
    )
    proc, master = spawn_in_pty(["sh", "-c", script], size=(33, 111), setsid=setsid)
    with _reaped(proc, master):
        read_until(master, rb"33 111\r\n(.|\r\n)*question\? ")
        os.write(master, b"yes\n")
        read_until(master, rb"answer=yes\r\n")
        set_size(master, 50, 60)  # no signal sent by hand: the kernel's SIGWINCH
        read_until(master, rb"50 60\r\n")


def test_the_remote_sees_the_size_and_a_resize(local_sshd: LocalSSHD) -> None:
    script = "stty size; trap 'stty size' WINCH; echo TRAPPED; while :; do sleep 0.05; done"
    proc, master = spawn_in_pty(
        ["ssh", "-tt", *local_sshd.ssh_args, local_sshd.host, script], size=(33, 111)
    )
    with _reaped(proc, master):
        read_until(master, rb"33 111\r\n(.|\r\n)*TRAPPED")
        set_size(master, 50, 60)
        read_until(master, rb"50 60\r\n")
        os.close(master)
        assert proc.wait(WAIT) != 0  # hung up: ssh ends the session


def _host_key_question(local_sshd: LocalSSHD, tmp_path: Path) -> list[str]:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    # ssh asks on /dev/tty only (no stdin fallback, and no askpass here)
    return [
        "ssh",
        "-o",
        "StrictHostKeyChecking=ask",
        "-o",
        f"UserKnownHostsFile={empty}",
        *local_sshd.ssh_args,
        local_sshd.host,
        "echo logged-in",
    ]


def _no_askpass() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "SSH_ASKPASS")}


def test_ssh_asks_its_question_on_the_pty(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    argv = _host_key_question(local_sshd, tmp_path)
    proc, master = spawn_in_pty(argv, env=_no_askpass())
    with _reaped(proc, master):
        read_until(master, rb"continue connecting \(yes/no")
        os.write(master, b"yes\n")
        read_until(master, rb"logged-in")
        assert proc.wait(WAIT) == 0
    assert (tmp_path / "known_hosts").read_text()  # the answer was taken: the key is added
    (tmp_path / "known_hosts").write_text("")
    # control: without a controlling terminal ssh cannot ask (it never reads stdin for this)
    master, slave = open_pty((24, 80))
    control = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=_no_askpass()
    )
    os.close(slave)
    with _reaped(control, master):
        read_until(master, rb"Host key verification failed")
        assert control.wait(WAIT) == 255


@pytest.mark.parametrize("closing", [b"Connection", b"Shared connection"])
def test_the_reader_drops_ssh_closing_line_and_reads_eio_as_eof(closing: bytes) -> None:
    line = closing + b" to host1 closed."
    script = f"printf 'out\\n'; printf '%s\\n' '{line.decode()}'"
    proc, master = spawn_in_pty(["sh", "-c", script])
    with PtyReader(master) as reader, _reaped(proc, -1):
        assert reader.readall() == b"out\r\n"  # the program's output, then EOF (EIO)
    # only at the very end: the same line followed by more output is output
    assert TtyOutput().feed(line + b"\r\n") == b""
    out = TtyOutput()
    assert out.feed(line + b"\r\n") + out.feed(b"more") == line + b"\r\nmore"


def test_a_missing_program_raises_like_subprocess() -> None:
    with pytest.raises(FileNotFoundError):
        spawn_in_pty(["/nonexistent/sshwrap-no-such-ssh"])


# -- no Python in the child ----------------------------------------------------------------
# An at-fork handler runs in the child of every fork that runs Python there (os.fork,
# os.forkpty, and so ptyprocess), never in subprocess's C child.  While armed, it reports into
# a pipe and checks the lock another thread holds: held in the child too, by a thread that
# does not exist there, so anything that took it would wait forever.
_ARMED: list[tuple[int, threading.Lock]] = []


def _in_forked_child() -> None:
    for fd, lock in _ARMED:
        held = not lock.acquire(blocking=False)
        os.write(fd, b"python ran in the child; the lock was " + (b"held" if held else b"free"))


os.register_at_fork(after_in_child=_in_forked_child)


@contextlib.contextmanager
def _lock_held_by_a_thread() -> Iterator[int]:
    """A thread holds a lock for the block; yields the read end of the at-fork report pipe."""
    lock = threading.Lock()
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            release.wait(WAIT)

    holder = threading.Thread(target=hold, name="lock-holder")
    holder.start()
    assert taken.wait(WAIT)
    r, w = os.pipe()
    os.set_blocking(r, False)
    _ARMED.append((w, lock))
    try:
        yield r
    finally:
        _ARMED.clear()
        release.set()
        holder.join(WAIT)
        os.close(w)
        os.close(r)


def _report(r: int) -> bytes:
    try:
        return os.read(r, 4096)
    except BlockingIOError:
        return b""


def test_spawning_while_a_thread_holds_a_lock_runs_no_python_in_the_child() -> None:
    with _lock_held_by_a_thread() as report:
        proc, master = spawn_in_pty(["sh", "-c", "echo exec-ok"])
        with _reaped(proc, master):
            read_until(master, rb"exec-ok")  # after the child's exec: a report would be in
            assert proc.wait(WAIT) == 0
        assert _report(report) == b""
        # control: ptyprocess forks with Python running in the child, the lock held there
        pty = PtyProcess.spawn(["sh", "-c", "echo exec-ok"])
        try:
            read_until(pty.fd, rb"exec-ok")
        finally:
            pty.close(force=True)
        assert _report(report) == b"python ran in the child; the lock was held"


def test_connection_spawn_with_the_pump_running(local_sshd: LocalSSHD) -> None:
    with connect(local_sshd.host, config=local_sshd.config) as c:
        assert c.run("true").returncode == 0
        busy = c.Popen(
            ["sh", "-c", "echo up; exec cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert busy.stdout is not None and busy.stdout.readline() == b"up\n"
        assert "sshwrap-mux-pump" in {t.name for t in threading.enumerate()}
        with _lock_held_by_a_thread() as report, warnings.catch_warnings():
            # CPython 3.12+ warns (DeprecationWarning) about a fork with threads running
            warnings.simplefilter("error", DeprecationWarning)
            with c.spawn("echo spawned-ok", timeout=WAIT) as s:
                s.expect("spawned-ok")
                assert s.expect_eof() == 0
            assert _report(report) == b""
        assert busy.communicate(b"still carried\n", timeout=WAIT)[0] == b"still carried\n"
        assert busy.returncode == 0


@pytest.mark.skipif(sys.version_info < (3, 12), reason="the fork-with-threads warning is 3.12+")
def test_control_ptyprocess_warns_about_forking_with_threads() -> None:
    with _lock_held_by_a_thread(), pytest.warns(DeprecationWarning, match="fork"):
        pty = PtyProcess.spawn(["true"])
    pty.close(force=True)
