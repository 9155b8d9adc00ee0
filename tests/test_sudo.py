"""``sudo=True``: ``sudo -S`` with a password sent on stdin only (sshwrap.core.sudo).

The state machine is tested byte by byte without a server; the rest runs against a real sshd
(as root: the test makes a throwaway login user with a password, two throwaway target users
and a sudoers file with ``timestamp_timeout=0`` so sudo always asks, and removes them all at
the end).  Each runs through ``sshwrap.run``, ``Connection.run`` (a channel) and its
``ssh -S`` fallback.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sudo_users import (
    FAST,
    NOPASS,
    TARGET,
    needs_sudo,
    scans_while_running,
    secrets_seen,
    sudo_sshd,
)
from waiting import wait_until

import sshwrap
import sshwrap.aio
from sshwrap.core.completed import CompletedProcess
from sshwrap.core.sudo import Password, SudoRun, SudoSettings, sudo_settings
from sshwrap.errors import SudoError
from sshwrap.testing import LocalSSHD


# -- the state machine, no server --------------------------------------------------------
def machine(password: str | None = "pw", data: bytes | None = b"in") -> SudoRun:
    return SudoRun("h", SudoSettings(Password(password), None), data)


def feed_all(run: SudoRun, data: bytes, step: int) -> tuple[bytes, int, bytes, bool]:
    out, consumed, send, end = bytearray(), 0, bytearray(), False
    for i in range(0, len(data), step):
        o, c, s, e = run.feed(data[i : i + step])
        out += o
        consumed += c
        send += s
        end = end or e
    out += run.end()
    return bytes(out), consumed, bytes(send), end


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_machine_prompt_then_start_in_any_split(step: int) -> None:
    run = machine()
    stream = b"motd\n" + run.prompt + run.started_mark + b"err [sudo] password for x:\n"
    out, consumed, send, end = feed_all(run, stream, step)
    assert out == b"motd\nerr [sudo] password for x:\n"
    assert consumed == len(run.prompt) + len(run.started_mark)  # window: cut out bytes
    assert send == b"pw\nin" and end and run.started and run.failed is None
    assert run.outcome(0) is None


def test_machine_sends_no_password_when_not_asked() -> None:
    run = machine(data=None)
    out, _, send, end = feed_all(run, run.started_mark + run.prompt, 5)
    assert send == b"" and end
    assert out == run.prompt  # after the start, the command's output is left alone


@pytest.mark.parametrize(
    "said", [b"", b"Sorry, try again.\n", b"sudo: 1 incorrect password attempt\n"]
)
def test_machine_refused(said: bytes) -> None:
    run = machine(password="secret-pw")
    _, _, send, _ = run.feed(run.prompt)
    assert send == b"secret-pw\n"
    _, _, send, _ = run.feed(said + run.prompt)
    assert send == b"" and isinstance(run.failed, SudoError)
    assert "refused" in str(run.failed) and "secret-pw" not in repr(run.failed)
    assert run.outcome(None) is run.failed


def test_machine_no_password_given() -> None:
    run = machine(password=None)
    run.feed(run.prompt)
    assert run.failed is not None and "none was given" in str(run.failed)


def test_machine_sudo_ended_before_start() -> None:
    run = machine()
    run.feed(b"sudo: unknown user nosuch\n")
    err = run.outcome(1)
    assert isinstance(err, SudoError) and err.returncode == 1
    assert "unknown user nosuch" in str(err)


def test_password_callable_asked_once_and_hidden() -> None:
    calls: list[int] = []

    def ask() -> str:
        calls.append(1)
        return "pw-from-callable"

    pw = Password(ask)
    assert calls == []  # lazily
    assert pw.get() == pw.get() == b"pw-from-callable"
    assert calls == [1]
    assert "pw-from" not in repr(pw) + repr(SudoSettings(pw, "u"))


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"sudo_password": "x"}, ValueError),
        ({"sudo_user": "root"}, ValueError),
        ({"sudo": True, "tty": True}, ValueError),
        ({"sudo": True, "sudo_password": "a\nb"}, ValueError),
        ({"sudo": True, "sudo_password": 5}, TypeError),
        ({"sudo": True, "sudo_user": "-x"}, ValueError),
        ({"sudo": True, "sudo_user": ""}, ValueError),
    ],
)
def test_bad_sudo_keywords(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        sudo_settings(options)
    with pytest.raises(error):  # refused before any ssh starts
        sshwrap.run("nowhere.invalid", "true", **options)


def test_sudo_refuses_a_stdin(tmp_path: Path) -> None:
    with open(tmp_path / "in", "wb+") as f, pytest.raises(ValueError, match="input="):
        sshwrap.run("nowhere.invalid", "cat", sudo=True, stdin=f)


# -- against sshd ------------------------------------------------------------------------
class SudoHost:
    def __init__(self, sshd: LocalSSHD, password: str) -> None:
        self.sshd = sshd
        self.password = password
        self.kw: dict[str, Any] = {"config": sshd.config}

    @property
    def host(self) -> str:
        return self.sshd.host


@pytest.fixture(scope="module")
def sudo_host() -> Iterator[SudoHost]:
    with sudo_sshd() as (sshd, password):
        yield SudoHost(sshd, password)


@pytest.fixture(scope="module")
def conn(sudo_host: SudoHost) -> Iterator[sshwrap.Connection]:
    with sshwrap.connect(sudo_host.host, **sudo_host.kw) as c:
        yield c


@pytest.fixture(scope="module")
def fallback_conn(sudo_host: SudoHost) -> Iterator[sshwrap.Connection]:
    """A Connection whose commands go through ``ssh -S`` (the fallback's path)."""
    with sshwrap.connect(sudo_host.host, proxy=False, **sudo_host.kw) as c:
        yield c


class Runner:
    """``sshwrap.run`` (a fresh ssh), ``Connection.run`` (a channel) or its ``ssh -S``
    fallback, with the same arguments."""

    def __init__(self, kind: str, sudo_host: SudoHost, conn: sshwrap.Connection | None) -> None:
        self.kind = kind
        self._host = sudo_host
        self._conn = conn

    def __call__(self, args: Any, **kw: Any) -> CompletedProcess:
        kw.setdefault("timeout", 30)  # a sudo left waiting for a password fails, never hangs
        if self._conn is None:
            return sshwrap.run(self._host.host, args, **self._host.kw, **kw)
        result: CompletedProcess = self._conn.run(args, **kw)
        return result


@pytest.fixture(params=["ssh", "channel", "fallback"])
def runner(request: pytest.FixtureRequest, sudo_host: SudoHost) -> Runner:
    names = {"channel": "conn", "fallback": "fallback_conn"}
    conn = request.getfixturevalue(names[request.param]) if request.param in names else None
    return Runner(request.param, sudo_host, conn)


@needs_sudo
def test_right_password_runs_as_root(sudo_host: SudoHost, runner: Runner) -> None:
    pw = sudo_host.password
    r = runner(["id", "-u"], sudo=True, sudo_password=pw, capture_output=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"0\n", b"")  # prompt and mark cut out
    assert pw not in repr(r)
    r = runner(
        "id -u; cat; echo to-err >&2",
        sudo=True,
        sudo_password=pw.encode(),
        input="in\n",
        capture_output=True,
        text=True,
    )
    assert (r.stdout, r.stderr) == ("0\nin\n", "to-err\n")  # input= after the password


@needs_sudo
def test_sudo_user(sudo_host: SudoHost, runner: Runner) -> None:
    uid = pwd.getpwnam(TARGET).pw_uid
    r = runner(
        "id -u",
        sudo=True,
        sudo_user=TARGET,
        sudo_password=lambda: sudo_host.password,
        capture_output=True,
    )
    assert r.stdout == f"{uid}\n".encode()


@needs_sudo
def test_password_not_asked_is_not_sent(sudo_host: SudoHost, runner: Runner) -> None:
    uid = pwd.getpwnam(NOPASS).pw_uid
    asked: list[int] = []
    never = "never-sent-" + secrets.token_hex(4)

    def ask() -> str:
        asked.append(1)
        return never

    for password in (never, ask):
        r = runner(
            "id -u; cat",
            sudo=True,
            sudo_user=NOPASS,
            sudo_password=password,
            input=b"data\n",
            capture_output=True,
        )
        assert r.stdout == f"{uid}\ndata\n".encode()  # a sent password would be in cat's output
        assert r.stderr == b""
    if runner.kind != "channel":  # (a channel asks a callable before the command starts)
        assert asked == []


@needs_sudo
@pytest.mark.parametrize("given", ["wrong", None])
def test_wrong_or_missing_password_fails_fast(
    sudo_host: SudoHost, runner: Runner, given: str | None
) -> None:
    wrong = None if given is None else "wrong-" + secrets.token_hex(6)
    start = time.monotonic()
    with pytest.raises(SudoError) as info:
        runner("echo ran", sudo=True, sudo_password=wrong, capture_output=True)
    assert time.monotonic() - start < FAST
    err = info.value
    assert err.host == sudo_host.host
    for text in (str(err), repr(err), err.stderr, repr(err.args)):
        assert sudo_host.password not in text
        assert wrong is None or wrong not in text
    assert ("refused" if wrong else "none was given") in str(err)


@needs_sudo
def test_sudo_ended_before_the_command(sudo_host: SudoHost, runner: Runner) -> None:
    with pytest.raises(SudoError, match="did not run the command") as info:
        runner("id -u", sudo=True, sudo_user="no-such-user-h12", capture_output=True)
    assert info.value.returncode not in (None, 0)


@needs_sudo
def test_timeout_holds_while_sudo_authenticates(sudo_host: SudoHost, runner: Runner) -> None:
    """A wrong password keeps sudo in its failure delay (~2 s): a shorter timeout ends the
    call within its bound, as ``TimeoutExpired``."""
    start = time.monotonic()
    with pytest.raises(sshwrap.TimeoutExpired) as info:
        runner(
            "echo ran",
            sudo=True,
            sudo_password="wrong-" + secrets.token_hex(4),
            capture_output=True,
            timeout=0.8,
        )
    assert time.monotonic() - start < 0.8 + 1.5
    assert not info.value.stdout
    assert sudo_host.password.encode() not in (info.value.stderr or b"")


@needs_sudo
def test_output_that_looks_like_a_prompt(sudo_host: SudoHost, runner: Runner) -> None:
    script = (
        "printf '[sudo] password for x: '; printf '[sudo] password for x: ' >&2\n"
        "echo 'Sorry, try again.' >&2; printf 'Password:' >&2; id -u"
    )
    r = runner(script, sudo=True, sudo_password=sudo_host.password, capture_output=True, timeout=20)
    assert r.stdout == b"[sudo] password for x: 0\n"
    assert r.stderr == b"[sudo] password for x: Sorry, try again.\nPassword:"


@needs_sudo
def test_stderr_merged_and_inherited(sudo_host: SudoHost, runner: Runner, tmp_path: Path) -> None:
    pw = sudo_host.password
    r = runner(
        "id -u; echo e >&2",
        sudo=True,
        sudo_password=pw,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert r.stdout == b"0\ne\n"
    with open(tmp_path / "err", "wb") as f:
        runner("echo e >&2", sudo=True, sudo_password=pw, stderr=f)
    assert (tmp_path / "err").read_bytes() == b"e\n"


@needs_sudo
def test_aio_run(sudo_host: SudoHost) -> None:
    async def main() -> Any:
        return await sshwrap.aio.run(
            sudo_host.host,
            "id -u",
            sudo=True,
            capture_output=True,
            sudo_password=sudo_host.password,
            **sudo_host.kw,
        )

    assert asyncio.run(main()).stdout == b"0\n"


def test_the_scan_sees_a_secret(tmp_path: Path) -> None:
    secret = "scan-" + secrets.token_hex(6)
    log = tmp_path / "log"
    log.write_text(f"debug1: {secret}\n")
    env = {**os.environ, "SOME_VAR": secret}
    argv = ["sh", "-c", "sleep 30", "sh", "-E", str(log)]
    with (
        subprocess.Popen(argv, env=env) as p,
        subprocess.Popen(["sh", "-c", "sleep 30", secret]) as q,
    ):
        try:
            cmdlines = [Path(f"/proc/{child.pid}/cmdline") for child in (p, q)]
            # (both exec'd: their argv is the one given)
            wait_until(lambda: all(b"sleep 30" in c.read_bytes() for c in cmdlines), 10, "exec")
            logs: set[str] = set()
            seen = secrets_seen(secret.encode(), logs)
        finally:
            p.kill()
            q.kill()
    assert f"/proc/{p.pid}/environ" in seen and f"/proc/{q.pid}/cmdline" in seen
    assert str(log) in seen and str(log) in logs


@needs_sudo
def test_password_never_in_argv_env_or_logs(
    sudo_host: SudoHost, runner: Runner, tmp_path: Path
) -> None:
    secret = sudo_host.password.encode()
    tmp_path.chmod(0o755)
    started, go = tmp_path / "started", tmp_path / "go"
    script = f"touch {started}; while [ ! -e {go} ]; do sleep 0.02; done; id -u"
    logs: set[str] = set()
    mark = sudo_host.sshd.config.encode()  # (every ssh of the test has -F config)
    scans, result = scans_while_running(
        lambda: runner(
            script, sudo=True, sudo_password=sudo_host.password, capture_output=True, timeout=60
        ),
        started.exists,
        go,
        secret,
        logs,
        mark,
    )
    assert scans == [[], [], []]
    assert logs  # ssh's -E log (the client's, or the master's) was read
    assert isinstance(result, CompletedProcess), result
    assert result.stdout == b"0\n"
    assert secret not in repr(result).encode() + result.stderr
    assert secret not in Path(sudo_host.sshd.log).read_bytes()


def test_popen_refuses_sudo(local_sshd: LocalSSHD) -> None:
    """``sudo=`` is ``run``'s: a Popen never silently runs the command without it."""
    with sshwrap.connect(local_sshd.host, config=local_sshd.config) as c:
        given: tuple[tuple[str, Any], ...] = (("sudo", True), ("sudo_password", "x"))
        for key, value in (*given, ("sudo_user", "root")):
            with pytest.raises(TypeError, match=key):
                c.Popen(["id", "-u"], stdout=subprocess.PIPE, **{key: value})
        with pytest.raises(TypeError, match="sudo"):
            sshwrap.Popen(local_sshd.host, "true", sudo=True)  # type: ignore[call-arg]
