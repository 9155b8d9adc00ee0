"""API parity for expect-style programs (issue 11): ``sshwrap.spawn.Spawned`` and
``Connection.spawn`` / ``Connection.interact``, each behaviour with one test body.

Faces: ``spawned`` (``Spawned(cmd, destination=host, ssh_args=...)``: one ``ssh -tt`` of its
own) and ``connection`` (``c.spawn(cmd)``: ``ssh -S`` over the Connection's master).  The
behaviours: ``size=`` as ``run``/``Popen`` take it (``dimensions=`` a deprecated alias), ``env=``
and ``cwd=`` as there, a bytes mode (``encoding=None``), ``returncode`` set once ``expect`` has
seen the end of the output, the exit status in ``interact()``'s result, and ``repr()``.
Real sshd, real ssh, a real outer terminal for ``interact``.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ptyterm import Term

import sshwrap
from sshwrap.spawn import ExpectEOF, Spawned
from sshwrap.testing import LocalSSHD

FACES = ("spawned", "connection")
Opener = Callable[..., Spawned[Any]]


@pytest.fixture(scope="module")
def conn(local_sshd: LocalSSHD) -> Iterator[sshwrap.Connection]:
    with sshwrap.connect(local_sshd.host, config=local_sshd.config) as c:
        yield c


@pytest.fixture(params=FACES)
def face(request: pytest.FixtureRequest) -> str:
    face: str = request.param
    return face


@pytest.fixture
def open_spawn(face: str, local_sshd: LocalSSHD, request: pytest.FixtureRequest) -> Opener:
    """``open_spawn(command, **keywords)`` through the face under test."""
    if face == "connection":
        c: sshwrap.Connection = request.getfixturevalue("conn")
        return c.spawn

    def plain(command: Any, **kw: Any) -> Spawned[Any]:
        return Spawned(command, destination=local_sshd.host, ssh_args=local_sshd.ssh_args, **kw)

    return plain


# -- size= (dimensions= deprecated) ------------------------------------------------------


def test_size_as_run_takes_it(open_spawn: Opener) -> None:
    with open_spawn("stty size", size=(33, 111), timeout=30) as s:
        s.expect(r"33 111")
        assert s.getwinsize() == (33, 111)
        assert s.expect_eof() == 0
    with pytest.warns(DeprecationWarning, match=r"size=\(rows, cols\)"):
        s = open_spawn("stty size", dimensions=(21, 71), timeout=30)
    with s:
        s.expect(r"21 71")
        assert s.expect_eof() == 0
    with pytest.raises(TypeError, match="dimensions"):
        open_spawn("true", size=(20, 70), dimensions=(20, 70))
    with pytest.raises(ValueError, match="tty=True"):
        open_spawn("true", size=(20, 70), tty=False)
    with pytest.raises(ValueError, match="rows, cols"):
        open_spawn("true", size=(0, 70))


# -- env= and cwd= -------------------------------------------------------------------------


def test_env_and_cwd_as_run_takes_them(open_spawn: Opener) -> None:
    env = {"SPAWN_VALUE": "a b'c $HOME"}
    with open_spawn('printf "<%s|%s>\\n" "$SPAWN_VALUE" "$PWD"', env=env, cwd="/tmp") as s:
        s.expect(r"<(.*)\|(.*)>")
        assert s.match is not None and s.match.groups() == ("a b'c $HOME", "/tmp")
        assert s.expect_eof() == 0
    with open_spawn(["pwd"], cwd="/nonexistent-spawn-dir") as s:
        assert s.expect_eof() != 0  # cd failed: nothing ran


def test_login_shell_with_env_and_cwd(open_spawn: Opener) -> None:
    # command None: the remote shell sets them, then becomes the user's login shell
    with open_spawn(None, env={"SPAWN_LOGIN": "yes-1"}, cwd="/tmp", timeout=30) as s:
        s.sendline('echo "<$SPAWN_LOGIN:$PWD>"; exit 4')
        s.expect(r"<yes-1:/tmp>")
        assert s.expect_eof() == 4


# -- the bytes mode ------------------------------------------------------------------------


@pytest.mark.parametrize("tty", [True, False])
def test_bytes_mode(open_spawn: Opener, tty: bool) -> None:
    with open_spawn("printf 'a\\377b|'; cat", encoding=None, tty=tty, timeout=30) as s:
        assert s.expect([b"never", re.compile(rb"a\xffb\|")]) == 1
        assert s.after == b"a\xffb|" and s.before == b""
        with pytest.raises(TypeError, match="bytes"):
            s.expect("a str pattern")
        with pytest.raises(TypeError, match="bytes"):
            s.send("a str")
        s.send(b"\xfe\xfd")
        s.sendline(b"-end")
        s.expect(b"\xfe\xfd-end")
        s.sendeof()  # at a line start: end of file for cat (tty), stdin closed (pipes)
        assert s.expect_eof() == 0
        assert isinstance(s.before, bytes)


# -- returncode once expect has seen the end -----------------------------------------------


def test_returncode_is_set_when_expect_sees_eof(open_spawn: Opener) -> None:
    # ssh exits just after the pty's last slave closed: expect must reap it before returning
    # (it was None in about one run in six)
    for i in range(40):
        with open_spawn(f"echo run-{i}; exit 7", timeout=30) as s:
            assert s.expect(["never", ExpectEOF]) == 1
            assert s.returncode == 7, f"run {i}: {s!r}"


# -- repr() -----------------------------------------------------------------------------


def test_repr_says_host_command_pid_and_state(open_spawn: Opener, local_sshd: LocalSSHD) -> None:
    with open_spawn("echo started; read x; exit 3", timeout=30) as s:
        s.expect("started")
        text = repr(s)
        assert f"host={local_sshd.host!r}" in text and f"pid={s.pid}" in text
        assert "command='echo started; read x; exit 3'" in text and text.endswith(" running>")
        s.sendline("")
        assert s.expect_eof() == 3
        assert repr(s).endswith(" returncode=3>")
    assert repr(s).endswith(" closed returncode=3>")


# -- interact(): the exit status in the result ---------------------------------------------

_INTERACT = textwrap.dedent(
    """
    import json, sys
    import sshwrap
    from sshwrap.spawn import Spawned
    cfg = json.loads(sys.argv[1])
    if cfg["face"] == "connection":
        with sshwrap.connect(cfg["host"], config=cfg["config"]) as c:
            print("INTERACT-START", flush=True)
            r = c.interact()
    else:
        with Spawned(None, destination=cfg["host"], ssh_args=["-F", cfg["config"]]) as s:
            print("INTERACT-START", flush=True)
            r = s.interact()
            assert r.returncode == s.returncode
    print(f"BACK eof={r.eof} escaped={r.escaped} rc={r.returncode}", flush=True)
    """
)


@pytest.mark.parametrize("how", ["exit", "escape"])
def test_interact_result_has_the_exit_status(
    face: str, local_sshd: LocalSSHD, tmp_path: Path, how: str
) -> None:
    script = tmp_path / "interact.py"
    script.write_text(_INTERACT)
    cfg = json.dumps({"face": face, "host": local_sshd.host, "config": local_sshd.config})
    t = Term([sys.executable, str(script), cfg])
    try:
        t.wait_raw(b"INTERACT-START")
        t.send("PS1='in''side$ '\r")
        t.wait_raw(b"inside$ ")
        if how == "exit":
            t.send("exit 5\r")
            t.wait_raw(b"BACK eof=True escaped=False rc=5")
        else:
            t.send(b"\x1d")
            t.wait_raw(b"BACK eof=False escaped=True rc=None")
        assert t.wait_exit() == (0, None)
    finally:
        t.close()
