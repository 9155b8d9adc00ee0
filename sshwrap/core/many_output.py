"""``sshwrap-many``'s output, shared by its command runs and its copies (``--put``/``--get``).

:class:`Tally` counts the hosts by status (the summary line and the exit status bits);
:class:`Output` writes each host's result as it arrives in the chosen mode (live lines, JSON
lines, groups, a file per host) and the progress (a bar on a terminal, else a plain line at
most once a second), then the summary.  A result is a ``HostResult`` (a command) or a
``CopyResult`` (a copy): the same field names and statuses.  Each line is one write, so the
hosts' lines never mix; a closed stdout (``| head``) calls ``Output.on_broken`` once.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .host_result import CopyResult, HostResult
from .hostset import fold

__all__ = [
    "EXIT_FAILED",
    "EXIT_SKIPPED",
    "EXIT_SSH_ERROR",
    "EXIT_TIMEOUT",
    "Output",
    "Result",
    "Tally",
    "describe",
    "fold_by_reason",
    "safe_name",
]

EXIT_FAILED = 1
EXIT_TIMEOUT = 2
EXIT_SSH_ERROR = 4
EXIT_SKIPPED = 8  # hosts never started: --max-fail exceeded, or a --canary failed

Result: TypeAlias = HostResult | CopyResult
"""One host's result: a command's or a copy's."""


def fold_by_reason(results: list[Result], why: bool) -> str:
    """``h[1-3] (exit 1), h5 (exit 2)``: hosts folded by what happened to them (``why``:
    else folded alone), in order."""
    by_reason: dict[str, list[str]] = {}
    for r in results:
        by_reason.setdefault(describe(r) if why else "", []).append(r.host)
    return ", ".join(
        fold(names) + (f" ({what})" if what else "") for what, names in by_reason.items()
    )


def safe_name(host: str) -> str:
    """``host`` as one file name (``--outdir``'s ``HOST.out``)."""
    name = re.sub(r"[^A-Za-z0-9._@:+-]", "_", host)
    return name if name not in ("", ".", "..") else "_" + name


# -- output ------------------------------------------------------------------------------


@dataclass
class Tally:
    """The hosts counted by status: the summary line and the exit status bits."""

    total: int
    done: int = 0
    ok: int = 0
    failed: int = 0
    timeout: int = 0
    ssh_error: int = 0
    cancelled: int = 0
    skipped: int = 0
    results: list[Result] = field(default_factory=list)

    def add(self, r: Result) -> None:
        """Count one host's result."""
        self.done += 1
        setattr(self, r.status, getattr(self, r.status) + 1)
        self.results.append(r)

    def exit_status(self) -> int:
        """The exit status bits: +1 a host failed, +2 one timed out, +4 an ssh error, +8 some
        hosts were skipped."""
        bits = {EXIT_FAILED: self.failed, EXIT_TIMEOUT: self.timeout}
        bits.update({EXIT_SSH_ERROR: self.ssh_error, EXIT_SKIPPED: self.skipped})
        return sum(bit for bit, n in bits.items() if n)

    def line(self) -> str:
        """``3 ok, 1 failed, 0 timed out, 0 ssh errors`` (and the skipped and the cancelled,
        if any)."""
        parts = [f"{self.ok} ok", f"{self.failed} failed", f"{self.timeout} timed out"]
        parts.append(f"{self.ssh_error} ssh error" + ("" if self.ssh_error == 1 else "s"))
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        if self.cancelled:
            parts.append(f"{self.cancelled} cancelled")
        return ", ".join(parts)


def describe(r: Result, verb: str = "") -> str:
    """What happened to a host, in a few words (``exit 1``, ``ssh error: ...``; a copy's
    ``PermissionError: ...``, with ``verb`` (``put``/``get``) its paths first:
    ``put a -> b: 1.2 MB in 0.40 s``)."""
    if r.status == "skipped":
        what = f"{verb} {r.source} -> {r.target}: " if verb and isinstance(r, CopyResult) else ""
        return what + f"skipped: {_message(r.error) if r.error is not None else 'not started'}"
    if isinstance(r, CopyResult):
        return _describe_copy(r, verb)
    if r.status == "ok":
        return "exit 0"
    if r.status == "failed":
        if r.returncode is None:  # sudo did not run the command
            assert r.error is not None
            return f"{type(r.error).__name__}: {_message(r.error)}"
        if r.signalled:
            return "killed by a signal" + (
                f" ({signal.Signals(-r.returncode).name})"
                if -r.returncode in _SIGNAL_NUMBERS
                else ""
            )
        return f"exit {r.returncode}"
    if r.status == "timeout":
        return "timed out" if r.started is not None else "not started (deadline)"
    if r.status == "ssh_error":
        msg = getattr(r.error, "message", None) or str(r.error)
        return f"ssh error: {type(r.error).__name__}: {msg}"
    return "cancelled"


