"""Session recording (issue 14, part 1): asciicast v2 files of interactive sessions.

The ``sshwrap`` command runs in a real outer pty (tests/ptyterm.py, read through pyte)
against a real sshd; the file it writes is read back as JSON, by ``asciinema cat`` (a player
nobody here wrote) and by a second pyte screen fed its output events.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyte
import pytest
from ptyterm import Term, sshwrap_argv
from test_connection_prompts import throwaway_user  # noqa: F401 (a fixture)
from waiting import wait_until

from sshwrap.io.appendlog import AppendLog
from sshwrap.io.recording import Record, Recorder
from sshwrap.protocol.asciicast import EchoGate, json_string, utf8_cut, visible
from sshwrap.testing import LocalSSHD, wait_exited

PASSWORD = "Sw0rdf1shQ"
ENV = {**os.environ, "TERM": "xterm-256color", "SHELL": "/bin/bash"}
ASCIINEMA = shutil.which("asciinema") or str(Path(sys.executable).with_name("asciinema"))


def _events(path: Path) -> tuple[dict[str, Any], list[list[Any]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    events = [json.loads(line) for line in lines[1:]]
    return header, events


def _replay(header: dict[str, Any], events: list[list[Any]]) -> str:
    """The final screen of a pyte terminal fed the recording's output and resizes."""
    screen = pyte.Screen(header["width"], header["height"])
    stream = pyte.Stream(screen)
    for _, code, data in events:
        if code == "o":
            stream.feed(data)
        elif code == "r":
            cols, rows = map(int, data.split("x"))
            screen.resize(rows, cols)
    return "\n".join(line.rstrip() for line in screen.display)


# ``read -s`` in a POSIX shell (the remote login shell may be dash): echo off while it reads.
# Its prompt "pwX: " differs from the typed command, which the remote pty echoes.
_READ_SECRET = "stty -echo; printf 'pw%s: ' X; read P; stty echo; echo; echo got-${#P}\r"


def _prompt(t: Term, start: int = 0) -> None:
    t.wait_raw(re.compile(rb"\$ $"), start=start)


def _type(t: Term, text: str) -> None:
    """Type key by key, each key echoed (or not) before the next one: as a person types."""
    for ch in text:
        t.send(ch)


def _no_secret(path: Path, events: list[list[Any]]) -> None:
    """No piece of the password in the file: not in its bytes, not spread over events."""
    raw = path.read_bytes()
    joined = "".join(e[2] for e in events)
    typed = "".join(e[2] for e in events if e[1] == "i")
    for i in range(len(PASSWORD) - 2):
        piece = PASSWORD[i : i + 3]
        assert piece.encode() not in raw and piece not in joined and piece not in typed, piece


def _check_common(path: Path, header: dict[str, Any], events: list[list[Any]]) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert header["version"] == 2
    assert (header["width"], header["height"]) == (80, 24)
    assert isinstance(header["timestamp"], int)
    assert header["env"] == {"TERM": "xterm-256color", "SHELL": "/bin/bash"}
    assert header["title"].startswith("ssh ")
    times = [e[0] for e in events]
    assert times == sorted(times) and all(isinstance(x, float) for x in times)
    assert {e[1] for e in events} <= {"o", "i", "r"}
    output = "".join(e[2] for e in events if e[1] == "o")
    assert "hello-rec-42" in output and "got-10" in output
    assert ["r", "100x30"] in [e[1:] for e in events]
    _no_secret(path, events)
    # A real player reproduces the output.
    shown = subprocess.run(
        [ASCIINEMA, "cat", str(path)], capture_output=True, timeout=60, check=True
    ).stdout
    assert b"hello-rec-42" in shown and b"got-10" in shown
    assert PASSWORD.encode() not in shown


