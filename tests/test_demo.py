"""``make demo``'s program, with and without a terminal."""

from __future__ import annotations

import subprocess
import sys

from ptyterm import Term


def test_demo_scripted_without_tty() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sshwrap.demo"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout.decode()
    assert "status: 7" in text
    assert "24 80" in text
    assert "session ended with status 3" in text
    assert "'a b|$HOME|'" in text and "->  -9" in text and "127.0.0.2" in text


def test_demo_interactive_with_tty() -> None:
    t = Term([sys.executable, "-m", "sshwrap.demo"], rows=30, cols=100)
    try:
        t.wait_raw(b"$ ", timeout=60)
        t.send("stty size\r")
        t.wait_screen("30 100")
        t.send("exit 4\r")
        t.wait_screen("sshwrap exited with status 4")
        assert t.wait_exit() == (0, None)
    finally:
        t.close()
