"""Files, expect-style programs and interact() over a Connection's master."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ptyprocess import PtyProcess

from sshwrap.connection import Connection, connect
from sshwrap.testing import LocalSSHD


@pytest.fixture(scope="module")
def conn(local_sshd: LocalSSHD) -> Iterator[Connection]:
    with connect(local_sshd.host, config=local_sshd.config) as c:
        yield c


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_put_get_directory_over_the_master(conn: Connection, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(3_000_000))
    (src / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(src / "sub" / "run.sh", 0o750)
    remote = conn.check_output("mktemp -d", text=True).strip()
    seen: list[tuple[int, int]] = []
    conn.put(src, remote + "/tree", progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] >= 3_000_000
    assert conn.check_output(["sh", "-c", f"cd {remote}/tree/sub && ./run.sh"]) == b"hi\n"
    back = tmp_path / "back"
    conn.get(remote + "/tree", back)
    assert _digest(back / "a.bin") == _digest(src / "a.bin")
    assert stat.S_IMODE((back / "sub" / "run.sh").stat().st_mode) == 0o750
    conn.run(["rm", "-rf", "--", remote], check=True)
    with pytest.raises(FileNotFoundError):
        conn.get(remote + "/missing", tmp_path / "x")


def test_spawn_expect_over_the_master(conn: Connection) -> None:
    with conn.spawn("printf 'name? '; read n; echo hello $n", timeout=20) as s:
        s.expect(r"name\? ")
        s.sendline("world")
        s.expect(r"hello (\w+)")
        assert s.match is not None and s.match.group(1) == "world"
        s.expect_eof()
    assert s.returncode == 0
    # The ssh it ran went through our master.
    assert f"ControlPath={conn.control_path}" in s.argv


def test_interact_hands_the_terminal_over(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    script = tmp_path / "shell.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sshwrap
            with sshwrap.connect({local_sshd.host!r}, config={local_sshd.config!r}) as c:
                r = c.interact()
                print("RESULT", "eof" if r.eof else "escaped", flush=True)
            """
        )
    )
    p = PtyProcess.spawn([sys.executable, str(script)], dimensions=(24, 80))
    buf = b""

    def until(needle: bytes, timeout: float = 30) -> None:
        nonlocal buf
        deadline = time.monotonic() + timeout
        while needle not in buf:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not seen in {buf[-500:]!r}")
            try:
                buf += p.read(4096)
            except EOFError:
                raise AssertionError(f"EOF before {needle!r}: {buf[-500:]!r}") from None

    try:
        until(b"$ ")  # the remote login shell's prompt
        p.write(b"echo hi-$((20+22))\n")
        until(b"hi-42")
        p.write(b"exit\n")
        until(b"RESULT eof")
        # Let the script leave its ``with`` (stopping the master, removing its directory)
        # instead of killing it halfway.
        deadline = time.monotonic() + 30
        while p.isalive() and time.monotonic() < deadline:
            try:
                buf += p.read(4096)
            except EOFError:
                break
        assert p.wait() == 0
    finally:
        p.close(force=True)
