"""put/get over a ControlMaster against the real sshd: content, modes, recursion, errors."""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sshwrap.errors import SSHConnectionError, SSHWrapError
from sshwrap.testing import LocalSSHD
from sshwrap.transfer import (
    RemoteFileNotFoundError,
    RemotePermissionError,
    TransferError,
    get,
    put,
)


@dataclass
class Master:
    host: str
    args: list[str]  # ssh options that go over the master

    def ssh(self, command: str) -> str:
        out = subprocess.run(
            ["ssh", *self.args, self.host, command],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        return out.stdout.decode()


@pytest.fixture(scope="module")
def master(local_sshd: LocalSSHD, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Master]:
    """A plain-ssh ControlMaster on a socket in a 0700 directory."""
    d = tmp_path_factory.mktemp("cm")
    os.chmod(d, 0o700)
    args = [*local_sshd.ssh_args, "-o", f"ControlPath={d / 's'}"]
    subprocess.run(
        ["ssh", *args, "-M", "-N", "-f", "-o", "ControlPersist=yes", local_sshd.host],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    yield Master(local_sshd.host, args)
    subprocess.run(["ssh", *args, "-O", "exit", local_sshd.host], capture_output=True, timeout=30)


@pytest.fixture
def remote_dir(master: Master) -> Iterator[str]:
    """A fresh remote directory, removed afterwards."""
    path = master.ssh("mktemp -d /tmp/sshwrap-xfer.XXXXXX").strip()
    yield path
    master.ssh(f"chmod -R u+rwx {path}; rm -rf {path}")


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_100mb_round_trip_same_sha256(master: Master, remote_dir: str, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    os.chmod(src, 0o640)
    ups: list[tuple[int, int]] = []
    put(
        src,
        f"{remote_dir}/big.bin",
        destination=master.host,
        ssh_args=master.args,
        progress=lambda done, total: ups.append((done, total)),
    )
    size = 100 << 20
    assert ups[0] == (0, size) and ups[-1] == (size, size)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(ups))
    assert len(ups) > 10  # progress is reported as data goes, not only at the end
    remote_sum = master.ssh(f"sha256sum {remote_dir}/big.bin").split()[0]
    assert remote_sum == _sha(src)
    assert master.ssh(f"stat -c %a {remote_dir}/big.bin").strip() == "640"
    downs: list[tuple[int, int]] = []
    back = tmp_path / "back.bin"
    get(
        f"{remote_dir}/big.bin",
        back,
        destination=master.host,
        ssh_args=master.args,
        progress=lambda done, total: downs.append((done, total)),
    )
    assert downs[-1] == (size, size)
    assert _sha(back) == _sha(src)
    assert stat.S_IMODE(os.stat(back).st_mode) == 0o640


def _make_tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """A small tree with varied modes; returns relative path -> (mode, content or None)."""
    spec: dict[str, tuple[int, bytes | None]] = {
        "a.txt": (0o644, b"alpha\n"),
        "run.sh": (0o755, b"#!/bin/sh\necho hi\n"),
        "secret": (0o600, b"\x00\x01binary\xff" * 1000),
        "empty": (0o640, b""),
        "sub": (0o750, None),
        "sub/deep": (0o700, None),
        "sub/deep/x.bin": (0o604, os.urandom(300_000)),
        "ro": (0o555, None),
        "ro/inside.txt": (0o444, b"read only\n"),
    }
    root.mkdir()
    for rel, (_mode, content) in spec.items():
        p = root / rel
        if content is None:
            p.mkdir()
        else:
            p.write_bytes(content)
    for rel, (mode, _) in sorted(spec.items(), key=lambda kv: -kv[0].count("/")):
        os.chmod(root / rel, mode)
    os.utime(root / "a.txt", (1_600_000_000, 1_600_000_000))
    return spec


def test_recursive_put_get_keeps_modes(master: Master, remote_dir: str, tmp_path: Path) -> None:
    spec = _make_tree(tmp_path / "tree")
    total = sum(len(c) for _, c in spec.values() if c is not None)
    seen: list[tuple[int, int]] = []
    # remote_dir exists: the tree goes inside it under its own name (like scp -r)
    put(
        tmp_path / "tree",
        remote_dir,
        destination=master.host,
        ssh_args=master.args,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen[-1] == (total, total)
    listing = master.ssh(f"cd {remote_dir}/tree && find . -mindepth 1 -exec stat -c '%a %n' {{}} +")
    remote_modes = {
        line.split(" ", 1)[1][2:]: int(line.split()[0], 8) for line in listing.splitlines()
    }
    assert remote_modes == {rel: mode for rel, (mode, _) in spec.items()}
    assert master.ssh(f"stat -c %Y {remote_dir}/tree/a.txt").strip() == "1600000000"
    assert master.ssh(f"cat {remote_dir}/tree/a.txt") == "alpha\n"

    out = tmp_path / "out"
    out.mkdir()
    get(f"{remote_dir}/tree", out, destination=master.host, ssh_args=master.args)
    for rel, (mode, content) in spec.items():
        p = out / "tree" / rel
        assert stat.S_IMODE(os.lstat(p).st_mode) == mode, rel
        if content is not None:
            assert p.read_bytes() == content, rel
    assert os.stat(out / "tree" / "a.txt").st_mtime == 1_600_000_000
    # into a path that does not exist yet: it becomes the copy
    get(
        f"{remote_dir}/tree/sub",
        tmp_path / "subcopy",
        destination=master.host,
        ssh_args=master.args,
    )
    assert (tmp_path / "subcopy" / "deep" / "x.bin").read_bytes() == spec["sub/deep/x.bin"][1]
    for p in (out, tmp_path / "tree"):
        for dirpath, _dirs, _files in os.walk(p):
            os.chmod(dirpath, 0o755)


def test_put_file_into_existing_dir_and_overwrite(
    master: Master, remote_dir: str, tmp_path: Path
) -> None:
    src = tmp_path / "f.txt"
    src.write_bytes(b"first version, longer\n")
    put(src, remote_dir, destination=master.host, ssh_args=master.args)
    src.write_bytes(b"second\n")
    put(src, f"{remote_dir}/f.txt", destination=master.host, ssh_args=master.args)
    assert master.ssh(f"cat {remote_dir}/f.txt") == "second\n"  # truncated, not patched


def test_home_relative_paths(master: Master, tmp_path: Path) -> None:
    name = f"sshwrap-home-{os.getpid()}.txt"
    src = tmp_path / name
    src.write_text("home\n")
    try:
        put(src, "~/", destination=master.host, ssh_args=master.args)
        assert master.ssh(f"cat ~/{name}") == "home\n"
        get(f"~/{name}", tmp_path / "a", destination=master.host, ssh_args=master.args)
        get(name, tmp_path / "b", destination=master.host, ssh_args=master.args)
        assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text() == "home\n"
    finally:
        master.ssh(f"rm -f ~/{name}")


def test_missing_local_file(master: Master, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        put(tmp_path / "nope", "/tmp/x", destination=master.host, ssh_args=master.args)
    assert "nope" in str(info.value)


def test_missing_remote_file(master: Master, remote_dir: str, tmp_path: Path) -> None:
    with pytest.raises(RemoteFileNotFoundError) as info:
        get(
            f"{remote_dir}/missing.txt",
            tmp_path / "x",
            destination=master.host,
            ssh_args=master.args,
        )
    err = info.value
    assert isinstance(err, FileNotFoundError) and isinstance(err, TransferError)
    assert isinstance(err, SSHWrapError)
    assert f"{remote_dir}/missing.txt" in str(err)
    assert not (tmp_path / "x").exists()
    # a missing remote parent directory on put
    src = tmp_path / "f"
    src.write_text("x")
    with pytest.raises(RemoteFileNotFoundError):
        put(src, f"{remote_dir}/no/such/dir/f", destination=master.host, ssh_args=master.args)


def test_remote_permission_denied(master: Master, local_sshd: LocalSSHD, tmp_path: Path) -> None:
    if local_sshd.user == "root":
        pytest.skip("the remote user is root: nothing is denied")
    src = tmp_path / "f"
    src.write_text("x")
    with pytest.raises(RemotePermissionError) as info:
        put(src, "/etc/sshwrap-denied", destination=master.host, ssh_args=master.args)
    assert isinstance(info.value, PermissionError)
    assert "/etc/sshwrap-denied" in str(info.value)
    with pytest.raises(RemotePermissionError):
        get("/etc/shadow", tmp_path / "shadow", destination=master.host, ssh_args=master.args)


def test_connection_failure_is_typed(local_sshd: LocalSSHD, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("x")
    args = [
        *local_sshd.ssh_args,
        "-o",
        "ControlPath=none",
        "-o",
        "Port=1",
        "-o",
        "ConnectTimeout=5",
    ]
    with pytest.raises(SSHConnectionError) as info:
        put(src, "/tmp/x", destination=local_sshd.host, ssh_args=args)
    assert "Connection refused" in str(info.value)
    assert info.value.host == local_sshd.host
