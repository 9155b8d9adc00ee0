"""``core.tty_process.CookedUndo``: output a ControlMaster wrote into a still-cooked pty.

Through ``ssh -S`` the master writes the remote output into the local pty itself, and the
passenger makes the pty raw only once the master has answered it: output that comes first is
mapped by the cooked pty's ``ONLCR`` (``\\r\\n`` from the remote terminal becomes ``\\r\\r\\n``).
The remote terminal's own ``\\r\\n`` is what a raw pty passes.  A real pty pair stands in for
ssh's: what is written to its slave is what the master wrote; ssh's log is given as text.
"""

from __future__ import annotations

import os
import termios
import tty
from collections.abc import Iterator

import pytest

from sshwrap.core.tty_process import MUX_HELLO, MUX_SESSION, CookedUndo

PASSENGER = f"debug2: {MUX_HELLO} 4\n"
SESSION = f"debug1: {MUX_SESSION} 1\n"


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()  # cooked: OPOST | ONLCR
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def _through(master: int, slave: int, data: bytes) -> bytes:
    os.write(slave, data)
    got = b""
    while len(got) < len(data):  # the pty may split it; ONLCR only adds bytes
        got += os.read(master, 4096)
    return got


def test_a_passenger_s_output_before_its_session_is_made_raw(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    log = PASSENGER
    undo = CookedUndo(master, lambda: log)
    got = _through(master, slave, b"a\r\nb\r\n")
    assert got == b"a\r\r\nb\r\r\n"  # what the cooked pty made of it
    assert undo(got) == b"a\r\nb\r\n"
    log += SESSION  # the session opened: ssh goes raw right after
    assert undo(_through(master, slave, b"c\r\n")) == b"c\r\r\n"  # not guessed at any more
    tty.setraw(slave)
    assert undo(_through(master, slave, b"d\r\n")) == b"d\r\n"


def test_ssh_on_its_own_is_never_touched(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    undo = CookedUndo(master, lambda: "debug1: Connecting to h1 port 22.\n")
    got = _through(master, slave, b"Warning: added\n")  # ssh's own words, cooked as meant
    assert undo(got) == b"Warning: added\r\n"


def test_a_pty_made_raw_ends_the_undo_for_good(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    undo = CookedUndo(master, lambda: PASSENGER)
    tty.setraw(slave)
    assert undo(_through(master, slave, b"x\r\n")) == b"x\r\n"
    attrs = termios.tcgetattr(slave)
    attrs[1] |= termios.OPOST | termios.ONLCR  # ssh restores the cooked modes at its exit
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    # output read from here on was written while ssh had the pty raw: left as it comes
    assert undo(_through(master, slave, b"y\r\n")) == b"y\r\r\n"


def test_a_missing_master_control_socket_means_no_passenger(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    log = PASSENGER + 'debug1: Control socket "/x" does not exist\n'
    assert CookedUndo(master, lambda: log)(_through(master, slave, b"z\n")) == b"z\r\n"
