"""One command on many hosts: ``run_many`` and ``run_many_async`` (``sshwrap.aio.run_many``).

Hosts: a ``str`` is a host pattern (``"web[01-50]"``, ``"@web"``: ClusterShell's syntax,
:mod:`sshwrap.core.hostset`), a list holds host names and connections as they are
(:mod:`sshwrap.core.host_input` says how groups are found and which items are refused).

Every host gets one plain ``ssh -T`` child in pipes mode (no pty per host, no thread per
host): its stdout and stderr are pipes, its stdin is ``/dev/null`` (or a pipe when ``input``
is given), and it runs in a session of its own, so a Ctrl-C typed at the terminal reaches
sshwrap only and sshwrap decides how every child ends.  ssh's own log goes, at
``LogLevel=VERBOSE`` with ``LogVerbose`` for the lines it reads
(:data:`sshwrap.protocol.sshlog.SHORT_LOG_SETTINGS`; ``DEBUG1`` for OpenSSH before 8.5), into a
pipe: it never reaches the caller's stderr, it tells when the
session is up (which ends the connect phase and starts the command timeout), and it tells
the remote exit status from the remote signal from ssh's own failure (ssh exits 255 for all
three).  The event loop watches the pipes and each child's exit (a pidfd): a host in flight
costs a handful of file descriptors and no thread, and children are started from the loop's
thread, never from a thread pool (:mod:`sshwrap.io.host_process`).

Timeouts: ``connect_timeout`` bounds the time from start until the session is up (it is
also handed to ssh as ``ConnectTimeout``); ``timeout`` bounds the remote command from then
on; ``deadline`` bounds the whole run.  A host over its limit has its ssh process group
killed (TERM, then KILL after 0.5 s); the others do not notice.  A command that outlives
``timeout`` is also stopped on the remote side when ``kill_remote`` is on (the default):
like ``sshwrap.run``, the command is tagged with a random session id in its environment, and
a second, short ssh signals the processes so tagged; it is bounded too, so every bound holds
within 1 s, cleanup included (:mod:`sshwrap.core.fanout_host`).  Without ``timeout`` or
``deadline`` nothing can need that stop, so the command then goes untagged, exactly as a
plain ``ssh host cmd`` sends it.

Cancelling (task cancellation, Ctrl-C, leaving the ``async for`` through ``aclose()``) kills
every ssh child by process group, waits for each one, and removes the FIFO directory: nothing
is left running locally (:mod:`sshwrap.core.fanout_run`).  Hosts that had finished keep their
results; the synchronous ``run_many`` raises ``FanoutInterrupted`` (a ``KeyboardInterrupt``)
carrying every result, the unfinished ones marked ``cancelled``.  A remote command that runs
without a terminal is not stopped by a cancellation (that would take a new connection per
host, and a prompt stop cannot wait for them): sshd closes its session, and the command ends
when it next writes, or when it is done.  Over a ``Connection`` (below) cancelling stops the
remote command too.

Connections: a host given as sshwrap's own ``Connection`` (``sshwrap.connect``, or its aio
twin; any :class:`ConnectionLike`, an object with a ``master``) runs as a channel of that
connection's ControlMaster (OpenSSH's mux proxy mode, through
:func:`sshwrap.core.commands.run_command`, as ``Connection.run`` does): no new ssh process, no
key exchange, and the exact ``-signum`` for a remote signal death.  Any other object with
``destination`` and ``control_path`` attributes (a :class:`ControlPathHost`) runs as ``ssh -o
ControlPath=... -o ControlMaster=no``.  A ControlMaster that the user's own ssh config sets
up is reused by ssh itself.

Persisted masters: with ``persist=`` (``"10m"``, seconds, ``True`` for 10 minutes) every
host's ssh is a ``ControlMaster=auto`` with that ``ControlPersist``, its socket named by
ssh's ``%C`` in a private directory of this user's: a later run (or this run's remote stop)
to the same host with the same settings runs over that master, with no new login.  A later
run finds a host's master in the directory's index and runs the host as a channel of it
through sshwrap's own mux client, with no ssh process at all (:mod:`sshwrap.core.fanout_warm`:
exact ``-signum`` as over a ``Connection``; output delivered to ``on_output`` when the host
is done); a master that does not answer is replaced by ssh, never a failure.
:func:`close_persisted` ends them by their pids (:mod:`sshwrap.io.persist`).

Resources: ``concurrency`` caps the ssh processes in flight, and so the file descriptors;
``check_fd_budget`` refuses, before anything starts, a concurrency that ``RLIMIT_NOFILE``
cannot hold (raising the soft limit up to the hard one first when that is enough).
"""

