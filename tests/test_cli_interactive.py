"""The drop-in command in interactive mode, through a real outer pty and the pyte emulator."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest
from ptyterm import Term, sshwrap_argv
from waiting import wait_until

from sshwrap.testing import LocalSSHD, comm, descendants


@pytest.fixture(scope="module")
def master(local_sshd: LocalSSHD, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A plain-ssh ControlMaster, so repeated sessions skip the key exchange: yields ssh args."""
    d = tmp_path_factory.mktemp("cm")
    os.chmod(d, 0o700)
    sock = str(d / "s")
    base = [*local_sshd.ssh_args, "-o", f"ControlPath={sock}"]
    subprocess.run(
        ["ssh", *base, "-M", "-N", "-f", "-o", "ControlPersist=yes", local_sshd.host],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    yield base
    subprocess.run(["ssh", *base, "-O", "exit", local_sshd.host], capture_output=True, timeout=30)


def test_size_resize_and_single_echo(local_sshd: LocalSSHD) -> None:
    t = Term(sshwrap_argv(*local_sshd.ssh_args, local_sshd.host), rows=30, cols=100)
    try:
        _prompt(t)
        t.send("stty size\r")
        t.wait_screen("30 100")
        # Typed input is echoed once (by the remote pty), not twice.
        t.send("echo one-echo-only\r")
        screen = t.wait_screen("\none-echo-only")
        assert screen.count("echo one-echo-only") == 1, screen
        # The remote learns the new size from SIGWINCH alone, without any keypress.
        # A foreground program that prints the size when SIGWINCH reaches it.
        t.send(
            'sh -c \'trap "stty size; echo WINCHED" WINCH; echo TRAPPED; '
            "while :; do sleep 0.05; done'\r"
        )
        t.wait_raw(b"\nTRAPPED")
        mark = len(t.raw)
        t.resize(40, 120)
        t.wait_raw(b"40 120", start=mark)
        t.wait_raw(b"WINCHED", start=mark)
        t.send("\x03")
        t.send("exit 0\r")
        assert t.wait_exit() == (0, None)
    finally:
        t.close()


def test_last_output_never_lost(master: list[str], local_sshd: LocalSSHD) -> None:
    for i in range(200):
        t = Term(sshwrap_argv(*master, "-t", local_sshd.host, "printf done; exit 3"), screen=False)
        try:
            status = t.wait_exit()
            out = bytes(t.raw)
        finally:
            t.close()
        assert b"done" in out, (i, out)
        assert status == (3, None), (i, status, out)


_RUNNER = textwrap.dedent(
    """
    import subprocess, sys, termios
    before = termios.tcgetattr(0)
    p = subprocess.Popen([sys.executable, "-m", "sshwrap", *sys.argv[1:]])
    sys.stdout.write(f"PID={p.pid};\\n"); sys.stdout.flush()
    rc = p.wait()
    after = termios.tcgetattr(0)
    sys.stdout.write(f"\\r\\nEXIT={rc} SAME={before == after};\\r\\n"); sys.stdout.flush()
    """
)


def _runner(args: list[str]) -> tuple[Term, int]:
    t = Term([sys.executable, "-c", _RUNNER, *args], screen=False)
    m = t.wait_raw(re.compile(rb"PID=(\d+);"))
    return t, int(m.group(1))


def _result(t: Term) -> tuple[str, str]:
    m = t.wait_raw(re.compile(rb"EXIT=(-?\d+) SAME=(\w+);"))
    return m.group(1).decode(), m.group(2).decode()


def _prompt(t: Term) -> None:
    """Wait for the remote shell's prompt (typing earlier would be typeahead, echoed locally)."""
    t.wait_raw(b"$ ")


@pytest.mark.parametrize("how", ["exit", "remote-kill-9", "SIGTERM", "SIGHUP", "ssh-SIGKILL"])
def test_terminal_restored(local_sshd: LocalSSHD, how: str) -> None:
    t, pid = _runner([*local_sshd.ssh_args, local_sshd.host])
    try:
        _prompt(t)
        if how == "exit":
            t.send("exit 5\r")
            expect = "5"
        elif how == "remote-kill-9":
            t.send("kill -9 $$\r")
            expect = "255"
        elif how in ("SIGTERM", "SIGHUP"):
            os.kill(pid, getattr(signal, how))
            expect = "255"  # ssh's status when it is told to quit
        else:
            (ssh_pid,) = [p for p in descendants(pid) if comm(p) == "ssh"]
            os.kill(ssh_pid, signal.SIGKILL)
            expect = str(-signal.SIGKILL)  # sshwrap dies of ssh's signal, as ssh did
        code, same = _result(t)
        assert (code, same) == (expect, "True"), bytes(t.raw[-500:])
        t.read_to_eof()
    finally:
        t.close()


def test_ctrl_c_interrupts_remote_command(local_sshd: LocalSSHD) -> None:
    t = Term(sshwrap_argv(*local_sshd.ssh_args, local_sshd.host), screen=False)
    try:
        _prompt(t)
        t.send("sleep 100\r")

        def sleep_pids() -> list[int]:
            return [pid for pid in local_sshd.session_pids() if comm(pid) == "sleep"]

        wait_until(lambda: bool(sleep_pids()), what="remote sleep to start")
        t.send("\x03")
        wait_until(lambda: not sleep_pids(), timeout=10, what="remote sleep to stop")
        t.send("echo rc=$?\r")
        t.wait_raw(b"rc=130")
        t.send("exit\r")
        assert t.wait_exit() == (0, None)
    finally:
        t.close()


def test_one_megabyte_paste(master: list[str], local_sshd: LocalSSHD) -> None:
    payload = base64.encodebytes(os.urandom(768 * 1024))  # ~1 MB of 77-byte lines
    assert len(payload) > 1_000_000
    name = f"paste-{os.getpid()}.txt"
    t = Term(
        sshwrap_argv(*master, "-t", local_sshd.host, f"cat > {name}; echo CAT''DONE"), screen=False
    )
    try:
        t.send(payload, timeout=120)
        t.send(b"\x04")
        t.wait_raw(b"CATDONE", timeout=120)
        assert t.wait_exit(timeout=60) == (0, None)
    finally:
        t.close()
    remote = subprocess.run(
        ["ssh", *master, local_sshd.host, f"sha256sum {name}; rm -f {name}"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert remote.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_escape_sequences_work(local_sshd: LocalSSHD) -> None:
    t = Term(sshwrap_argv(*local_sshd.ssh_args, local_sshd.host), screen=False)
    try:
        _prompt(t)
        t.send("\r~?")
        t.wait_raw(b"Supported escape sequences")
        t.send("\r~.")
        status = t.wait_exit()
        assert b"Connection to" in t.raw and b"closed" in t.raw
        assert status == (255, None)
    finally:
        t.close()


def test_killed_sshd_gives_ssh_message_and_restores(
    local_sshd_factory: Callable[..., LocalSSHD],
) -> None:
    sshd = local_sshd_factory()
    t, _ = _runner([*sshd.ssh_args, sshd.host])
    try:
        _prompt(t)
        for pid in sshd.session_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        code, same = _result(t)
        assert (code, same) == ("255", "True"), bytes(t.raw[-500:])
        assert b"closed by remote host" in t.raw
        t.read_to_eof()
    finally:
        t.close()


def test_escape_suspend_and_fg(local_sshd: LocalSSHD) -> None:
    """``~^Z`` stops the session and gives the shell back; ``fg`` resumes it (at the new size)."""
    shell = shutil.which("bash")
    if shell is None:
        pytest.skip("needs bash for job control")
    env = {**os.environ, "PS1": "LOCAL> ", "TERM": "xterm"}
    t = Term([shell, "--norc", "--noprofile", "-i"], screen=False, env=env)
    try:
        t.wait_raw(b"LOCAL> ")
        mark = len(t.raw)
        argv = " ".join(shlex.quote(a) for a in sshwrap_argv(*local_sshd.ssh_args, local_sshd.host))
        t.send(f"{argv}\r")
        t.wait_raw(b"$ ", start=mark)
        t.send("echo remote-$((6*7))\r")
        t.wait_raw(b"remote-42", start=mark)
        mark = len(t.raw)
        t.send("\r~\x1a")
        # The local shell reports the job stopped and prompts again.
        t.wait_raw(re.compile(rb"Stopped.*\n.*LOCAL> "), start=mark)
        mark = len(t.raw)
        t.send("echo local-$((1+1))\r")
        t.wait_raw(b"local-2", start=mark)
        # The window changes while the session is stopped: fg resumes it at the new size.
        t.resize(33, 101)
        mark = len(t.raw)
        t.send("fg\r")
        t.send("\recho back-$((40+2)); stty size\r")
        t.wait_raw(b"back-42", start=mark)
        t.wait_raw(b"33 101", start=mark)
        mark = len(t.raw)
        t.send("exit 7\r")
        t.wait_raw(b"LOCAL> ", start=mark)
        t.send("echo status=$?\r")
        t.wait_raw(b"status=7", start=mark)
        t.send("exit\r")
        t.wait_exit()
    finally:
        t.close()


# A minimal job-control shell: sshwrap in a foreground process group of its own; reports the
# terminal's modes at the moment sshwrap stops (no shell restores them for it here).
_JOB_RUNNER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, termios
    before = termios.tcgetattr(0)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    def foreground():
        os.setpgid(0, 0)
        os.tcsetpgrp(0, os.getpid())
        signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    p = subprocess.Popen([sys.executable, "-m", "sshwrap", *sys.argv[1:]], preexec_fn=foreground)
    _, st = os.waitpid(p.pid, os.WUNTRACED)
    os.tcsetpgrp(0, os.getpgrp())
    stop = signal.Signals(os.WSTOPSIG(st)).name if os.WIFSTOPPED(st) else "none"
    print(f"STOP={stop} SAME={before == termios.tcgetattr(0)};", flush=True)
    sys.stdin.readline()
    os.tcsetpgrp(0, p.pid)
    os.kill(p.pid, signal.SIGCONT)
    _, st = os.waitpid(p.pid, 0)
    os.tcsetpgrp(0, os.getpgrp())
    code = os.waitstatus_to_exitcode(st)
    print(f"EXIT={code} SAME={before == termios.tcgetattr(0)};", flush=True)
    """
)


def test_escape_suspend_restores_modes_then_resumes_raw(local_sshd: LocalSSHD) -> None:
    """At the stop the terminal has the user's modes back; after SIGCONT it is raw again."""
    t = Term([sys.executable, "-c", _JOB_RUNNER, *local_sshd.ssh_args, local_sshd.host])
    try:
        _prompt(t)
        t.send("\r~\x1a")
        m = t.wait_raw(re.compile(rb"STOP=(\w+) SAME=(\w+);"))
        assert (m.group(1), m.group(2)) == (b"SIGTSTP", b"True"), bytes(t.raw[-500:])
        mark = len(t.raw)
        t.send("go\r")
        # Raw again: the remote shell echoes what is typed, and runs it.
        t.send("\recho back-$((40+2))\r")
        t.wait_raw(b"back-42", start=mark)
        t.send("exit 3\r")
        code, same = _result(t)
        assert (code, same) == ("3", "True"), bytes(t.raw[-500:])
    finally:
        t.close()
