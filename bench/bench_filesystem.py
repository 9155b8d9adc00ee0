"""fsspec filesystems over ssh: sshwrap's ``SSHWrapFileSystem`` against fsspec's paramiko
``SFTPFileSystem`` and ``sshfs`` (asyncssh), on the same server.

Rows (issue 15): 100 MB ``cat_file``, ``get`` and ``put``; 1,000 small files ``put`` and
``get`` (a glob of one directory's files: the baselines' ``put_file``/``get_file`` take no
directory); 1,000 random 4 KiB reads from one open file (``block_size=4096``, so no
filesystem reads ahead more than the others).  Runs are interleaved (the order alternating)
and the median is reported; a baseline that is not installed is reported so.
Goal: fastest on every row, at least 1.5x ahead on the bulk rows.

CPU (the wall is noisy on a loaded machine): each row's note gives the median CPU seconds of
the client (this process, its reaped children and sshwrap's master: the baselines decrypt in
this process, sshwrap in its master) and of the server (sshd's whole process tree).
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from common import Row, fmt_s, median, timed

from sshwrap.filesystem import SSHWrapFileSystem
from sshwrap.testing import LocalSSHD, descendants

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


def _proc_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its reaped children (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _cpu(sshd: LocalSSHD, master: int) -> tuple[float, float]:
    """(client, server) CPU seconds so far (see the module docstring)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + _proc_cpu(master)
    server = sum(_proc_cpu(p) for top in sshd.pids for p in (top, *descendants(top)))
    return client, server


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
        cpus: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in cases}
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
                c0, s0 = _cpu(sshd, ours.connection.master_pid)
                times[key].append(timed(cases[key]))
                c1, s1 = _cpu(sshd, ours.connection.master_pid)
                cpus[key].append((c1 - c0, s1 - s0))
            order.reverse()
        med = {k: median(v) for k, v in times.items()}

        def cpu(key: tuple[str, str]) -> str:
            return "/".join(f"{median([c[i] for c in cpus[key]]):.2f}" for i in (0, 1))

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
                        (f"median of {reps}, interleaved; " if op == "cat_file" else "")
                        + f"CPU s client/server {cpu((op, 'sshwrap'))} vs {cpu((op, name))}",
                    )
                )
        return rows
    finally:
        ours.connection.run(["rm", "-rf", "--", remote])
        shutil.rmtree(local, ignore_errors=True)
