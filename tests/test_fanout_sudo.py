"""``sudo=True`` in the fan-out: ``run_many``, ``sshwrap.aio.run_many`` and ``sshwrap-many
--sudo``, against ``LocalSSHD(hosts=8)`` logging in as a throwaway user whose sudo asks a
password (as root: see ``sudo_users``; skipped otherwise, with the reason)."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sudo_users import FAST, NOPASS, TARGET, needs_sudo, scans_while_running, sudo_sshd

import sshwrap
import sshwrap.aio
from sshwrap import HostResult
from sshwrap.errors import SudoError
from sshwrap.testing import LocalSSHD

EXE = str(Path(sys.executable).with_name("sshwrap-many"))
HOSTS = 8


class Fleet:
    def __init__(self, sshd: LocalSSHD, password: str) -> None:
        self.sshd = sshd
        self.password = password
        self.hosts = list(sshd.hosts)
        self.kw: dict[str, Any] = {"config": sshd.config}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("needs root (throwaway users, a sudoers file)")
    with sudo_sshd(HOSTS) as (sshd, password):
        yield Fleet(sshd, password)


def _hidden(secret: str, results: list[HostResult]) -> None:
    """``secret`` shows in no part of any result (its error's text included)."""
    for r in results:
        texts = [repr(r), r.ssh_log, str(r.error), repr(r.error)]
        if isinstance(r.error, SudoError):
            texts.append(r.error.stderr)
        assert all(secret not in t for t in texts), r.host
        assert secret.encode() not in r.stdout + r.stderr, r.host


@needs_sudo
def test_right_password_on_every_host(fleet: Fleet) -> None:
    asked: list[int] = []

    def ask() -> str:
        asked.append(1)
        return fleet.password

    results = sshwrap.run_many(
        fleet.hosts, ["id", "-u"], sudo=True, sudo_password=ask, timeout=60, **fleet.kw
    )
    assert [(r.status, r.stdout, r.stderr) for r in results] == [("ok", b"0\n", b"")] * HOSTS
    assert asked == [1]  # once for the run, not once per host
    _hidden(fleet.password, results)
    uid = pwd.getpwnam(TARGET).pw_uid
    as_target: dict[str, Any] = {"sudo": True, "sudo_user": TARGET, "sudo_password": fleet.password}
    script = "id -u; cat; echo to-err >&2"
    results = sshwrap.run_many(fleet.hosts, script, input=b"in\n", **as_target, **fleet.kw)
    assert {(r.status, r.stdout, r.stderr) for r in results} == {
        ("ok", f"{uid}\nin\n".encode(), b"to-err\n")  # input= after the password
    }


@needs_sudo
def test_aio_and_a_password_not_asked(fleet: Fleet) -> None:
    uid = pwd.getpwnam(NOPASS).pw_uid
    never = "never-sent-" + secrets.token_hex(4)

    async def main() -> list[HostResult]:
        gen = sshwrap.aio.run_many(
            fleet.hosts,
            "id -u; cat",
            sudo=True,
            sudo_user=NOPASS,
            sudo_password=never,
            input=b"data\n",
            **fleet.kw,
        )
        return [r async for r in gen]

    results = asyncio.run(main())
    # (a password sent to a sudo that did not ask would be in cat's output)
    assert {(r.status, r.stdout, r.stderr) for r in results} == {
        ("ok", f"{uid}\ndata\n".encode(), b"")
    }


@needs_sudo
@pytest.mark.parametrize("given", ["wrong", None])
def test_wrong_or_missing_password_fails_every_host_fast(fleet: Fleet, given: str | None) -> None:
    wrong = None if given is None else "wrong-" + secrets.token_hex(6)
    start = time.monotonic()
    results = sshwrap.run_many(
        fleet.hosts, "echo ran", sudo=True, sudo_password=wrong, retries=3, **fleet.kw
    )
    assert time.monotonic() - start < FAST
    for r in results:
        assert (r.status, r.returncode, r.stdout, r.attempts) == ("failed", None, b"", 1)
        assert isinstance(r.error, SudoError) and r.error.host == r.host
        assert ("refused" if wrong else "none was given") in str(r.error)
    _hidden(fleet.password, results)
    if wrong is not None:
        _hidden(wrong, results)


@needs_sudo
def test_per_host_commands_and_rollout_under_sudo(fleet: Fleet) -> None:
    """``%h`` and a per-host mapping run inside each host's sudo (as root), with a canary and
    batches; a refusal on the canary skips the rest."""
    hosts = fleet.hosts[:4]
    kw: dict[str, Any] = {"sudo": True, "sudo_password": fleet.password, **fleet.kw}
    results = sshwrap.run_many(hosts, "echo %h $(id -u)", canary=1, batch=2, **kw)
    assert [(r.status, r.stdout) for r in results] == [("ok", f"{h} 0\n".encode()) for h in hosts]
    mapping = {h: ["sh", "-c", f"echo {i} $(id -u)"] for i, h in enumerate(hosts)}
    results = sshwrap.run_many(hosts, mapping, **kw)
    assert [r.stdout for r in results] == [f"{i} 0\n".encode() for i in range(len(hosts))]
    bad = {**kw, "sudo_password": "wrong-" + secrets.token_hex(4)}
    results = sshwrap.run_many(hosts, "echo %h", canary=1, **bad)
    assert results[0].status == "failed" and isinstance(results[0].error, SudoError)
    assert [r.status for r in results[1:]] == ["skipped"] * 3
    _hidden(fleet.password, results)


@needs_sudo
def test_sudo_ended_before_the_command(fleet: Fleet) -> None:
    results = sshwrap.run_many(
        fleet.hosts[:2], "id -u", sudo=True, sudo_user="no-such-user-h12", **fleet.kw
    )
    for r in results:
        assert r.status == "failed" and isinstance(r.error, SudoError)
        assert "did not run the command" in str(r.error) and r.error.returncode not in (None, 0)


@needs_sudo
def test_over_connections(fleet: Fleet) -> None:
    """Hosts given as Connections: the channel path's own sudo, same result shape."""
    with (
        sshwrap.connect(fleet.hosts[0], **fleet.kw) as c1,
        sshwrap.connect(fleet.hosts[1], **fleet.kw) as c2,
    ):
        ok = sshwrap.run_many([c1, c2], "id -u", sudo=True, sudo_password=fleet.password)
        assert [(r.status, r.stdout) for r in ok] == [("ok", b"0\n")] * 2
        bad = sshwrap.run_many([c1, c2], "id -u", sudo=True, sudo_password="wrong-pw")
        assert {(r.status, r.returncode, type(r.error)) for r in bad} == {
            ("failed", None, SudoError)
        }


@needs_sudo
def test_password_never_in_argv_env_or_logs(fleet: Fleet, tmp_path: Path) -> None:
    secret = fleet.password.encode()
    tmp_path.chmod(0o755)
    go = tmp_path / "go"
    # Each host's command, as root, says it runs, then waits for "go" (a file event).
    script = f'touch {tmp_path}/started."$$"; while [ ! -e {go} ]; do sleep 0.02; done; id -u'
    scans, done = scans_while_running(
        lambda: sshwrap.run_many(
            fleet.hosts, script, sudo=True, sudo_password=fleet.password, timeout=60, **fleet.kw
        ),
        lambda: len(list(tmp_path.glob("started.*"))) == HOSTS,
        go,
        secret,
    )
    assert scans == [[], [], []]
    assert isinstance(done, list), done
    assert [(r.status, r.stdout) for r in done] == [("ok", b"0\n")] * HOSTS
    assert all(r.ssh_log for r in done)  # ssh's log was read, and holds no password
    _hidden(fleet.password, done)
    assert secret not in Path(fleet.sshd.log).read_bytes()


def _cli(fleet: Fleet, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, "-F", fleet.sshd.config, "-H", ",".join(fleet.hosts), *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        **kw,
    )


@needs_sudo
def test_cli_with_a_password_file(fleet: Fleet, tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text(fleet.password + "\n")  # (one trailing newline dropped)
    pw_file.chmod(0o600)
    done = _cli(fleet, "--sudo", "--sudo-password-file", str(pw_file), "--json", "--", "id", "-u")
    assert done.returncode == 0, done.stderr
    objs = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(o["host"] for o in objs) == sorted(fleet.hosts)
    assert {(o["status"], o["stdout"]) for o in objs} == {("ok", "0\n")}
    assert fleet.password not in done.stdout + done.stderr
    uid = pwd.getpwnam(TARGET).pw_uid
    done = _cli(
        fleet, "--sudo", "--sudo-user", TARGET, "--sudo-password-file", str(pw_file), "--", "id -u"
    )
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(f"{h} | {uid}" for h in fleet.hosts)
    pw_file.write_text("wrong-" + secrets.token_hex(4))
    start = time.monotonic()
    done = _cli(fleet, "--sudo", "--sudo-password-file", str(pw_file), "--json", "--", "id -u")
    assert time.monotonic() - start < FAST + 3  # (the CLI's own start-up besides)
    assert done.returncode == 1, done.stderr  # the "failed" bit
    objs = [json.loads(line) for line in done.stdout.splitlines()]
    assert {(o["status"], o["returncode"], o["error"]["type"]) for o in objs} == {
        ("failed", None, "SudoError")
    }


# -- refused before anything runs (no root needed) ---------------------------------------
def _usage(*args: str) -> subprocess.CompletedProcess[str]:
    # A session of its own: no controlling terminal, so /dev/tty cannot be opened.
    return subprocess.run(
        [EXE, "-H", "nowhere.invalid", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_cli_refuses_sudo_without_a_terminal_or_file() -> None:
    done = _usage("--sudo", "--", "true")
    assert done.returncode == 64
    assert "--sudo-password-file" in done.stderr and "terminal" in done.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--sudo", "--sudo-password-file", "/nonexistent/pw", "--", "true"], "/nonexistent/pw"),
        (["--sudo-user", "root", "--", "true"], "go with --sudo"),
        (["--sudo-password-file", "f", "--", "true"], "go with --sudo"),
        (["--sudo", "--via", "gw:nowhere.invalid", "--", "true"], "gateways"),
        (["--sudo", "--put", "a", "b"], "--put"),
    ],
)
def test_cli_sudo_usage_errors(args: list[str], words: str) -> None:
    done = _usage(*args)
    assert done.returncode == 64, done.stderr
    assert words in done.stderr


def test_sudo_through_gateways_is_refused() -> None:
    with pytest.raises(ValueError, match="gateways"):
        sshwrap.run_many(["h1"], "true", sudo=True, via={"gw": "h1"})


def test_bad_sudo_keywords_are_refused_before_any_ssh() -> None:
    with pytest.raises(ValueError, match="need sudo=True"):
        sshwrap.run_many(["nowhere.invalid"], "true", sudo_password="x")
    with pytest.raises(ValueError, match="newline"):
        sshwrap.run_many(["nowhere.invalid"], "true", sudo=True, sudo_password="a\nb")
