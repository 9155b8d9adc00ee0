"""terminal.raw_mode and the relay on their own, in a real pty."""

from __future__ import annotations

import re
import sys
import textwrap

from ptyterm import Term

_PROBE = textwrap.dedent(
    """
    import sys, termios
    from sshwrap.terminal.modes import raw_mode, get_size
    before = termios.tcgetattr(0)
    try:
        with raw_mode(0) as saved:
            raw = termios.tcgetattr(0)
            assert saved == before
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    after = termios.tcgetattr(0)
    echo_in_raw = bool(raw[3] & termios.ECHO)
    sys.stdout.write(f"RAW_ECHO={echo_in_raw} SAME={before == after} SIZE={get_size(0)};\\n")
    """
)


def test_raw_mode_restored_after_exception() -> None:
    t = Term([sys.executable, "-c", _PROBE], rows=33, cols=77, screen=False)
    try:
        m = t.wait_raw(re.compile(rb"RAW_ECHO=(\w+) SAME=(\w+) SIZE=\((\d+), (\d+)\);"))
        assert m.groups() == (b"False", b"True", b"33", b"77")
        assert t.wait_exit() == (0, None)
    finally:
        t.close()


_RELAY = textwrap.dedent(
    """
    import os, sys
    from ptyprocess import PtyProcess
    from sshwrap.terminal.relay import relay
    from sshwrap.terminal.modes import raw_mode
    inner = PtyProcess.spawn([sys.executable, "-c",
        "import sys; sys.stdout.write('A' * 200000 + 'END'); sys.stdout.flush()"])
    with raw_mode(0):
        res = relay(inner.fd, is_alive=inner.isalive)
    inner.wait()
    sys.stdout.write(f"\\r\\nEOF={res.eof}\\r\\n")
    """
)


def test_relay_delivers_every_byte_before_returning() -> None:
    t = Term([sys.executable, "-c", _RELAY], screen=False)
    try:
        t.wait_raw(b"EOF=True")
        assert t.wait_exit() == (0, None)
    finally:
        t.close()
    assert bytes(t.raw).count(b"A") == 200000 and b"AEND" in t.raw
