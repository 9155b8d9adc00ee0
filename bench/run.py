"""Run every ``bench/bench_*.py`` and print one comparison table.

Each module defines ``run(sshd: LocalSSHD, quick: bool) -> list[Row]``.  ``--quick`` makes
every benchmark smaller (for a smoke run); ``-k NAME`` runs only modules whose name contains NAME.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row

from sshwrap.testing import LocalSSHD


def _table(rows: list[Row]) -> str:
    head = ("benchmark", "sshwrap", "baseline", "ratio", "goal", "met")
    body = [
        (
            r.bench,
            r.sshwrap,
            r.baseline,
            "" if r.ratio is None else f"{r.ratio:.2f}x",
            r.goal,
            "" if r.ok is None else ("yes" if r.ok else "NO"),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in body:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    notes = [f"- {r.bench}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["", *notes] if notes else []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    ap.add_argument("-k", dest="only", default="", help="only modules whose name contains this")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent
    names = sorted(p.stem for p in here.glob("bench_*.py") if args.only in p.stem)
    rows: list[Row] = []
    failed = 0
    with LocalSSHD(hosts=1) as sshd:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            try:
                mod = importlib.import_module(name)
                rows.extend(mod.run(sshd, args.quick))
            except Exception:
                failed += 1
                traceback.print_exc()
                rows.append(Row(name, "error", "", note="raised; see the traceback above"))
    print(_table(rows))
    sys.stdout.flush()
    os.sync()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
