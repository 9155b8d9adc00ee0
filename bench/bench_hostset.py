"""Issue 12: the host-range parser (``sshwrap.core.hostset``) against ClusterShell's NodeSet.

- expanding ``node[000001-100000]`` and folding its 100,000 names back;
- the same for a product, ``rack[1-100]-node[0001-1000]`` (two numbers a name);
- the import a command pays for the parser, on top of ``sshwrap.many_cli`` (the fleet
  command's own imports), each measured in a fresh interpreter.

Each timing is the best of several rounds (other work on a shared machine only ever adds
time).  ClusterShell is the baseline when installed (``pip install clustershell``); without
it the rows show sshwrap's numbers alone.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import Row, fmt_s, median  # noqa: E402

from sshwrap.core.hostset import expand, fold  # noqa: E402
from sshwrap.testing import LocalSSHD  # noqa: E402

GOAL_S = 0.25  # each of expand and fold for 100,000 names: together well under 0.5 s


def _best(fn: Callable[[], object], rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def _nodeset() -> Any:
    try:  # by name: mypy has no stubs for it (pyproject's overrides do not list it)
        return importlib.import_module("ClusterShell.NodeSet").NodeSet
    except ImportError:
        return None


def _rows_for(pattern: str, rounds: int) -> list[Row]:
    names = expand(pattern)
    assert fold(names) == pattern, fold(names)
    ours_expand = _best(lambda: expand(pattern), rounds)
    ours_fold = _best(lambda: fold(names), rounds)
    nodeset = _nodeset()
    theirs_expand = theirs_fold = None
    if nodeset is not None:
        assert list(nodeset(pattern)) == names
        assert str(nodeset.fromlist(names)) == pattern
        theirs_expand = _best(lambda: list(nodeset(pattern)), rounds)
        # ClusterShell folds a product of 100,000 names in ~20 s: one round is enough.
        theirs_fold = _best(lambda: str(nodeset.fromlist(names)), 1)
    rows = []
    for what, ours, theirs, call in (
        ("expand", ours_expand, theirs_expand, "list(NodeSet(p))"),
        ("fold", ours_fold, theirs_fold, "NodeSet.fromlist"),
    ):
        rows.append(
            Row(
                f"hostset: {what} {len(names):,} names {pattern}",
                fmt_s(ours),
                "ClusterShell not installed" if theirs is None else f"{call} {fmt_s(theirs)}",
                None if theirs is None else ours / theirs,
                f"<= {fmt_s(GOAL_S)}",
                ours <= GOAL_S,
            )
        )
    return rows


def _import_cost(module: str, samples: int, cache: str) -> float:
    """Median seconds of ``import module`` in a fresh interpreter after sshwrap.many_cli.

    Byte code is cached (in ``cache``, outside the tree) as an installed package has it:
    the first run compiles, the samples after it are timed.
    """
    code = (
        "import time, sshwrap.many_cli\n"
        "t = time.perf_counter()\n"
        f"import {module}\n"
        "print(time.perf_counter() - t)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    argv = [sys.executable, "-X", f"pycache_prefix={cache}", "-c", code]
    out = []
    for _ in range(samples + 1):
        done = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
        out.append(float(done.stdout))
    return median(out[1:])


def _import_row(samples: int) -> Row:
    with tempfile.TemporaryDirectory(prefix="sshwrap-bench-pyc-") as cache:
        ours = _import_cost("sshwrap.core.hostset", samples, cache)
        theirs = None
        if _nodeset() is not None:
            theirs = _import_cost("ClusterShell.NodeSet", samples, cache)
    return Row(
        "hostset: import on top of sshwrap.many_cli",
        fmt_s(ours),
        "ClusterShell not installed" if theirs is None else f"ClusterShell.NodeSet {fmt_s(theirs)}",
        None if theirs is None else ours / theirs,
        "<= 5 ms",
        ours <= 0.005,
        note="median of fresh interpreters, byte code cached: the CLI's start-up grows by this",
    )


def run(sshd: LocalSSHD, quick: bool) -> list[Row]:
    """The issue 12 range-parser rows of the benchmark table (no sshd needed)."""
    del sshd
    rounds = 2 if quick else 5
    return [
        *_rows_for("node[000001-100000]", rounds),
        *_rows_for("rack[1-100]-node[0001-1000]", rounds),
        _import_row(5 if quick else 15),
    ]


if __name__ == "__main__":
    for row in run(None, "--quick" in sys.argv):  # type: ignore[arg-type]
        print(row)
