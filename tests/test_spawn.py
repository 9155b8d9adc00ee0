"""Spawned (expect-style over ssh -tt in a local pty) against the real sshd, over a master."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faults import frozen
from ptyterm import Term
from waiting import wait_until

from sshwrap.errors import UNKNOWN_SIGNAL, SSHConnectionError, SSHWrapError
from sshwrap.spawn import ExpectEOF, ExpectTimeout, Spawned
from sshwrap.testing import LocalSSHD, wait_exited


@dataclass
class Master:
    host: str
    args: list[str]  # ssh options that go over the master


@pytest.fixture(scope="module")
def master(local_sshd: LocalSSHD, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Master]:
    """A plain-ssh ControlMaster on a socket in a 0700 directory."""
    d = tmp_path_factory.mktemp("cm")
    os.chmod(d, 0o700)
    args = [*local_sshd.ssh_args, "-o", f"ControlPath={d / 's'}"]
    subprocess.run(
        ["ssh", *args, "-M", "-N", "-f", "-o", "ControlPersist=yes", local_sshd.host],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    yield Master(local_sshd.host, args)
    subprocess.run(["ssh", *args, "-O", "exit", local_sshd.host], capture_output=True, timeout=30)


_MUX_HELLO = b"mux_client_hello_exchange: master version"


def spawn(master: Master, command: str | list[str] | None, **kw: Any) -> Spawned[str]:
    return Spawned(command, destination=master.host, ssh_args=master.args, **kw)


def test_expect_sendline_before_match_returncode(master: Master) -> None:
    script = "printf 'name? '; read x; echo \"hello, $x!\"; exit 3"
    with spawn(master, script) as s:
        assert s.expect([r"never-printed", r"name\? "]) == 1
        assert s.before == ""
        s.sendline("bob")
        assert s.expect(r"hello, (\w+)!") == 0
        assert s.match is not None and s.match.group(1) == "bob"
        assert s.after == "hello, bob!"
        assert "bob" in s.before  # the remote pty echoed what we typed
        assert s.expect_eof() == 3
        assert s.returncode == 3 and s.ssh_error is None
        assert s.before == "\r\n"  # the pty's line end; ssh's closing line is not output


def _state(pid: int) -> str:
    """The process's state letter (``/proc/PID/stat``: R running, S sleeping, T stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_keys_wait_for_the_mux_clients_raw_mode(master: Master, local_sshd: LocalSSHD) -> None:
    # The flake of the test above (about 1 run in 15 on a loaded machine): over a master,
    # ssh -S puts the pty in raw mode only once the master has answered its session request,
    # while the master writes the remote output into the pty itself.  A late client leaves
    # the pty cooked under output that already asks for input: keys typed then were echoed
    # by the local pty as well, and every line ended in \r\r\n.  Here the client is made
    # late for sure: the server is frozen while the client waits for the master's answer, the
    # client is stopped there, the server thawed.  send() waits for raw mode, and the output
    # read before it comes has the cooked pty's extra \r taken out.
    script = "echo first-line; printf 'name? '; read x; echo \"hello, $x!\"; exit 3"
    with frozen(local_sshd):
        s = spawn(master, script)
        log = Path(s.argv[s.argv.index("-E") + 1])
        # after its hello the client sends the request and sleeps until the master answers,
        # which it cannot before the server opens the session
        wait_until(lambda: _MUX_HELLO in log.read_bytes() and _state(s.pid) == "S", 30)
        os.kill(s.pid, signal.SIGSTOP)
    with s:
        sending = threading.Event()

        def go_on() -> None:
            wait_until(sending.is_set, 30)
            os.kill(s.pid, signal.SIGCONT)

        helper = threading.Thread(target=go_on)
        try:
            s.expect(r"name\? ")  # the master relayed it: the stopped client is not raw yet
            assert termios.tcgetattr(s.fd)[3] & termios.ICANON
            assert s.before == "first-line\r\n"
            helper.start()
            sending.set()
            s.sendline("bob")  # typed while the client is still stopped, unless send() waits
        finally:
            os.kill(s.pid, signal.SIGCONT)
        helper.join(30)
        assert s.expect(r"hello, (\w+)!") == 0
        assert s.before == "bob\r\n"  # the remote pty's echo, and only that
        assert s.expect_eof() == 3
        assert s.before == "\r\n"


