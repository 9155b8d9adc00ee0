"""sshwrap.run / Popen / call / check_* against the real sshd (pipes mode)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
from test_process_helpers import (
    control_master,
    marker_seconds,
    timeout_case,
    wait_gone,
    wait_user_processes,
)

import sshwrap
from sshwrap.core.completed import popen_repr, popen_state
from sshwrap.core.options import (
    check_terminal,
    popen_text,
    run_streams,
    text_encoding,
    text_option,
)
from sshwrap.process import DEVNULL, PIPE, STDOUT
from sshwrap.testing import LocalSSHD


def test_run_attributes(local_sshd: LocalSSHD) -> None:
    r = sshwrap.run(
        local_sshd.host,
        ["printf", "%s\n", "a b", "$HOME"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        config=local_sshd.config,
    )
    assert isinstance(r, sshwrap.CompletedProcess)
    assert isinstance(r, subprocess.CompletedProcess)
    assert r.args == ["printf", "%s\n", "a b", "$HOME"]
    assert r.returncode == 0
    assert r.stdout == "a b\n$HOME\n"
    assert r.stderr == ""
    assert r.host == local_sshd.host
    assert "host1" in repr(r)


def test_str_goes_to_shell_as_is(local_sshd: LocalSSHD) -> None:
    out = sshwrap.check_output(
        local_sshd.host,
        "echo $((40+2)) | tr 4 x; echo $0 >&2",
        config=local_sshd.config,
        stderr=DEVNULL,
    )
    assert out == b"x2\n"


def test_stdout_and_stderr_separate_and_exact(local_sshd: LocalSSHD) -> None:
    r = sshwrap.run(
        local_sshd.host,
        "printf 'o\\r\\n\\0x'; printf 'e\\n' >&2",
        capture_output=True,
        config=local_sshd.config,
    )
    assert r.stdout == b"o\r\n\0x"
    assert r.stderr == b"e\n"


def test_text_encoding_errors(local_sshd: LocalSSHD) -> None:
    r = sshwrap.run(
        local_sshd.host,
        ["printf", "caf\\351\\n"],
        capture_output=True,
        encoding="latin-1",
        config=local_sshd.config,
    )
    assert r.stdout == "café\n"
    r = sshwrap.run(
        local_sshd.host,
        ["printf", "\\377\\n"],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        config=local_sshd.config,
    )
    assert r.stdout == "\ufffd\n"


def test_input_and_stdin_pipe(local_sshd: LocalSSHD) -> None:
    r = sshwrap.run(
        local_sshd.host, "wc -c", input=b"12345", capture_output=True, config=local_sshd.config
    )
    assert r.stdout.strip() == b"5"
    r = sshwrap.run(
        local_sshd.host,
        ["cat"],
        input="héllo",
        text=True,
        capture_output=True,
        config=local_sshd.config,
    )
    assert r.stdout == "héllo"


_CHILD = """
import sys, sshwrap
r = sshwrap.run(sys.argv[1], "cat", config=sys.argv[2], capture_output=True, **{kw})
print(repr(r.stdout))
print(repr(sys.stdin.read()))
"""


def test_stdin_defaults_to_devnull(local_sshd: LocalSSHD) -> None:
    """The ``while read host; do ssh ...; done`` pitfall: our stdin must stay ours."""
    code = _CHILD.replace("{kw}", "{}")
    child = subprocess.run(
        [sys.executable, "-c", code, local_sshd.host, local_sshd.config],
        input=b"host2\nhost3\n",
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.decode().splitlines() == ["b''", repr("host2\nhost3\n")]


def test_stdin_none_inherits(local_sshd: LocalSSHD) -> None:
    code = _CHILD.replace("{kw}", "{'stdin': None}")
    child = subprocess.run(
        [sys.executable, "-c", code, local_sshd.host, local_sshd.config],
        input=b"host2\nhost3\n",
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.decode().splitlines() == [repr(b"host2\nhost3\n"), "''"]


def test_stdout_to_file_and_stderr_to_stdout(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    path = tmp_path / "out"
    with open(path, "wb") as f:
        r = sshwrap.run(
            local_sshd.host,
            "echo one; echo two >&2",
            stdout=f,
            stderr=STDOUT,
            config=local_sshd.config,
        )
    assert r.returncode == 0 and r.stdout is None
    assert sorted(path.read_bytes().splitlines()) == [b"one", b"two"]
    fd = os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        sshwrap.run(local_sshd.host, "echo to-fd >&2", stderr=fd, config=local_sshd.config)
    finally:
        os.close(fd)
    assert (tmp_path / "err").read_bytes() == b"to-fd\n"
    r = sshwrap.run(local_sshd.host, "echo gone", stdout=DEVNULL, config=local_sshd.config)
    assert r.stdout is None and r.returncode == 0


def test_env_and_cwd(local_sshd: LocalSSHD) -> None:
    weird = "d i r'$`;\n-x"
    base = sshwrap.check_output(
        local_sshd.host, "mktemp -d", text=True, config=local_sshd.config
    ).strip()
    try:
        sshwrap.check_call(
            local_sshd.host, ["mkdir", "--", f"{base}/{weird}"], config=local_sshd.config
        )
        env = {"A": "x y'z$HOME`id`", "B": "", "C_1": "é\nline"}
        r = sshwrap.run(
            local_sshd.host,
            'pwd; printf "%s|" "$A" "$B" "$C_1"',
            env=env,
            cwd=f"{base}/{weird}",
            capture_output=True,
            text=True,
            config=local_sshd.config,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"{base}/{weird}\n" + "x y'z$HOME`id`||é\nline|"
    finally:
        sshwrap.run(local_sshd.host, ["rm", "-rf", "--", base], config=local_sshd.config)
    with pytest.raises(ValueError):
        sshwrap.run(local_sshd.host, "true", env={"A=B": "x"}, config=local_sshd.config)


def test_missing_cwd_runs_nothing(local_sshd: LocalSSHD) -> None:
    r = sshwrap.run(
        local_sshd.host,
        "echo ran",
        cwd="/nonexistent/dir",
        capture_output=True,
        config=local_sshd.config,
    )
    assert r.returncode != 0
    assert r.stdout == b""
    assert b"nonexistent" in r.stderr


def test_settings_user_port_identity_options(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    # A config that names no user, port or key: they must come from the keywords.
    config = tmp_path / "config"
    config.write_text(
        "Host *\n"
        f"    UserKnownHostsFile {local_sshd.known_hosts}\n"
        "    GlobalKnownHostsFile /dev/null\n"
        "    StrictHostKeyChecking yes\n"
        "    IdentitiesOnly yes\n"
        "    PasswordAuthentication no\n"
        "    KbdInteractiveAuthentication no\n"
    )
    r = sshwrap.run(
        local_sshd.addresses[0],
        "id -un",
        config=config,
        user=local_sshd.user,
        port=local_sshd.port,
        identity=local_sshd.identity,
        options={"ConnectTimeout": 20, "BatchMode": True},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{local_sshd.user}\n"
    # options= come before the config: Port=1 wins over the config's port.
    with pytest.raises(sshwrap.SSHConnectionError):
        sshwrap.run(local_sshd.host, "true", config=local_sshd.config, options={"Port": 1})


def test_jump(local_sshd: LocalSSHD) -> None:
    r = sshwrap.run(
        local_sshd.host,
        "echo through",
        jump=local_sshd.host,
        config=local_sshd.config,
        capture_output=True,
        timeout=60,
    )
    assert r.stdout == b"through\n"
    with pytest.raises(sshwrap.SSHConnectionError):
        sshwrap.run(
            local_sshd.host,
            "true",
            jump="bad..host",
            config=local_sshd.config,
            capture_output=True,
            timeout=60,
        )


def test_call_check_call_check_output(local_sshd: LocalSSHD) -> None:
    assert sshwrap.call(local_sshd.host, "exit 7", config=local_sshd.config) == 7
    assert sshwrap.check_call(local_sshd.host, ["true"], config=local_sshd.config) == 0
    assert (
        sshwrap.check_output(local_sshd.host, "uname", text=True, config=local_sshd.config).strip()
        == os.uname().sysname
    )


# -- Popen --------------------------------------------------------------------------------


def test_popen_basics(local_sshd: LocalSSHD) -> None:
    with sshwrap.Popen(
        local_sshd.host, ["cat"], stdin=PIPE, stdout=PIPE, config=local_sshd.config
    ) as p:
        assert isinstance(p, subprocess.Popen)
        assert p.pid > 0 and p.args == ["cat"] and p.host == local_sshd.host
        assert p.returncode is None and p.poll() is None
        out, err = p.communicate(b"data", timeout=30)
    assert (out, err) == (b"data", None)
    assert p.returncode == 0 and p.poll() == 0


def test_popen_wait_timeout(local_sshd: LocalSSHD) -> None:
    with sshwrap.Popen(local_sshd.host, "exec sleep 30", config=local_sshd.config) as p:
        with pytest.raises(sshwrap.TimeoutExpired) as info:
            p.wait(timeout=0.5)
        assert info.value.host == local_sshd.host
        p.kill()
        assert p.wait(timeout=30) == -9


def test_first_line_arrives_before_exit(local_sshd: LocalSSHD) -> None:
    """Acceptance: the first line of ``echo a; sleep 2; echo b`` is read in under 1 s.

    Through a ControlMaster, so the key exchange of a loaded machine is not what is measured.
    """
    with control_master(local_sshd.config, local_sshd.host) as mux:
        start = time.monotonic()
        with sshwrap.Popen(
            local_sshd.host,
            "echo a; sleep 2; echo b",
            stdout=PIPE,
            config=local_sshd.config,
            options=mux,
        ) as p:
            assert p.stdout is not None
            assert p.stdout.readline() == b"a\n"
            first = time.monotonic() - start
            assert p.stdout.readline() == b"b\n"
            second = time.monotonic() - start
            assert p.wait(timeout=30) == 0
    assert first < 1.0
    assert second - first > 1.5


def test_lines_stream_on_fresh_connection(local_sshd: LocalSSHD) -> None:
    with sshwrap.Popen(
        local_sshd.host, "echo a; sleep 2; echo b", stdout=PIPE, config=local_sshd.config
    ) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == b"a\n"
        first = time.monotonic()
        assert p.stdout.readline() == b"b\n"
        assert time.monotonic() - first > 1.5  # a arrived while the remote still slept
        assert p.wait(timeout=30) == 0


def test_communicate_32mb_both_ways(local_sshd: LocalSSHD) -> None:
    data = os.urandom(32 << 20)
    with sshwrap.Popen(
        local_sshd.host,
        "cat; echo done >&2",
        stdin=PIPE,
        stdout=PIPE,
        stderr=PIPE,
        config=local_sshd.config,
    ) as p:
        out, err = p.communicate(data, timeout=120)
    assert out == data
    assert err == b"done\n"


def test_terminate_reaches_remote(local_sshd: LocalSSHD) -> None:
    marker = marker_seconds()
    with sshwrap.Popen(
        local_sshd.host, f"echo up; exec sleep {marker}", stdout=PIPE, config=local_sshd.config
    ) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == b"up\n"
        pids = wait_user_processes(local_sshd.user, marker)
        assert pids
        p.terminate()
        assert p.wait(timeout=30) == -15
    assert wait_gone(pids, 5) == []


def test_kill_stops_remote_and_local(local_sshd: LocalSSHD) -> None:
    marker = marker_seconds()
    with sshwrap.Popen(
        local_sshd.host, f"echo up; exec sleep {marker}", stdout=PIPE, config=local_sshd.config
    ) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == b"up\n"
        pids = wait_user_processes(local_sshd.user, marker)
        assert pids
        t = time.monotonic()
        p.kill()
        assert p.wait(timeout=5) == -9
        assert time.monotonic() - t < 2
    assert wait_gone(pids, 5) == []


def test_timeout_stops_remote_command(local_sshd: LocalSSHD) -> None:
    """Acceptance: timeout=1 on sleep 100 raises within 2 s; the remote sleep is gone in 5 s."""
    elapsed, pids = timeout_case(
        lambda m: sshwrap.run(local_sshd.host, ["sleep", m], timeout=1, config=local_sshd.config),
        local_sshd.user,
    )
    assert elapsed < 2
    assert wait_gone(pids, 5) == []


def test_timeout_stops_remote_command_through_master(local_sshd: LocalSSHD) -> None:
    with control_master(local_sshd.config, local_sshd.host) as mux:
        elapsed, pids = timeout_case(
            lambda m: sshwrap.run(
                local_sshd.host, ["sleep", m], timeout=1, config=local_sshd.config, options=mux
            ),
            local_sshd.user,
            attempts=1,
        )
        assert elapsed < 2
        assert wait_gone(pids, 5) == []


def test_call_timeout_stops_remote_command(local_sshd: LocalSSHD) -> None:
    elapsed, pids = timeout_case(
        lambda m: sshwrap.call(local_sshd.host, ["sleep", m], timeout=1, config=local_sshd.config),
        local_sshd.user,
    )
    assert elapsed < 2
    assert wait_gone(pids, 5) == []


def test_ssh_error_from_popen_wait(local_sshd: LocalSSHD) -> None:
    with sshwrap.Popen(local_sshd.host, "true", config=local_sshd.config, port=1, stderr=PIPE) as p:
        with pytest.raises(sshwrap.SSHConnectionError):
            p.wait(timeout=30)
        assert p.poll() == 255
        assert isinstance(p.ssh_error, sshwrap.SSHConnectionError)
        assert "Connection refused" in p.ssh_messages


def test_ssh_messages_appended_to_captured_stderr(local_sshd: LocalSSHD) -> None:
    # A warning ssh prints at its default level must still reach the caller.
    with sshwrap.Popen(
        local_sshd.host,
        "echo remote >&2",
        stderr=PIPE,
        config=local_sshd.config,
        options={"StrictHostKeyChecking": "accept-new", "UserKnownHostsFile": "/dev/null"},
    ) as p:
        _, err = p.communicate(timeout=30)
    assert err.startswith(b"remote\n")
    assert b"Warning: Permanently added" in err
    assert b"debug" not in err


def test_reading_stdout_object_directly(local_sshd: LocalSSHD) -> None:
    with sshwrap.Popen(
        local_sshd.host, "seq 1 3", stdout=PIPE, text=True, config=local_sshd.config
    ) as p:
        assert p.stdout is not None
        assert isinstance(p.stdout, io.TextIOWrapper)
        assert list(p.stdout) == ["1\n", "2\n", "3\n"]
    assert p.returncode == 0


def test_local_ssh_killed_hangs_up_remote(local_sshd: LocalSSHD) -> None:
    """^C reaches the local ssh too: the remote command is hung up, as a terminal would."""
    marker = marker_seconds()
    with sshwrap.Popen(
        local_sshd.host, f"echo up; exec sleep {marker}", stdout=PIPE, config=local_sshd.config
    ) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == b"up\n"
        pids = wait_user_processes(local_sshd.user, marker)
        assert pids
        os.kill(p.pid, signal.SIGINT)
        assert p.wait(timeout=30) == -signal.SIGINT
    assert wait_gone(pids, 5) == []


def test_host_is_never_an_option(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    with pytest.raises(ValueError, match="may not start with '-'"):
        sshwrap.run(
            f"-oProxyCommand=touch {target}", "true", config=local_sshd.config, capture_output=True
        )
    assert not target.exists()


def test_send_any_signal(local_sshd: LocalSSHD) -> None:
    script = "trap 'echo got-usr1; exit 0' USR1; echo ready; while :; do sleep 1; done"
    with sshwrap.Popen(local_sshd.host, script, stdout=PIPE, config=local_sshd.config) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        p.send_signal(signal.SIGUSR1)
        assert p.stdout.readline() == b"got-usr1\n"
        assert p.wait(timeout=30) == 0


def test_communicate_timeout_then_kill_and_collect(local_sshd: LocalSSHD) -> None:
    """The subprocess idiom: on TimeoutExpired, kill() and communicate() again."""
    with (
        control_master(local_sshd.config, local_sshd.host) as mux,
        sshwrap.Popen(
            local_sshd.host,
            "echo first; exec sleep 60",
            stdout=PIPE,
            config=local_sshd.config,
            options=mux,
        ) as p,
    ):
        with pytest.raises(sshwrap.TimeoutExpired):
            p.communicate(timeout=1.5)
        p.kill()
        out, _ = p.communicate(timeout=30)
    assert out == b"first\n"
    assert p.returncode == -signal.SIGKILL


def test_terminate_reaches_a_shell_running_builtins_only(local_sshd: LocalSSHD) -> None:
    """The session's shell has no child to carry the tag: it is found by its command line."""
    with sshwrap.Popen(
        local_sshd.host, "echo up; while :; do :; done", stdout=PIPE, config=local_sshd.config
    ) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == b"up\n"
        p.terminate()
        assert p.wait(timeout=30) == -signal.SIGTERM