from __future__ import annotations

import asyncio
import os
import reprlib
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, Unpack

from .core.argv import OptionValue, check_destination, find_ssh, ssh_settings_args
from .core.batches import ROLLOUT_KEYWORDS, Spec
from .core.fanout_host import ConnectionLike, OutputCallback
from .core.fanout_run import ControlPathHost, FanoutOptions, FanoutRun
from .core.host_input import GroupsSource, literal_hosts, load_groups, pattern_hosts
from .core.host_result import FanoutInterrupted, HostResult, Status
from .core.options import SSHSettings
from .core.per_host import HostCommand, PerHostCommands, per_host_commands
from .core.sudo import PasswordSpec
from .io.fd_budget import FDS_PER_HOST, FdBudgetError, check_fd_budget
from .io.persist import (
    PERSIST_DEFAULT,
    MasterIndex,
    PersistDirError,
    close_masters,
    control_paths,
    persist_dir,
    persist_options,
    persist_seconds,
    persisted_sockets,
)

__all__ = [
    "FDS_PER_HOST",
    "PERSIST_DEFAULT",
    "ConnectionLike",
    "ControlPathHost",
    "FanoutInterrupted",
    "FdBudgetError",
    "HostResult",
    "OutputCallback",
    "Persist",
    "PersistDirError",
    "Status",
    "check_fd_budget",
    "close_persisted",
    "run_many",
    "run_many_async",
]

Via = Mapping[str, str | Iterable[str]]
"""``via=``: gateway name -> the hosts it serves (a host pattern, or a list of names)."""

Persist = bool | int | float | str | None
"""``persist=``: True (:data:`PERSIST_DEFAULT`, 10 minutes), seconds, or ssh's time format
(``"30s"``, ``"10m"``, ``"1h"``); None, False or leaving it out: no persisted masters."""

# -- public API ---------------------------------------------------------------------------


def _host_list(
    hosts: str | Iterable[str | ControlPathHost], groups: GroupsSource | None = None
) -> list[str | ControlPathHost]:
    """``hosts`` as a list, checked before any ssh runs (see ``sshwrap.aio.run_many``).

    A ``str`` is one host pattern, expanded with ``groups``; an iterable's items are host
    names (a ``str`` that reads as a pattern of other names is a ``ValueError``) and
    connections (a ``Connection``, or any object with ``destination`` and ``control_path``);
    anything else raises ``TypeError`` naming the item.
    """
    loaded = load_groups(groups)
    if isinstance(hosts, str):
        return list(pattern_hosts(hosts, loaded))
    if isinstance(hosts, bytes | bytearray | memoryview) or not isinstance(hosts, Iterable):
        if isinstance(hosts, ControlPathHost):
            hint = " (put a single connection in a list: [conn])"
        elif isinstance(hosts, bytes | bytearray):
            hint = " (decode it: a host is a str)"
        else:
            hint = ""
        raise TypeError(
            "hosts must be a host pattern (str) or an iterable of host names and connections, "
            f"not {type(hosts).__name__}{hint}"
        )
    items = list(hosts)
    for i, h in enumerate(items):
        if not isinstance(h, str) and not isinstance(h, ControlPathHost):
            raise TypeError(
                f"hosts[{i}] must be a host name (str) or a Connection, "
                f"not {type(h).__name__} {reprlib.repr(h)}"
            )
    literal_hosts(items)
    return items


