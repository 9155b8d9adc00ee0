"""Shared pieces of the fan-out tests: a client config mixing good, refused, hanging and
wrong-key hosts, and a view of this process's ssh children."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from waiting import wait_until

from sshwrap.testing import LocalSSHD, comm, descendants
from sshwrap.testing import is_running as alive

# Shared helpers, re-exported for the tests.
__all__ = ["alive", "comm", "descendants", "wait_until"]

ALIAS_ENV = "LC_SSHWRAP_ALIAS"
"""Each alias sends its own name in this variable (``SetEnv``; sshd accepts ``LC_*``), so a
test can tell every host's output from the others' even when aliases share an address."""


@dataclass
class Hosts:
    """A client config with ``hosts`` aliases (and the special ones, if asked for)."""

    config: str
    hosts: list[str]
    sshd: LocalSSHD
    refused: str = "refused"
    hang: str = "hang"
    badkey: str = "badkey"


def write_config(
    sshd: LocalSSHD,
    n: int,
    tmp: Path,
    *,
    hang: LocalSSHD | None = None,
    refused_port: int | None = None,
    wrong_key: str | None = None,
) -> Hosts:
    """``n`` aliases ``h1``..``hN`` spread over ``sshd``'s addresses, plus ``refused`` (a
    port that refuses), ``hang`` (an sshd the caller suspends) and ``badkey`` (a key the
    server does not know) when given.  (One sshd listens on at most 16 addresses.)"""
    lines: list[str] = []
    aliases = [f"h{i + 1}" for i in range(n)]
    for i, alias in enumerate(aliases):
        addr = sshd.addresses[i % len(sshd.addresses)]
        lines += [
            f"Host {alias}",
            f"    HostName {addr}",
            f"    Port {sshd.port}",
            f"    SetEnv {ALIAS_ENV}={alias}",
        ]
    known = [sshd.known_hosts]
    if refused_port is not None:
        lines += ["Host refused", "    HostName 127.0.0.1", f"    Port {refused_port}"]
    if hang is not None:
        known.append(hang.known_hosts)
        lines += ["Host hang", f"    HostName {hang.addresses[0]}", f"    Port {hang.port}"]
    if wrong_key is not None:
        lines += [
            "Host badkey",
            f"    HostName {sshd.addresses[0]}",
            f"    Port {sshd.port}",
            f"    IdentityFile {wrong_key}",
        ]
    lines += [
        "Host * !badkey",
        f"    IdentityFile {sshd.identity}",
        "Host *",
        f"    User {sshd.user}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {' '.join(known)}",
        "    GlobalKnownHostsFile /dev/null",
        "    StrictHostKeyChecking yes",
        "    UpdateHostKeys no",
        "    PasswordAuthentication no",
        "    KbdInteractiveAuthentication no",
    ]
    cfg = tmp / f"ssh_config_{n}"
    cfg.write_text("\n".join(lines) + "\n")
    os.chmod(cfg, 0o600)
    return Hosts(str(cfg), aliases, sshd)


@contextmanager
def mixed_config(sshd: LocalSSHD, hang: LocalSSHD, n: int, tmp: Path) -> Iterator[Hosts]:
    """``n`` good aliases plus refused, hang and badkey; the refusing port is held bound
    (not listening) while the context lasts."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        wrong = tmp / "wrong_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)],
            check=True,
            capture_output=True,
        )
        yield write_config(
            sshd,
            n,
            tmp,
            hang=hang,
            refused_port=closed.getsockname()[1],
            wrong_key=str(wrong),
        )