def test_stdin_from_file_and_fd(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(b"from a file\n")
    with open(src, "rb") as f:
        r = sshwrap.run(
            local_sshd.host, "cat", stdin=f, capture_output=True, config=local_sshd.config
        )
    assert r.stdout == b"from a file\n"
    fd = os.open(src, os.O_RDONLY)
    try:
        r = sshwrap.run(
            local_sshd.host, "wc -c", stdin=fd, capture_output=True, config=local_sshd.config
        )
    finally:
        os.close(fd)
    assert r.stdout.strip() == b"12"


# -- subprocess's checks, written once in core.options (issue 11) ------------------------------
def test_run_streams_refuse_what_subprocess_run_refuses() -> None:
    with pytest.raises(ValueError, match=r"^stdin and input arguments may not both be used\.$"):
        run_streams(b"x", False, {"stdin": DEVNULL})
    with pytest.raises(ValueError, match="capture_output"):
        run_streams(None, True, {"stderr": STDOUT})
    assert run_streams(b"x", True, {"stdin": None}) == (PIPE, PIPE, PIPE)
    assert run_streams(None, False, {}) == (DEVNULL, None, None)  # sshwrap's stdin default


def test_text_options_as_subprocess_popen() -> None:
    assert text_option({"universal_newlines": True}) is True
    assert text_option({"text": False, "universal_newlines": None}) is False
    with pytest.raises(subprocess.SubprocessError, match="Cannot disambiguate"):
        text_option({"text": True, "universal_newlines": False})
    assert popen_text({}) == (False, None)
    assert popen_text({"text": True}) == (True, text_encoding())
    assert popen_text({"errors": "replace"}) == (True, text_encoding())
    assert popen_text({"encoding": "latin-1"}) == (True, "latin-1")
    with subprocess.Popen(["true"], stdout=DEVNULL, universal_newlines=True) as p:
        assert popen_text({"universal_newlines": True})[1] == cast(Any, p).encoding


def test_size_needs_tty() -> None:
    check_terminal({"tty": True, "size": (30, 100)})
    check_terminal({"tty": False})
    with pytest.raises(ValueError, match=r"size= needs tty=True"):
        check_terminal({"size": (30, 100)})


class Popen:
    """Stands for a started command in popen_repr's tests (its class name is shown)."""

    def __init__(self, returncode: int | None, args: object) -> None:
        self.returncode, self.args = returncode, args


def test_popen_repr_shapes() -> None:
    assert popen_repr(Popen(None, ["cat"]), "h1", popen_state(None)) == (
        "<Popen: returncode: None args: ['cat'] host: 'h1' state: running>"
    )
    assert popen_state(0) == popen_state(3) == "exited"
    assert popen_state(-9) == "killed by a signal"
    assert popen_state(255, sshwrap.SSHConnectionError("h1", "gone")) == (
        "failed (SSHConnectionError)"
    )
    long = popen_repr(Popen(0, ["x" * 200]), "h1", "exited")
    assert long.startswith("<Popen: returncode: 0 args: ['xxx") and "...' host" not in long
    assert long.endswith("... host: 'h1' state: exited>")
    assert len(long.split(" host: ")[0]) == 79  # cut as subprocess cuts: 76 + "..."


def test_popen_repr_through_its_life(local_sshd: LocalSSHD) -> None:
    p = sshwrap.Popen(local_sshd.host, ["sleep", "300"], config=local_sshd.config)
    assert repr(p) == (
        f"<Popen: returncode: None args: ['sleep', '300'] host: {local_sshd.host!r} state: running>"
    )
    p.kill()
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert repr(p).endswith(f"host: {local_sshd.host!r} state: killed by a signal>")
    assert repr(p).startswith("<Popen: returncode: -9 args: ")


def test_getstatusoutput_of_a_failed_ssh_raises(local_sshd: LocalSSHD) -> None:
    # No status arrived: an error, never a (status, output) pair.
    with pytest.raises(sshwrap.SSHError):
        sshwrap.getstatusoutput(local_sshd.host, "true", config=local_sshd.config, port=1)


def test_getoutput_encoding_and_timeout(local_sshd: LocalSSHD) -> None:
    got = sshwrap.getstatusoutput(
        local_sshd.host, "printf 'caf\\351\\n'", encoding="latin-1", config=local_sshd.config
    )
    assert got == (0, "café")
    with pytest.raises(sshwrap.TimeoutExpired):
        sshwrap.getoutput(local_sshd.host, "sleep 60", timeout=1, config=local_sshd.config)