def via_routes(
    via: Via | None, groups: GroupsSource | None, persist: Persist
) -> dict[str, set[str]] | None:
    """``via`` as gateway -> set of host names, checked before any ssh runs."""
    if not via:
        return None
    if not isinstance(via, Mapping):
        raise TypeError(f"via must map gateway names to host patterns, not {type(via).__name__}")
    if persist is not None and persist is not False:
        raise ValueError("persist= does not go through gateways (via=) yet")
    loaded = load_groups(groups)
    routes = {}
    for gw, members in via.items():
        if not isinstance(gw, str) or not gw:
            raise TypeError(f"via: a gateway is a host name (str), not {gw!r}")
        check_destination(gw)
        if isinstance(members, str):
            routes[gw] = set(pattern_hosts(members, loaded))
        else:
            items = list(members)
            literal_hosts(items, f"via[{gw!r}]")
            routes[gw] = set(items)
    return routes


if TYPE_CHECKING:  # imported when a run goes through gateways (a flat run never loads them)
    from .core.gateway_run import TreeRun
    from .core.gateway_waves import TreeWaves

Run: TypeAlias = "FanoutRun | TreeRun | TreeWaves"
"""A planned fan-out: :meth:`results` runs it, :meth:`complete` fills in the hosts left."""


def plan_run(
    hosts: Sequence[str | ControlPathHost],
    command: HostCommand | PerHostCommands,
    routes: dict[str, set[str]] | None,
    **kwargs: Any,
) -> Run:
    """The run: flat (:class:`FanoutRun`, which applies ``batch``/``max_fail``/``canary``
    itself), or through the gateways of ``routes`` (in waves: :class:`TreeWaves`;
    ``forward_agent`` is for those: a flat run leaves it to the user's config).

    A per-host ``command`` mapping is checked against the hosts first (one for each host,
    no key naming none: :func:`sshwrap.core.per_host.per_host_commands`)."""
    if isinstance(command, Mapping):
        names = [h if isinstance(h, str) else h.destination for h in hosts]
        command = per_host_commands(command, names)
    if routes is not None and kwargs.get("sudo"):
        raise ValueError("sudo through gateways (via=) is not supported yet")
    if routes is None:
        kwargs.pop("forward_agent", None)
        return FanoutRun(hosts, command, **kwargs)
    if any(kwargs.get(k) is not None for k in ROLLOUT_KEYWORDS):
        from .core.gateway_waves import TreeWaves

        return TreeWaves(hosts, command, routes, **kwargs)
    from .core.gateway_run import TreeRun

    return TreeRun(hosts, command, routes, **kwargs)


def _with_persist(
    persist: Persist,
    hosts: list[str | ControlPathHost],
    options: Mapping[str, OptionValue] | None,
) -> dict[str, Any]:
    """The run's ``options`` (with the persisted masters' settings when ``persist`` asks for
    them) and ``persist_dir`` (the masters' directory, or None)."""
    if persist is None or persist is False:
        return {"options": options, "persist_dir": None}
    seconds = persist_seconds(persist)
    for i, h in enumerate(hosts):
        if not isinstance(h, str) and not isinstance(h, ConnectionLike):
            raise ValueError(f"hosts[{i}] has a ControlPath of its own: persist= is for host names")
    directory = persist_dir()
    assert directory is not None
    return {"options": persist_options(seconds, directory, options), "persist_dir": directory}


