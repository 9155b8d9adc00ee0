"""connect() answers ssh's prompts from Python (password, passphrase, host key) via askpass."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from waiting import blocked_signals

from sshwrap.connection import connect
from sshwrap.errors import AuthenticationError, HostKeyError
from sshwrap.testing import LocalSSHD

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="password logins need root to set the test user's password"
)


def _readable(pid: str, what: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{what}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _processes_showing(secret: str) -> list[str]:
    needle = secret.encode()
    hits = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for what in ("cmdline", "environ"):
                if needle in _readable(pid, what):
                    hits.append(f"{pid}/{what}")
    return hits


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    """A local user created for this test only (so parallel test runs never share a
    password), removed afterwards."""
    name = "swpw" + secrets.token_hex(4)
    subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/sh", name], check=True, capture_output=True
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", "--remove", "--force", name], capture_output=True)


@needs_root
def test_password_login_and_secret_never_exposed(
    local_sshd_factory: Callable[..., LocalSSHD], throwaway_user: str
) -> None:
    pw = "pw-" + secrets.token_hex(12)
    sshd = local_sshd_factory(password=pw, user=throwaway_user)
    opts = {"PubkeyAuthentication": "no", "PreferredAuthentications": "password"}
    with connect(sshd.host, config=sshd.config, options=opts, password=pw) as c:
        assert c.run("echo in", capture_output=True).stdout == b"in\n"
        # While connected: no process (ours or any other) shows the password.
        assert c.master_pid
        assert _processes_showing(pw) == []
        assert pw not in Path(c.log_path).read_text(errors="replace")


@needs_root
def test_wrong_password_is_authentication_error_quickly(
    local_sshd_factory: Callable[..., LocalSSHD], throwaway_user: str
) -> None:
    sshd = local_sshd_factory(password="right-" + secrets.token_hex(8), user=throwaway_user)
    wrong = "wrong-" + secrets.token_hex(8)
    opts = {"PubkeyAuthentication": "no", "PreferredAuthentications": "password"}
    t = time.monotonic()
    with pytest.raises(AuthenticationError) as info:
        connect(sshd.host, config=sshd.config, options=opts, password=wrong)
    assert time.monotonic() - t < 5
    assert wrong not in str(info.value) and wrong not in info.value.stderr


def test_passphrase_protected_key(
    local_sshd_factory: Callable[..., LocalSSHD], tmp_path: Path
) -> None:
    sshd = local_sshd_factory()
    phrase = "phrase-" + secrets.token_hex(8)
    key = tmp_path / "id_locked"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", phrase, "-f", str(key)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    # Only the locked key may log in now.
    (sshd.dir / "authorized_keys").write_text((tmp_path / "id_locked.pub").read_text())
    opts = {"IdentityFile": str(key), "IdentitiesOnly": "yes"}
    with connect(sshd.host, config=sshd.config, options=opts, passphrase=phrase) as c:
        assert c.run("echo unlocked", capture_output=True).stdout == b"unlocked\n"
        assert _processes_showing(phrase) == []
    with pytest.raises(AuthenticationError):
        connect(sshd.host, config=sshd.config, options=opts, passphrase="not-" + phrase)


def test_unknown_host_key_needs_on_prompt_yes(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    opts = {"UserKnownHostsFile": str(empty), "StrictHostKeyChecking": "ask"}
    with pytest.raises(HostKeyError):
        connect(
            local_sshd.host,
            config=local_sshd.config,
            options=opts,
            on_prompt=lambda text, kind: False,
        )
    seen: list[str] = []
    masks: list[set[int]] = []

    def yes(text: str, kind: str) -> bool | None:
        seen.append(kind)
        masks.append(blocked_signals(threading.get_native_id()))
        return kind == "hostkey"

    with connect(local_sshd.host, config=local_sshd.config, options=opts, on_prompt=yes) as c:
        assert c.run("true").returncode == 0
    assert "hostkey" in seen
    # The callback runs in sshwrap's askpass thread, but with the usual signal mask (what it
    # starts must not inherit blocked signals).
    assert all(signal.SIGINT not in m and signal.SIGTERM not in m for m in masks), masks


def test_host_key_rejected_by_config_stays_rejected(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    opts = {"UserKnownHostsFile": str(empty), "StrictHostKeyChecking": "yes"}
    with pytest.raises(HostKeyError):
        connect(
            local_sshd.host,
            config=local_sshd.config,
            options=opts,
            on_prompt=lambda text, kind: True,
        )
