"""List commands arrive byte identical on the real sshd; str commands go to the shell as is."""

from __future__ import annotations

import os
import pathlib
import shlex

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sshwrap
from sshwrap.core.argv import remote_command, ssh_settings_args
from sshwrap.testing import LocalSSHD

# Any text an argv can carry: no NUL (C strings), no lone surrogates (not encodable).
ARG = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    max_size=40,
)

TRICKY = [
    "",
    " ",
    "a b",
    "'",
    '"',
    "'\"'\"'",
    "$HOME",
    "${HOME}",
    "$(id)",
    "`id`",
    ";",
    "a;b",
    "&&",
    "|",
    ">x",
    "<x",
    "*",
    "?",
    "[a]",
    "~",
    "~root",
    "#",
    "a#b",
    "\\",
    "\\n",
    "\n",
    "a\nb",
    "\r\n",
    "\t",
    "-",
    "-n",
    "--",
    "-e",
    "--help",
    "é",
    "日本語",
    "🙂",
    "\x01\x1b[31m",
    "!",
    "{a,b}",
    "a=b",
]


def _echo_back(sshd: LocalSSHD, items: list[str]) -> list[bytes]:
    r = sshwrap.run(sshd.host, ["printf", "%s\\0", *items], capture_output=True, config=sshd.config)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(b"\0") or not items
    out: bytes = r.stdout
    return out.split(b"\0")[:-1]


def test_tricky_strings_arrive_identical(local_sshd: LocalSSHD) -> None:
    assert _echo_back(local_sshd, TRICKY) == [t.encode() for t in TRICKY]


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(items=st.lists(ARG, min_size=1, max_size=20))
def test_any_list_arrives_identical(local_sshd: LocalSSHD, items: list[str]) -> None:
    assert _echo_back(local_sshd, items) == [i.encode() for i in items]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(values=st.lists(ARG, min_size=1, max_size=8))
def test_any_env_value_arrives_identical(local_sshd: LocalSSHD, values: list[str]) -> None:
    env = {f"V{i}": v for i, v in enumerate(values)}
    script = 'printf "%s\\0"' + "".join(f' "$V{i}"' for i in range(len(values)))
    r = sshwrap.run(local_sshd.host, script, env=env, capture_output=True, config=local_sshd.config)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(b"\0")[:-1] == [v.encode() for v in values]


def test_leading_dash_command(local_sshd: LocalSSHD) -> None:
    # A first item starting with '-' is still the command's name, not an option to anything.
    r = sshwrap.run(
        local_sshd.host,
        ["-definitely-not-a-command"],
        capture_output=True,
        config=local_sshd.config,
    )
    assert r.returncode == 127
    assert b"-definitely-not-a-command" in r.stderr


def test_str_is_shell_code(local_sshd: LocalSSHD) -> None:
    r = sshwrap.run(
        local_sshd.host,
        "x=$((6*7)); echo \"$x\" 'a  b' | tr a A; # comment",
        capture_output=True,
        config=local_sshd.config,
    )
    assert r.stdout == b"42 A  b\n"


def test_remote_command_text() -> None:
    assert remote_command(["echo", "a b", "$x"]) == "echo 'a b' '$x'"
    assert remote_command("echo $x") == "echo $x"
    assert remote_command("ls", cwd="/a b", env={"K": "v w"}) == (
        "cd -- '/a b' || exit\nexport K='v w'\nls"
    )
    with pytest.raises(ValueError):
        remote_command([])
    with pytest.raises(ValueError):
        remote_command("x", env={"1BAD": "v"})


def test_remote_command_bytes_and_paths() -> None:
    # bytes and os.PathLike items as subprocess takes them; non-UTF-8 bytes kept as
    # surrogates, which ssh's argv and the exec request encode back unchanged.
    cmd = remote_command([b"printf", b"%s", b"a\xffb", pathlib.PurePosixPath("x y")])
    assert cmd == "printf %s " + shlex.quote("a\udcffb") + " 'x y'"
    assert os.fsencode(cmd).endswith(b"'a\xffb' 'x y'")
    assert remote_command(b"echo $x") == "echo $x"
    with pytest.raises(TypeError, match=r"expected str, bytes or os.PathLike object, not int"):
        remote_command(["echo", 5])


@pytest.mark.parametrize(
    ("cwd", "operand"),
    [
        ("-", "./-"),  # not OLDPWD
        ("-P", "./-P"),  # not an option
        ("sub dir", "'./sub dir'"),  # not searched in CDPATH (which would print the directory)
        ("./x", "./x"),
        ("../x", "../x"),
        (".", "."),
        ("/abs/-", "/abs/-"),
        (b"-", "./-"),
        (pathlib.PurePosixPath("-"), "./-"),
    ],
)
def test_cwd_reaches_the_directory_named_so(
    cwd: str | bytes | os.PathLike[str], operand: str
) -> None:
    assert remote_command("pwd", cwd=cwd) == f"cd -- {operand} || exit\npwd"


def test_settings_args() -> None:
    assert ssh_settings_args(
        config="/c",
        user="u",
        port=2222,
        identity="/k",
        jump="j",
        options={"ConnectTimeout": 5, "BatchMode": True, "ForwardAgent": False},
    ) == [
        "-F", "/c", "-l", "u", "-p", "2222", "-i", "/k", "-J", "j",
        "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", "-o", "ForwardAgent=no",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        ssh_settings_args(options={"Bad Key": 1})
    with pytest.raises(ValueError):
        ssh_settings_args(options={"ProxyCommand": "a\nb"})
