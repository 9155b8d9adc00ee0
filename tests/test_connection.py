"""Connection: an owned ControlMaster and commands over its mux proxy, against a real sshd."""

from __future__ import annotations

import gc
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from waiting import blocked_signals, wait_until

import sshwrap
from sshwrap.connection import SUN_PATH_MAX, Connection, connect
from sshwrap.errors import (
    CalledProcessError,
    SSHConnectionError,
    SSHWrapError,
    TimeoutExpired,
)
from sshwrap.testing import LocalSSHD, descendants, is_running, wait_exited


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _remote(sshd: LocalSSHD, needle: str, *, anywhere: bool = False) -> list[int]:
    """Pids of the sshd's session processes whose command line starts with ``needle``
    (or contains it).  Starts with: the remote shell has exec'd the program; a signal that
    reached ``sh -c`` before that exec would be caught by dash and lost in the exec."""
    return [
        p
        for p in sshd.session_pids()
        if ((needle in _cmdline(p)) if anywhere else _cmdline(p).startswith(needle))
    ]


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


@pytest.fixture(scope="module")
def conn(local_sshd: LocalSSHD) -> Iterator[Connection]:
    with connect(local_sshd.host, config=local_sshd.config) as c:
        yield c


def test_run_output_status_and_quoting(conn: Connection) -> None:
    r = conn.run(["printf", "%s\n", "a b", "$HOME", "", "it's"], capture_output=True)
    assert r.returncode == 0
    assert r.stdout == b"a b\n$HOME\n\nit's\n"
    assert r.stderr == b""
    assert r.host == conn.host
    r = conn.run("echo out; echo err >&2; exit 3", capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert conn.run("exit 255").returncode == 255  # a genuine 255 is no ssh failure
    assert conn.check_output(["cat"], input=b"fed in") == b"fed in"
    assert conn.call("exit 4") == 4
    assert conn.check_call("true") == 0
    assert conn.run("cd; pwd", stdout=subprocess.PIPE, env={"X": "1"}).stdout.strip()
    r = conn.run(
        'echo "$A$B"; pwd', capture_output=True, text=True, env={"A": "x y", "B": "$z"}, cwd="/tmp"
    )
    assert r.stdout == "x y$z\n/tmp\n"
    r = conn.run("echo merged >&2", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert r.stdout == b"merged\n" and r.stderr is None


def test_check_raises_called_process_error(conn: Connection) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        conn.run("echo no >&2; exit 7", capture_output=True, check=True)
    assert isinstance(info.value, CalledProcessError) and isinstance(info.value, SSHWrapError)
    assert info.value.returncode == 7
    assert info.value.stderr == b"no\n"
    assert info.value.host == conn.host


def test_remote_signal_death_is_exact(conn: Connection) -> None:
    assert conn.run("kill -9 $$").returncode == -9
    assert conn.run("kill -TERM $$").returncode == -15
    assert conn.run("kill -USR1 $$").returncode == -signal.SIGUSR1
    with pytest.raises(CalledProcessError, match="SIGKILL"):
        conn.run("kill -KILL $$", check=True)


def test_stdin_default_is_devnull_and_files_work(conn: Connection, tmp_path: object) -> None:
    assert conn.run("cat", capture_output=True).stdout == b""
    src = os.path.join(str(tmp_path), "in")
    dst = os.path.join(str(tmp_path), "out")
    with open(src, "wb") as f:
        f.write(os.urandom(300_000))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        assert conn.run("cat", stdin=fin, stdout=fout).returncode == 0
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()


def test_big_data_both_ways(conn: Connection) -> None:
    data = os.urandom(8 * 1024 * 1024)
    r = conn.run("cat", input=data, capture_output=True)
    assert r.stdout == data
    r = conn.run("head -c 20000000 /dev/zero", capture_output=True)
    assert r.stdout == bytes(20_000_000)


def test_popen_pipes_line_by_line(conn: Connection) -> None:
    with conn.Popen(
        "echo a; read x; echo got $x", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as p:
        assert p.pid is None
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline() == "a\n"  # arrives before the command ends
        p.stdin.write("b\n")
        p.stdin.flush()
        assert p.stdout.readline() == "got b\n"
        p.stdin.close()
    assert p.returncode == 0


def test_popen_communicate_no_deadlock(conn: Connection) -> None:
    data = os.urandom(16 * 1024 * 1024)
    with conn.Popen(
        ["sh", "-c", "cat; cat /dev/null >&2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as p:
        out, err = p.communicate(data, timeout=120)
    assert out == data and err == b"" and p.returncode == 0


def test_popen_send_signal_sigint_stops_remote_sleep(
    conn: Connection, local_sshd: LocalSSHD
) -> None:
    p = conn.Popen(["sleep", "1001"])
    wait_until(lambda: bool(_remote(local_sshd, "sleep 1001")), 10, "the remote sleep")
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=10) == -2
    wait_until(lambda: not _remote(local_sshd, "sleep 1001"), 5, "the remote sleep to go")


def test_popen_terminate_and_kill(conn: Connection, local_sshd: LocalSSHD) -> None:
    p = conn.Popen(["sleep", "1002"])
    wait_until(lambda: bool(_remote(local_sshd, "sleep 1002")), 10, "the remote sleep")
    p.terminate()
    assert p.wait(timeout=10) == -15
    p = conn.Popen(["sleep", "1003"])
    wait_until(lambda: bool(_remote(local_sshd, "sleep 1003")), 10, "the remote sleep")
    p.kill()
    assert p.wait(timeout=10) == -9
    assert p.poll() == -9


def test_timeout_stops_remote_command(conn: Connection, local_sshd: LocalSSHD) -> None:
    t = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        conn.run("echo started; exec sleep 1004", timeout=1, capture_output=True)
    assert time.monotonic() - t < 4
    assert isinstance(info.value, TimeoutExpired)
    assert info.value.output == b"started\n"
    assert info.value.host == conn.host
    wait_until(lambda: not _remote(local_sshd, "sleep 1004"), 5, "the remote sleep to go")


def test_timeout_then_kill_when_term_is_ignored(conn: Connection, local_sshd: LocalSSHD) -> None:
    with pytest.raises(TimeoutExpired):
        conn.run("trap '' TERM; sleep 1005; :", timeout=0.5, kill_after=0.5)
    wait_until(
        lambda: not _remote(local_sshd, "sleep 1005", anywhere=True), 5, "the remote command to go"
    )


def test_popen_wait_timeout(conn: Connection) -> None:
    with conn.Popen(["sleep", "1006"]) as p:
        with pytest.raises(TimeoutExpired):
            p.wait(timeout=0.2)
        assert p.poll() is None
        p.kill()
    assert p.returncode == -9


def test_socket_dir_private_then_removed(local_sshd: LocalSSHD) -> None:
    c = connect(local_sshd.host, config=local_sshd.config)
    try:
        d = os.path.dirname(c.control_path)
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(c.control_path).st_mode)
        for name in os.listdir(d):  # the master's log and stderr: private too
            if not stat.S_ISSOCK(os.stat(os.path.join(d, name)).st_mode):
                assert stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode) == 0o600, name
        assert len(os.fsencode(c.control_path)) + 17 <= SUN_PATH_MAX
        assert c.alive and is_running(c.master_pid)
        pid = c.master_pid
        # The master holds no pipe of ours: its stdio is /dev/null or its log.
        for fd in ("0", "1", "2"):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert not [t for t in targets if t.startswith("pipe:")], targets
    finally:
        c.close()
    assert not os.path.exists(d)
    assert not c.alive
    assert wait_exited([pid], 5) == [], "the master to exit"
    with pytest.raises(ValueError):
        c.run("true")


def test_hundred_runs_one_master_no_other_ssh(local_sshd: LocalSSHD) -> None:
    with connect(local_sshd.host, config=local_sshd.config) as c:
        me = os.getpid()
        for _ in range(100):
            assert c.run("true").returncode == 0
            ssh_kids = [
                p for p in descendants(me) if os.path.basename(_cmdline(p).split(" ")[0]) == "ssh"
            ]
            assert not ssh_kids
        masters = [p for p in _all_pids() if c.control_path in _cmdline(p)]
        assert masters == [c.master_pid]


def test_killed_master_reconnects(local_sshd: LocalSSHD) -> None:
    with connect(local_sshd.host, config=local_sshd.config) as c:
        old = c.master_pid
        os.kill(old, signal.SIGKILL)
        assert wait_exited([old], 5) == [], "the master to die"
        t = time.monotonic()
        assert c.run("echo back", capture_output=True).stdout == b"back\n"
        assert time.monotonic() - t < 5
        assert c.master_pid != old and is_running(c.master_pid)
        assert c.restarts == 1


def test_killed_master_raises_without_reconnect(local_sshd: LocalSSHD) -> None:
    with connect(local_sshd.host, config=local_sshd.config, reconnect=False) as c:
        p = c.Popen(["sleep", "1007"])
        wait_until(lambda: bool(_remote(local_sshd, "sleep 1007")), 10, "the remote sleep")
        os.kill(c.master_pid, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(SSHConnectionError):
            p.wait(timeout=5)
        assert p.returncode == 255 and isinstance(p.ssh_error, SSHConnectionError)
        with pytest.raises(SSHConnectionError):
            c.run("true")
        assert time.monotonic() - t < 5
        assert not c.alive


def test_many_threads_at_once(conn: Connection) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(15):
                r = conn.run(["echo", f"{n}-{i}"], capture_output=True, text=True)
                assert r.stdout == f"{n}-{i}\n", r
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]


def test_concurrent_popen_streams_do_not_mix(conn: Connection) -> None:
    procs = [
        conn.Popen(
            ["sh", "-c", f"head -c 3000000 /dev/zero | tr '\\0' {c}"], stdout=subprocess.PIPE
        )
        for c in "abcd"
    ]
    # Read them in turn, so three of them are throttled by their full pipes meanwhile.
    for c, p in zip("abcd", procs, strict=True):
        out, _ = p.communicate(timeout=60)
        assert out == c.encode() * 3_000_000
        assert p.returncode == 0


def test_fallback_ssh_s_when_proxy_is_off(local_sshd: LocalSSHD) -> None:
    with connect(local_sshd.host, config=local_sshd.config, proxy=False) as c:
        assert not c.uses_proxy
        r = c.run(["printf", "%s", "a b"], capture_output=True)
        assert (r.returncode, r.stdout) == (0, b"a b")
        assert c.run("exit 5").returncode == 5
        masters = [p for p in _all_pids() if c.control_path in _cmdline(p)]
        assert c.master_pid in masters


def test_connect_failure_is_typed(local_sshd: LocalSSHD) -> None:
    with pytest.raises(SSHConnectionError):
        connect(local_sshd.host, config=local_sshd.config, port=1)
    assert issubclass(sshwrap.SSHConnectionError, sshwrap.SSHError)


def test_exports() -> None:
    assert sshwrap.connect is connect
    assert sshwrap.Connection is Connection


def test_no_fd_or_thread_leaks(conn: Connection) -> None:
    conn.run("true")
    before = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    for _ in range(500):
        conn.run("echo x", capture_output=True)
    for _ in range(100):
        with conn.Popen(
            "cat", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as p:
            p.communicate(b"y")
    wait_until(lambda: len(os.listdir("/proc/self/fd")) <= before, 5, "fds to be closed")
    assert threading.active_count() == threads


def test_more_concurrent_commands_than_server_max_sessions(
    local_sshd_factory: Callable[..., LocalSSHD],
) -> None:
    # sshd's MaxSessions (10 by default) caps the channels of one connection: sshwrap waits
    # for one of its channels to close and tries again instead of failing.
    sshd = local_sshd_factory(extra_sshd_config=["Match all", "MaxSessions 3"])
    with connect(sshd.host, config=sshd.config) as c:
        held = [c.Popen(["sleep", "1008"]) for _ in range(3)]
        with pytest.raises(TimeoutExpired):  # the limit is real: a 4th session must wait
            c.run("true", timeout=0.5)
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(c.check_output(["echo", "ok"])))
        t.start()
        held[0].kill()
        t.join(30)
        assert result == [b"ok\n"]
        for p in held[1:]:
            p.kill()
        for p in held:
            assert p.wait(10) == -9
        outs: list[bytes] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            out = c.check_output(["sh", "-c", "sleep 0.2; echo $0", str(i)])
            with lock:
                outs.append(out)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert sorted(outs) == sorted(f"{i}\n".encode() for i in range(12))


def test_master_stopped_when_program_exits_without_close(
    local_sshd: LocalSSHD, tmp_path: object
) -> None:
    script = os.path.join(str(tmp_path), "leave.py")
    with open(script, "w") as f:
        f.write(
            "import sshwrap\n"
            f"c = sshwrap.connect({local_sshd.host!r}, config={local_sshd.config!r})\n"
            "print(c.master_pid, c.control_path, flush=True)\n"
        )
    out = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, timeout=60, check=True
    )
    pid_s, path = out.stdout.split()
    assert wait_exited([int(pid_s)], 5) == [], "the master to exit"
    assert not os.path.exists(os.path.dirname(path))


def test_master_stopped_when_connection_is_dropped(local_sshd: LocalSSHD) -> None:
    c = connect(local_sshd.host, config=local_sshd.config)
    c.run("true")
    pid, d = c.master_pid, os.path.dirname(c.control_path)
    del c
    gc.collect()
    assert wait_exited([pid], 5) == [], "the master to exit"
    assert not os.path.exists(d)


def test_helper_threads_leave_signals_to_the_callers_threads(conn: Connection) -> None:
    """Ctrl-C must reach the thread waiting in ``run``: the mux pump blocks async signals."""
    assert conn.run("true").returncode == 0
    pumps = [t for t in threading.enumerate() if t.name == "sshwrap-mux-pump"]
    assert pumps
    for t in pumps:
        assert t.native_id is not None
        blocked = blocked_signals(t.native_id)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
            assert sig in blocked, (t.name, sorted(blocked))
    assert signal.SIGINT not in blocked_signals(threading.get_native_id())


def test_keyboard_interrupt_in_run_stops_the_remote_command(
    local_sshd: LocalSSHD, tmp_path: object
) -> None:
    script = os.path.join(str(tmp_path), "interrupted.py")
    with open(script, "w") as f:
        f.write(
            "import sshwrap\n"
            f"with sshwrap.connect({local_sshd.host!r}, config={local_sshd.config!r}) as c:\n"
            "    try:\n"
            "        c.run(['sleep', '1009'])\n"
            "    except KeyboardInterrupt:\n"
            "        print('interrupted', flush=True)\n"
            "    import sys\n"
            "    sys.stdin.read()  # keep the connection up until the test has looked\n"
        )
    p = subprocess.Popen(
        [sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: bool(_remote(local_sshd, "sleep 1009")), 20, "the remote sleep")
        p.send_signal(signal.SIGINT)
        assert p.stdout is not None
        readable, _, _ = select.select([p.stdout], [], [], 20)
        assert readable, "no KeyboardInterrupt in the script within 20 s"
        assert p.stdout.readline() == "interrupted\n"
        # The connection is still up: only sshwrap's signal can have stopped the command.
        wait_until(lambda: not _remote(local_sshd, "sleep 1009"), 5, "the remote sleep to go")
        p.communicate("", timeout=20)
        assert p.returncode == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_connect_through_a_jump_host(local_sshd_factory: Callable[..., LocalSSHD]) -> None:
    sshd = local_sshd_factory(hosts=2)
    with connect(sshd.hosts[1], config=sshd.config, jump=sshd.hosts[0]) as c:
        r = c.run("set -- $SSH_CONNECTION; echo $3; kill -TERM $$", capture_output=True)
        assert r.stdout == b"127.0.0.2\n"  # the server address seen by the session
        assert r.returncode == -15  # exact through the jump too
        # The master reaches host2 through a ProxyJump helper (ssh -W ... host1).
        helpers = [
            p
            for p in _all_pids()
            if " -W " in _cmdline(p) and sshd.config in _cmdline(p) and sshd.hosts[0] in _cmdline(p)
        ]
        assert len(helpers) == 1, [_cmdline(p) for p in _all_pids() if " -W " in _cmdline(p)]


def test_tty_run_and_popen_over_the_channel(conn: Connection) -> None:
    r = conn.run("tty; echo out; echo err >&2", tty=True, capture_output=True)
    lines = r.stdout.split(b"\r\n")
    assert lines[0].startswith(b"/dev/pts/"), r.stdout  # the remote side has a terminal
    assert lines[1:3] == [b"out", b"err"]  # merged by it, CR LF line ends
    assert conn.run("kill -9 $$", tty=True).returncode == -9  # still exact with a tty
    r = conn.run("stty size", tty=True, size=(33, 111), capture_output=True)
    assert r.stdout == b"33 111\r\n"
    with conn.Popen(
        "stty -echo; echo ready; read x; stty size",
        tty=True,
        size=(20, 70),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as p:
        assert p.stdin is not None and p.stdout is not None
        assert p.stdout.readline() == b"ready\r\n"
        p.resize(40, 120)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"40 120\r\n"
    assert p.returncode == 0


def test_close_releases_every_fd_without_gc(local_sshd: LocalSSHD) -> None:
    fds = sorted(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    gc.disable()  # nothing may depend on the garbage collector
    try:
        with connect(local_sshd.host, config=local_sshd.config) as c:
            c.run("echo x", capture_output=True)
            with c.Popen("cat", stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
                p.communicate(b"y")
            c.forward_local(0, "127.0.0.1", 9).cancel()
        assert sorted(os.listdir("/proc/self/fd")) == fds
        assert threading.active_count() == threads
    finally:
        gc.enable()


# -- the procedures behind both faces (sshwrap.core.commands) over Connection.master ----------
def test_one_procedure_driven_by_both_drivers(conn: Connection) -> None:
    """``run_command`` over ``Connection.master``: the sync driver and the async one give the
    same result, on the same proxy socket (no restart, no other master)."""
    import asyncio

    from sshwrap.core.commands import run_command
    from sshwrap.core.waiting import run_async, run_sync
    from sshwrap.io.master import Master

    assert isinstance(conn.master, Master)
    core, pid = conn.master.ready(), conn.master_pid
    assert core is not None
    cmd = "echo out; echo err >&2; exit 3"
    sync = run_sync(run_command(conn.master, cmd, capture_output=True))
    aio = asyncio.run(run_async(run_command(conn.master, cmd, capture_output=True)))
    for r in (sync, aio):
        assert (r.returncode, r.stdout, r.stderr, r.host) == (3, b"out\n", b"err\n", conn.host)
        assert isinstance(r, sshwrap.CompletedProcess)
    assert conn.master.ready() is core and conn.master_pid == pid and conn.restarts == 0


def test_fallback_passes_tty_in_both_faces(local_sshd: LocalSSHD) -> None:
    """The ``ssh -S`` fallback gives the remote command a terminal of the size asked for,
    through ``Connection.run`` and ``AsyncConnection.run`` alike."""
    import asyncio

    from sshwrap.aio.connection import AsyncConnection

    with connect(local_sshd.host, config=local_sshd.config, proxy=False) as c:
        assert not c.uses_proxy
        cmd = "stty size; exit 4"
        sync = c.run(cmd, tty=True, size=(33, 101), capture_output=True, timeout=60)
        aio = asyncio.run(
            AsyncConnection(c).run(cmd, tty=True, size=(33, 101), capture_output=True, timeout=60)
        )
        for r in (sync, aio):
            assert r.returncode == 4
            assert r.stdout.startswith(b"33 101\r\n"), r.stdout


def test_popen_resize_reaches_the_remote_terminal(conn: Connection) -> None:
    """``ChannelPopen.resize`` sends window-change: the remote program gets SIGWINCH (its
    trap fires without a keypress) and sees the new size."""
    script = (
        "stty size; trap 'stty size; echo WINCHED' WINCH; echo TRAPPED; "
        "while :; do sleep 0.05; done"
    )
    with conn.Popen(script, tty=True, size=(20, 70), stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        assert p.stdout.readline() == b"20 70\r\n"
        assert p.stdout.readline() == b"TRAPPED\r\n"
        p.resize(40, 120)
        assert p.stdout.readline() == b"40 120\r\n"
        assert p.stdout.readline() == b"WINCHED\r\n"
        p.kill()
    assert p.returncode == -signal.SIGKILL


def test_tty_input_is_typed_and_ended_by_ctrl_d(conn: Connection) -> None:
    """With a remote terminal, ``input`` is typed and ended by ^D, as ``sshwrap.run`` types it:
    ``cat`` echoes it and ends (channel EOF would not end it: sshd only closes its side)."""
    r = conn.run("cat", tty=True, input=b"hello\n", capture_output=True, timeout=10)
    assert (r.returncode, r.stdout) == (0, b"hello\r\nhello\r\n")


def test_popen_repr_names_host_command_and_state(conn: Connection) -> None:
    """subprocess's repr, plus the host and the state (``ended``: over, not waited for)."""
    cmd = "echo ready; exec sleep 30"
    head = f"<ChannelPopen: returncode: None args: {cmd!r} host: {conn.host!r} state:"
    with conn.Popen(cmd, stdout=subprocess.PIPE) as p:
        assert repr(p) == f"{head} running>"
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        p.kill()
        wait_until(p.closed.is_set, 30, "the channel to end")
        assert repr(p) == f"{head} ended>"
    done = f"<ChannelPopen: returncode: -9 args: {cmd!r} host: {conn.host!r}"
    assert repr(p) == f"{done} state: killed by a signal>"
