"""The ``sshwrap-many`` command against real sshds."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ptyprocess import PtyProcess
from ptyterm import Term
from test_fanout_helpers import (
    ALIAS_ENV,
    Hosts,
    alive,
    comm,
    descendants,
    mixed_config,
    write_config,
)
from test_persist import master_pids
from waiting import wait_until

from sshwrap.core.hostset import fold
from sshwrap.io.persist import persisted_sockets
from sshwrap.testing import LocalSSHD

EXE = str(Path(sys.executable).with_name("sshwrap-many"))


@pytest.fixture(scope="module")
def server() -> Iterator[LocalSSHD]:
    with LocalSSHD(hosts=4) as sshd:
        yield sshd


@pytest.fixture(scope="module")
def many(server: LocalSSHD, tmp_path_factory: pytest.TempPathFactory) -> Hosts:
    return write_config(server, 12, tmp_path_factory.mktemp("manycli"))


def run_cli(
    many: Hosts, *args: str, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, "-F", many.config, *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_live_lines_are_prefixed_and_summary_says_what_happened(many: Hosts) -> None:
    hosts = ",".join(many.hosts[:5])
    cmd = f'case "${ALIAS_ENV}" in h2) echo bad >&2; exit 3;; esac; echo "hello ${ALIAS_ENV}"'
    p = run_cli(many, "-H", hosts, "-p", "3", "--", cmd)
    assert p.returncode == 1  # a command failed
    out = sorted(p.stdout.splitlines())
    assert out == sorted(f"{h} | hello {h}" for h in many.hosts[:5] if h != "h2")
    assert "h2 | bad" in p.stderr.splitlines()
    assert "h2 | [exit 3]" in p.stderr.splitlines()
    assert "5 hosts in" in p.stderr and "4 ok, 1 failed, 0 timed out, 0 ssh errors" in p.stderr
    assert "\x1b" not in p.stderr + p.stdout  # no progress bar, no colours when piped


def test_words_after_dashdash_go_to_the_remote_shell_like_ssh(many: Hosts) -> None:
    p = run_cli(many, "-H", "h1", "--", "echo", "$((1+2))", "a  b")
    assert p.returncode == 0
    assert p.stdout == "h1 | 3 a b\n"


def test_hosts_from_file_and_stdin(many: Hosts, tmp_path: Path) -> None:
    f = tmp_path / "hosts.txt"
    f.write_text("# web tier\nh1\nh2  # second\n\nh3\nh1\n")
    p = run_cli(many, "-H", str(f), "--json", "--", "true")
    assert p.returncode == 0
    assert sorted(json.loads(line)["host"] for line in p.stdout.splitlines()) == ["h1", "h2", "h3"]
    p = run_cli(many, "-H", "-", "--json", "--", "true", input="h4\nh5\n")
    assert p.returncode == 0
    assert sorted(json.loads(line)["host"] for line in p.stdout.splitlines()) == ["h4", "h5"]


def test_json_lines(many: Hosts) -> None:
    cmd = f"case \"${ALIAS_ENV}\" in h2) printf '\\377';; esac; echo out; echo err >&2"
    p = run_cli(many, "-H", "h1,h2", "--json", "--", cmd)
    assert p.returncode == 0
    objs = {o["host"]: o for o in map(json.loads, p.stdout.splitlines())}
    h1 = objs["h1"]
    assert h1["status"] == "ok" and h1["returncode"] == 0
    assert h1["stdout"] == "out\n" and h1["stderr"] == "err\n" and h1["error"] is None
    assert h1["duration"] > 0 and h1["connect_time"] > 0
    h2 = objs["h2"]
    assert h2["stdout"] is None and h2["stdout_base64"] == "/291dAo="  # b"\xffout\n"


def test_group_identical_outputs(many: Hosts) -> None:
    cmd = f'case "${ALIAS_ENV}" in h3|h5) echo other;; *) echo same;; esac'
    p = run_cli(many, "-H", ",".join(many.hosts[:6]), "--group", "--", cmd)
    assert p.returncode == 0
    assert p.stdout == (
        "==== h[1-2,4,6] (4 hosts): exit 0\nsame\n==== h[3,5] (2 hosts): exit 0\nother\n"
    )


def test_fold_hosts() -> None:
    # --group and the summary fold with core.hostset.fold (the folding of -H's patterns)
    assert fold(["web1", "web2", "web3", "web7", "db", "web10"]) == "web[1-3,7,10],db"
    assert fold(["a1"]) == "a1"
    assert fold(["n01", "n02", "x"]) == "n[01-02],x"  # equal widths fold, padding kept
    assert fold(["n9", "n09", "n10"]) == "n[9,09-10]"  # names of other padding stay apart
    assert fold(["u@h1", "u@h2"]) == "u@h[1-2]"


def test_outdir_writes_a_file_per_host(many: Hosts, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = f'echo "o ${ALIAS_ENV}"; echo "e ${ALIAS_ENV}" >&2'
    p = run_cli(many, "-H", "h1,h2,h3", "--outdir", str(out), "--", cmd)
    assert p.returncode == 0
    for h in ("h1", "h2", "h3"):
        assert (out / f"{h}.out").read_text() == f"o {h}\n"
        assert (out / f"{h}.err").read_text() == f"e {h}\n"
    assert p.stdout == ""


def test_exit_status_bits_for_ssh_errors_and_timeouts(server: LocalSSHD, tmp_path: Path) -> None:
    with LocalSSHD() as hang, mixed_config(server, hang, 3, tmp_path) as m:
        hang.suspend()
        try:
            t0 = time.monotonic()
            cmd = f'case "${ALIAS_ENV}" in h1) sleep 30;; h2) exit 1;; esac'
            hosts = "h1,h2,h3,refused,badkey,hang"
            p = run_cli(m, "-H", hosts, "-t", "2", "--connect-timeout", "3", "--", cmd)
            elapsed = time.monotonic() - t0
        finally:
            hang.resume()
    assert p.returncode == 1 | 2 | 4
    assert elapsed < 3 + 4
    err = re.sub(r" +\|", " |", p.stderr)  # the host column is padded
    assert "1 ok, 1 failed, 1 timed out, 3 ssh errors" in err
    assert "h1 | [timed out]" in err
    assert "refused | [ssh error: SSHConnectionError:" in err
    assert "badkey | [ssh error: AuthenticationError:" in err
    assert "hang | [ssh error: SSHConnectionError:" in err


def test_ssh_options_reach_every_ssh(many: Hosts) -> None:
    p = run_cli(many, "-H", "h1,h2", "-l", "nosuchuser", "--", "true")
    assert p.returncode == 4
    assert p.stderr.count("AuthenticationError") >= 2
    p = run_cli(many, "-H", "h1", "-o", "Port=1", "--", "true")
    assert p.returncode == 4 and "Connection refused" in p.stderr
    # -o ConnectTimeout is sshwrap-many's own --connect-timeout (a hung host: a suspended sshd)
    with LocalSSHD() as hang:
        hang.suspend()
        try:
            t0 = time.monotonic()
            p = subprocess.run(
                [EXE, *hang.ssh_args, "-H", hang.host, "-o", "ConnectTimeout=2", "--", "true"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            took = time.monotonic() - t0
        finally:
            hang.resume()
    assert p.returncode == 4 and took < 2 + 3


def test_a_closed_stdout_stops_the_run_quietly(many: Hosts) -> None:
    argv = [EXE, "-F", many.config, "-H", ",".join(many.hosts), "--", "seq 100000; sleep 30"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    first = p.stdout.readline()
    assert first.endswith(b"| 1\n")
    p.stdout.close()  # the reader goes away, as with `| head -1`
    _, err = p.communicate(timeout=20)
    assert p.returncode == 141
    assert b"Traceback" not in err and b"Exception" not in err
    assert b"stdout closed: 12 hosts" in err


def test_usage_errors(many: Hosts) -> None:
    p = run_cli(many, "-H", "h1")
    assert p.returncode == 64 and "no command" in p.stderr
    p = run_cli(many, "-H", "h1", "-o", "NoEquals", "--", "true")
    assert p.returncode == 64 and "KEY=VALUE" in p.stderr
    p = run_cli(many, "--bogus", "-H", "h1", "--", "true")
    assert p.returncode == 64


def test_refuses_a_parallelism_the_fd_limit_cannot_hold(many: Hosts) -> None:
    import resource

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    p = subprocess.run(
        [EXE, "-F", many.config, "-H", ",".join(many.hosts), "-p", "50", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=low_limit,
    )
    assert p.returncode == 64
    assert "open-files limit is 64" in p.stderr and "concurrency of at most" in p.stderr
    assert "Traceback" not in p.stderr


def on_a_terminal(argv: list[str], width: int = 100) -> tuple[int | None, str]:
    """Run ``argv`` on a pty until it exits: its exit status and everything it wrote."""
    proc = PtyProcess.spawn(argv, dimensions=(24, width))
    chunks = []
    while True:
        try:
            chunks.append(proc.read(65536))
        except EOFError:
            break
    proc.wait()
    return proc.exitstatus, b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal(many: Hosts) -> None:
    argv = [EXE, "-F", many.config, "-H", ",".join(many.hosts), "-p", "4", "--", "sleep 0.3"]
    status, text = on_a_terminal(argv)
    assert status == 0
    assert "\x1b[" in text  # rich drew (and then cleared) a live display
    assert "/12" in text  # its "done/total" column
    assert "12 hosts in" in text


def test_ctrl_c_ends_every_ssh_and_prints_partial_results(many: Hosts) -> None:
    hosts = many.hosts[:10]
    cmd = f'case "${ALIAS_ENV}" in h1) echo quick; exit 0;; esac; echo up; sleep 60'
    p = subprocess.Popen(
        [EXE, "-F", many.config, "-H", ",".join(hosts), "-p", "20", "--", cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # as from an interactive shell: SIGINT not ignored (sshwrap-many keeps an ignored one)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert p.stdout is not None and p.stderr is not None
    seen = b""
    deadline = time.monotonic() + 60
    while seen.count(b"| up\n") < len(hosts) - 1:
        left = deadline - time.monotonic()
        assert left > 0, seen
        if select.select([p.stdout], [], [], left)[0]:
            chunk = os.read(p.stdout.fileno(), 65536)
            assert chunk, seen
            seen += chunk
    ssh_pids = [d for d in descendants(p.pid) if comm(d) == "ssh"]
    assert len(ssh_pids) == len(hosts) - 1
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    took = time.monotonic() - t0
    assert p.returncode == 130
    assert took < 5
    assert not any(alive(pid) for pid in ssh_pids)
    text = err.decode()
    assert "interrupted: 10 hosts" in text
    assert "1 ok, 0 failed, 0 timed out, 0 ssh errors, 9 cancelled" in text
    assert b"h1  | quick\n" in seen + out


# -- issue 11: a mistyped hosts file, plain progress, 141 in --help ----------------------------
@pytest.mark.parametrize(
    "spec",
    ["nosuchfile.txt", "hosts/web", "./hosts", "~/no-such-hosts", "web.hosts", "all.CFG", "a.lst"],
)
def test_a_hosts_file_that_does_not_exist_is_a_usage_error(many: Hosts, spec: str) -> None:
    p = run_cli(many, "-H", spec, "--", "true")
    assert p.returncode == 64, p.stderr
    assert p.stderr.splitlines()[-1] == f"sshwrap-many: error: -H {spec}: no such file"
    assert p.stderr.startswith("usage: sshwrap-many")


def test_a_path_in_a_comma_list_or_a_directory_is_refused_too(many: Hosts, tmp_path: Path) -> None:
    p = run_cli(many, "-H", "h1,typo.txt", "--", "true")
    assert p.returncode == 64
    assert p.stderr.splitlines()[-1] == "sshwrap-many: error: -H typo.txt: no such file"
    p = run_cli(many, "-H", str(tmp_path), "--", "true")
    assert p.returncode == 64
    assert p.stderr.splitlines()[-1] == f"sshwrap-many: error: -H {tmp_path}: is a directory"


def test_a_hosts_file_under_tilde_is_read(many: Hosts, tmp_path: Path) -> None:
    (tmp_path / "fleet.txt").write_text("h1\nh2\n")
    p = subprocess.run(
        [EXE, "-F", many.config, "-H", "~/fleet.txt", "--json", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert p.returncode == 0, p.stderr
    assert sorted(json.loads(line)["host"] for line in p.stdout.splitlines()) == ["h1", "h2"]


def test_help_lists_every_exit_status(many: Hosts) -> None:
    p = run_cli(many, "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for code in ("+1", "+2", "+4", "64 usage", "130 interrupted", "141 stdout closed"):
        assert code in text


PROGRESS = re.compile(r"sshwrap-many: (\d+)/12 done: (\d+) ok, 0 failed, 0 timed out, 0 ssh errors")


def test_progress_without_a_terminal_is_plain_lines(many: Hosts) -> None:
    # Every host waits for the same go, so the 12 results come within a moment: a line per
    # result would be 12 lines; at most one a second (and one at the end) is 2 or 3.
    gate = Path(tempfile.mkdtemp(prefix="sshwrap-gate-"))
    try:
        gate.chmod(0o777)  # the remote side may log in as another user
        cmd = f'touch {gate}/"${ALIAS_ENV}"; while [ ! -e {gate}/go ]; do sleep 0.05; done'
        argv = [EXE, "-F", many.config, "-H", ",".join(many.hosts), "--progress", "--json"]
        p = subprocess.Popen(
            [*argv, "--", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_until(lambda: len(list(gate.iterdir())) == 12, 60, "every host waiting")
            (gate / "go").touch()
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
    finally:
        shutil.rmtree(gate, ignore_errors=True)
    assert p.returncode == 0, err
    assert "\x1b" not in err and "\r" not in err  # no control characters
    lines = err.split("\n")
    assert lines[-1] == "" and "" not in lines[:-1]  # no stray blank line
    progress = [m for line in lines if (m := PROGRESS.fullmatch(line))]
    assert [line for line in lines[:-1] if not PROGRESS.fullmatch(line)] == [
        next(line for line in lines if line.startswith("12 hosts in"))
    ]
    assert progress[-1].groups() == ("12", "12")  # the last one
    done = [int(m.group(1)) for m in progress]
    assert done == sorted(set(done))
    ends = [o["started"] + o["duration"] for o in map(json.loads, out.splitlines())]
    assert len(progress) <= 2 + (max(ends) - min(ends)) + 1  # 1 s: delivery on a busy machine
    assert len(progress) < 12


def test_progress_on_a_terminal_is_a_bar_not_lines(many: Hosts) -> None:
    hosts = ",".join(many.hosts)
    term = Term([EXE, "-F", many.config, "-H", hosts, "-p", "4", "--progress", "--", "true"])
    try:
        status = term.wait_exit(60)
    finally:
        term.close()
    text = term.raw.decode(errors="replace")
    assert status == (0, None)
    assert "\x1b[" in text and "/12" in text  # rich's live display, its done/total column
    assert "sshwrap-many: " not in text  # no plain progress lines
    assert "12 hosts in" in text


def test_persist_then_close(many: Hosts, tmp_path: Path) -> None:
    runtime = tempfile.mkdtemp(prefix="p-", dir="/tmp")
    cm = f"{runtime}/sshwrap/cm"
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [EXE, "-F", many.config, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)

    try:
        p = cli("-H", "h[1-4]", "--persist", "10m", "--", "echo", "hi")
        assert p.returncode == 0, p.stderr
        assert sorted(p.stdout.splitlines()) == [f"h{i} | hi" for i in range(1, 5)]
        assert len(persisted_sockets(cm)) == 4
        logins = many.sshd.read_log().count("Accepted publickey")
        p = cli("-H", "h[1-4]", "--persist", "10m", "--", "echo", "again")
        assert p.returncode == 0 and len(p.stdout.splitlines()) == 4, p.stderr
        assert many.sshd.read_log().count("Accepted publickey") == logins  # all warm
        p = cli("-H", "h[1-2]", "--close")
        assert (p.returncode, p.stderr) == (0, "sshwrap-many: closed 2 persisted masters\n")
        assert len(persisted_sockets(cm)) == 2
        p = cli("--close")
        assert (p.returncode, p.stderr) == (0, "sshwrap-many: closed 2 persisted masters\n")
        assert os.listdir(cm) == [] and master_pids(cm) == []
    finally:
        left = master_pids(cm)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)
        assert not left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-H", "h1", "--persist", "soon", "--", "true"], "persist='soon'"),
        (["-H", "h1", "--persist", "0", "--", "true"], "persist='0'"),
        (["-H", "h1", "--persist", "1m", "-o", "ControlPath=/x", "--", "true"], "ControlPath"),
        (["-H", "h1", "--close", "--", "true"], "--close takes no command"),
        (["--close", "--persist", "1m"], "--close takes no command and no --persist"),
        (["--", "true"], "required: -H/--hosts"),
    ],
)
def test_persist_usage_errors(many: Hosts, args: list[str], message: str) -> None:
    p = run_cli(many, *args)
    assert p.returncode == 64 and message in p.stderr, p.stderr
    assert p.stdout == ""