def test_output_read_after_ssh_left_raw_mode_is_kept(master: Master) -> None:
    # ssh -S restores the cooked modes when it exits: output read only afterwards was written
    # while the pty was raw and keeps its \r\n.  Enter is typed straight into the pty once it
    # is raw (not with send(), nor reading the output), then the output is printed.
    with spawn(master, "read x; printf 'a\\nb\\n'") as s:
        wait_until(lambda: not termios.tcgetattr(s.fd)[3] & termios.ICANON, 30, "raw mode")
        os.write(s.fd, b"\r")
        assert wait_exited([s.pid], 30) == []  # not read meanwhile (nor reaped)
        assert s.expect_eof() == 0
        assert s.before == "\r\na\r\nb\r\n"  # the echoed Enter, then the output


def test_earliest_match_wins_and_list_quoting(master: Master) -> None:
    with spawn(master, ["printf", "%s|%s\\n", "first word", "$HOME 'q'"]) as s:
        assert s.expect(["q'", r"first word\|"]) == 1
        assert s.expect(r"\$HOME 'q'") == 0  # a list argument arrives verbatim
        assert s.expect_eof() == 0


def test_password_prompt_without_echo(master: Master) -> None:
    # like sudo: the program turns echo off, reads, and the answer never shows
    script = (
        "stty -echo; printf 'password for me: '; read pw; stty echo; echo; "
        '[ "$pw" = "s3cr3t-value" ] && echo ACCEPTED || echo REJECTED'
    )
    with spawn(master, script) as s:
        s.expect(r"password for \w+: ")
        s.sendline("s3cr3t-value")
        assert s.expect(["ACCEPTED", "REJECTED"]) == 0
        assert "s3cr3t-value" not in s.before
        s.expect_eof()


def test_timeout_is_typed_and_bounded(master: Master) -> None:
    with spawn(master, "echo partial; sleep 30") as s:
        t0 = time.monotonic()
        with pytest.raises(ExpectTimeout) as info:
            s.expect("never", timeout=1)
        assert time.monotonic() - t0 < 5
        err = info.value
        assert isinstance(err, SSHWrapError) and isinstance(err, TimeoutError)
        assert "partial" in str(err.before) and "partial" in s.before
    assert s.returncode is not None  # closed by the with block


def test_eof_is_typed(master: Master) -> None:
    with spawn(master, "echo the-end; exit 2") as s:
        with pytest.raises(ExpectEOF) as info:
            s.expect("never")
        assert isinstance(info.value, EOFError) and isinstance(info.value, SSHWrapError)
        assert "the-end" in s.before
        assert s.wait(10) == 2


def test_eof_and_timeout_as_patterns(master: Master) -> None:
    with spawn(master, "echo one; sleep 2; echo two") as s:
        assert s.expect(["two", ExpectTimeout], timeout=0.5) == 1  # no exception
        assert "one" in s.before
        assert s.expect([ExpectEOF, "never"], timeout=30) == 0
        assert "two" in s.before
        assert s.wait(10) == 0


def test_resize_reaches_remote(master: Master) -> None:
    script = "stty size; trap 'stty size' WINCH; echo TRAPPED; while :; do sleep 0.05; done"
    with spawn(master, script, size=(33, 111)) as s:
        s.expect(r"33 111")
        s.expect("TRAPPED")
        s.resize(50, 60)
        assert s.getwinsize() == (50, 60)
        s.expect(r"50 60")
        s.sendintr()
        s.expect_eof()


def test_signal_death_and_ssh_failure(master: Master, local_sshd: LocalSSHD) -> None:
    with spawn(master, "kill -9 $$") as s:
        assert s.expect_eof() == UNKNOWN_SIGNAL
        assert s.ssh_error is None
    with spawn(master, "exit 255") as s:
        assert s.expect_eof() == 255 and s.ssh_error is None
    # without a master too (ssh's own log says exit-signal)
    direct = Master(local_sshd.host, local_sshd.ssh_args)
    with spawn(direct, "kill -9 $$") as s:
        assert s.expect_eof() == UNKNOWN_SIGNAL
    broken = Master(local_sshd.host, [*local_sshd.ssh_args, "-o", "Port=1"])
    with spawn(broken, "true") as s:
        with pytest.raises(ExpectEOF):
            s.expect("never")
        assert s.wait(10) == 255
        assert isinstance(s.ssh_error, SSHConnectionError)
        assert "Connection refused" in str(s.ssh_error)


def test_pipes_mode_is_byte_exact(master: Master) -> None:
    with spawn(master, "printf 'a\\nb\\n'; cat", tty=False) as s:
        s.expect("b\n")
        assert s.before == "a\n"
        s.send("x~.y\n")  # no escape character, no pty: comes back as sent
        s.expect(r"x~\.y\n")
        s.sendeof()
        assert s.expect_eof() == 0


