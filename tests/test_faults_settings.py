"""ssh's own words for settings ssh refuses, in every face; option injection runs nothing.

For each bad setting of the table, plain ``ssh`` runs first with the same settings (its argv
built by sshwrap's own builder, ``sshwrap.core.argv``), and its last stderr line, computed here,
must be in the message of the error that each face raises (or reports): ``run``, ``aio.run``,
``sshwrap.connect``, ``run_many`` and ``sshwrap-many --json``.  Many of these lines are
printed by ssh before it opens its ``-E`` log, where a log-only reader saw nothing ("ssh
exited with status 255 and said nothing").

Name resolution uses ``bad..host``: glibc rejects the empty label before building a query,
so nothing is sent to any DNS server (a ``.invalid`` name would be sent to the resolver).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import sshwrap
import sshwrap.aio
from sshwrap.core.argv import build_ssh_argv, find_ssh, ssh_settings_args
from sshwrap.testing import LocalSSHD

MANY = str(Path(sys.executable).with_name("sshwrap-many"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass
class Bad:
    """One bad setting: ``host`` (None: the fixture's) and sshwrap's settings keywords."""

    name: str
    host: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    config_error: bool = False  # ssh refused to parse it: SSHConfigError


def _bad_option(name: str, key: str, value: object) -> Bad:
    """A row for ``options={key: value}``, an option value ssh refuses to parse."""
    return Bad(name, settings={"options": {key: value}}, config_error=True)


def _table(sshd: LocalSSHD, tmp: Path) -> dict[str, Bad]:
    bad_config = tmp / "bad_config"
    bad_config.write_text(
        Path(sshd.config).read_text() + "\nHost *\n    NoSuchKeyword yes\n    Port 99999\n"
    )
    rows = [
        _bad_option("unknown option", "NoSuchOption", "x"),
        Bad("bad port", settings={"port": 99999}, config_error=True),
        Bad("non-numeric port", settings={"port": "abc"}, config_error=True),
        _bad_option("port 0 as option", "Port", 0),
        _bad_option("non-numeric ConnectTimeout", "ConnectTimeout", "abc"),
        _bad_option("bad Ciphers", "Ciphers", "nosuch-cipher"),
        _bad_option("bad MACs", "MACs", "nosuch-mac"),
        _bad_option("bad KexAlgorithms", "KexAlgorithms", "nosuch-kex"),
        _bad_option("bad HostKeyAlgorithms", "HostKeyAlgorithms", "nosuch-hk"),
        _bad_option("bad LogLevel", "LogLevel", "LOUD"),
        _bad_option("bad RequestTTY", "RequestTTY", "maybe"),
        _bad_option("bad StrictHostKeyChecking", "StrictHostKeyChecking", "perhaps"),
        _bad_option("bad IPQoS", "IPQoS", "bogus"),
        _bad_option("bad RekeyLimit", "RekeyLimit", "bogus"),
        _bad_option("bad ConnectionAttempts", "ConnectionAttempts", 0),
        Bad("missing -F config", settings={"config": str(tmp / "no-such-config")}),
        Bad("bad line in -F config", settings={"config": str(bad_config)}, config_error=True),
        Bad("unresolvable host name", host="bad..host"),
        Bad("destination with a space", host="bad host", config_error=True),
        Bad("bad user@host syntax", host="x@bad;host", config_error=True),
        Bad("user with shell characters", settings={"user": "bad;user"}, config_error=True),
        Bad("user the server refuses", settings={"user": "no such user"}),
        Bad("refused port", settings={"port": _free_port()}),
        # it reads ssh's banner before it exits (else ssh's words race: EOF or EPIPE)
        Bad(
            "ProxyCommand that exits",
            settings={
                "options": {"ProxyCommand": "sh -c 'head -c 1 >/dev/null; echo no way >&2; exit 1'"}
            },
        ),
        Bad("unresolvable jump host", settings={"jump": "bad..host"}),
    ]
    return {r.name: r for r in rows}


NAMES = [
    "unknown option",
    "bad port",
    "non-numeric port",
    "port 0 as option",
    "non-numeric ConnectTimeout",
    "bad Ciphers",
    "bad MACs",
    "bad KexAlgorithms",
    "bad HostKeyAlgorithms",
    "bad LogLevel",
    "bad RequestTTY",
    "bad StrictHostKeyChecking",
    "bad IPQoS",
    "bad RekeyLimit",
    "bad ConnectionAttempts",
    "missing -F config",
    "bad line in -F config",
    "unresolvable host name",
    "destination with a space",
    "bad user@host syntax",
    "user with shell characters",
    "user the server refuses",
    "refused port",
    "ProxyCommand that exits",
    "unresolvable jump host",
]


@dataclass
class Case:
    host: str
    settings: dict[str, Any]
    last_line: str
    config_error: bool


@pytest.fixture(scope="module")
def table(
    local_sshd: LocalSSHD, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Case]]:
    tmp = tmp_path_factory.mktemp("bad-settings")
    out: dict[str, Case] = {}
    for name, row in _table(local_sshd, tmp).items():
        settings = {"config": local_sshd.config, **row.settings}
        host = row.host or local_sshd.host
        argv = build_ssh_argv(find_ssh(), host, "true", settings=ssh_settings_args(**settings))
        plain = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
        )
        assert plain.returncode == 255, (name, plain)
        lines = [ln.strip() for ln in plain.stderr.splitlines() if ln.strip()]
        assert lines, (name, "plain ssh said nothing")
        out[name] = Case(host, settings, lines[-1], row.config_error)
    yield out


def _face_run(case: Case) -> str:
    with pytest.raises(sshwrap.SSHError) as info:
        sshwrap.run(case.host, "true", capture_output=True, **case.settings)
    return _checked(info.value, case)


def _face_run_uncaptured(case: Case) -> str:
    with pytest.raises(sshwrap.SSHError) as info:
        sshwrap.run(case.host, "true", stderr=subprocess.DEVNULL, **case.settings)
    return _checked(info.value, case)


def _face_popen_wait(case: Case) -> str:
    with (
        pytest.raises(sshwrap.SSHError) as info,
        sshwrap.Popen(case.host, "true", stderr=subprocess.DEVNULL, **case.settings) as p,
    ):
        p.wait(60)
    return _checked(info.value, case)


def _face_aio_create_process(case: Case) -> str:
    async def main() -> None:
        p = await sshwrap.aio.create_process(
            case.host, "true", stderr=subprocess.DEVNULL, **case.settings
        )
        try:
            await p.wait()
        finally:
            p.close()

    with pytest.raises(sshwrap.SSHError) as info:
        asyncio.run(main())
    return _checked(info.value, case)


def _face_aio_run(case: Case) -> str:
    async def main() -> None:
        await sshwrap.aio.run(case.host, "true", capture_output=True, **case.settings)

    with pytest.raises(sshwrap.SSHError) as info:
        asyncio.run(main())
    return _checked(info.value, case)


def _face_connect(case: Case) -> str:
    with (
        pytest.raises(sshwrap.SSHError) as info,
        sshwrap.connect(case.host, start_timeout=30, **case.settings) as c,
    ):
        c.run("true")  # raised at the start, or here
    return _checked(info.value, case)


def _face_run_many(case: Case) -> str:
    [result] = sshwrap.run_many([case.host], "true", **case.settings)
    assert result.status != "ok" and isinstance(result.error, sshwrap.SSHError), result
    return _checked(result.error, case)


def _face_many_cli(case: Case) -> str:
    s = case.settings
    argv = [MANY, "--json", "-H", case.host, "-F", s["config"]]
    for key, value in s.get("options", {}).items():
        argv += ["-o", f"{key}={value}"]
    if "port" in s:
        argv += ["-o", f"Port={s['port']}"]
    if "jump" in s:
        argv += ["-J", s["jump"]]
    if "user" in s:
        argv += ["-l", s["user"]]
    r = subprocess.run([*argv, "--", "true"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r
    obj = json.loads(r.stdout.splitlines()[0])
    assert obj["error"] is not None, obj
    message: str = obj["error"]["message"]
    assert case.last_line in message, (message, case.last_line)
    return message


def _checked(e: sshwrap.SSHError, case: Case) -> str:
    assert case.last_line in e.message, (e.message, case.last_line)
    assert case.last_line in e.stderr
    assert "said nothing" not in e.message
    if case.config_error:
        assert isinstance(e, sshwrap.SSHConfigError), (type(e), e.message)
    return e.message


FACES: dict[str, Callable[[Case], str]] = {
    "run": _face_run,
    "run-uncaptured": _face_run_uncaptured,
    "Popen.wait": _face_popen_wait,
    "aio.run": _face_aio_run,
    "aio.create_process": _face_aio_create_process,
    "connect": _face_connect,
    "run_many": _face_run_many,
    "sshwrap-many": _face_many_cli,
}


def _grid(rows: list[str], faces: Iterable[str]) -> list[Any]:
    """One ``pytest.param(row, face)`` per pair, with the id ``row-face``."""
    return [pytest.param(r, f, id=f"{r}-{f}") for r in rows for f in faces]


@pytest.mark.parametrize(("name", "face"), _grid(NAMES, FACES))
def test_message_holds_ssh_last_line(table: dict[str, Case], name: str, face: str) -> None:
    if name == "destination with a space" and face == "sshwrap-many":
        pytest.skip("sshwrap-many -H splits its host lists on whitespace")
    FACES[face](table[name])


def test_table_is_big_enough() -> None:
    assert len(NAMES) >= 15


def test_plain_run_keeps_ssh_words_on_the_users_stderr(
    table: dict[str, Case], capfd: pytest.CaptureFixture[str]
) -> None:
    """Not captured: what ssh printed before its log opened still reaches the user's stderr."""
    case = table["unknown option"]
    with pytest.raises(sshwrap.SSHConfigError):
        sshwrap.run(case.host, "true", **case.settings)
    assert case.last_line in capfd.readouterr().err


def test_captured_stderr_keeps_ssh_words(table: dict[str, Case]) -> None:
    """Captured: the exception carries them (``.stderr``), none go to the real stderr."""
    case = table["bad port"]
    with pytest.raises(sshwrap.SSHConfigError) as info:
        sshwrap.run(case.host, "true", capture_output=True, **case.settings)
    assert info.value.stderr.strip().endswith(case.last_line)


# -- option injection --------------------------------------------------------------------------


@pytest.fixture
def spy_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An ``ssh`` (via ``SSHWRAP_SSH``) that records that it ran, then runs the real one."""
    ran = tmp_path / "ssh-ran"
    spy = tmp_path / "ssh"
    spy.write_text(f'#!/bin/sh\necho "$@" >> {ran}\nexec {find_ssh()} "$@"\n')
    spy.chmod(spy.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("SSHWRAP_SSH", str(spy))
    yield ran


INJECTIONS = ["destination", "user", "jump host", "second jump host"]


def _injection(where: str, sshd: LocalSSHD, target: Path) -> tuple[str, dict[str, Any]]:
    evil = f"-oProxyCommand=touch {target}"
    host, settings = sshd.host, {"config": sshd.config}
    if where == "destination":
        host = evil
    elif where == "user":
        settings["user"] = evil
    elif where == "jump host":
        settings["jump"] = evil
    else:
        settings["jump"] = f"{sshd.host},{evil}"
    return host, settings


def _inject_run(host: str, kw: dict[str, Any]) -> None:
    sshwrap.run(host, "true", capture_output=True, **kw)


def _inject_popen(host: str, kw: dict[str, Any]) -> None:
    with sshwrap.Popen(host, "true", **kw) as p:
        p.wait()


def _inject_aio_run(host: str, kw: dict[str, Any]) -> None:
    asyncio.run(sshwrap.aio.run(host, "true", **kw))


def _inject_aio_create(host: str, kw: dict[str, Any]) -> None:
    async def main() -> None:
        p = await sshwrap.aio.create_process(host, "true", **kw)
        await p.wait()

    asyncio.run(main())


def _inject_connect(host: str, kw: dict[str, Any]) -> None:
    with sshwrap.connect(host, **kw) as c:
        c.run("true")


def _inject_run_many(host: str, kw: dict[str, Any]) -> None:
    sshwrap.run_many([host], "true", **kw)


def _inject_spawn(host: str, kw: dict[str, Any]) -> None:
    from sshwrap.spawn import Spawned

    args = ssh_settings_args(**kw)  # user and jump are refused here
    with Spawned("true", destination=host, ssh_args=args, timeout=30) as s:
        s.expect_eof()


def _inject_many_cli(host: str, kw: dict[str, Any]) -> None:
    # attached values (``--hosts=-o...``, ``-l-o...``): argparse reads them as values
    argv = [MANY, "--json", f"--hosts={host}", "-F", kw["config"]]
    if "user" in kw:
        argv.append(f"-l{kw['user']}")
    if "jump" in kw:
        argv.append(f"-J{kw['jump']}")
    r = subprocess.run([*argv, "--", "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 64, r  # a usage error, before any ssh
    raise ValueError(r.stderr.splitlines()[-1])


INJECT_FACES: dict[str, Callable[[str, dict[str, Any]], None]] = {
    "run": _inject_run,
    "Popen": _inject_popen,
    "aio.run": _inject_aio_run,
    "aio.create_process": _inject_aio_create,
    "connect": _inject_connect,
    "run_many": _inject_run_many,
    "sshwrap-many": _inject_many_cli,
    "spawn": _inject_spawn,
}


@pytest.mark.parametrize(("where", "face"), _grid(INJECTIONS, INJECT_FACES))
def test_option_injection_runs_nothing(
    local_sshd: LocalSSHD, spy_ssh: Path, tmp_path: Path, where: str, face: str
) -> None:
    target = Path(f"/tmp/pwned-{secrets.token_hex(6)}")
    host, kw = _injection(where, local_sshd, target)
    try:
        with pytest.raises(ValueError, match=r"-oProxyCommand=touch"):
            INJECT_FACES[face](host, kw)
        assert not spy_ssh.exists(), f"ssh ran: {spy_ssh.read_text()}"
        assert not target.exists()
    finally:
        if target.exists():
            os.unlink(target)