@pytest.mark.parametrize("with_input", [False, True], ids=["output", "input"])
def test_cli_records_a_session(local_sshd: LocalSSHD, tmp_path: Path, with_input: bool) -> None:
    path = tmp_path / "session.cast"
    opts = ["--record", str(path), *(["--record-input"] if with_input else [])]
    t = Term(sshwrap_argv(*opts, *local_sshd.ssh_args, local_sshd.host), env=ENV)
    try:
        _prompt(t)
        t.send("echo hello-rec-$((40+2))\r")
        t.wait_raw(b"\nhello-rec-42")
        _prompt(t, len(t.raw) - 2)
        # A foreground program that prints the size when SIGWINCH reaches it (typing
        # `stty size` after the resize could overtake the window change).
        t.send(
            'sh -c \'trap "stty size; echo WINCHED" WINCH; echo TRAPPED; '
            "while :; do sleep 0.05; done'\r"
        )
        t.wait_raw(b"\nTRAPPED")
        mark = len(t.raw)
        t.resize(30, 100)
        t.wait_raw(b"30 100", start=mark)
        t.wait_raw(b"WINCHED", start=mark)
        t.send("\x03")
        _prompt(t, mark)
        mark = len(t.raw)
        t.send(_READ_SECRET)
        t.wait_raw(b"pwX: ", start=mark)
        _type(t, PASSWORD + "\r")
        t.wait_raw(b"got-10", start=mark)
        _prompt(t, len(t.raw) - 2)
        t.send("exit\r")
        assert t.wait_exit() == (0, None)
        live = t.display()
    finally:
        t.close()
    header, events = _events(path)
    _check_common(path, header, events)
    typed = "".join(e[2] for e in events if e[1] == "i")
    if with_input:
        assert "echo hello-rec-$((40+2))" in typed and "trap" in typed
        assert "exit" in typed
    else:
        assert typed == ""
    # A terminal emulator fed the events shows the live session's final screen.
    assert _replay(header, events) == live


