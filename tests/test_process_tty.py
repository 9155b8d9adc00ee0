"""tty=True: ssh -tt in a local pty, against the real sshd."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_process_helpers import timeout_case, wait_gone

import sshwrap
import sshwrap.aio
from sshwrap.process import PIPE
from sshwrap.testing import LocalSSHD

FACES = ["sync", "aio"]
"""``sshwrap.aio.run(tty=True)`` is the same procedure as ``sshwrap.run(tty=True)``: tests
marked with both run one body through each."""


def _run_face(
    face: str, host: str, cmd: sshwrap.process.Command, **kw: Any
) -> sshwrap.CompletedProcess:
    if face == "sync":
        return sshwrap.run(host, cmd, **kw)
    return asyncio.run(sshwrap.aio.run(host, cmd, **kw))


@pytest.mark.parametrize("face", FACES)
def test_remote_sees_a_terminal(local_sshd: LocalSSHD, face: str) -> None:
    r = _run_face(
        face,
        local_sshd.host,
        "tty; test -t 0 && test -t 1 && echo both",
        tty=True,
        capture_output=True,
        config=local_sshd.config,
    )
    assert r.returncode == 0
    lines = r.stdout.split(b"\r\n")
    assert lines[0].startswith(b"/dev/pts/")
    assert lines[1] == b"both"
    # ssh's own "Connection to ... closed." is not part of the output.
    assert b"Connection to" not in r.stdout
    assert r.stdout.endswith(b"both\r\n")


@pytest.mark.parametrize("face", FACES)
def test_size(local_sshd: LocalSSHD, face: str) -> None:
    r = _run_face(
        face,
        local_sshd.host,
        "stty size",
        tty=True,
        size=(33, 101),
        capture_output=True,
        config=local_sshd.config,
    )
    assert r.stdout == b"33 101\r\n"


@pytest.mark.parametrize("face", FACES)
def test_output_merged_text_mode(local_sshd: LocalSSHD, face: str) -> None:
    r = _run_face(
        face,
        local_sshd.host,
        "echo out; echo err >&2",
        tty=True,
        capture_output=True,
        text=True,
        config=local_sshd.config,
    )
    assert r.stdout == "out\nerr\n"
    assert r.stderr == ""  # merged by the terminal: nothing is left for stderr


@pytest.mark.parametrize("face", FACES)
def test_input_through_terminal(local_sshd: LocalSSHD, face: str) -> None:
    r = _run_face(
        face,
        local_sshd.host,
        "cat",
        tty=True,
        input=b"hello\n",
        capture_output=True,
        config=local_sshd.config,
        timeout=30,
    )
    assert r.returncode == 0
    assert b"hello\r\n" in r.stdout  # echoed by the remote terminal and written by cat


@pytest.mark.parametrize("face", FACES)
def test_signal_gives_negative_returncode(local_sshd: LocalSSHD, face: str) -> None:
    r = _run_face(
        face, local_sshd.host, "kill -9 $$", tty=True, config=local_sshd.config, capture_output=True
    )
    assert r.returncode < 0


@pytest.mark.parametrize("face", FACES)
def test_exit_status(local_sshd: LocalSSHD, face: str) -> None:
    r = _run_face(
        face, local_sshd.host, "exit 255", tty=True, config=local_sshd.config, capture_output=True
    )
    assert r.returncode == 255


def test_line_by_line_and_resize(local_sshd: LocalSSHD) -> None:
    with sshwrap.Popen(
        local_sshd.host,
        "stty size; while read x; do stty size; done",
        tty=True,
        stdin=PIPE,
        stdout=PIPE,
        config=local_sshd.config,
    ) as p:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline() == b"24 80\r\n"
        p.resize(40, 120)
        seen = []
        for _ in range(20):  # the new size reaches the remote pty asynchronously
            p.stdin.write(b"\n")
            p.stdin.flush()
            line = p.stdout.readline()
            while line == b"\r\n":  # the echoed newline
                line = p.stdout.readline()
            seen.append(line)
            if line == b"40 120\r\n":
                break
        assert seen[-1] == b"40 120\r\n", seen
        p.kill()
        p.wait(timeout=30)


@pytest.mark.parametrize("face", FACES)
def test_timeout_hangs_up(local_sshd: LocalSSHD, face: str) -> None:
    elapsed, pids = timeout_case(
        lambda m: _run_face(
            face,
            local_sshd.host,
            ["sleep", m],
            tty=True,
            timeout=1,
            capture_output=True,
            config=local_sshd.config,
        ),
        local_sshd.user,
    )
    assert elapsed < 2
    assert wait_gone(pids, 5) == []


@pytest.mark.parametrize("face", FACES)
def test_tty_ssh_error(local_sshd: LocalSSHD, face: str) -> None:
    with pytest.raises(sshwrap.SSHConnectionError):
        _run_face(
            face,
            local_sshd.host,
            "true",
            tty=True,
            port=1,
            config=local_sshd.config,
            capture_output=True,
        )


@pytest.mark.parametrize("face", FACES)
def test_text_input_through_terminal(local_sshd: LocalSSHD, face: str) -> None:
    r = _run_face(
        face,
        local_sshd.host,
        'read x; echo "[$x]"',
        tty=True,
        input="héllo\n",
        text=True,
        capture_output=True,
        config=local_sshd.config,
        timeout=30,
    )
    assert r.returncode == 0
    assert r.stdout.endswith("[héllo]\n")


@pytest.mark.parametrize("face", FACES)
def test_output_to_inherited_stdout(
    local_sshd: LocalSSHD, capfd: pytest.CaptureFixture[str], face: str
) -> None:
    r = _run_face(face, local_sshd.host, "echo shown", tty=True, config=local_sshd.config)
    assert r.returncode == 0 and r.stdout is None
    assert capfd.readouterr().out == "shown\r\n"
