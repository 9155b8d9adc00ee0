"""``sshwrap-many``: one command on many hosts, on the user's own OpenSSH setup.

::

    sshwrap-many -H hosts.txt -p 100 -t 30 -- uptime          # live host-prefixed lines
    sshwrap-many -H hosts.txt --group -- cat /etc/os-release  # identical outputs grouped
    sshwrap-many -H web1,web2 --json -- df -h                 # one JSON object per host
    sshwrap-many -H - --outdir out/ -- journalctl -n 100      # hosts from stdin, a file each

    sshwrap-many -H 'web[01-50]' -x 'web[07-09]' -- uptime   # ranges, less an exclusion
    sshwrap-many -H @web --groups groups.txt -- uptime      # groups file lines "web: h[1-6]"
    sshwrap-many -H 'h[1-8]' --persist 10m -- true          # masters stay up 10 minutes
    sshwrap-many -H 'h[1-8]' --close                        # close those persisted masters

``-H`` takes a host pattern (ClusterShell's syntax, :mod:`sshwrap.core.hostset`: ``h1,h2``,
``web[01-50]``, ``rack[1-2]-node[001-016]``, ``h[1-8]!h[3-4]``, ``@group``; spaces between
names count as commas), a hosts file (a pattern a line, ``#`` comments), or ``-`` (stdin);
repeatable, the hosts in the order given, each once.  ``-x`` (same forms, repeatable) leaves
hosts out.  ``@name`` reads ``--groups FILE`` (lines ``name: pattern``), else the file the
environment variable ``SSHWRAP_GROUPS`` names.  A bad pattern or an unknown group exits 64
with the pattern, the position and the reason (and the file's line).  A word that looks like
a path (a ``/``, a leading ``.`` or ``~``, a suffix
``.txt``/``.hosts``/``.list``/``.lst``/``.conf``/``.cfg``) but names no file exits 64.
Host lists in the output (``--group``, the summary) are folded back the same way
(``h[1-3,7]``).

The words after ``--`` are joined with spaces and handed to the remote shell, as ``ssh host
words...`` does.  ssh's own ``-F``, ``-o``, ``-l``, ``-i`` and ``-J`` go to every ssh;
``-p`` is the parallelism (as in pssh), so a port goes as ``-o Port=N``.

``--persist TIME`` (``30s``, ``10m``, ``1h``, seconds) leaves every host's ControlMaster up
for TIME after its last use, in a private directory of this user's, and runs over those a run
before left up (no new login; one that died is replaced); ``--close`` ends them by their pids
(those of the ``-H`` hosts, with the same ``-F``/``-l``/``-J``/``-o``; else all) and says how
many (:mod:`sshwrap.io.persist`).

Exit status (the bits add up): 0 every host ran the command and it exited 0; 1 some command
exited non-zero or died of a signal; 2 some host timed out (``-t`` or ``--deadline``); 4
some host had an ssh error (refused, unreachable, authentication, host key, connect
timeout).  64: bad usage (including a ``-p`` the open-files limit cannot hold); 130:
interrupted (Ctrl-C, SIGTERM, SIGHUP) after ending every ssh and printing what finished;
141: stdout was closed by its reader (``| head``), so the run was stopped the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NoReturn

from .core.fanout_run import FanoutRun
from .core.host_input import GROUPS_ENV, cli_hosts
from .core.hostset import fold
from .fanout import FdBudgetError, HostResult, close_persisted
from .io.persist import persist_dir, persist_options, persist_seconds, ssh_seconds

__all__ = ["EXIT_FAILED", "EXIT_SSH_ERROR", "EXIT_TIMEOUT", "main"]

EXIT_FAILED = 1
EXIT_TIMEOUT = 2
EXIT_SSH_ERROR = 4
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell shows for a writer killed by SIGPIPE


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 64 (2 is the "timed out" bit of the exit status)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="sshwrap-many",
        description="Run one command on many hosts with the system's ssh.",
        epilog="Exit status: 0 all ok; +1 a command failed; +2 a host timed out; "
        "+4 an ssh error; 64 usage; 130 interrupted; 141 stdout closed by its reader "
        "(| head), the run stopped.",
    )
    ap.add_argument(
        "-H",
        "--hosts",
        action="append",
        metavar="HOSTS",
        help="a host pattern (h1,h2  web[01-50]  h[1-8]!h3  @group), a file (a pattern per "
        "line, # comments), or - for stdin; repeatable; a word that looks like a path (a /, "
        "a leading . or ~, a suffix such as .txt) but names no file is an error",
    )
    ap.add_argument(
        "-x",
        "--exclude",
        action="append",
        default=[],
        metavar="HOSTS",
        help="leave out these hosts (a pattern, a file or -, as for -H); repeatable",
    )
    ap.add_argument(
        "--groups",
        metavar="FILE",
        help=f"groups file for @name (lines 'name: pattern'; default: ${GROUPS_ENV})",
    )
    ap.add_argument("-p", "--parallel", type=int, default=32, metavar="N", help="hosts at once")
    ap.add_argument("-t", "--timeout", type=float, help="seconds for each remote command")
    ap.add_argument(
        "--connect-timeout",
        type=float,
        metavar="S",
        help="seconds to connect (default: -o ConnectTimeout, else 30)",
    )
    ap.add_argument("--deadline", type=float, metavar="S", help="seconds for the whole run")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--group", action="store_true", help="group hosts with identical output")
    out.add_argument("--json", action="store_true", help="one JSON object per host (lines)")
    out.add_argument("--outdir", metavar="DIR", help="write DIR/HOST.out and DIR/HOST.err")
    ap.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress: a bar on a terminal, else a plain line at most once a second "
        "(default: when stderr is a terminal)",
    )
    ap.add_argument(
        "--persist",
        metavar="TIME",
        help="keep each host's master up TIME after the run (30s, 10m, 1h) and reuse those "
        "that an earlier run left up",
    )
    ap.add_argument(
        "--close",
        action="store_true",
        help="close the persisted masters (of the -H hosts, else all of this user's); no command",
    )
    ap.add_argument("-I", "--input", metavar="FILE", help="send FILE to every host's stdin")
    ap.add_argument("-F", dest="config", metavar="CONFIG", help="ssh config file")
    ap.add_argument(
        "-o", dest="options", action="append", default=[], metavar="KEY=VALUE", help="ssh option"
    )
    ap.add_argument("-l", dest="user", help="remote user")
    ap.add_argument("-i", dest="identity", help="identity file")
    ap.add_argument("-J", dest="jump", help="jump host(s)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- command words")
    return ap


def _options(items: Sequence[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in items:
        key, sep, value = item.replace("=", " ", 1).partition(" ")
        if not sep or not key.strip():
            raise ValueError(f"-o wants KEY=VALUE, not {item!r}")
        opts.setdefault(key.strip(), value.strip())  # ssh takes the first value given
    return opts


def _fold_by_reason(results: list[HostResult], why: bool) -> str:
    """``h[1-3] (exit 1), h5 (exit 2)``: hosts folded by what happened to them, in order."""
    by_reason: dict[str, list[str]] = {}
    for r in results:
        by_reason.setdefault(_describe(r) if why else "", []).append(r.host)
    return ", ".join(
        fold(names) + (f" ({what})" if what else "") for what, names in by_reason.items()
    )


def _safe_name(host: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._@:+-]", "_", host)
    return name if name not in ("", ".", "..") else "_" + name


# -- output ------------------------------------------------------------------------------


@dataclass
class _Tally:
    total: int
    done: int = 0
    ok: int = 0
    failed: int = 0
    timeout: int = 0
    ssh_error: int = 0
    cancelled: int = 0
    results: list[HostResult] = field(default_factory=list)

    def add(self, r: HostResult) -> None:
        self.done += 1
        setattr(self, r.status, getattr(self, r.status) + 1)
        self.results.append(r)

    def exit_status(self) -> int:
        bits = {EXIT_FAILED: self.failed, EXIT_TIMEOUT: self.timeout}
        return sum(bit for bit, n in {**bits, EXIT_SSH_ERROR: self.ssh_error}.items() if n)

    def line(self) -> str:
        parts = [f"{self.ok} ok", f"{self.failed} failed", f"{self.timeout} timed out"]
        parts.append(f"{self.ssh_error} ssh error" + ("" if self.ssh_error == 1 else "s"))
        if self.cancelled:
            parts.append(f"{self.cancelled} cancelled")
        return ", ".join(parts)


def _describe(r: HostResult) -> str:
    if r.status == "ok":
        return "exit 0"
    if r.status == "failed":
        assert r.returncode is not None
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


_GROUPS = dict(failed="failed", timeout="timed out", ssh_error="ssh errors", cancelled="cancelled")
_PLAIN_PROGRESS_EVERY = 1.0  # seconds between two plain progress lines, at most one a second


class _Output:
    """Writes results in the chosen mode; live lines and the progress (a bar on a terminal,
    plain lines otherwise)."""

    def __init__(self, args: argparse.Namespace, hosts: list[str], progress: bool) -> None:
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
            self.task = self.bar.add_task("running", total=len(hosts))

    def context(self) -> AbstractContextManager[Any]:
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
    def result(self, r: HostResult, tally: _Tally) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task, advance=1, description=tally.line().replace(", 0 cancelled", "")
            )
        elif self.plain_progress:
            now = time.monotonic()
            if self.progress_at is None or now - self.progress_at >= _PLAIN_PROGRESS_EVERY:
                self._progress_line(tally)
                self.progress_at = now
        if self.mode == "live":
            self._flush_partial(r.host)
            if r.status != "ok":
                self._emit(2, self._prefix(r.host) + f"[{_describe(r)}]\n".encode())
        elif self.mode == "json":
            self._json(r)
        elif self.mode == "outdir":
            self._files(r)

    def _progress_line(self, tally: _Tally) -> None:
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
        }
        for name in ("stdout", "stderr"):
            data: bytes = getattr(r, name)
            try:
                obj[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                obj[name] = None
                obj[name + "_base64"] = base64.b64encode(data).decode()
        obj["error"] = (
            None
            if r.error is None
            else {"type": type(r.error).__name__, "message": getattr(r.error, "message", "")}
        )
        obj["started"] = r.started
        obj["duration"] = round(r.duration, 6)
        obj["connect_time"] = None if r.connect_time is None else round(r.connect_time, 6)
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        if self.console is not None and sys.stdout.isatty():
            self.console.print(line.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        else:
            self.write_out(line.encode())

    def _files(self, r: HostResult) -> None:
        assert self.outdir is not None
        base = os.path.join(self.outdir, _safe_name(r.host))
        for suffix, data in ((".out", r.stdout), (".err", r.stderr)):
            with open(base + suffix, "wb") as f:
                f.write(data)

    # -- at the end ------------------------------------------------------------------------
    def finish(self, tally: _Tally, elapsed: float, interrupted: bool) -> None:
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
                err.write(f"  {label}: {_fold_by_reason(bad, status != 'cancelled')}\n")
        err.flush()

    def _groups(self, results: list[HostResult]) -> None:
        groups: dict[tuple[bytes, bytes, str], list[HostResult]] = {}
        for r in results:
            groups.setdefault((r.stdout, r.stderr, _describe(r)), []).append(r)
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


# -- main --------------------------------------------------------------------------------


def _ignored(sig: int) -> bool:
    return signal.getsignal(sig) is signal.SIG_IGN


async def _run(run: FanoutRun, output: _Output, tally: _Tally) -> bool:
    """Drive the run; True if it was interrupted by a signal."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupted = False

    def stop() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    # Signals that are ignored (nohup, a background job without job control) stay ignored.
    sigs = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if not _ignored(s)]
    for s in sigs:
        loop.add_signal_handler(s, stop)
    output.on_broken = stop
    gen = run.results()
    try:
        async for r in gen:
            tally.add(r)
            output.result(r, tally)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        # aclose() below has ended every child; print the partial results.
    finally:
        await gen.aclose()
        for s in sigs:
            loop.remove_signal_handler(s)
    if interrupted:
        for r in run.stopped_results():
            tally.add(r)
            output.result(r, tally)
        seen = {r.index for r in tally.results}
        for r in run.complete({}):
            if r.index not in seen:
                tally.add(r)  # never started
    return interrupted


