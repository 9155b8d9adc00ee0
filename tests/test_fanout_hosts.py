"""Host ranges and groups (issue 12) reach ``run_many``, ``sshwrap.aio.run_many`` and
``sshwrap-many``: a ``str`` is a pattern, ``groups=`` / ``--groups`` / ``$SSHWRAP_GROUPS``
give ``@name``, ``-x`` leaves hosts out, a list's items stay names, and a bad pattern is
refused before any ssh runs (the CLI: exit 64 with the pattern, the position, the reason).

Real sshd, real ssh: every alias ``hN`` sends its own name (``LC_SSHWRAP_ALIAS``), so the
output says exactly which hosts ran.  The API tests have one body for both faces.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_fanout_helpers import ALIAS_ENV, Hosts, write_config

import sshwrap
import sshwrap.aio
from sshwrap.core.hostset import HostPatternError, hosts, parse_groups
from sshwrap.fanout import HostResult
from sshwrap.testing import LocalSSHD

EXE = str(Path(sys.executable).with_name("sshwrap-many"))
FACES = ("sync", "async")
ECHO = f'echo "${ALIAS_ENV}"'


@pytest.fixture(scope="module")
def many(local_sshd: LocalSSHD, tmp_path_factory: pytest.TempPathFactory) -> Hosts:
    return write_config(local_sshd, 8, tmp_path_factory.mktemp("fanouthosts"))


@pytest.fixture
def no_default_groups(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SSHWRAP_GROUPS", raising=False)
    yield


def run_many(face: str, hosts: Any, command: str, **kwargs: Any) -> list[HostResult]:
    """``sshwrap.run_many`` (``sync``) or ``sshwrap.aio.run_many`` in input order (``async``)."""
    if face == "sync":
        return sshwrap.run_many(hosts, command, **kwargs)

    async def collect() -> list[HostResult]:
        return [r async for r in sshwrap.aio.run_many(hosts, command, **kwargs)]

    return sorted(asyncio.run(collect()), key=lambda r: r.index)


def ran(results: list[HostResult]) -> list[tuple[str, str, bytes]]:
    return [(r.host, r.status, r.stdout) for r in results]


def echoed(*names: str) -> list[tuple[str, str, bytes]]:
    return [(h, "ok", f"{h}\n".encode()) for h in names]


# -- the API -------------------------------------------------------------------------------


@pytest.mark.parametrize("face", FACES)
def test_a_str_is_a_pattern_expanded_in_its_order(face: str, many: Hosts) -> None:
    results = run_many(face, "h[3,1-2,5]!h2", ECHO, config=many.config)
    assert ran(results) == echoed("h3", "h1", "h5")
    assert [r.index for r in results] == [0, 1, 2]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("kind", ["mapping", "Groups", "path", "pathlike"])
def test_groups_give_at_names(face: str, kind: str, many: Hosts, tmp_path: Path) -> None:
    text = "web: h[1-4]!h2\nall: @web,h6  # a group naming a group\n"
    path = tmp_path / "groups.txt"
    path.write_text(text)
    groups: Any = {
        "mapping": {"web": "h[1-4]!h2", "all": "@web,h6"},
        "Groups": parse_groups(text),
        "path": str(path),
        "pathlike": path,
    }[kind]
    results = run_many(face, "@all!h3", ECHO, config=many.config, groups=groups)
    assert ran(results) == echoed("h1", "h4", "h6")


@pytest.mark.parametrize("face", FACES)
def test_the_default_groups_file_is_sshwrap_groups(
    face: str, many: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "groups"
    path.write_text("db: h[7-8]\n")
    monkeypatch.setenv("SSHWRAP_GROUPS", str(path))
    assert ran(run_many(face, "@db", ECHO, config=many.config)) == echoed("h7", "h8")
    # groups= wins over the default
    results = run_many(face, "@db", ECHO, config=many.config, groups={"db": "h2"})
    assert ran(results) == echoed("h2")
    # the file is read only for a group: user@host is none
    monkeypatch.setenv("SSHWRAP_GROUPS", str(tmp_path / "missing"))
    results = run_many(face, f"{many.sshd.user}@h[1-2]", ECHO, config=many.config)
    assert ran(results) == [(f"{many.sshd.user}@{h}", *rest) for h, *rest in echoed("h1", "h2")]
    with pytest.raises(FileNotFoundError, match=r"^SSHWRAP_GROUPS=\S+/missing: no such file$"):
        run_many(face, "h1,@db", ECHO, config=many.config)


@pytest.mark.parametrize("face", FACES)
def test_a_hostset_is_taken_as_a_list(face: str, many: Hosts) -> None:
    chosen = hosts("h[1-4]") - hosts("h[2-3]")
    assert ran(run_many(face, chosen, ECHO, config=many.config)) == echoed("h1", "h4")


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize(
    ("item", "found"),
    [
        ("h[1-3]", "a host pattern (3 hosts)"),
        ("h1,h2", "a host pattern (2 hosts)"),
        ("@web", "a group"),
    ],
)
def test_a_list_item_that_reads_as_a_pattern_is_refused(
    face: str, item: str, found: str, many: Hosts
) -> None:
    started: list[str] = []
    message = f"hosts[1] '{item}' is {found}, but the items of a list are host names: "
    with pytest.raises(ValueError, match="^" + re.escape(message)) as e:
        run_many(face, ["h1", item], "true", config=many.config, on_start=started.append)
    assert f"run_many({item!r}, ...)" in str(e.value)
    assert started == []  # nothing ran


@pytest.mark.parametrize("face", FACES)
def test_a_list_item_that_is_no_pattern_is_a_name(face: str, many: Hosts) -> None:
    # ssh's URI form with brackets: not a pattern, so ssh gets it as it is
    dest = f"ssh://{many.sshd.user}@[{many.sshd.addresses[0]}]:{many.sshd.port}"
    results = run_many(face, ["h1", dest], "echo hi", config=many.config)
    assert [(r.host, r.status) for r in results] == [("h1", "ok"), (dest, "ok")]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize(
    ("pattern", "groups", "position", "reason"),
    [
        ("h[1-", None, 1, "this '[' is never closed"),
        ("h[3-1]", None, 2, "the range 3-1 goes down"),
        ("@web", None, 0, "a @group but no groups given"),
        ("h1,@nope", {"web": "h1"}, 3, "no group named 'nope'"),
    ],
)
def test_a_bad_pattern_is_refused_before_any_ssh(
    face: str,
    pattern: str,
    groups: dict[str, str] | None,
    position: int,
    reason: str,
    many: Hosts,
    no_default_groups: None,
) -> None:
    started: list[str] = []
    with pytest.raises(HostPatternError) as e:
        run_many(face, pattern, "true", config=many.config, groups=groups, on_start=started.append)
    assert isinstance(e.value, ValueError)
    assert (e.value.pattern, e.value.position, e.value.reason) == (pattern, position, reason)
    assert started == []


@pytest.mark.parametrize("face", FACES)
def test_bad_groups_are_refused_before_any_ssh(face: str, many: Hosts, tmp_path: Path) -> None:
    path = tmp_path / "groups.txt"
    path.write_text("web: h1\nbad h2\n")
    with pytest.raises(HostPatternError) as e:
        run_many(face, "h1", "true", config=many.config, groups=path)
    assert e.value.line == 2 and f"in the groups file {path}" in e.value.__notes__
    with pytest.raises(FileNotFoundError, match="no such file"):
        run_many(face, "h1", "true", config=many.config, groups=tmp_path / "missing")
    with pytest.raises(TypeError, match=r"^groups must be a Groups, a mapping"):
        run_many(face, "h1", "true", config=many.config, groups=5)


# -- sshwrap-many ----------------------------------------------------------------------------


def run_cli(
    many: Hosts, *args: str, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "SSHWRAP_GROUPS"}
    return subprocess.run(
        [EXE, "-F", many.config, *args],
        capture_output=True,
        text=True,
        timeout=60,
        input=input,
        env={**base, **(env or {})},
    )


def json_hosts(p: subprocess.CompletedProcess[str]) -> list[str]:
    """The hosts that ran (their own name on stdout), sorted."""
    objs = [json.loads(line) for line in p.stdout.splitlines()]
    assert all(o["stdout"] == o["host"] + "\n" for o in objs), objs
    return sorted(o["host"] for o in objs)


def test_cli_range_minus_exclusion_runs_exactly_those(many: Hosts) -> None:
    p = run_cli(many, "-H", "h[1-4]", "-x", "h2", "--json", "--", ECHO)
    assert p.returncode == 0, p.stderr
    assert json_hosts(p) == ["h1", "h3", "h4"]
    assert "3 hosts in" in p.stderr
    p = run_cli(many, "-H", "h[1-8]", "-x", "h[3-4]", "-x", "h[6-8]", "--json", "--", ECHO)
    assert json_hosts(p) == ["h1", "h2", "h5"]


def test_cli_hosts_file_lines_hold_patterns(many: Hosts, tmp_path: Path) -> None:
    f = tmp_path / "fleet.txt"
    f.write_text("# racks\nh[1-2] h5  # two forms\nh[6-8]!h7\n")
    x = tmp_path / "skip.txt"
    x.write_text("h8\n")
    p = run_cli(many, "-H", str(f), "-x", str(x), "--json", "--", ECHO)
    assert p.returncode == 0, p.stderr
    assert json_hosts(p) == ["h1", "h2", "h5", "h6"]
    p = run_cli(many, "-H", "-", "--json", "--", ECHO, input="h[3-4]\n")
    assert json_hosts(p) == ["h3", "h4"]


def test_cli_groups_file_and_the_default(many: Hosts, tmp_path: Path) -> None:
    groups = tmp_path / "groups.txt"
    groups.write_text("web: h[1-6]\nodd: h[1-8/2]\n")
    p = run_cli(many, "-H", "@web", "--groups", str(groups), "-x", "@odd", "--json", "--", ECHO)
    assert p.returncode == 0, p.stderr
    assert json_hosts(p) == ["h2", "h4", "h6"]
    p = run_cli(many, "-H", "@odd", "--json", "--", ECHO, env={"SSHWRAP_GROUPS": str(groups)})
    assert p.returncode == 0, p.stderr
    assert json_hosts(p) == ["h1", "h3", "h5", "h7"]


def test_cli_summary_folds_hosts_by_what_happened(many: Hosts) -> None:
    cmd = f'case "${ALIAS_ENV}" in h2|h3|h4) exit 1;; h6) exit 2;; esac'
    p = run_cli(many, "-H", "h[1-6]", "--", cmd)
    assert p.returncode == 1
    assert "  failed: h[2-4] (exit 1), h6 (exit 2)" in p.stderr.splitlines()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["-H", "h[1-"], "-H: bad host pattern 'h[1-' at position 1: this '[' is never closed"),
        (
            ["-H", "h1 h[5-2]"],
            "-H: bad host pattern 'h1 h[5-2]' at position 5: the range 5-2 goes down",
        ),
        (
            ["-H", "h1", "-x", "h[1-x]"],
            "-x: bad host pattern 'h[1-x]' at position 2: '1-x' is not a number or a range"
            " like 1-10 or 1-10/2",
        ),
        (
            ["-H", "@web"],
            "-H: bad host pattern '@web' at position 0: a @group but no groups given"
            " (give --groups FILE, or set SSHWRAP_GROUPS)",
        ),
        (
            ["-H", "h1 -oProxyCommand=x /tmp/y"],
            "-H host may not start with '-' (ssh would read an option): '-oProxyCommand=x'",
        ),
        (["-H", "h1", "-x", "h1"], "no hosts left after -x"),
        (["-H", "-", "-x", "-"], "stdin can be read once: give - to only one of -H, -x and -I"),
    ],
)
def test_cli_bad_patterns_are_usage_errors(many: Hosts, args: list[str], error: str) -> None:
    p = run_cli(many, *args, "--", "true")
    assert p.returncode == 64, p.stderr
    assert p.stderr.splitlines()[-1] == f"sshwrap-many: error: {error}"
    assert "Traceback" not in p.stderr


def test_cli_bad_groups_and_hosts_files_are_usage_errors(many: Hosts, tmp_path: Path) -> None:
    groups = tmp_path / "groups.txt"
    groups.write_text("web: h[1-3]\n\nbad: h[2-\n")
    p = run_cli(many, "-H", "@web", "--groups", str(groups), "--", "true")
    assert p.returncode == 64
    assert p.stderr.splitlines()[-1] == (
        f"sshwrap-many: error: --groups {groups}: groups file line 3: bad host pattern 'h[2-'"
        " at position 1: group 'bad': this '[' is never closed"
    )
    groups.write_text("web: h[1-3]\n")
    p = run_cli(many, "-H", "@nope", "--groups", str(groups), "--", "true")
    assert p.returncode == 64
    assert p.stderr.splitlines()[-1] == (
        "sshwrap-many: error: -H: bad host pattern '@nope' at position 0: no group named 'nope'"
    )
    p = run_cli(many, "-H", "@web", "--groups", str(tmp_path / "none.txt"), "--", "true")
    assert p.returncode == 64
    assert p.stderr.splitlines()[-1].endswith("none.txt: no such file")
    hosts_file = tmp_path / "fleet.txt"
    hosts_file.write_text("h1\nh[2-3\n")
    p = run_cli(many, "-H", str(hosts_file), "--", "true")
    assert p.returncode == 64
    assert p.stderr.splitlines()[-1] == (
        f"sshwrap-many: error: -H {hosts_file} line 2: bad host pattern 'h[2-3' at position 1:"
        " this '[' is never closed"
    )


def test_cli_group_folds_zero_padded_names(many: Hosts, tmp_path: Path) -> None:
    # two zero-padded aliases besides h1..h8 (the earlier "Host *" blocks give them the rest)
    config = tmp_path / "ssh_config"
    sshd = many.sshd
    extra = f"Host n01 n02\n    HostName {sshd.addresses[0]}\n    Port {sshd.port}\n"
    config.write_text(Path(many.config).read_text() + extra)
    config.chmod(0o600)
    p = subprocess.run(
        [EXE, "-F", str(config), "-H", "n[01-02],h1", "--group", "--", "echo same"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "==== n[01-02],h1 (3 hosts): exit 0\nsame\n"