_SIGNAL_NUMBERS = {int(s) for s in signal.Signals}


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _describe_copy(r: CopyResult, verb: str) -> str:
    what = f"{verb} {r.source} -> {r.target}: " if verb else ""
    if r.status == "ok":
        return what + f"{_size(r.transferred)} in {r.duration:.2f} s"
    if r.status == "timeout":
        return what + ("timed out" if r.started is not None else "not started (deadline)")
    if r.status == "cancelled":
        return what + "cancelled"
    assert r.error is not None
    label = "ssh error: " if r.status == "ssh_error" else ""
    return what + f"{label}{type(r.error).__name__}: {_message(r.error)}"


def _message(e: BaseException) -> str:
    return str(getattr(e, "message", None) or e)


def _error_json(e: BaseException | None) -> dict[str, str] | None:
    if e is None:
        return None
    return {"type": type(e).__name__, "message": getattr(e, "message", None) or str(e)}


def _copy_json(r: CopyResult) -> dict[str, Any]:
    return {
        "host": r.host,
        "status": r.status,
        "error": _error_json(r.error),
        "source": r.source,
        "target": r.target,
        "transferred": r.transferred,
        "total": r.total,
        "started": r.started,
        "duration": round(r.duration, 6),
        "connect_time": None if r.connect_time is None else round(r.connect_time, 6),
    }


_GROUPS = dict(
    failed="failed",
    timeout="timed out",
    ssh_error="ssh errors",
    skipped="skipped",
    cancelled="cancelled",
)
_PLAIN_PROGRESS_EVERY = 1.0  # seconds between two plain progress lines, at most one a second