async def run_many_async(
    hosts: str | Iterable[str | ControlPathHost],
    command: HostCommand | PerHostCommands,
    *,
    groups: GroupsSource | None = None,
    concurrency: int = 32,
    timeout: float | None = None,
    connect_timeout: float | None = 30.0,
    deadline: float | None = None,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    config: str | os.PathLike[str] | None = None,
    user: str | None = None,
    port: int | None = None,
    identity: str | os.PathLike[str] | None = None,
    jump: str | None = None,
    options: Mapping[str, OptionValue] | None = None,
    ssh: str | None = None,
    batch_mode: bool = True,
    kill_remote: bool = True,
    on_output: OutputCallback | None = None,
    on_start: Callable[[str], None] | None = None,
    retries: int = 0,
    batch: Spec = None,
    max_fail: Spec = None,
    canary: int | None = None,
    persist: Persist = None,
    via: Via | None = None,
    forward_agent: bool | None = None,
    sudo: bool = False,
    sudo_password: PasswordSpec = None,
    sudo_user: str | None = None,
) -> AsyncIterator[HostResult]:
    """Run ``command`` on every host, ``concurrency`` at a time; yield results as they finish.

    This is ``sshwrap.aio.run_many``.  ``command`` is quoted like ``sshwrap.run``: a list
    item by item, a ``str`` as it is.  ``%h`` in it is each host's name (its destination
    as given): in a list, in any item, before the quoting; in a ``str``, quoted for the
    shell (``shlex.quote``: a plain name as it is), so a name can never inject shell.
    ``%%h`` is a literal ``%h``; every other ``%`` is kept (``date +%s``, ``printf '%s'``).
    ``command`` may instead map each host's name to its own command (``{"web1": "uptime",
    "db1": ["pg_ctl", "reload"]}``; ``%h`` works there too): every host needs one, and a
    key that names no host of the run, a key that is no ``str`` or a value that is no
    command raises (``ValueError``/``TypeError``) before any ssh runs.  With ``via=`` both
    reach the gateways: each runs its hosts' commands, ``%h`` their names.
    ``timeout`` bounds each remote command (from the moment its session is up),
    ``connect_timeout`` each connection (also ssh's ``ConnectTimeout``), ``deadline`` the
    whole run (hosts it stops or never starts come back with status ``timeout``).
    ``input`` is sent to every host's stdin (default: ``/dev/null``, so no host reads the
    caller's stdin).  ssh settings (``config``, ``user``,
    ``port``, ``identity``, ``jump``, ``options``) go to every ssh as ``-F/-l/-p/-i/-J/-o``.
    ``batch_mode`` (default on) sets ``BatchMode=yes``: a fan-out cannot answer prompts, so
    a host that would ask fails at once instead of hanging (each ssh has no terminal, so
    with ``batch_mode=False`` it can only ask through ``SSH_ASKPASS``).  ``kill_remote``
    (default on) stops a timed-out command on the remote side too.
    Every bound covers the cleanup it causes: a host over ``timeout``, ``connect_timeout``
    or ``deadline`` is done within 1 s of it (its ssh: TERM, KILL 0.5 s later; the remote
    stop: its own ssh with a ``ConnectTimeout``, killed and reaped 0.7 s after the bound
    when the host does not answer, e.g. a cut link or a frozen sshd), so the whole run ends
    within 1 s of its last bound and leaves no ssh behind.  Destinations, users and jump
    hosts starting with ``-`` raise ``ValueError`` before any ssh runs.
    ``on_output(host, stream, data)`` (stream 1 or 2) sees the bytes as they arrive;
    ``on_start(host)`` each host as it starts.
    ``retries`` (default 0) starts a host's ssh again, up to that many more times, when it
    failed before its session was up with a connection-level ``SSHConnectionError``
    (refused, timed out, reset, closed during the key exchange, unreachable, or
    ``connect_timeout``), after a backoff with full jitter (at most 0.5 s before the first
    retry, doubling, capped at 8 s), each attempt with its own ``connect_timeout``, and never
    past ``deadline`` (a backoff that would end there is not taken).  Never retried: a remote
    command's failure (``exit 255`` too), anything after the session was up, authentication,
    host key and config failures (retrying those hides an attack or locks accounts), a name
    that does not resolve, a host given as a connection.  ``HostResult.attempts`` says how
    many ssh were started for the host.
    Rolling batches (:mod:`sshwrap.core.batches`): ``batch`` (a count, or a percentage of the
    hosts such as ``"25%"``, rounded up) runs the hosts in waves, in input order: a wave
    starts only once every host of the wave before has ended (``concurrency`` applies inside
    a wave).  ``max_fail`` (a count, or a percentage of the hosts, rounded down): once MORE
    hosts than that have failed (any status but ``ok``: ``failed``, ``timeout``,
    ``ssh_error``), no new host starts, those in flight finish, and every host never
    started comes back ``skipped`` (``returncode`` None, ``error`` a ``SkippedError`` saying
    why); ``max_fail=0`` stops at the first failure.  ``canary=N``: the first N hosts run
    alone first (their own wave; N over the host count makes every host a canary), and the
    rest start only if every canary was ``ok``, else they are ``skipped``.  A bad value (a
    batch of 0, a negative count, ``"150%"``, ``"abc"``) raises ``ValueError`` before any
    ssh runs.  Through gateways the waves hold across the tree and so does ``max_fail``
    (:mod:`sshwrap.core.gateway_waves`).
    ``persist`` (``True``, seconds, or ssh's time format: ``"30s"``, ``"10m"``, ``"1h"``)
    leaves each host's ControlMaster up that long after its last use, in a private
    directory of this user's (:mod:`sshwrap.io.persist`), and reuses one that a run before
    left there: a run over warm masters makes no new connection.  ``True`` is 10 minutes
    (:data:`PERSIST_DEFAULT`).  A master that died is replaced by ssh, not reported as a
    failure; :func:`close_persisted` ends them.  A bad value raises ``ValueError`` (and so
    do ssh options that set ``ControlMaster``/``ControlPersist``/``ControlPath`` alongside
    it); an unsafe directory ``PersistDirError``; both before any ssh runs.
    ``hosts`` is one ``str``, a host pattern (``"web[01-50]"``, ``"h[1-8]!h[3-4]"``,
    ``"@web"``; ``"web1"`` is one host, never ``w``, ``e``, ...), expanded by
    ``sshwrap.hosts`` in its order; or an iterable (a list, a ``HostSet``) of host names and
    connections, taken as they are, duplicates included.  A list's items are never expanded:
    one that reads as a pattern of other names (``["h[1-3]"]``, ``["a,b"]``, ``["@web"]``)
    raises ``ValueError`` saying to pass the pattern as a ``str``, so no host runs by a name
    ssh cannot know; an item that is no pattern (``"ssh://[::1]:2222"``) is a name.
    ``groups`` gives the ``@name`` groups: a ``Groups``, a mapping of name to pattern, or a
    groups file's path (lines ``name: pattern``); without it, an ``@`` reads the file that
    the environment variable ``SSHWRAP_GROUPS`` names.  A bad pattern or an unknown group
    raises ``HostPatternError`` (a ``ValueError``, with ``pattern``, ``position`` and
    ``reason``); an argument that is no str or iterable, or an item neither a ``str`` nor a
    connection, raises ``TypeError`` naming it; all before any ssh runs.  A host may be a
    ``Connection``: its ControlMaster is reused.

    ``via`` (``{"gw1": "web[1-50]", "gw2": "db[1-9]"}``) runs the hosts a gateway's pattern
    names through that gateway (the first gateway naming a host takes it; the rest run
    flat): ONE ssh to each gateway, with these same ssh settings, sends sshwrap itself to
    the gateway's ``python3`` (3.11 or later; nothing is installed or left there), which runs
    the fan-out there, with its own ssh, and these same settings, keywords and bounds
    (``concurrency`` applies per gateway), streaming each result back as it finishes.  A
    gateway that cannot be reached, lacks a suitable ``python3`` or dies mid-run fails only
    its own unreported hosts (``ssh_error``, a ``GatewayError``: an ``SSHConnectionError``
    whose message and ``gateway`` name the gateway); a host that a later gateway names too
    is tried through that one.  A gateway that another gateway's pattern names is behind
    that one (``{"gw1": "gw2,web[1-5]", "gw2": "web[6-9]"}``: web6-9 through gw1, then gw2;
    the agent on gw1 reaches gw2 itself; a cycle is a ``ValueError``).
    ``forward_agent`` is for the ssh to each gateway: ``None`` (default) leaves it to the
    ssh config (``ForwardAgent`` there is honoured, ssh's default is no), ``True`` forwards
    the agent (``-A``: the gateway's ssh can then use its keys), ``False`` never (``-a``).
    Cancelling ends each gateway's ssh, and the gateway then ends every ssh it started
    (:mod:`sshwrap.core.gateway_run`).  ``persist`` does not combine with ``via`` yet.

    ``sudo=True`` runs the command through ``sudo -S`` on every host, as ``sudo_user``
    (default root), as ``sshwrap.run`` does (:mod:`sshwrap.core.sudo`): a random prompt per
    host, ``sudo_password`` (``str``, ``bytes``, or a callable returning one: called once
    for the whole run, before the first host starts) written to that host's ssh stdin only
    when its sudo asks, then ``input``.  A host whose sudo refuses the password (or asks and
    none was given, or ends before the command starts: not allowed, no such user) is stopped
    at once and comes back ``failed`` with ``returncode`` None and ``error`` a ``SudoError``
    (never retried: a wrong password is not tried again into a locked account).  The
    password is never in an argv, the environment, ssh's log, a result or an error.  Not
    with ``via`` (``ValueError``).

    Leave early with ``contextlib.aclosing``; cancelling the consuming task ends every ssh
    child before the cancellation completes.  Raises ``FdBudgetError`` before starting
    anything if the open-files limit cannot hold ``concurrency`` hosts in flight.
    """
    host_list = _host_list(hosts, groups)
    routes = via_routes(via, groups, persist)
    run = plan_run(
        host_list,
        command,
        routes,
        concurrency=concurrency,
        timeout=timeout,
        connect_timeout=connect_timeout,
        deadline=deadline,
        input=input,
        env=env,
        cwd=cwd,
        config=config,
        user=user,
        port=port,
        identity=identity,
        jump=jump,
        **_with_persist(persist, host_list, options),
        ssh=ssh,
        batch_mode=batch_mode,
        kill_remote=kill_remote,
        on_output=on_output,
        on_start=on_start,
        retries=retries,
        forward_agent=forward_agent,
        batch=batch,
        max_fail=max_fail,
        canary=canary,
        sudo=sudo,
        sudo_password=sudo_password,
        sudo_user=sudo_user,
    )
    gen = run.results()
    try:
        async for result in gen:
            yield result
    finally:
        await gen.aclose()