@pytest.mark.skipif(os.geteuid() != 0, reason="password logins need root")
def test_ssh_password_prompt_not_recorded(
    local_sshd_factory: Callable[..., LocalSSHD],
    throwaway_user: str,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    """ssh's own password prompt (in the pty, before the session) stays out of the file."""
    path = tmp_path / "login.cast"
    sshd = local_sshd_factory(password=PASSWORD, user=throwaway_user)
    args = [*sshd.ssh_args, "-o", "PubkeyAuthentication=no"]
    argv = sshwrap_argv("--record", str(path), "--record-input", *args, sshd.host)
    t = Term(argv, env=ENV)
    try:
        t.wait_raw(re.compile(rb"[Pp]assword: ?$"))
        _type(t, PASSWORD + "\r")
        _prompt(t)
        t.send("echo in-$((6*7))\r")
        t.wait_raw(b"in-42")
        t.send("exit\r")
        assert t.wait_exit() == (0, None)
    finally:
        t.close()
    _, events = _events(path)
    _no_secret(path, events)
    assert "echo in-$((6*7))" in "".join(e[2] for e in events if e[1] == "i")


def test_written_while_the_session_goes(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    """Output reaches the file within about a second, without more events; after sshwrap is
    killed (no close, no fsync) every line of the file is still a valid event."""
    path = tmp_path / "crash.cast"
    t = Term(sshwrap_argv("--record", str(path), *local_sshd.ssh_args, local_sshd.host), env=ENV)
    try:
        _prompt(t)
        t.send("echo before-$((1+1))-crash\r")
        t.wait_raw(b"before-2-crash")
        wait_until(lambda: b"before-2-crash" in path.read_bytes(), 5, "the output in the file")
        os.kill(t.proc.pid, signal.SIGKILL)
        assert not wait_exited([t.proc.pid], 30)
    finally:
        t.close()
    header, events = _events(path)  # every line parses
    assert header["version"] == 2
    assert any("before-2-crash" in e[2] for e in events if e[1] == "o")


def test_existing_file_and_symlink_refused(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep me")
    link = tmp_path / "link.cast"
    link.symlink_to(target)
    for name in (target, link):
        t = Term(sshwrap_argv("--record", str(name), *local_sshd.ssh_args, local_sshd.host))
        try:
            t.wait_raw(b"exists")
            assert t.wait_exit() == (255, None)
        finally:
            t.close()
    assert target.read_text() == "keep me" and link.is_symlink()
    # Asked to overwrite: a new 0600 file replaces the symlink itself, never its target.
    t = Term(
        sshwrap_argv(
            "--record-overwrite", "--record", str(link), *local_sshd.ssh_args, local_sshd.host
        ),
        env=ENV,
    )
    try:
        _prompt(t)
        t.send("exit 3\r")
        assert t.wait_exit() == (3, None)
    finally:
        t.close()
    assert target.read_text() == "keep me"
    assert not link.is_symlink() and stat.S_IMODE(link.stat().st_mode) == 0o600
    assert json.loads(link.read_text().splitlines()[0])["version"] == 2


def test_env_variable_and_option_words(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    """``SSHWRAP_RECORD`` records; a ``--record`` word after ssh's arguments is ssh's (here:
    part of the remote command), never sshwrap's."""
    path = tmp_path / "env.cast"
    argv = sshwrap_argv(*local_sshd.ssh_args, "-t", local_sshd.host, "echo", "--record", "x")
    t = Term(argv, env={**ENV, "SSHWRAP_RECORD": str(path)})
    try:
        t.wait_raw(b"--record x")
        assert t.wait_exit() == (0, None)
    finally:
        t.close()
    _, events = _events(path)
    assert "--record x" in "".join(e[2] for e in events if e[1] == "o")


_SPAWN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import sshwrap
    from sshwrap.io.recording import Record
    cfg = json.loads(sys.argv[1])
    kw = {"password": cfg["password"], "options": {"PubkeyAuthentication": "no"}}
    with sshwrap.connect(cfg["host"], config=cfg["config"], **(kw if cfg["password"] else {})) as c:
        rec = Record(cfg["path"], input=True)
        if cfg["face"] == "connection":
            r = c.interact(record=rec)
        else:
            with c.spawn(None, tty=True, timeout=None) as s:
                r = s.interact(record=rec)
        print(f"\\r\\nRESULT rc={r.returncode} path={r.record_path}", flush=True)
    """
)


@pytest.mark.parametrize("face", ["spawned", "connection"])
def test_interact_record_keyword(local_sshd: LocalSSHD, tmp_path: Path, face: str) -> None:
    path = tmp_path / f"{face}.cast"
    _interact_recorded(local_sshd, path, face, None)


@pytest.mark.skipif(os.geteuid() != 0, reason="password logins need root")
def test_askpass_answer_not_recorded(
    local_sshd_factory: Callable[..., LocalSSHD],
    throwaway_user: str,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    """sshwrap's own answer to ssh's password prompt (the askpass helper, over its private
    socket) never passes the relay, so it never reaches a recording."""
    sshd = local_sshd_factory(password=PASSWORD, user=throwaway_user)
    _interact_recorded(sshd, tmp_path / "askpass.cast", "spawned", PASSWORD)


def _interact_recorded(sshd: LocalSSHD, path: Path, face: str, password: str | None) -> None:
    script = path.with_suffix(".py")
    script.write_text(_SPAWN_SCRIPT)
    cfg: dict[str, str | None] = {"host": sshd.host, "config": sshd.config, "face": face}
    cfg.update(path=str(path), password=password)
    t = Term([sys.executable, str(script), json.dumps(cfg)], env=ENV)
    try:
        _prompt(t)
        t.send("echo via-$((2+3))-api\r")
        t.wait_raw(b"via-5-api")
        mark = len(t.raw)
        t.send(_READ_SECRET)
        t.wait_raw(b"pwX: ", start=mark)
        _type(t, PASSWORD + "\r")
        t.wait_raw(b"got-10", start=mark)
        t.send("exit 4\r")
        t.wait_raw(b"RESULT rc=4 path=" + str(path).encode())
        t.wait_exit()
    finally:
        t.close()
    header, events = _events(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert header["version"] == 2 and header["env"]["TERM"] == "xterm-256color"
    assert "via-5-api" in "".join(e[2] for e in events if e[1] == "o")
    assert "echo via-$((2+3))-api" in "".join(e[2] for e in events if e[1] == "i")
    _no_secret(path, events)


# -- the pure pieces ------------------------------------------------------------------------


def test_json_string_round_trips_every_byte() -> None:
    data = bytes(range(128)) + "é€😀".encode() + b'\\"\x1b[0m'
    assert json.loads(json_string(data)) == data.decode()
    assert json.loads(json_string(b"\xff\xfeok")) == "\ufffd\ufffdok"
    assert json_string(b"plain") == b'"plain"'


def test_utf8_cut_keeps_sequences_whole() -> None:
    euro = "€".encode()  # 3 bytes
    assert utf8_cut(b"ab" + euro) == 5
    assert utf8_cut(b"ab" + euro[:2]) == 2
    assert utf8_cut(b"ab" + euro[:1]) == 2
    assert utf8_cut(b"") == 0


def test_echo_gate() -> None:
    g = EchoGate()
    assert g.typed(b"l", 1.0) == [] and g.output(b"l") == [(1.0, b"l")]
    assert g.typed(b"\x1b[A", 2.0) == [(2.0, b"\x1b[A")]  # no visible bytes: released
    assert visible(b"ab\x1b[1;5Cc\r") == b"abc"
    # a key that got no echo before the next one: dropped, and the gate stays quiet ...
    assert g.typed(b"s", 3.0) == []
    assert g.typed(b"e", 3.1) == []
    assert g.output(b"e") == []  # ... even if the output happens to look like an echo
    assert g.typed(b"\r", 3.2) == []  # ... up to the line end
    assert (
        g.typed(b"ok", 4.0) == [] and g.output(b"o") == [] and g.output(b"k\r\n") == [(4.0, b"ok")]
    )
    assert g.typed(b"x", 5.0) == [] and g.output(b"\r\nprompt") == []  # mismatch: dropped


# -- the file as it is written ----------------------------------------------------------------


def test_append_log_writes_whole_lines_in_order(tmp_path: Path) -> None:
    """Whatever the sizes and flushes, the file is at all times the complete lines added so
    far, in order, and ends with a line end; a direct write's last line may carry spaces
    before its end (JSON whitespace), nothing else differs; a line longer than the buffer
    is kept whole."""
    rnd = random.Random(14)
    for direct_min in (0, 1 << 30):  # every flush a direct one, or none
        path = tmp_path / f"log{direct_min}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        log = AppendLog(fd, 3 * 4096, direct_min=direct_min)
        lines: list[bytes] = []
        partial = b""
        try:
            for _ in range(300):
                size = rnd.choice([1, 7, 100, 4095, 5000, 20000])
                data = rnd.randbytes(size).replace(b"\n", b"x").replace(b" ", b"y")
                if rnd.random() < 0.6:
                    data += b"\n"
                log.add(data)
                *done, partial = (partial + data).split(b"\n")
                lines += done
                if rnd.random() < 0.3:
                    log.flush()
                on_disk = path.read_bytes()
                assert on_disk == b"" or on_disk.endswith(b"\n")
                got = [line.rstrip(b" ") for line in on_disk.split(b"\n")[:-1]]
                assert got == lines[: len(got)]
                if direct_min:
                    assert b" " not in on_disk
            log.add(b"\n")
            log.flush(final=True)
            assert log.pending == 0
        finally:
            log.close()
            os.close(fd)
        on_disk = path.read_bytes()
        got = [line.rstrip(b" ") for line in on_disk.split(b"\n")[:-1]]
        assert got == [*lines, partial]
        assert (b" " in on_disk) == (log.direct and not direct_min)  # padded: direct writes
    # A file that takes no O_DIRECT: plain writes.
    fd = os.open(os.devnull, os.O_WRONLY)
    log = AppendLog(fd, 4096)
    try:
        assert not log.direct
        log.add(b"x" * 10000 + b"\n")
        log.flush()
        assert log.pending == 0
    finally:
        log.close()
        os.close(fd)


def test_events_keep_order_and_times(tmp_path: Path) -> None:
    """Output gathered into events, a UTF-8 character split between bursts, a resize and an
    echoed key in between: the events come in the order things happened, with times that
    never go back, and the output is the bytes as they came."""
    path = tmp_path / "order.cast"
    rec = Recorder(Record(path, input=True), (24, 80), env={"TERM": "xterm"})
    euro = "€".encode()
    try:
        rec.output([b"one ", b"two " + euro[:1]])
        rec.output([euro[1:] + b" three\r\n"])
        rec.resize(30, 100)
        rec.output([b"after resize\r\n"])
        rec.input(b"k")
        rec.output([b"k"])  # the echo: the key is released as an "i" event
        rec.output([b'\x1b[0m"quoted" \\ \x00 end'])
    finally:
        rec.close()
    header, events = _events(path)
    assert (header["width"], header["height"], header["env"]) == (80, 24, {"TERM": "xterm"})
    times = [e[0] for e in events]
    assert times == sorted(times)
    codes = [e[1] for e in events]
    assert codes.index("r") < codes.index("i") and codes.count("r") == codes.count("i") == 1
    before_r = "".join(e[2] for e in events[: codes.index("r")])
    assert before_r == "one two € three\r\n"
    assert events[codes.index("i")][2] == "k"
    output = "".join(e[2] for e in events if e[1] == "o")
    assert output == 'one two € three\r\nafter resize\r\nk\x1b[0m"quoted" \\ \x00 end'


def test_output_written_within_a_second_while_it_goes_on(tmp_path: Path) -> None:
    """Output that never pauses (so the relay's poll never times out and ``tick`` is never
    called) still reaches the file within about a second, by the output events themselves."""
    path = tmp_path / "steady.cast"
    rec = Recorder(path, (24, 80))
    sent: list[bytes] = []
    try:
        start = time.monotonic()
        while b"steady-0 " not in path.read_bytes():
            assert time.monotonic() - start < 10, "output not written while it goes on"
            sent.append(b"steady-%d " % len(sent))
            rec.output(sent[-1:])
            select.select([], [], [], 0.002)  # output paced like a slow stream (not a wait)
        assert sum(map(len, sent)) < 1 << 20  # written by time, not because a buffer filled
    finally:
        rec.close()
    _, events = _events(path)
    assert "".join(e[2] for e in events) == b"".join(sent).decode()


def test_sigkill_during_bulk_output_leaves_a_valid_file(
    local_sshd: LocalSSHD, tmp_path: Path
) -> None:
    """sshwrap killed while it records bulk output (blocks written past the page cache, the
    last partial block through it): every line of the file is an event, asciinema plays it."""
    path = tmp_path / "bulk.cast"
    # base64 lines with an escape sequence, quotes, a backslash and UTF-8 now and then
    cmd = "while :; do head -c 200000 /dev/urandom | base64; "
    cmd += r"""printf '\033[1m"q" \\ \303\251\n'; done"""
    argv = sshwrap_argv("--record", str(path), *local_sshd.ssh_args, "-tt", local_sshd.host, cmd)
    t = Term(argv, env=ENV, screen=False)
    try:
        deadline = time.monotonic() + 60
        while not path.exists() or path.stat().st_size < 3 << 20:
            assert time.monotonic() < deadline, "the recording did not grow"
            t.pump(0.1)
            del t.raw[:]  # keep only what is new: this output is not looked at
        os.kill(t.proc.pid, signal.SIGKILL)
        assert not wait_exited([t.proc.pid], 30)
    finally:
        t.close()
    header, events = _events(path)  # every line parses
    assert header["version"] == 2 and len(events) > 10
    times = [e[0] for e in events]
    assert times == sorted(times)
    assert '\x1b[1m"q" \\ é' in "".join(e[2] for e in events)
    shown = subprocess.run(
        [ASCIINEMA, "cat", str(path)], capture_output=True, timeout=120, check=True
    ).stdout
    assert '"q" \\ é'.encode() in shown


def test_bulk_output_is_escaped_read_by_read(tmp_path: Path) -> None:
    """Bulk output (reads of 4 KiB, text lines and escapes) is escaped into the log's buffer
    read by read: what is allocated at once does not grow with the burst (a joined burst and
    its escaped copies made malloc grow and trim its heap: fresh pages, page faults for
    each), and the file holds the output exactly."""
    line = b'0123456789abcdef"\\ \x1b[1mbold\x1b[0m \xc3\xa9t\xc3\xa9\x00\r\n'
    data = line * ((4 << 20) // len(line)) + b"not UTF-8: \xff\xfe\r\n" + line * 100
    reads = [data[i : i + 4096] for i in range(0, len(data), 4096)]  # UTF-8 cut at times
    peaks = {}
    for burst in (4, 64):
        path = tmp_path / f"bulk{burst}.cast"
        rec = Recorder(path, (24, 80))
        try:
            tracemalloc.start()
            try:
                for i in range(0, len(reads), burst):
                    rec.output(reads[i : i + burst])
                _, peaks[burst] = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        finally:
            rec.close()
        _, events = _events(path)
        assert "".join(e[2] for e in events) == data.decode("utf-8", "replace")
    # One read's escaping may take some times its size (orjson reserves room for the worst
    # case); a burst of 64 reads (256 KiB) must take no more than one of 4 reads does.
    assert peaks[64] < peaks[4] * 1.25 + (8 << 10), f"peak {peaks} bytes for bursts of 4, 64"
    assert peaks[4] < 64 * 4096, peaks