class Output:
    """Writes results in the chosen mode; live lines and the progress (a bar on a terminal,
    plain lines otherwise).  ``verb`` (``put``/``get``): the results are a copy's."""

    def __init__(
        self, args: argparse.Namespace, hosts: list[str], progress: bool, verb: str = ""
    ) -> None:
        self.verb = verb
        self.mode = (
            "json" if args.json else "group" if args.group else "outdir" if args.outdir else "live"
        )
        self.outdir: str | None = args.outdir
        self.width = max((len(h) for h in hosts), default=0)
        self.partial: dict[tuple[str, int], bytearray] = {}
        self.broken = False  # stdout's reader went away
        self.on_broken: Callable[[], None] | None = None
        self.bar: Any = None
        self.task: Any = None
        self.console: Any = None
        # Without a terminal on stderr, progress is plain lines (no control characters).
        self.plain_progress = progress and not sys.stderr.isatty()
        self.progress_at: float | None = None  # when the last plain line was written
        self.progress_done = 0  # how many hosts it showed done
        if progress and not self.plain_progress:
            from rich import progress as rp
            from rich.console import Console

            self.console = Console(file=sys.stderr)
            columns = (rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn())
            self.bar = rp.Progress(
                *columns,
                rp.MofNCompleteColumn(),
                rp.TimeElapsedColumn(),
                console=self.console,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.task = self.bar.add_task(verb or "running", total=len(hosts))

    def context(self) -> AbstractContextManager[Any]:
        """The progress bar's live display (a no-op without one)."""
        return self.bar if self.bar is not None else nullcontext()

    # -- live lines --------------------------------------------------------------------
    def _emit(self, stream: int, line: bytes) -> None:
        if self.console is not None and (stream == 2 or sys.stdout.isatty()):
            from rich.text import Text

            self.console.print(Text(line.decode(errors="replace").rstrip("\n")), soft_wrap=True)
            return
        if stream == 1:
            self.write_out(line)
            return
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()

    def write_out(self, data: bytes) -> None:
        """Write to stdout; when its reader has gone (``| head``), stop the run instead."""
        if self.broken:
            return
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            self.broken = True
            # Nothing more can be written there, and Python must not try again at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            if self.on_broken is not None:
                self.on_broken()

    def on_output(self, host: str, stream: int, data: bytes) -> None:
        if self.mode != "live":
            return
        buf = self.partial.setdefault((host, stream), bytearray())
        buf += data
        end = buf.rfind(b"\n") + 1
        if not end:
            return
        prefix = self._prefix(host)
        lines = bytes(buf[: end - 1]).split(b"\n")
        del buf[:end]
        self._emit(stream, b"".join(prefix + line + b"\n" for line in lines))  # one write

    def _prefix(self, host: str) -> bytes:
        return (host.ljust(self.width) + " | ").encode()

    def _flush_partial(self, host: str) -> None:
        for stream in (1, 2):
            buf = self.partial.pop((host, stream), None)
            if buf:
                self._emit(stream, self._prefix(host) + bytes(buf) + b"\n")

    # -- per result ----------------------------------------------------------------------
    def result(self, r: Result, tally: Tally) -> None:
        """Show one host's result (``tally`` has counted it)."""
        if self.bar is not None:
            self.bar.update(
                self.task, advance=1, description=tally.line().replace(", 0 cancelled", "")
            )
        elif self.plain_progress:
            now = time.monotonic()
            if self.progress_at is None or now - self.progress_at >= _PLAIN_PROGRESS_EVERY:
                self._progress_line(tally)
                self.progress_at = now
        if isinstance(r, CopyResult):
            if self.mode == "json":
                self._json_line(_copy_json(r))
            else:
                line = self._prefix(r.host) + f"{describe(r, self.verb)}\n".encode()
                self._emit(1 if r.ok else 2, line)
        elif self.mode == "live":
            self._flush_partial(r.host)
            if r.status != "ok":
                self._emit(2, self._prefix(r.host) + f"[{describe(r)}]\n".encode())
        elif self.mode == "json":
            self._json(r)
        elif self.mode == "outdir":
            self._files(r)

    def _progress_line(self, tally: Tally) -> None:
        self.progress_done = tally.done
        line = f"sshwrap-many: {tally.done}/{tally.total} done: {tally.line()}\n"
        sys.stderr.write(line)
        sys.stderr.flush()

    def _json(self, r: HostResult) -> None:
        obj: dict[str, Any] = {
            "host": r.host,
            "status": r.status,
            "returncode": r.returncode,
            "signalled": r.signalled,
            "attempts": r.attempts,
        }
        for name in ("stdout", "stderr"):
            data: bytes = getattr(r, name)
            try:
                obj[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                obj[name] = None
                obj[name + "_base64"] = base64.b64encode(data).decode()
        obj["error"] = _error_json(r.error)
        obj["started"] = r.started
        obj["duration"] = round(r.duration, 6)
        obj["connect_time"] = None if r.connect_time is None else round(r.connect_time, 6)
        self._json_line(obj)

    def _json_line(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        if self.console is not None and sys.stdout.isatty():
            self.console.print(line.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        else:
            self.write_out(line.encode())

    def _files(self, r: HostResult) -> None:
        assert self.outdir is not None
        base = os.path.join(self.outdir, safe_name(r.host))
        for suffix, data in ((".out", r.stdout), (".err", r.stderr)):
            with open(base + suffix, "wb") as f:
                f.write(data)

    # -- at the end ------------------------------------------------------------------------
    def finish(self, tally: Tally, elapsed: float, interrupted: bool) -> None:
        """The last partial lines, the groups, the last progress line and the summary."""
        if self.mode == "live":
            for host, _ in list(self.partial):
                self._flush_partial(host)
        if self.mode == "group":
            self._groups(tally.results)
        if self.plain_progress and (self.progress_at is None or tally.done != self.progress_done):
            self._progress_line(tally)  # the last one, unless the last shown says it already
        err = sys.stderr
        head = "stdout closed: " if self.broken else "interrupted: " if interrupted else ""
        err.write(f"{head}{tally.total} hosts in {elapsed:.2f} s: {tally.line()}\n")
        for status, label in _GROUPS.items():
            bad = sorted((r for r in tally.results if r.status == status), key=lambda r: r.index)
            if bad:
                err.write(f"  {label}: {fold_by_reason(bad, status != 'cancelled')}\n")
        err.flush()

    def _groups(self, results: list[Result]) -> None:
        groups: dict[tuple[bytes, bytes, str], list[HostResult]] = {}
        for r in results:
            assert isinstance(r, HostResult)  # (--group is for commands)
            groups.setdefault((r.stdout, r.stderr, describe(r)), []).append(r)
        out = io.BytesIO()
        for (stdout, stderr, what), members in sorted(
            groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0].index)
        ):
            members.sort(key=lambda r: r.index)
            names = fold(r.host for r in members)
            n = len(members)
            out.write(f"==== {names} ({n} host{'s' if n != 1 else ''}): {what}\n".encode())
            out.write(stdout)
            if stdout and not stdout.endswith(b"\n"):
                out.write(b"\n")
            if stderr:
                out.write(b"---- stderr\n" + stderr)
                if not stderr.endswith(b"\n"):
                    out.write(b"\n")
        self.write_out(out.getvalue())
