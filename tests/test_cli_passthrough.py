"""Where ssh would not use a terminal, ``sshwrap`` behaves byte for byte like ssh."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys

import pytest
from ptyterm import Term, sshwrap_argv

from sshwrap.cli import wants_tty
from sshwrap.core.sshparse import parse_ssh_argv
from sshwrap.testing import LocalSSHD


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _both(
    args: list[str], stdin: bytes | None = None, prefix: list[str] | None = None
) -> tuple[subprocess.CompletedProcess[bytes], ...]:
    pre = prefix or []
    kw: dict[str, object] = {"capture_output": True, "timeout": 60}
    if stdin is None:
        kw["stdin"] = subprocess.DEVNULL
    else:
        kw["input"] = stdin
    ssh = subprocess.run([*pre, "ssh", *args], **kw)  # type: ignore[call-overload]
    wrap = subprocess.run([*pre, *sshwrap_argv(*args)], **kw)  # type: ignore[call-overload]
    return ssh, wrap


CASES = {
    "exit0": ([], "exit 0", None),
    "exit7": ([], "exit 7", None),
    "both-streams": ([], "echo out; echo err >&2; printf 'no newline'", None),
    "stdin-piped": ([], "tr a-z A-Z; echo; wc -c", b"hello\nworld\n"),
    "-n": (["-n"], "cat; echo after-cat", b"ignored\n"),
    "-T": (["-T"], "tty; echo status=$?", None),
    "-t-without-tty": (["-t"], "tty; echo status=$?", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_as_ssh(local_sshd: LocalSSHD, case: str) -> None:
    opts, command, stdin = CASES[case]
    ssh, wrap = _both([*local_sshd.ssh_args, *opts, local_sshd.host, command], stdin)
    assert (wrap.returncode, wrap.stdout, wrap.stderr) == (ssh.returncode, ssh.stdout, ssh.stderr)


def test_refused_port_same_as_ssh(local_sshd: LocalSSHD) -> None:
    ssh, wrap = _both([*local_sshd.ssh_args, "-p", str(_closed_port()), local_sshd.host, "true"])
    assert ssh.returncode == 255 and b"refused" in ssh.stderr
    assert (wrap.returncode, wrap.stdout, wrap.stderr) == (ssh.returncode, ssh.stdout, ssh.stderr)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root for an empty network namespace (no DNS query leaves)",
)
def test_unknown_host_same_as_ssh(local_sshd: LocalSSHD) -> None:
    # Inside a fresh network namespace name resolution fails without sending anything anywhere.
    ssh, wrap = _both(
        [*local_sshd.ssh_args, "no-such-host.invalid", "true"], prefix=["unshare", "--net"]
    )
    assert ssh.returncode == 255 and b"resolve" in ssh.stderr
    assert (wrap.returncode, wrap.stdout, wrap.stderr) == (ssh.returncode, ssh.stdout, ssh.stderr)


def test_version_and_usage_same_as_ssh() -> None:
    for args in (["-V"], [], ["-Z"]):
        ssh, wrap = _both(args)
        assert (wrap.returncode, wrap.stdout, wrap.stderr) == (
            ssh.returncode,
            ssh.stdout,
            ssh.stderr,
        )


def test_fifty_megabytes_through_cat(local_sshd: LocalSSHD) -> None:
    data = os.urandom(50 * 1024 * 1024)
    out = subprocess.run(
        sshwrap_argv(*local_sshd.ssh_args, local_sshd.host, "cat"),
        input=data,
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(data).digest()


def test_command_with_tty_stdin_still_execs(local_sshd: LocalSSHD) -> None:
    # stdin is a terminal, but a command without -t gets no tty from ssh: so neither from us.
    t = Term(sshwrap_argv(*local_sshd.ssh_args, local_sshd.host, "tty; echo rc=$?"), screen=False)
    try:
        status = t.wait_exit()
    finally:
        t.close()
    assert b"not a tty" in t.raw and b"rc=1" in t.raw
    assert status == (0, None)


def test_sshwrap_ssh_env_and_missing_ssh() -> None:
    env = dict(os.environ, SSHWRAP_SSH="/nonexistent/ssh")
    out = subprocess.run(sshwrap_argv("-V"), env=env, capture_output=True, timeout=30)
    assert out.returncode == 255
    assert b"sshwrap:" in out.stderr and b"/nonexistent/ssh" in out.stderr
    env = dict(os.environ, PATH="/nonexistent")
    env.pop("SSHWRAP_SSH", None)
    out = subprocess.run(sshwrap_argv("-V"), env=env, capture_output=True, timeout=30)
    assert out.returncode == 255 and b"not found" in out.stderr
    # SSHWRAP_SSH picks the binary: a stand-in that prints its arguments.
    env = dict(os.environ, SSHWRAP_SSH="/bin/echo")
    out = subprocess.run(sshwrap_argv("-V", "x y"), env=env, capture_output=True, timeout=30)
    assert out.stdout == b"-V x y\n"


def test_parse_like_ssh() -> None:
    p = parse_ssh_argv(["-p", "22", "-tt", "-oRequestTTY=no", "host", "-v", "ls", "-l"])
    assert p.destination == "host"
    assert p.command == ["ls", "-l"]
    assert p.values("p") == ["22"]
    assert [o for o, _ in p.options].count("t") == 2
    assert p.has("v")  # options after the destination, as ssh allows
    assert p.o_option("requesttty") == "no"
    p = parse_ssh_argv(["--", "host", "-t"])
    assert p.destination == "host" and p.command == ["-t"] and not p.has("t")
    assert parse_ssh_argv(["-p"]).error


@pytest.mark.parametrize(
    ("opts", "command", "tty", "expected"),
    [
        ([], [], True, True),
        ([], ["cmd"], True, False),
        (["-t"], ["cmd"], True, True),
        (["-T"], [], True, False),
        (["-N"], [], True, False),
        (["-n"], [], True, False),
        (["-f"], [], True, False),
        (["-W", "x:1"], [], True, False),
        (["-o", "RequestTTY=no"], [], True, False),
        (["-o", "RequestTTY=force"], ["cmd"], True, True),
        (["-o", "SessionType=none"], [], True, False),
        (["-o", "RemoteCommand=ls"], [], True, False),
        (["-o", "RemoteCommand=ls", "-t"], [], True, True),
        ([], [], False, False),
    ],
)
def test_mode_decision(
    local_sshd: LocalSSHD, opts: list[str], command: list[str], tty: bool, expected: bool
) -> None:
    ssh = shutil.which("ssh")
    assert ssh
    argv = [*local_sshd.ssh_args, *opts, local_sshd.host, *command]
    assert wants_tty(ssh, argv, tty) is expected, argv


def test_python_dash_m_entry() -> None:
    out = subprocess.run([sys.executable, "-m", "sshwrap", "-V"], capture_output=True, timeout=30)
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, timeout=30)
    assert (out.returncode, out.stderr) == (ssh.returncode, ssh.stderr)
