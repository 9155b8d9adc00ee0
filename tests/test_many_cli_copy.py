"""``sshwrap-many --put`` / ``--get`` (issue 12's fleet copy, its command line) against a
real sshd: every host is this machine through its own alias, so each host writes its own
``%h`` path and the tests look at the remote files directly (as root)."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from faults import MARK_VAR, leftovers
from test_fanout_helpers import Hosts, alive, comm, descendants, write_config
from test_fleet_copy import _sparse, _sums
from test_many_cli import on_a_terminal
from waiting import wait_until

from sshwrap.testing import LocalSSHD

EXE = str(Path(sys.executable).with_name("sshwrap-many"))
MB = 1_000_000


@pytest.fixture(scope="module")
def server() -> Iterator[LocalSSHD]:
    with LocalSSHD(hosts=4) as sshd:
        yield sshd


@pytest.fixture(scope="module")
def refused_port() -> Iterator[int]:
    """A port bound and not listening while the module runs: a connect is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture(scope="module")
def many(server: LocalSSHD, refused_port: int, tmp_path_factory: pytest.TempPathFactory) -> Hosts:
    return write_config(server, 4, tmp_path_factory.mktemp("manycopy"), refused_port=refused_port)


@pytest.fixture
def remote_dir(server: LocalSSHD) -> Iterator[Path]:
    """A directory the remote user owns (on this machine), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="sshwrap-manycopy-"))
    try:
        os.chmod(d, 0o755)
        _give(d, server)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _give(path: Path, server: LocalSSHD) -> None:
    e = pwd.getpwnam(server.user)
    os.chown(path, e.pw_uid, e.pw_gid)


def run_cli(many: Hosts, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, "-F", many.config, *args], capture_output=True, text=True, timeout=timeout
    )


def _tree(root: Path) -> dict[str, str]:
    """A few files (one empty, one in a subdirectory); their sha256 by relative path."""
    sums = {}
    for i, rel in enumerate(["a.bin", "empty", "sub/b.bin", "sub/deeper/c.txt"]):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(i * 70_001)
        path.write_bytes(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def _lines(text: str) -> list[str]:
    return re.sub(r" +\|", " |", text).splitlines()  # the host column is padded


def test_put_then_get_round_trip_on_4_hosts(many: Hosts, remote_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    sums = _tree(src)
    hosts = "h[1-4]"
    p = run_cli(many, "-H", hosts, "-p", "2", "--put", str(src), f"{remote_dir}/%h")
    assert p.returncode == 0, p.stderr
    assert sum(i * 70_001 for i in range(4)) == 420_006
    out = _lines(p.stdout)
    assert len(out) == 4, p.stdout
    for h in many.hosts:
        assert _sums(remote_dir / h) == sums, h
        line = f"{h} | put {src} -> {remote_dir}/{h}: 420.0 kB in "
        assert any(ln.startswith(line) and ln.endswith(" s") for ln in out), (line, out)
    assert "4 hosts in" in p.stderr and "4 ok, 0 failed, 0 timed out, 0 ssh errors" in p.stderr

    got = tmp_path / "collected"
    p = run_cli(many, "-H", hosts, "--progress", "--get", f"{remote_dir}/%h", f"{got}/")
    assert p.returncode == 0, p.stderr
    assert "sshwrap-many: 4/4 done: 4 ok, 0 failed" in p.stderr  # plain progress, in hosts
    assert sorted(os.listdir(got)) == many.hosts
    for h in many.hosts:
        assert _sums(got / h / h) == sums, h  # LOCALDIR/HOST/<the remote name>
    assert len(_lines(p.stdout)) == 4 and all(" | get " in ln for ln in _lines(p.stdout))


def test_progress_bar_on_a_terminal(many: Hosts, remote_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "f.txt"
    src.write_bytes(b"x" * 1000)
    put = ["--put", str(src), f"{remote_dir}/%h"]
    status, text = on_a_terminal([EXE, "-F", many.config, "-H", "h[1-4]", *put], width=200)
    assert status == 0, text
    assert "\x1b[" in text  # rich drew (and then cleared) a live display
    assert "/4" in text  # its "done/total" column, in hosts
    assert "4 hosts in" in text
    assert sorted(os.listdir(remote_dir)) == many.hosts


def _failing_setup(remote_dir: Path, server: LocalSSHD, tmp_path: Path) -> Path:
    """h1 and h2 get a writable directory, h3 one it cannot write (root's, 0555)."""
    for h in ("h1", "h2", "h3"):
        (remote_dir / h).mkdir(mode=0o755)
        if h != "h3":
            _give(remote_dir / h, server)
    os.chmod(remote_dir / "h3", 0o555)
    src = tmp_path / "f.txt"
    src.write_bytes(b"payload\n" * 1000)
    return src


def test_exit_status_adds_a_failed_copy_and_a_refused_host(
    many: Hosts, server: LocalSSHD, remote_dir: Path, tmp_path: Path
) -> None:
    src = _failing_setup(remote_dir, server, tmp_path)
    target = f"{remote_dir}/%h/f.txt"
    p = run_cli(many, "-H", "h1,h2,h3,refused", "--put", str(src), target)
    assert p.returncode == 1 | 4, p.stderr
    err = _lines(p.stderr)
    assert "4 hosts in" in p.stderr and "2 ok, 1 failed, 0 timed out, 1 ssh error" in p.stderr
    assert any(ln.startswith(f"h3 | put {src} -> {remote_dir}/h3/f.txt: ") for ln in err), err
    refused = [ln for ln in err if ln.startswith("refused | put ")]
    assert len(refused) == 1 and "ssh error: SSHConnectionError" in refused[0], err
    assert any(ln.startswith("  failed: h3 (") for ln in err), err
    assert any(ln.startswith("  ssh errors: refused (") for ln in err), err
    assert sorted(ln.split(" |")[0] for ln in _lines(p.stdout)) == ["h1", "h2"]
    assert (remote_dir / "h1" / "f.txt").read_bytes() == src.read_bytes()
    assert os.listdir(remote_dir / "h3") == []  # nothing partial


def test_json_lines(many: Hosts, server: LocalSSHD, remote_dir: Path, tmp_path: Path) -> None:
    src = _failing_setup(remote_dir, server, tmp_path)
    p = run_cli(many, "-H", "h1,h3,refused", "--json", "--put", str(src), f"{remote_dir}/%h/f.txt")
    assert p.returncode == 1 | 4, p.stderr
    objs = {o["host"]: o for o in map(json.loads, p.stdout.splitlines())}
    assert sorted(objs) == ["h1", "h3", "refused"]
    keys = {"host", "status", "error", "source", "target", "transferred", "total", "started"}
    assert all(keys | {"duration"} <= set(o) for o in objs.values())
    ok = objs["h1"]
    assert ok["status"] == "ok" and ok["error"] is None
    assert ok["source"] == str(src) and ok["target"] == f"{remote_dir}/h1/f.txt"
    assert ok["transferred"] == ok["total"] == 8000
    assert ok["started"] > 0 and ok["duration"] > 0
    bad = objs["h3"]
    assert bad["status"] == "failed" and bad["error"]["type"] and bad["error"]["message"]
    assert objs["refused"]["status"] == "ssh_error"
    assert objs["refused"]["error"]["type"] == "SSHConnectionError"
    assert "refused" in objs["refused"]["error"]["message"]


def test_a_deadline_is_the_timed_out_bit(many: Hosts, remote_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "h1.bin").write_bytes(b"small\n")
    _sparse(tmp_path / "h2.bin", 40_000 * MB)  # far more than 2 s of copying
    t0 = time.monotonic()
    put = ["--put", f"{tmp_path}/%h.bin", f"{remote_dir}/%h"]
    p = run_cli(many, "-H", "h1,h2", "--deadline", "2", *put)
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stderr
    assert took < 2 + 6, took  # (the stop's bound, the CLI's start, a loaded machine)
    assert "1 ok, 0 failed, 1 timed out, 0 ssh errors" in p.stderr
    assert re.search(r"^h2 \| put .*: timed out$", p.stderr, re.M), p.stderr
    assert not (remote_dir / "h2").exists()  # nothing partial under the destination's name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--put", "{src}", "/tmp/x", "--", "true"], "one or the other"),
        (["--get", "/etc/hostname"], "expected 2 arguments"),
        (["--put", "{src}", "/tmp/x", "--get", "/a", "b"], "not allowed with"),
        (["--put", "{missing}", "/tmp/x"], "No such file"),
        (["--put", "{src}", "/tmp/x", "--persist", "1m"], "--put takes no --persist"),
        (["--put", "{src}", "/tmp/x", "--group"], "--put takes no --group"),
        (["--get", "/etc/hostname", "{tmp}", "--outdir", "{tmp}"], "--get takes no --outdir"),
        (["--put", "{src}", "/tmp/x", "-I", "{src}"], "--put takes no -I"),
        (["--put", "{src}", "/tmp/x", "--close"], "(nor --put/--get)"),
        ([], "or copy with --put/--get"),
    ],
)
def test_usage_errors(many: Hosts, tmp_path: Path, args: list[str], message: str) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    words = [a.format(src=src, missing=tmp_path / "missing", tmp=tmp_path / "out") for a in args]
    p = run_cli(many, "-H", "h1,h2", *words)
    assert p.returncode == 64, (p.returncode, p.stderr)
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