def _remote_pids_running(sshd: LocalSSHD, marker: str) -> list[int]:
    found = []
    for pid in sshd.session_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def test_leaving_the_with_stops_the_remote_program(master: Master, local_sshd: LocalSSHD) -> None:
    marker = "sleep 4711"
    with spawn(master, f"echo STARTED; {marker}") as s:
        s.expect("STARTED")
        wait_until(lambda: _remote_pids_running(local_sshd, marker), 10, "remote sleep")
        pid = s.pid
    assert not s.isalive()
    assert not os.path.exists(f"/proc/{pid}") or s.returncode is not None
    wait_until(lambda: not _remote_pids_running(local_sshd, marker), 10, "remote sleep to end")


# -- interact() through a real outer terminal ---------------------------------------------

_INTERACT_SCRIPT = textwrap.dedent(
    """
    import json, sys, termios
    from sshwrap.spawn import Spawned
    cfg = json.loads(sys.argv[1])
    with Spawned(None, destination=cfg["host"], ssh_args=cfg["args"]) as s:
        s.sendline("PS1='rsh$ '; echo pre-$((1+1))")
        s.expect("pre-2")
        print("INTERACT-START", flush=True)
        r = s.interact()
        echo = bool(termios.tcgetattr(0)[3] & termios.ECHO)
        print(f"BACK eof={r.eof} escaped={r.escaped} rc={s.returncode} echo={echo}", flush=True)
        if r.escaped:
            s.sendline("echo after-$((3+4))")
            s.expect("after-7")
            print("STILL-ALIVE", flush=True)
            s.sendline("exit 6")
            print("FINAL", s.expect_eof(), flush=True)
    """
)


def _interact_term(master: Master, tmp_path: Path, rows: int = 24, cols: int = 80) -> Term:
    script = tmp_path / "interact.py"
    script.write_text(_INTERACT_SCRIPT)
    cfg = json.dumps({"host": master.host, "args": master.args})
    return Term([sys.executable, str(script), cfg], rows=rows, cols=cols)


def test_interact_until_remote_exits(master: Master, tmp_path: Path) -> None:
    t = _interact_term(master, tmp_path, rows=30, cols=100)
    try:
        t.wait_raw(b"INTERACT-START")
        t.wait_screen("rsh$")  # output left over from expect() is shown first
        t.send("stty size\r")
        t.wait_screen("30 100")  # the pty got the outer terminal's size
        t.send("echo typed-$((2+3))\r")
        screen = t.wait_screen("typed-5")
        assert screen.count("echo typed-$((2+3))") == 1  # echoed once, by the remote pty
        # a resize reaches the remote program by itself (SIGWINCH there), no keypress needed
        t.send(
            'sh -c \'trap "stty size; echo WINCHED" WINCH; echo TRAPPED; '
            "while :; do sleep 0.05; done'\r"
        )
        t.wait_raw(b"\nTRAPPED")
        mark = len(t.raw)
        t.resize(40, 120)
        t.wait_raw(b"40 120", start=mark)
        t.wait_raw(b"WINCHED", start=mark)
        mark = len(t.raw)
        t.send("\x03")
        t.wait_raw(b"rsh$ ", start=mark)
        t.send("exit 4\r")
        t.wait_raw(b"BACK eof=True escaped=False rc=4 echo=True")
        assert t.wait_exit() == (0, None)
    finally:
        t.close()


def test_interact_escape_key_hands_back(master: Master, tmp_path: Path) -> None:
    t = _interact_term(master, tmp_path)
    try:
        t.wait_raw(b"INTERACT-START")
        t.wait_screen("rsh$")
        t.send("echo inside\r")
        t.wait_screen("\ninside")
        t.send(b"\x1d")
        t.wait_raw(b"BACK eof=False escaped=True rc=None echo=True")
        t.wait_raw(b"STILL-ALIVE")  # the remote shell survived the hand-back
        t.wait_raw(b"FINAL 6")
        assert t.wait_exit() == (0, None)
    finally:
        t.close()


def test_interact_passes_sigterm_on_and_restores_terminal(master: Master, tmp_path: Path) -> None:
    t = _interact_term(master, tmp_path)
    try:
        t.wait_raw(b"INTERACT-START")
        t.wait_screen("rsh$")
        t.send("echo alive-$((4+4))\r")
        t.wait_screen("alive-8")
        os.kill(t.proc.pid, signal.SIGTERM)  # to the program that is inside interact()
        # relayed to ssh, which ends; interact() returns and the terminal is cooked again
        m = t.wait_raw(re.compile(rb"BACK eof=True escaped=False rc=(-?\d+) echo=True"))
        assert int(m.group(1)) < 0  # the session ended by a signal (the hang-up), not an exit
        assert t.wait_exit() == (0, None)
    finally:
        t.close()
