"""fsspec filesystems over ssh: sshwrap's ``SSHWrapFileSystem`` against fsspec's paramiko
``SFTPFileSystem`` and ``sshfs`` (asyncssh), on the same server.

Rows (issue 15): 100 MB ``cat_file``, ``get`` and ``put``; 1,000 small files ``put`` and
``get`` (a glob of one directory's files: the baselines' ``put_file``/``get_file`` take no
directory); 1,000 random 4 KiB reads from one open file (``block_size=4096``, so no
filesystem reads ahead more than the others).  Runs are interleaved (the order alternating)
and the median is reported; a baseline that is not installed is reported so.
Goal: fastest on every row, at least 1.5x ahead on the bulk rows.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from common import Row, fmt_s, median, timed

from sshwrap.filesystem import SSHWrapFileSystem
from sshwrap.testing import LocalSSHD

BULK_GOAL = 1 / 1.5


def _paramiko_fs(sshd: LocalSSHD) -> Any:
    try:
        from fsspec.implementations.sftp import SFTPFileSystem  # type: ignore[import-untyped]
    except ImportError:
        return None
    return SFTPFileSystem(
        sshd.addresses[0],
        port=sshd.port,
        username=sshd.user,
        key_filename=sshd.identity,
        look_for_keys=False,
        allow_agent=False,
        skip_instance_cache=True,
    )


def _sshfs_fs(sshd: LocalSSHD) -> Any:
    try:
        from sshfs import SSHFileSystem
    except ImportError:
        return None
    return SSHFileSystem(
        sshd.addresses[0],
        port=sshd.port,
        username=sshd.user,
        client_keys=[sshd.identity],
        known_hosts=sshd.known_hosts,
        agent_path=None,
        skip_instance_cache=True,
    )


def _random_reads(fs: Any, path: str, offsets: list[int]) -> None:
    with fs.open(path, "rb", block_size=4096) as f:
        for off in offsets:
            f.seek(off)
            if len(f.read(4096)) != 4096:
                raise RuntimeError("short read")


def _cases(
    fs: Any, tag: str, local: str, remote: str, offsets: list[int]
) -> dict[str, Callable[[], object]]:
    big, small = f"{local}/big.bin", f"{local}/small"
    rbig, rsmall = f"{remote}/big.bin", f"{remote}/small"
    out = f"{local}/out-{tag}"
    return {
        "cat_file": lambda: fs.cat_file(rbig),
        "get": lambda: fs.get_file(rbig, f"{out}.bin"),
        "put": lambda: fs.put_file(big, f"{remote}/put-{tag}.bin"),
        # (a glob into an existing directory: paramiko's put_file takes no directory)
        "put 1,000 files": lambda: fs.put(small + "/*", f"{remote}/tree-{tag}/"),
        "get 1,000 files": lambda: fs.get(rsmall + "/*", f"{out}-tree/"),
        "1,000 random 4 KiB reads": lambda: _random_reads(fs, rbig, offsets),
    }


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """Rows for every operation, sshwrap against each installed baseline."""
    mb = 16 if quick else 100
    files = 100 if quick else 1000
    reps = 2 if quick else 5
    ours = SSHWrapFileSystem(host=sshd.host, config=sshd.config, skip_instance_cache=True)
    local = tempfile.mkdtemp(prefix="sshwrap-bfs-")
    remote = ours.connection.check_output("mktemp -d /tmp/sshwrap-bfs.XXXXXX", text=True).strip()
    others = {"paramiko": _paramiko_fs(sshd), "sshfs": _sshfs_fs(sshd)}
    try:
        with open(f"{local}/big.bin", "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
        os.mkdir(f"{local}/small")
        for i in range(files):
            with open(f"{local}/small/f{i:04d}", "wb") as f:
                f.write(os.urandom(1024))
        ours.put(f"{local}/big.bin", f"{remote}/big.bin")
        ours.put(f"{local}/small", f"{remote}/small", recursive=True)
        rng = random.Random(15)
        offsets = [rng.randrange(0, (mb << 20) - 4096) for _ in range(1000)]
        fss = {"sshwrap": ours, **{k: v for k, v in others.items() if v is not None}}
        cases = {
            (op, name): fn
            for name, fs in fss.items()
            for op, fn in _cases(fs, name, local, remote, offsets).items()
        }
        times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
        order = list(cases)
        for _ in range(reps):
            for key in order:
                op, name = key
                if op.startswith("put 1,000"):
                    ours.connection.check_call(["rm", "-rf", "--", f"{remote}/tree-{name}"])
                    ours.mkdir(f"{remote}/tree-{name}")
                if op.startswith("get 1,000"):
                    shutil.rmtree(f"{local}/out-{name}-tree", ignore_errors=True)
                    os.mkdir(f"{local}/out-{name}-tree")
                times[key].append(timed(cases[key]))
            order.reverse()
        med = {k: median(v) for k, v in times.items()}
        rows = []
        for op in _cases(ours, "x", local, remote, offsets):
            mine = med[(op, "sshwrap")]
            bulk = op in ("cat_file", "get", "put")
            label = f"{op} {mb} MB" if bulk else op
            if op.endswith("files"):
                label = op.replace("1,000", f"{files:,}")
            for name, fs in others.items():
                if fs is None:
                    rows.append(Row(f"fsspec {label} vs {name}", fmt_s(mine), "not installed"))
                    continue
                base = med[(op, name)]
                ratio = mine / base
                goal = BULK_GOAL if bulk else 1.0
                rows.append(
                    Row(
                        f"fsspec {label} vs {name}",
                        fmt_s(mine) + (f" ({mb / mine:.0f} MB/s)" if bulk else ""),
                        fmt_s(base) + (f" ({mb / base:.0f} MB/s)" if bulk else ""),
                        ratio,
                        "time <= 0.67x" if bulk else "time < 1x",
                        ratio <= goal,
                        f"median of {reps}, interleaved" if op == "cat_file" else "",
                    )
                )
        return rows
    finally:
        ours.connection.run(["rm", "-rf", "--", remote])
        shutil.rmtree(local, ignore_errors=True)
