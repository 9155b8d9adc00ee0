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
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

import sshwrap
import sshwrap.aio
from sshwrap.core.completed import CompletedProcess
from sshwrap.core.sudo import Password, SudoRun, SudoSettings, sudo_settings
from sshwrap.errors import SudoError
from sshwrap.testing import LocalSSHD

LOGIN = "sshwrap-sudo"
TARGET = "sshwrap-sudo-to"  # sudo asks the password for it
NOPASS = "sshwrap-sudo-np"  # NOPASSWD: sudo never asks
SUDOERS = Path("/etc/sudoers.d/sshwrap-sudo-test")
FAST = 5.0  # a refused password must fail well within this (sudo's own delay is ~2 s)

needs_sudo = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("sudo") is None or shutil.which("visudo") is None,
    reason="needs root (throwaway users, a sudoers file) and sudo installed (make sshd)",
)


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


def _user(name: str, password: str | None) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--home-dir", f"/home/{name}", "--shell", "/bin/sh", name],
            check=True,
            capture_output=True,
        )
    entry = pwd.getpwnam(name)
    os.makedirs(entry.pw_dir, mode=0o755, exist_ok=True)
    os.chown(entry.pw_dir, entry.pw_uid, entry.pw_gid)
    pw_line = f"{name}:{password}\n" if password else None
    if pw_line:
        subprocess.run(["chpasswd"], input=pw_line.encode(), check=True, capture_output=True)
    else:
        subprocess.run(["usermod", "--password", "*", name], check=True, capture_output=True)


def _remove_user(name: str) -> None:
    try:
        home = pwd.getpwnam(name).pw_dir
    except KeyError:
        return
    subprocess.run(["userdel", name], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def sudo_host() -> Iterator[SudoHost]:
    password = "sudo-" + secrets.token_urlsafe(12)
    try:
        _user(LOGIN, password)
        _user(TARGET, None)
        _user(NOPASS, None)
        rules = (
            f"Defaults:{LOGIN} !lecture, timestamp_timeout=0\n"
            f"{LOGIN} ALL=(ALL) ALL\n"
            f"{LOGIN} ALL=({NOPASS}) NOPASSWD: ALL\n"
        )
        tmp = SUDOERS.with_name(SUDOERS.name + ".new")  # sudo skips names with a '.'
        tmp.write_text(rules)
        tmp.chmod(0o440)
        subprocess.run(["visudo", "-cqf", str(tmp)], check=True, capture_output=True)
        tmp.rename(SUDOERS)
        with LocalSSHD(user=LOGIN) as sshd:
            yield SudoHost(sshd, password)
    finally:
        SUDOERS.unlink(missing_ok=True)
        SUDOERS.with_name(SUDOERS.name + ".new").unlink(missing_ok=True)
        for name in (LOGIN, TARGET, NOPASS):
            _remove_user(name)


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


def _secrets_seen(secret: bytes, logs: set[str] | None = None, mark: bytes = b"") -> list[str]:
    """Where ``secret`` shows: any process's argv or environment, or an ssh ``-E`` log (the
    logs read of processes with ``mark`` in their argv are added to ``logs``)."""
    seen = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for part in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{part}").read_bytes()
            except OSError:
                continue
            if secret in data:
                seen.append(f"/proc/{pid}/{part}")
            if part == "cmdline" and b"\0-E\0" in data:
                args = data.split(b"\0")
                log = os.fsdecode(args[args.index(b"-E") + 1])
                try:
                    if secret in Path(log).read_bytes():
                        seen.append(log)
                except OSError:
                    continue
                if logs is not None and mark in data:
                    logs.add(log)
    return seen


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
            logs: set[str] = set()
            seen = _secrets_seen(secret.encode(), logs)
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
    results: list[Any] = []

    def call() -> None:
        try:
            results.append(
                runner(
                    script,
                    sudo=True,
                    sudo_password=sudo_host.password,
                    capture_output=True,
                    timeout=60,
                )
            )
        except BaseException as e:  # shown by the assertion below
            results.append(e)

    worker = threading.Thread(target=call)
    worker.start()
    try:
        wait_until(lambda: started.exists() or results, 30, "the command to start")
        logs: set[str] = set()
        mark = sudo_host.sshd.config.encode()  # (every ssh of the test has -F config)
        scans = [_secrets_seen(secret, logs, mark) for _ in range(3)]
    finally:
        go.touch()
        worker.join(60)
    assert not worker.is_alive()
    assert scans == [[], [], []]
    assert logs  # ssh's -E log (the client's, or the master's) was read
    (result,) = results
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