def _dir() -> str:
    directory = persist_dir()
    assert directory is not None
    return directory


def _close(ap: argparse.ArgumentParser, args: argparse.Namespace, command: list[str]) -> int:
    """``--close``: end the persisted masters (of the ``-H`` hosts, else all of this user's)."""
    if command or args.persist is not None:
        ap.error("--close takes no command and no --persist")
    try:
        n = close_persisted(
            cli_hosts(args.hosts, args.exclude, args.groups) if args.hosts else None,
            config=args.config,
            user=args.user,
            jump=args.jump,
            options=_options(args.options),
        )
    except (OSError, ValueError) as e:
        ap.error(str(e))
    print(f"sshwrap-many: closed {n} persisted master{'s' if n != 1 else ''}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sshwrap-many`` console script; returns the exit status."""
    ap = _parser()
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
    if args.close:
        return _close(ap, args, command)
    if not args.hosts:
        ap.error("the following arguments are required: -H/--hosts")
    if not command:
        ap.error("no command given (put it after --)")
    if args.parallel < 1:
        ap.error("-p must be at least 1")
    if [*args.hosts, *args.exclude, args.input].count("-") > 1:
        ap.error("stdin can be read once: give - to only one of -H, -x and -I")
    batch_mode = True
    no_connect_timeout = False
    try:
        hosts = cli_hosts(args.hosts, args.exclude, args.groups)
        options = _options(args.options)
        # ssh's own spellings of what sshwrap-many controls itself.
        connect_timeout = args.connect_timeout
        for key in [k for k in options if k.lower() in ("connecttimeout", "batchmode")]:
            value = options[key]
            if key.lower() == "batchmode":
                del options[key]
                batch_mode = value.lower() in ("yes", "true")
            elif (seconds := ssh_seconds(value)) is not None:
                del options[key]
                if connect_timeout is None:
                    connect_timeout = seconds
            else:
                # Not a time ssh would take: it goes to ssh, which says what is wrong.
                no_connect_timeout = connect_timeout is None
        if args.persist is not None:
            options = persist_options(persist_seconds(args.persist), _dir(), options)
        data = None
        if args.input == "-":
            data = sys.stdin.buffer.read()
        elif args.input is not None:
            with open(args.input, "rb") as f:
                data = f.read()
        if args.outdir:
            os.makedirs(args.outdir, exist_ok=True)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    if not hosts:
        ap.error("no hosts left after -x" if args.exclude else "no hosts given")
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    output = _Output(args, hosts, progress)
    try:
        run = FanoutRun(
            hosts,
            " ".join(command),
            concurrency=args.parallel,
            timeout=args.timeout,
            connect_timeout=(
                None if no_connect_timeout else 30.0 if connect_timeout is None else connect_timeout
            ),
            batch_mode=batch_mode,
            deadline=args.deadline,
            input=data,
            config=args.config,
            user=args.user,
            identity=args.identity,
            jump=args.jump,
            options=options,
            on_output=output.on_output,
        )
    except FdBudgetError as e:
        print(f"sshwrap-many: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        ap.error(str(e))
    tally = _Tally(total=len(hosts))
    t0 = time.monotonic()
    with output.context():
        interrupted = asyncio.run(_run(run, output, tally))
    output.finish(tally, time.monotonic() - t0, interrupted)
    if output.broken or interrupted:
        return EXIT_BROKEN_PIPE if output.broken else EXIT_INTERRUPTED
    return tally.exit_status()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