@contextmanager
def _started(many: Hosts, *args: str, mark: str = "") -> Iterator[subprocess.Popen[bytes]]:
    """sshwrap-many running (killed and reaped afterwards if the test left it running)."""
    p = subprocess.Popen(
        [EXE, "-F", many.config, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, MARK_VAR: mark},
        # as from an interactive shell: SIGINT not ignored (sshwrap-many keeps an ignored one)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _interrupt(p: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """Ctrl-C; what it wrote to stdout and stderr until it exited."""
    p.send_signal(signal.SIGINT)
    return p.communicate(timeout=20)


def test_ctrl_c_prints_partial_results_and_leaves_nothing(
    many: Hosts, remote_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "h1.bin").write_bytes(b"small\n")
    for h in ("h2", "h3"):
        _sparse(tmp_path / f"{h}.bin", 2000 * MB)
    mark = uuid.uuid4().hex
    put = ["--put", f"{tmp_path}/%h.bin", f"{remote_dir}/%h"]
    with _started(many, "-H", "h[1-3]", *put, mark=mark) as p:

        def moving() -> bool:
            names = os.listdir(remote_dir)
            parts = [n for n in names if n.endswith(".part")]
            return "h1" in names and len(parts) == 2

        wait_until(moving, 60, "h1 copied, h2 and h3 moving")
        # the run's ssh: its masters (each runs its host's SFTP session itself), daemonized
        ssh_pids = [d for d in [*descendants(p.pid), *leftovers(mark)] if comm(d) == "ssh"]
        assert ssh_pids
        out, err = _interrupt(p)
    text = err.decode()
    assert p.returncode == 130, text
    assert "interrupted: 3 hosts" in text
    assert "1 ok, 0 failed, 0 timed out, 0 ssh errors, 2 cancelled" in text
    assert re.search(rb"^h1 \| put \S+h1\.bin -> \S+/h1: 6 B in ", out, re.M), out
    assert re.search(r"^h2 \| put .*: cancelled$", text, re.M), text
    assert not any(alive(pid) for pid in ssh_pids)
    assert leftovers(mark) == []  # no ssh, no master left running
    # nothing partial under a destination's name (a stop's cleanup of the remote temporary
    # file is the transfer's, bounded by core.fleet_copy.STOP_GRACE: not asserted here)
    assert [n for n in os.listdir(remote_dir) if not n.startswith(".")] == ["h1"]


def test_each_hosts_line_shows_as_it_finishes(
    many: Hosts, remote_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "h1.bin").write_bytes(b"small\n")
    _sparse(tmp_path / "h2.bin", 4000 * MB)
    with _started(many, "-H", "h[1-2]", "--put", f"{tmp_path}/%h.bin", f"{remote_dir}/%h") as p:
        assert p.stdout is not None
        ready = select.select([p.stdout], [], [], 60)[0]
        assert ready, "no line from h1 within 60 s"
        line = p.stdout.readline()
        assert re.match(rb"h1 \| put \S+h1\.bin -> \S+/h1: 6 B in ", line), line
        assert p.poll() is None  # h2 still copying
        out, err = _interrupt(p)
    assert p.returncode == 130, err
    assert out == b""  # h1's line came once
    assert b"1 ok, 0 failed, 0 timed out, 0 ssh errors, 1 cancelled" in err
