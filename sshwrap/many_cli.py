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
    sshwrap-many -H 'h[1-8]' --put build.tgz /srv/build.tgz  # a file (or tree) to every host
    sshwrap-many -H 'h[1-8]' --get /etc/os-release got/     # got/h1/os-release, got/h2/...

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
words...`` does.  ``%h`` in them is each host's name (quoted for the shell when it is not a
plain name: ``sshwrap-many -H 'h[1-3]' -- echo %h``); ``%%h`` is a literal ``%h``, and
every other ``%`` stays (``date +%s``) (:mod:`sshwrap.core.per_host`).  ssh's own ``-F``,
``-o``, ``-l``, ``-i`` and ``-J`` go to every ssh;
``-p`` is the parallelism (as in pssh), so a port goes as ``-o Port=N``.

``--persist TIME`` (``30s``, ``10m``, ``1h``, seconds) leaves every host's ControlMaster up
for TIME after its last use, in a private directory of this user's, and runs over those a run
before left up (no new login; one that died is replaced); ``--close`` ends them by their pids
(those of the ``-H`` hosts, with the same ``-F``/``-l``/``-J``/``-o``; else all) and says how
many (:mod:`sshwrap.io.persist`).

``--put LOCAL REMOTE`` / ``--get REMOTE LOCALDIR`` copy instead of running a command
(:func:`sshwrap.put_many` / :func:`sshwrap.get_many`: SFTP over each host's own master,
atomic per file; ``get`` writes ``LOCALDIR/HOST/``; ``%h`` in a path is the host's name,
``%%h`` a literal ``%h``), with the same ``-p``, ``-t`` (each host's transfer),
``--connect-timeout``, ``--deadline``, ssh settings, ``--json`` (``host``, ``status``,
``error``, ``source``, ``target``, ``transferred``, ``total``, ``started``, ``duration``,
``connect_time``), ``--progress``, summary and exit status (a copy that failed is the 1
bit).  A line per host (``h3 | put build.tgz -> /srv/build.tgz: 10.0 MB in 0.42 s``, or its
error on stderr).  A missing LOCAL (without ``%h``), a command, ``-I``, ``--group``, ``--outdir``
or ``--persist`` with them exits 64 before any host starts (a copy's master ends with it).

``--sudo`` runs the command through ``sudo -S`` on every host (``--sudo-user U``: as U, else
root), with the password asked once on the terminal (``/dev/tty``, not echoed) or read once
from ``--sudo-password-file F`` (one trailing newline dropped); it goes only to each host's
ssh stdin when that host's sudo asks, never to an argv or environment.  A host whose sudo
refuses it fails at once (the 1 bit, ``SudoError``).  No terminal and no file, a file that
cannot be read, ``--put``/``--get`` or gateways with it: exit 64, before any host starts.

``--retries N`` starts a host's ssh again, up to N more times, when it failed before its
session was up with a connection-level failure (refused, timed out, reset, unreachable):
see ``retries`` of :func:`sshwrap.run_many`.

Rolling batches (commands and copies, flat or ``--via``; :mod:`sshwrap.core.batches`):
``--batch N|P%`` runs the hosts in waves of N (or P percent of the hosts, rounded up), in
input order, each wave once the one before has ended; ``--max-fail N|P%``: once MORE than N
hosts (P percent of the hosts, rounded down) have failed (any status but ok), no new host
starts and those never started are ``skipped``; ``--canary N``: the first N hosts run
alone first, the rest only if all of them were ok (else ``skipped``).  A bad value exits 64
before any host starts.

Exit status (the bits add up): 0 every host ran the command and it exited 0 (or copied);
1 some command exited non-zero or died of a signal, or some copy failed; 2 some host timed
out (``-t`` or ``--deadline``); 4 some host had an ssh error (refused, unreachable,
authentication, host key, connect timeout); 8 some hosts were skipped (``--max-fail``
exceeded or a ``--canary`` failed: they never started).  64: bad usage (including a ``-p`` the
open-files limit cannot hold); 130: interrupted (Ctrl-C, SIGTERM, SIGHUP) after ending every
ssh and printing what finished; 141: stdout was closed by its reader (``| head``), so the
run was stopped the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from .core.batches import rollout
from .core.host_input import GROUPS_ENV, cli_hosts
from .core.host_result import CopyResult
from .core.hostset import parse_groups
from .core.many_output import EXIT_FAILED, EXIT_SKIPPED, EXIT_SSH_ERROR, EXIT_TIMEOUT, Output, Tally
from .fanout import FdBudgetError, Run, close_persisted, plan_run, via_routes
from .io.persist import persist_dir, persist_options, persist_seconds, ssh_seconds
from .many_sudo import sudo_keywords

__all__ = ["EXIT_FAILED", "EXIT_SKIPPED", "EXIT_SSH_ERROR", "EXIT_TIMEOUT", "main"]

EXIT_USAGE = 64
_ROLLOUT_FLAGS = ("--batch", "--max-fail", "--canary")
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
        description="Run one command on many hosts, or copy to or from them, with ssh.",
        epilog="Exit status: 0 all ok; +1 a command (or copy) failed; +2 a host timed out; "
        "+4 an ssh error; +8 hosts skipped (--max-fail exceeded, a --canary failed); "
        "64 usage; 130 interrupted; 141 stdout closed by its reader (| head), the run stopped.",
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
    ap.add_argument(
        "--via",
        action="append",
        default=[],
        metavar="GW:PATTERN",
        help="run the hosts of PATTERN through the gateway GW (repeatable)",
    )
    ap.add_argument(
        "--topology",
        metavar="FILE",
        help="gateways from FILE: lines 'gateway: pattern' (a gateway named in another's "
        "pattern is behind it)",
    )
    ap.add_argument(
        "--via-forward-agent",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="forward the agent to the gateways (ssh -A), or never (--no-...: ssh -a); "
        "default: as the ssh config says",
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
    ap.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="start a host's ssh up to N more times when it could not connect (refused, "
        "timed out, reset), after a jittered backoff; never after auth, host key or remote "
        "failures",
    )
    ap.add_argument(
        "--batch",
        metavar="N|P%",
        help="run the hosts in waves of N (or P%% of them, rounded up), in order: a wave "
        "starts once every host of the one before has ended",
    )
    ap.add_argument(
        "--max-fail",
        metavar="N|P%",
        help="once more than N hosts (P%% of them, rounded down) have failed (any status but "
        "ok), start no new host: the rest are skipped (exit bit 8)",
    )
    ap.add_argument(
        "--canary",
        type=int,
        metavar="N",
        help="run the first N hosts alone first, the rest only if every one of them was ok",
    )
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
    copy = ap.add_mutually_exclusive_group()
    copy.add_argument(
        "--put",
        nargs=2,
        metavar=("LOCAL", "REMOTE"),
        help="copy the file or directory LOCAL to REMOTE on every host, instead of a command "
        "(%%h: the host's name, %%%%h a literal %%h)",
    )
    copy.add_argument(
        "--get",
        nargs=2,
        metavar=("REMOTE", "LOCALDIR"),
        help="copy REMOTE from every host into LOCALDIR/HOST/ (a LOCALDIR with %%h: each "
        "host's exact local path), instead of a command",
    )
    ap.add_argument("-I", "--input", metavar="FILE", help="send FILE to every host's stdin")
    ap.add_argument(
        "--sudo",
        action="store_true",
        help="run the command through sudo -S (password asked once on the terminal)",
    )
    ap.add_argument("--sudo-user", metavar="USER", help="with --sudo: as USER (default root)")
    ap.add_argument(
        "--sudo-password-file", metavar="FILE", help="with --sudo: read the password from FILE"
    )
    ap.add_argument("-F", dest="config", metavar="CONFIG", help="ssh config file")
    ap.add_argument(
        "-o", dest="options", action="append", default=[], metavar="KEY=VALUE", help="ssh option"
    )
    ap.add_argument("-l", dest="user", help="remote user")
    ap.add_argument("-i", dest="identity", help="identity file")
    ap.add_argument("-J", dest="jump", help="jump host(s)")
    ap.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="-- command words (%%h: each host's name, quoted for the shell; %%%%h a literal "
        "%%h; any other %% as it is, e.g. date +%%s)",
    )
    return ap


def _options(items: Sequence[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in items:
        key, sep, value = item.replace("=", " ", 1).partition(" ")
        if not sep or not key.strip():
            raise ValueError(f"-o wants KEY=VALUE, not {item!r}")
        opts.setdefault(key.strip(), value.strip())  # ssh takes the first value given
    return opts


# -- main --------------------------------------------------------------------------------


def _ignored(sig: int) -> bool:
    return signal.getsignal(sig) is signal.SIG_IGN


def _via(args: argparse.Namespace) -> dict[str, str]:
    """The gateways of ``--via GW:PATTERN`` and ``--topology FILE`` (lines ``gw: pattern``,
    the groups file's format): gateway -> the host pattern it serves."""
    via: dict[str, str] = {}
    if args.topology is not None:
        with open(os.path.expanduser(args.topology)) as f:
            via.update(parse_groups(f.read()))
    for item in args.via:
        gw, sep, pattern = item.partition(":")
        if not sep or not gw.strip() or not pattern.strip():
            raise ValueError(f"--via {item}: give GATEWAY:PATTERN")
        via[gw.strip()] = pattern.strip()
    return via


async def _run(run: Run, output: Output, tally: Tally) -> bool:
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
        seen = {r.index for r in tally.results}
        for r in run.complete({}):  # in input order: the rest, cancelled
            if r.index not in seen:
                tally.add(r)
                if r.started is not None:  # it was in flight: its output so far
                    output.result(r, tally)
    return interrupted


def _dir() -> str:
    directory = persist_dir()
    assert directory is not None
    return directory


def _check_copy_args(
    ap: argparse.ArgumentParser, args: argparse.Namespace, command: list[str]
) -> None:
    """What ``--put``/``--get`` cannot take: a command, stdin data, the command outputs."""
    flag = "--put" if args.put else "--get"
    if command:
        ap.error(f"{flag} copies instead of running a command: give one or the other")
    for given, name in ((args.input, "-I"), (args.group, "--group"), (args.outdir, "--outdir")):
        if given:
            ap.error(f"{flag} takes no {name} (that is for a command's output)")
    if args.persist is not None:
        ap.error(
            f"{flag} takes no --persist: a copy starts each host's own master and ends it "
            "with the run (persisted masters serve commands)"
        )


def _copy(
    ap: argparse.ArgumentParser,
    args: argparse.Namespace,
    hosts: list[str],
    progress: bool,
    batch_mode: bool,
    connect_timeout: float | None,
    settings: dict[str, Any],
) -> int:
    """``--put LOCAL REMOTE`` / ``--get REMOTE LOCALDIR`` on every host (sshwrap.fleet)."""
    from .fleet import CopyInterrupted, get_many, put_many  # only a copy loads SFTP

    verb = "put" if args.put else "get"
    source, target = args.put or args.get
    output = Output(args, hosts, progress, verb)
    tally = Tally(total=len(hosts))
    shown: set[int] = set()
    running = True

    def show(r: CopyResult) -> None:
        shown.add(r.index)
        tally.add(r)
        output.result(r, tally)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def broken() -> None:
        if running:
            raise KeyboardInterrupt  # stops every host, as Ctrl-C does

    output.on_broken = broken
    options: dict[str, Any] = {
        **{k: v for k, v in settings.items() if v is not None},
        "concurrency": args.parallel,
        "timeout": args.timeout,
        "connect_timeout": connect_timeout,
        "deadline": args.deadline,
        "batch_mode": batch_mode,
        "on_result": show,  # each host's line as it finishes
        **_rollout_args(args),
    }
    func = put_many if verb == "put" else get_many
    results: list[CopyResult] | None = None
    interrupted = False
    # SIGTERM and SIGHUP stop the copy as Ctrl-C does (those ignored stay ignored).
    sigs = [s for s in (signal.SIGTERM, signal.SIGHUP) if not _ignored(s)]
    old = {s: signal.signal(s, stop) for s in sigs}
    t0 = time.monotonic()
    try:
        with output.context():
            try:
                results = func(hosts, source, target, **options)
            except CopyInterrupted as e:
                interrupted, results = True, e.results
            except KeyboardInterrupt:
                interrupted = True  # before any host started
            except FdBudgetError as e:
                print(f"sshwrap-many: {e}", file=sys.stderr)
                return EXIT_USAGE
            except (OSError, ValueError, TypeError) as e:
                ap.error(str(e))
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)
            running = False
            if results is None:  # interrupted before the copy started, or while stopping
                results = [
                    CopyResult(h, "cancelled", None, None, 0.0, index=i)
                    for i, h in enumerate(hosts)
                ]
            rest = [r for r in results if r.index not in shown]
            for r in sorted(rest, key=lambda r: (r.started is None, (r.started or 0) + r.duration)):
                if r.started is None and r.status == "cancelled":
                    tally.add(r)  # never started
                else:
                    show(r)
    finally:
        running = False
    output.finish(tally, time.monotonic() - t0, interrupted)
    if output.broken or interrupted:
        return EXIT_BROKEN_PIPE if output.broken else EXIT_INTERRUPTED
    return tally.exit_status()


def _rollout_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch": args.batch, "max_fail": args.max_fail, "canary": args.canary}


def _close(ap: argparse.ArgumentParser, args: argparse.Namespace, command: list[str]) -> int:
    """``--close``: end the persisted masters (of the ``-H`` hosts, else all of this user's)."""
    if command or args.persist is not None or args.put or args.get:
        ap.error("--close takes no command and no --persist (nor --put/--get)")
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
    copy = args.put or args.get
    if args.close:
        return _close(ap, args, command)
    if not args.hosts:
        ap.error("the following arguments are required: -H/--hosts")
    if copy:
        _check_copy_args(ap, args, command)
    elif not command:
        ap.error("no command given (put it after --, or copy with --put/--get)")
    if args.parallel < 1:
        ap.error("-p must be at least 1")
    if args.retries < 0:
        ap.error("--retries must be at least 0")
    if copy and args.retries:
        ap.error("--retries is for commands: a copy is not retried")
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
        directory = None
        if args.persist is not None:
            directory = _dir()
            options = persist_options(persist_seconds(args.persist), directory, options)
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
    try:
        rollout(len(hosts), args.batch, args.max_fail, args.canary, labels=_ROLLOUT_FLAGS)
    except ValueError as e:
        ap.error(str(e))
    try:
        sudo = sudo_keywords(ap, args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    if copy:
        connect = None if no_connect_timeout else connect_timeout
        settings = dict(config=args.config, user=args.user, identity=args.identity)
        settings.update(jump=args.jump, options=options)
        return _copy(ap, args, hosts, progress, batch_mode, connect, settings)
    output = Output(args, hosts, progress)
    try:
        run = plan_run(
            hosts,
            " ".join(command),
            via_routes(_via(args), args.groups, args.persist),
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
            retries=args.retries,
            forward_agent=args.via_forward_agent,
            **_rollout_args(args),
            persist_dir=directory,
            **sudo,
        )
    except FdBudgetError as e:
        print(f"sshwrap-many: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        ap.error(str(e))
    tally = Tally(total=len(hosts))
    t0 = time.monotonic()
    with output.context():
        interrupted = asyncio.run(_run(run, output, tally))
    output.finish(tally, time.monotonic() - t0, interrupted)
    if output.broken or interrupted:
        return EXIT_BROKEN_PIPE if output.broken else EXIT_INTERRUPTED
    return tally.exit_status()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
