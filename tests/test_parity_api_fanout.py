"""Parity (issue 11): the fan-out's ``hosts`` argument, refused or taken the same way by
``sshwrap.run_many`` and ``sshwrap.aio.run_many``, with one test body for both faces.

A ``str`` is one host pattern (a plain name is one host), never a list of its characters; an
argument that is not an iterable of host names and connections, or an item that is neither,
is a ``TypeError`` naming it, raised before any ssh starts.  Real sshd, real ssh.  Patterns,
groups and the refused pattern-like list items: ``tests/test_fanout_hosts.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import sshwrap
import sshwrap.aio
from sshwrap.fanout import HostResult
from sshwrap.testing import LocalSSHD

FACES = ("sync", "async")
CONNECT = 10.0  # bounds a wrong host on code that still splits a str (the default is 30 s)


def run_many(face: str, hosts: Any, command: str, **kwargs: Any) -> list[HostResult]:
    """``sshwrap.run_many`` (``sync``) or ``sshwrap.aio.run_many`` collected in input order
    (``async``)."""
    if face == "sync":
        return sshwrap.run_many(hosts, command, **kwargs)

    async def collect() -> list[HostResult]:
        return [r async for r in sshwrap.aio.run_many(hosts, command, **kwargs)]

    return sorted(asyncio.run(collect()), key=lambda r: r.index)


@dataclass(frozen=True)
class Through:
    """A host reached through a ControlMaster (a ``ControlPathHost``)."""

    destination: str
    control_path: str


@pytest.mark.parametrize("face", FACES)
def test_a_str_is_one_host(face: str, local_sshd: LocalSSHD) -> None:
    host = local_sshd.host
    results = run_many(face, host, "echo hi", config=local_sshd.config, connect_timeout=CONNECT)
    assert [(r.host, r.status, r.stdout) for r in results] == [(host, "ok", b"hi\n")]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda h: [h, h], id="list"),
        pytest.param(lambda h: (h,), id="tuple"),
        pytest.param(lambda h: (x for x in [h]), id="generator"),
        pytest.param(lambda h: {h: 1}, id="dict-keys"),
    ],
)
def test_iterables_of_host_names_are_taken_as_they_are(
    face: str, make: Callable[[str], Any], local_sshd: LocalSSHD
) -> None:
    host = local_sshd.host
    hosts = make(host)
    want = len(hosts) if isinstance(hosts, list | tuple | dict) else 1
    results = run_many(face, hosts, "echo hi", config=local_sshd.config)
    assert [(r.host, r.status, r.stdout) for r in results] == [(host, "ok", b"hi\n")] * want


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        pytest.param(
            5, r"^hosts must be a host pattern \(str\) or an iterable .*, not int$", id="int"
        ),
        pytest.param(None, r"^hosts must be .*, not NoneType$", id="None"),
        pytest.param(b"host1", r"^hosts must be .*, not bytes \(decode it", id="bytes"),
        pytest.param(
            Through("host1", "/nonexistent/ctl"),
            r"^hosts must be .*, not Through \(put a single connection in a list",
            id="one-connection",
        ),
        pytest.param(
            ["host1", 5],
            r"^hosts\[1\] must be a host name \(str\) or a Connection, not int 5$",
            id="int-item",
        ),
        pytest.param(["host1", None], r"^hosts\[1\] .*, not NoneType None$", id="None-item"),
        pytest.param([b"host1"], r"^hosts\[0\] .*, not bytes b'host1'$", id="bytes-item"),
        pytest.param([["host1"]], r"^hosts\[0\] .*, not list \['host1'\]$", id="nested-list"),
    ],
)
def test_other_hosts_are_refused_naming_the_item(
    face: str, hosts: Any, message: str, local_sshd: LocalSSHD
) -> None:
    started: list[str] = []
    with pytest.raises(TypeError, match=message):
        run_many(face, hosts, "true", config=local_sshd.config, on_start=started.append)
    assert started == []  # refused before any ssh ran
