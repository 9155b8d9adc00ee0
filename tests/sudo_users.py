"""Throwaway users, a sudoers file and a sshd for the sudo tests (as root), and the scan that
looks for a secret in every process's argv and environment and in ssh's ``-E`` logs.

:func:`sudo_sshd` makes a login user ``LOGIN`` with a random password, two target users
(``TARGET``: sudo asks the password for it; ``NOPASS``: NOPASSWD) and a sudoers file with
``timestamp_timeout=0`` (sudo always asks), starts a :class:`~sshwrap.testing.LocalSSHD`
logging in as ``LOGIN``, and removes them all at the end.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from waiting import wait_until

from sshwrap.testing import LocalSSHD

LOGIN = "sshwrap-sudo"
TARGET = "sshwrap-sudo-to"  # sudo asks the password for it
NOPASS = "sshwrap-sudo-np"  # NOPASSWD: sudo never asks
SUDOERS = Path("/etc/sudoers.d/sshwrap-sudo-test")
FAST = 5.0  # a refused password must fail well within this (sudo's own delay is ~2 s)

needs_sudo = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("sudo") is None or shutil.which("visudo") is None,
    reason="needs root (throwaway users, a sudoers file) and sudo installed (make sshd)",
)


def make_user(name: str, password: str | None) -> None:
    """Create ``name`` (if missing) with a home and ``password`` (None: no password)."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--home-dir", f"/home/{name}", "--shell", "/bin/sh", name],
            check=True,
            capture_output=True,
        )
    entry = pwd.getpwnam(name)
    os.makedirs(entry.pw_dir, mode=0o755, exist_ok=True)
    os.chown(entry.pw_dir, entry.pw_uid, entry.pw_gid)
    pw_line = f"{name}:{password}\n" if password else None
    if pw_line:
        subprocess.run(["chpasswd"], input=pw_line.encode(), check=True, capture_output=True)
    else:
        subprocess.run(["usermod", "--password", "*", name], check=True, capture_output=True)


def remove_user(name: str) -> None:
    """Remove ``name`` and its home (nothing if there is no such user)."""
    try:
        home = pwd.getpwnam(name).pw_dir
    except KeyError:
        return
    subprocess.run(["userdel", name], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def sudo_sshd(hosts: int = 1) -> Iterator[tuple[LocalSSHD, str]]:
    """The users, the sudoers file and a sshd of ``hosts`` aliases: ``(sshd, password)``."""
    password = "sudo-" + secrets.token_urlsafe(12)
    try:
        make_user(LOGIN, password)
        make_user(TARGET, None)
        make_user(NOPASS, None)
        rules = (
            f"Defaults:{LOGIN} !lecture, timestamp_timeout=0\n"
            f"{LOGIN} ALL=(ALL) ALL\n"
            f"{LOGIN} ALL=({NOPASS}) NOPASSWD: ALL\n"
        )
        tmp = SUDOERS.with_name(SUDOERS.name + ".new")  # sudo skips names with a '.'
        tmp.write_text(rules)
        tmp.chmod(0o440)
        subprocess.run(["visudo", "-cqf", str(tmp)], check=True, capture_output=True)
        tmp.rename(SUDOERS)
        with LocalSSHD(hosts, user=LOGIN) as sshd:
            yield sshd, password
    finally:
        SUDOERS.unlink(missing_ok=True)
        SUDOERS.with_name(SUDOERS.name + ".new").unlink(missing_ok=True)
        for name in (LOGIN, TARGET, NOPASS):
            remove_user(name)


def secrets_seen(secret: bytes, logs: set[str] | None = None, mark: bytes = b"") -> list[str]:
    """Where ``secret`` shows: any process's argv or environment, or an ssh ``-E`` log (the
    logs read of processes with ``mark`` in their argv are added to ``logs``).  A log given
    as ``/proc/PID/fd/N`` is a pipe that its reader drains (a fan-out's: its text is each
    result's ``ssh_log``): not opened here, where a read would wait or take its bytes."""
    seen = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for part in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{part}").read_bytes()
            except OSError:
                continue
            if secret in data:
                seen.append(f"/proc/{pid}/{part}")
            if part == "cmdline" and b"\0-E\0" in data:
                args = data.split(b"\0")
                log = os.fsdecode(args[args.index(b"-E") + 1])
                if log.startswith("/proc/"):
                    continue
                try:
                    if secret in Path(log).read_bytes():
                        seen.append(log)
                except OSError:
                    continue
                if logs is not None and mark in data:
                    logs.add(log)
    return seen


def scans_while_running(
    call: Callable[[], object],
    started: Callable[[], bool],
    go: Path,
    secret: bytes,
    logs: set[str] | None = None,
    mark: bytes = b"",
) -> tuple[list[list[str]], object]:
    """Run ``call()`` in a thread; once ``started()`` holds (the remote command waits for
    ``go`` to exist), scan for ``secret`` three times (:func:`secrets_seen`), then create
    ``go`` and wait for the call: ``(the scans, what it returned or raised)``."""
    results: list[object] = []

    def run() -> None:
        try:
            results.append(call())
        except BaseException as e:  # the caller's assertions show it
            results.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        wait_until(lambda: started() or bool(results), 60, "the command to start")
        scans = [secrets_seen(secret, logs, mark) for _ in range(3)]
    finally:
        go.touch()
        worker.join(60)
    assert not worker.is_alive()
    (result,) = results
    return scans, result
