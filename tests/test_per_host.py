"""Per-host values (issue 12): ``%h`` in commands and paths, per-host commands, on real sshds."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import sshwrap
import sshwrap.aio
from sshwrap.core.per_host import expand_host, has_host_token
from sshwrap.testing import LocalSSHD

EXE = str(Path(sys.executable).with_name("sshwrap-many"))
EVIL = "~root"
"""A host alias the shell would change (ssh refuses ``;$`&|<>(){}`` and quotes in a name, not
``~``): unquoted, ``echo %h`` would print root's home directory."""


@pytest.fixture(scope="module")
def three() -> Iterator[LocalSSHD]:
    with LocalSSHD(hosts=3) as sshd:
        yield sshd


def _logins(sshd: LocalSSHD) -> int:
    return sshd.read_log().count("Accepted publickey")


def test_the_expander_only_knows_h_and_its_escape() -> None:
    assert expand_host("echo %h", "web1") == "echo web1"
    assert expand_host("%%h=%h", "a") == "%h=a"
    assert expand_host("date +%s; printf '%s %%\\n' %H:%M", "a") == (
        "date +%s; printf '%s %%\\n' %H:%M"
    )
    assert expand_host("100%%%h", "a") == "100%%h"  # a '%', then the escape
    assert has_host_token("x%h") and not has_host_token("x%%h") and not has_host_token("%s")


@pytest.mark.parametrize("timeout", [None, 30.0])  # untagged and tagged command lines
def test_h_in_a_str_and_a_list_command(three: LocalSSHD, timeout: float | None) -> None:
    cmd = "echo %h; echo '%%h' 100%; date +%s"
    rs = sshwrap.run_many(three.hosts, cmd, config=three.config, timeout=timeout)
    for r, h in zip(rs, three.hosts, strict=True):
        lines = r.stdout.decode().splitlines()
        assert r.ok and lines[:2] == [h, "%h 100%"], r
        assert re.fullmatch(r"\d+", lines[2]), lines  # date +%s untouched
    rs = sshwrap.run_many(
        three.hosts, ["printf", "%s|%s\\n", "n=%h", "%%h"], config=three.config, timeout=timeout
    )
    assert [r.stdout for r in rs] == [f"n={h}|%h\n".encode() for h in three.hosts]


def test_a_host_name_cannot_inject_shell(three: LocalSSHD, tmp_path: Path) -> None:
    # three's client config with one more alias, EVIL, for its first address
    evil_config = str(tmp_path / "ssh_config")
    text = Path(three.config).read_text()
    Path(evil_config).write_text(f"Host {EVIL}\n    HostName {three.addresses[0]}\n{text}")
    for cmd in ("echo %h", ["echo", "%h"]):
        (r,) = sshwrap.run_many([EVIL], cmd, config=evil_config)
        assert r.ok, r
        assert r.stdout == f"{EVIL}\n".encode()  # one word, nothing run
    hosts_file = Path(evil_config).with_name("hosts")
    hosts_file.write_text(EVIL + "\n")
    p = subprocess.run(
        [EXE, "-F", evil_config, "-H", str(hosts_file), "--", "echo", "%h"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"{EVIL} | {EVIL}"]


def test_per_host_commands(three: LocalSSHD) -> None:
    a, b, c = three.hosts
    commands = {a: "echo one", b: ["echo", "two", "%h"], c: "echo %h three"}
    rs = sshwrap.run_many(three.hosts, commands, config=three.config)
    assert [r.stdout for r in rs] == [b"one\n", f"two {b}\n".encode(), f"{c} three\n".encode()]

    async def main() -> list[bytes]:
        out = {}
        async for r in sshwrap.aio.run_many(three.hosts, commands, config=three.config):
            out[r.index] = r.stdout
        return [out[i] for i in range(3)]

    assert asyncio.run(main()) == [r.stdout for r in rs]


def test_bad_per_host_commands_are_refused_before_any_ssh(three: LocalSSHD) -> None:
    a, b, c = three.hosts
    before = _logins(three)
    started: list[str] = []
    cases: list[tuple[object, type[Exception], str]] = [
        ({a: "x", b: "y"}, ValueError, f"no command for host.*{c!r}"),
        ({a: "x", b: "y", c: "z", "typo": "w"}, ValueError, "'typo' name no host"),
        ({a: "x", b: "y", c: "z", 1: "w"}, TypeError, "a key must be a host name"),
        ({a: "x", b: 3, c: "z"}, TypeError, f"command\\[{b!r}\\] must be a str"),
        ({a: "x", b: ["ok", 3], c: "z"}, TypeError, r"\[1\] must be a str"),
    ]
    for commands, error, message in cases:
        with pytest.raises(error, match=message):
            sshwrap.run_many(
                three.hosts,
                commands,  # type: ignore[arg-type]
                config=three.config,
                on_start=started.append,
            )
    assert started == [] and _logins(three) == before


def test_h_and_per_host_commands_through_a_gateway(
    local_sshd_factory: Callable[..., LocalSSHD],
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the gateway's session must read the client config (as root)")
    sshd = local_sshd_factory(hosts=3, user="root")
    gw, b, c = sshd.hosts
    rs = sshwrap.run_many([b, c], "echo %h", config=sshd.config, via={gw: [b, c]})
    assert [r.stdout for r in rs] == [f"{b}\n".encode(), f"{c}\n".encode()], rs
    commands = {b: ["echo", "B", "%h"], c: "echo C"}
    rs = sshwrap.run_many([b, c], commands, config=sshd.config, via={gw: [b, c]})
    assert [r.stdout for r in rs] == [f"B {b}\n".encode(), b"C\n"]
    # a gateway host and a flat one with a mapping: each gets its own
    rs = sshwrap.run_many([b, c], commands, config=sshd.config, via={gw: [b]})
    assert [r.stdout for r in rs] == [f"B {b}\n".encode(), b"C\n"]


def test_h_over_a_connection(three: LocalSSHD) -> None:
    with sshwrap.connect(three.hosts[1], config=three.config) as conn:
        (r,) = sshwrap.run_many([conn], ["echo", "%h"])
        assert r.stdout == f"{three.hosts[1]}\n".encode()
        (r,) = sshwrap.run_many([conn], {three.hosts[1]: "echo own %h"})
        assert r.stdout == f"own {three.hosts[1]}\n".encode()


def test_cli_h_and_its_help(three: LocalSSHD) -> None:
    p = subprocess.run(
        [EXE, "-F", three.config, "-H", ",".join(three.hosts), "--", "echo", "%h", "+%s", "%%h"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == [f"{h} | {h} +%s %h" for h in three.hosts]
    p = subprocess.run([EXE, "--help"], capture_output=True, text=True, timeout=60)
    assert "%h: each host's name" in " ".join(p.stdout.split())