class RunManyOptions(FanoutOptions, total=False):
    """The keywords of :func:`run_many`: those of ``sshwrap.aio.run_many`` (``concurrency``
    32, ``connect_timeout`` 30 s, no ``timeout`` or ``deadline`` unless given)."""

    concurrency: int
    timeout: float | None
    connect_timeout: float | None
    deadline: float | None
    groups: GroupsSource | None
    persist: Persist
    via: Via | None
    forward_agent: bool | None


_RUN_MANY_DEFAULTS: dict[str, Any] = {
    "concurrency": 32,
    "timeout": None,
    "connect_timeout": 30.0,
    "deadline": None,
}


def run_many(
    hosts: str | Iterable[str | ControlPathHost],
    command: HostCommand | PerHostCommands,
    **kwargs: Unpack[RunManyOptions],
) -> list[HostResult]:
    """Run ``command`` on every host; return one ``HostResult`` per host, in input order.

    ``sshwrap.run_many(["web1", "web2"], "uptime", concurrency=100, timeout=30)``, or with a
    pattern, ``sshwrap.run_many("web[01-50]!web07", "uptime")`` (the order is the pattern's
    expansion; ``groups=`` for ``@name``).  The keywords and ``hosts`` are those of
    ``sshwrap.aio.run_many`` (bounds kept within 1 s, cleanup included).  On Ctrl-C every
    ssh child is ended first (within about 1 s, remote stops in flight included), then
    ``FanoutInterrupted`` (a ``KeyboardInterrupt``) is raised carrying ``results``: the
    finished hosts, and the others marked ``cancelled`` with their output so far.
    ``via=`` runs hosts through gateways (see ``sshwrap.aio.run_many``); the results are
    still in input order.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_many() inside a running event loop: use sshwrap.aio.run_many")
    groups = kwargs.pop("groups", None)
    host_list = _host_list(hosts, groups)
    persist = kwargs.pop("persist", None)
    routes = via_routes(kwargs.pop("via", None), groups, persist)
    if persist is not None:
        kwargs.update(_with_persist(persist, host_list, kwargs.get("options")))  # type: ignore[typeddict-item]
    run = plan_run(host_list, command, routes, **{**_RUN_MANY_DEFAULTS, **kwargs})
    results: dict[int, HostResult] = {}

    interrupted = False
    # (Decided before asyncio.run, which installs a SIGINT handler of its own.)
    watch = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )

    async def main() -> None:
        nonlocal interrupted
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_sigint() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        # Through the loop's own wakeup fd: a plain handler would not wake the selector when
        # the kernel delivers SIGINT to another thread, and Ctrl-C would wait for the hosts.
        if watch:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        gen = run.results()
        try:
            async for r in gen:
                results[r.index] = r
        finally:
            await gen.aclose()
            if watch:
                loop.remove_signal_handler(signal.SIGINT)

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        if not interrupted and not isinstance(sys.exc_info()[1], KeyboardInterrupt):
            raise
        raise FanoutInterrupted(run.complete(results)) from None
    return run.complete(results)


def close_persisted(
    hosts: str | Iterable[str] | None = None,
    *,
    groups: GroupsSource | None = None,
    timeout: float = 10.0,
    **settings: Unpack[SSHSettings],
) -> int:
    """End the ControlMasters that runs with ``persist=`` left up; return how many ended.

    ``hosts`` None: every persisted master of this user's.  Else only those hosts' (a host
    pattern or a list of names, as for :func:`run_many`): each host's socket is named by
    ``ssh -G`` with the ssh settings given here (``config``, ``user``, ``port``, ``jump``,
    ``options``, ``ssh``), which must be those of the run that left it (ssh's ``%C`` hashes
    the host, port, user and jump host).  Each master is sent SIGTERM by its own pid (asked of
    its socket) and waited for, SIGKILL when it has not exited within ``timeout`` (the call
    returns within about ``timeout`` + 1 s); no master is left running and no socket left
    behind.  A socket whose master died is removed, not
    counted.  Raises ``PersistDirError`` when the directory is unsafe.
    """
    directory = persist_dir(create=False)
    if directory is None:
        return 0
    until = time.monotonic() + timeout
    if hosts is None:
        paths = persisted_sockets(directory)
    else:
        names = [h for h in _host_list(hosts, groups) if isinstance(h, str)]
        args = ssh_settings_args(
            config=settings.get("config"),
            user=settings.get("user"),
            port=settings.get("port"),
            jump=settings.get("jump"),
            options=persist_options(None, directory, settings.get("options")),
        )
        ssh = settings.get("ssh") or find_ssh()
        argvs = {h: [ssh, *args, "-G", check_destination(h)] for h in dict.fromkeys(names)}
        paths = list(control_paths(argvs, timeout=timeout).values())
    closed = close_masters(paths, max(0.1, until - time.monotonic()))
    MasterIndex(directory).prune()
    return closed
