"""LocalSSHD: a real sshd that starts, serves several aliases and leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from sshwrap.testing import LocalSSHD


def test_hosts_on_distinct_addresses_and_cleanup() -> None:
    with LocalSSHD(hosts=3) as sshd:
        assert sshd.hosts == ["host1", "host2", "host3"]
        seen = set()
        for alias in sshd.hosts:
            out = subprocess.run(
                sshd.ssh(alias, "echo $SSH_CONNECTION; id -un"),
                capture_output=True,
                check=True,
                timeout=30,
            )
            conn, user = out.stdout.decode().splitlines()
            seen.add(conn.split()[2])
            assert user == sshd.user
            assert out.stderr == b""  # quiet remote side: no banner, no motd, no rc noise
        assert seen == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}
        # A session that is still running when we stop must not survive.
        p = subprocess.Popen(
            sshd.ssh(sshd.host, "echo started; exec sleep 300"),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert p.stdout is not None
        assert p.stdout.readline() == b"started\n"
        sessions = sshd.session_pids()
        assert sessions
        directory, pid = sshd.dir, sshd.pid
    p.wait(timeout=30)
    p.stdout.close()
    assert not directory.exists()
    for gone in [pid, *sessions]:
        assert (
            not Path(f"/proc/{gone}").exists()
            or Path(f"/proc/{gone}/stat").read_text().split(")")[1].split()[0] == "Z"
        )


def test_strict_host_key_checking_stays_on(local_sshd: LocalSSHD) -> None:
    text = Path(local_sshd.config).read_text()
    assert "StrictHostKeyChecking yes" in text
    # With another key in known_hosts, ssh refuses: checking is real.
    other = Path(local_sshd.known_hosts).read_text()
    try:
        Path(local_sshd.known_hosts).write_text(
            other.replace(
                other.split()[2],
                "AAAAC3NzaC1lZDI1NTE5AAAAIBn5yM0mqWN6a2Z9bXq1F0Q4d8e7Y9s9u0v1w2x3y4z5",
            )
        )
        out = subprocess.run(
            local_sshd.ssh(local_sshd.host, "true"),
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 255
        assert b"HOST IDENTIFICATION HAS CHANGED" in out.stderr
    finally:
        Path(local_sshd.known_hosts).write_text(other)


def test_more_hosts_than_one_sshd_can_listen_for() -> None:
    with LocalSSHD(hosts=20) as sshd:
        assert len(sshd.pids) == 2
        last = subprocess.run(
            sshd.ssh(sshd.hosts[-1], "echo $SSH_CONNECTION"),
            capture_output=True,
            check=True,
            timeout=30,
        )
        assert last.stdout.split()[2] == b"127.0.0.20"


def test_fixture_is_the_plugin(local_sshd: LocalSSHD) -> None:
    assert isinstance(local_sshd, LocalSSHD)
    assert os.path.exists(local_sshd.config)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to become an ordinary user"
)
def test_works_as_an_ordinary_user() -> None:
    """An unprivileged sshd logs in as the user that started it."""
    from sshwrap.testing import ensure_test_user

    user = ensure_test_user()
    probe = textwrap.dedent(
        """
        import subprocess
        from sshwrap.testing import LocalSSHD
        with LocalSSHD() as s:
            out = subprocess.run(s.ssh(s.host, "id -un"), capture_output=True, timeout=60)
            print(s.user, out.returncode, out.stdout.decode().strip(), s.dir)
        """
    )
    # The checkout may sit in a directory only root can enter (a home directory, any
    # `mktemp -d`): give the user a readable copy of the package and the base interpreter.
    import sshwrap

    readable = Path(tempfile.mkdtemp(prefix="sshwrap-ordinary-"))
    try:
        os.chmod(readable, 0o755)
        shutil.copytree(
            Path(sshwrap.__file__).parent,
            readable / "sshwrap",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for d, _, files in os.walk(readable):
            os.chmod(d, 0o755)
            for name in files:
                os.chmod(os.path.join(d, name), 0o644)
        python = os.path.realpath(sys.executable)
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(readable)}
        env["HOME"] = user.pw_dir
        out = subprocess.run(
            [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
                python,
                "-c",
                probe,
            ],
            capture_output=True,
            timeout=120,
            env=env,
            cwd="/",
        )
    finally:
        shutil.rmtree(readable, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    name, rc, who, directory = out.stdout.decode().split()
    assert (name, rc, who) == (user.pw_name, "0", user.pw_name)
    assert not os.path.exists(directory)


def test_stray_session_processes_are_stopped_too() -> None:
    with LocalSSHD() as sshd:
        # A process that outlives its connection leaves sshd's tree (reparented to init).
        subprocess.run(
            sshd.ssh(sshd.host, "sleep 311 </dev/null >/dev/null 2>&1 & echo $!"),
            capture_output=True,
            check=True,
            timeout=30,
        )
        strays = sshd.stray_pids()
        assert strays
        assert not set(strays) & set(sshd.session_pids())
    for pid in strays:
        assert (
            not Path(f"/proc/{pid}").exists()
            or Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
        )


def _effective(argv: list[str]) -> dict[str, str]:
    """``sshd -T`` / ``ssh -G`` output as {lowercase key: value} (the first value of each)."""
    out = subprocess.run(argv, capture_output=True, check=True, timeout=30, text=True)
    settings: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key, value)
    return settings


def test_extra_config_as_a_str_is_lines_not_characters(
    local_sshd_factory: Callable[..., LocalSSHD],
) -> None:
    sshd = local_sshd_factory(
        extra_sshd_config="MaxSessions 2\nClientAliveInterval 17\n",
        extra_client_config="ServerAliveInterval 23",
    )
    assert sshd.extra_sshd_config == ["MaxSessions 2", "ClientAliveInterval 17"]
    server = _effective(["/usr/sbin/sshd", "-T", "-f", sshd.sshd_config])
    assert server["maxsessions"] == "2"  # ahead of LocalSSHD's own MaxSessions 256
    assert server["clientaliveinterval"] == "17"
    client = _effective(["ssh", "-G", *sshd.ssh_args, sshd.host])
    assert client["serveraliveinterval"] == "23"
    out = subprocess.run(sshd.ssh(sshd.host, "echo up"), capture_output=True, timeout=30)
    assert out.stdout == b"up\n"


def test_extra_config_as_a_list_of_lines_still_works() -> None:
    with LocalSSHD(extra_sshd_config=["MaxSessions 3", "ClientAliveInterval 19"]) as sshd:
        server = _effective(["/usr/sbin/sshd", "-T", "-f", sshd.sshd_config])
        assert (server["maxsessions"], server["clientaliveinterval"]) == ("3", "19")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (5, r"extra_sshd_config must be a str or a list of str, not int"),
        (b"MaxSessions 2", r"extra_sshd_config must be a str or a list of str, not bytes"),
        (["MaxSessions 2", 7], r"extra_sshd_config\[1\] must be a str .*not int 7"),
    ],
)
def test_extra_config_of_another_type_is_refused(value: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        LocalSSHD(extra_sshd_config=value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=message.replace("sshd", "client")):
        LocalSSHD(extra_client_config=value)  # type: ignore[arg-type]
