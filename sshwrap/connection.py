"""``sshwrap.connect()``: an OpenSSH ControlMaster that sshwrap owns, and commands over it.

The sync face.  The master's lifecycle (start, check, restart, stop, forwards) is
:class:`sshwrap.io.master.Master` (``Connection.master``); the commands are the procedures of
:mod:`sshwrap.core.commands`, run here by ``run_sync`` in the caller's thread (Ctrl-C
interrupts them there, and they clean up: the channel closed, the remote command stopped).
``sshwrap.aio.connect`` is the async face over the same Master and procedures.

Design
------
**Commands.**  sshwrap speaks OpenSSH's mux protocol itself (``sshwrap.io.mux_control``) and asks
for *proxy mode* (``MUX_C_PROXY``, OpenSSH >= 7.4): the control socket then carries the SSH
connection protocol (RFC 4254) in the clear while the master keeps transport, crypto and keys.
``sshwrap.io.pump`` opens one ``session`` channel per command on one shared socket, with one
I/O thread for all of them.  So a command costs no new process, no fd passing and no new
authentication: one channel open (done ahead: a spare channel is kept open), one ``exec``.
And it knows exactly how the command ended: ``exit-status``, or ``exit-signal`` with the
signal's name (``returncode == -signum``), which neither ``ssh -S`` nor passenger mode can
report.  ``Popen.send_signal``/``terminate``/``kill``
send ``signal`` requests, which sshd (>= 7.9) delivers with ``killpg`` to the command's session,
and a timeout sends TERM, then KILL.  We chose proxy over passenger mode
(``MUX_C_NEW_SESSION`` with stdio fds passed over the socket) because passenger mode reports an
exit value only (255 for a signal death) and cannot signal the remote command.

**Fallback.**  A master that does not speak mux protocol 4 or refuses proxy mode (older
OpenSSH, ``ControlMaster ask``) is used through ``ssh -S P`` subprocesses
(``sshwrap.process``), with that module's semantics; ``Connection(..., proxy=False)`` forces it.

**A dead master** (killed, network gone, ``ServerAliveInterval`` expired) is noticed when its
socket closes: the next call starts a new master, with the same settings and prompt answers
(``reconnect=True``, the default), or raises ``SSHConnectionError`` (``reconnect=False``).
The restart is bounded by the call's ``timeout`` (and ``connect_timeout``): ssh gets a
``ConnectTimeout`` derived from what is left and is killed and reaped when the bound runs out,
on Ctrl-C, or when an asyncio caller is cancelled.  Commands running when it died end with
``CommandLostError`` (an ``SSHConnectionError`` carrying the output that did arrive; ``run``)
or returncode 255 with ``Popen.ssh_error`` set, unless both their exit status and the end of
their output had arrived: never a returncode for a command whose end was not seen.  A
command that cannot have started (the channel was not open yet) is tried once more on the
new master.  The new master is asked for the same forwards (same ports; a remote
forward of port 0 gets the server's new choice in ``Forward.port``; one that cannot be
restored becomes inactive).

**Attach and detach.**  ``sshwrap.attach(path)`` gives a Connection over a ControlMaster that
is already running (the user's own ``ssh -M -S path``, or one a Connection ``detach()``-ed,
in this process or another) without owning it: commands run on proxy channels over it as
over sshwrap's own, ``close()`` leaves it running, and once it is gone a call raises
``SSHConnectionError`` (sshwrap starts no master behind the user's back unless
``reconnect=True``).  ``connect(host, attach="auto")`` attaches to the master the user's
config names for the host (``ssh -G``: its ``ControlPath``) when one answers there, else
starts sshwrap's own; ``attach=True`` requires one; the default (``False``) always starts
sshwrap's own, as before.  ``Connection.detach()`` leaves sshwrap's master running past the
program and returns a ``Detached`` (picklable; ``str()`` is a JSON text ``attach()`` takes);
``attach(detached, own=True)`` (or ``close(stop=True)``) finally stops it and removes its
socket directory.  See ``sshwrap.io.attach``.

**Threads.**  Every method may be called from several threads at once; commands run
concurrently over the one master.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Unpack, cast, overload

from .core.argv import check_destination, find_ssh, ssh_settings_args
from .core.channel_popen import ChannelPopenOptions
from .core.channel_streams import Stream
from .core.commands import ChannelRunOptions, run_command, start_command
from .core.completed import CompletedProcess
from .core.getoutput import OutputOptions, getoutput_options, status_output
from .core.options import SSH_SETTINGS_KEYS, Command, SSHSettings, check_keywords
from .core.shell import Shell, check_shell_options
from .core.waiting import run_sync
from .io.attach import Detached, attach_target
from .io.forwards import Forward, ForwardError
from .io.master import SUN_PATH_MAX, Master
from .io.mux_control import MUX_FWD_DYNAMIC, MUX_FWD_LOCAL, MUX_FWD_REMOTE
from .io.pump import check_exec_size

if TYPE_CHECKING:
    from .io.prompts import OnPrompt
    from .spawn import InteractOptions, Spawned, SpawnOptions
    from .terminal.relay import RelayResult
    from .transfer import AbortableCopyOptions, TransferOptions

__all__ = [
    "SUN_PATH_MAX",
    "ConnectOptions",
    "Connection",
    "Detached",
    "Forward",
    "ForwardError",
    "MasterState",
    "Stream",
    "attach",
    "connect",
]


class ConnectOptions(SSHSettings, total=False):
    """The keywords of ``sshwrap.connect``/``Connection`` (and ``sshwrap.aio.connect``) after
    the destination: the ssh settings of ``sshwrap.run``, the prompt answers and the master's
    own (see ``Connection``)."""

    password: str | None
    passphrase: str | None
    on_prompt: OnPrompt | None
    start_timeout: float | None
    reconnect: bool
    proxy: bool
    connect_timeout: float | None
    attach: bool | Literal["auto"]


def make_master(destination: str, **options: Unpack[ConnectOptions]) -> Master:
    """The (not started) ``Master`` of a ``Connection`` with these settings (see there)."""
    check_destination(destination)  # ValueError for what ssh would take as an option
    settings = cast(
        SSHSettings, {k: v for k, v in options.items() if k in SSH_SETTINGS_KEYS and k != "ssh"}
    )
    start_timeout = options.get("start_timeout", 60.0)
    connect_timeout = options.get("connect_timeout")
    if connect_timeout is not None:
        start_timeout = (
            connect_timeout if start_timeout is None else min(start_timeout, connect_timeout)
        )
    return Master(
        destination,
        settings=settings,
        settings_args=ssh_settings_args(**cast(dict[str, Any], settings)),
        ssh=options.get("ssh"),
        locate_ssh=find_ssh,
        password=options.get("password"),
        passphrase=options.get("passphrase"),
        on_prompt=options.get("on_prompt"),
        start_timeout=start_timeout,
        reconnect=options.get("reconnect", True),
        proxy=options.get("proxy", True),
        attach=options.get("attach", False),
    )


class MasterState:
    """The state of a connection's ControlMaster, read alike on both faces: ``Connection``
    and ``sshwrap.aio.AsyncConnection`` (which shares its Connection's ``Master``).  Plain
    reads: none waits (the alive check does, and is each face's own)."""

    _master: Master

    @property
    def master(self) -> Master:
        """The ControlMaster (``sshwrap.io.master.Master``): its lifecycle, forwards and
        proxy socket; ``sshwrap.core.commands`` runs commands over it (both faces, and the
        fan-out for a host given as a Connection)."""
        return self._master

    @property
    def attached(self) -> bool:
        """True for a master sshwrap does not own (``close()`` leaves it running)."""
        return not self._master.owned

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._master.closed

    @property
    def uses_proxy(self) -> bool:
        """True when commands run on channels over the mux proxy (else ``ssh -S``)."""
        return self._master.uses_proxy

    @property
    def log_path(self) -> str:
        """The master's own log (ssh ``-E``)."""
        return self._master.log_path

    @property
    def control_path(self) -> str:
        """The master's control socket (in a private directory; empty before the start)."""
        return self._master.control_path

    @property
    def master_pid(self) -> int:
        """The master's pid (0 before the start)."""
        return self._master.pid

    @property
    def restarts(self) -> int:
        """How often a dead master was started again."""
        return self._master.restarts

    @property
    def start_timeout(self) -> float | None:
        """Seconds a start of the master may take (the smaller of ``start_timeout`` and
        ``connect_timeout``)."""
        return self._master.start_timeout

    @property
    def reconnect(self) -> bool:
        """Whether a dead master is started again (else ``SSHConnectionError``)."""
        return self._master.reconnect


class Connection(MasterState):
    """An OpenSSH ControlMaster owned by sshwrap, and commands, forwards and files over it.

    Create it with ``sshwrap.connect(...)`` (started) or ``Connection(...)`` + ``open()`` or a
    ``with``.  See the module docstring for the design.  Settings are those of
    ``sshwrap.run``: ``config`` (``-F``), ``user``, ``port``, ``identity``, ``jump``,
    ``options`` (each ``-o Key=Value``), ``ssh`` (the client binary); ``password``,
    ``passphrase`` and ``on_prompt`` answer ssh's prompts (``sshwrap.io.prompts``);
    ``start_timeout`` bounds the master's start (connection and authentication: the ssh
    that starts it is killed and reaped when it runs out, ``SSHConnectionError``);
    ``connect_timeout`` is the same bound under run_many's name (the smaller of the two
    applies); the bound, rounded up to whole seconds, is also given to ssh as
    ``ConnectTimeout`` unless ``options`` set one.  ``reconnect`` restarts a master that died;
    ``proxy=False`` runs commands as ``ssh -S`` subprocesses instead of mux proxy channels.
    ``attach``: ``"auto"`` uses the user's configured master for the host when one answers
    (``close()`` then leaves it running), ``True`` requires one, ``False`` (the default)
    always starts sshwrap's own (see the module docstring).

    **Bounds.**  A command's ``timeout`` covers the whole call, including restarting a dead
    master: the restart gets what is left of the timeout (ssh's ``ConnectTimeout`` derived
    from it, the ssh killed and reaped when it runs out) and a master that is not back in
    time raises ``SSHConnectionError`` (the command never started; a call waiting for another
    thread's restart likewise).  Ctrl-C and asyncio cancellation stop a restart at once (the
    starting ssh is killed and reaped).  The margin is documented on ``run``.
    """

    def __init__(self, destination: str, **options: Unpack[ConnectOptions]) -> None:
        self._master = make_master(destination, **options)
        self.destination = destination
        self.host = destination

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> Connection:
        """Start the master (if not started yet); returns self."""
        self._master.open()
        return self

    def __enter__(self) -> Connection:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, *, stop: bool | None = None) -> None:
        """Stop the master (``-O exit``), wait for it to go, remove the socket directory.

        An attached master that is not ours (``attached``) is left running, unless
        ``stop=True`` (a detached master's socket directory is then removed too)."""
        self._master.close(stop=stop)

    def detach(self) -> Detached:
        """Leave the master running after this Connection and this program: returns what
        ``sshwrap.attach()`` in a later process needs (the control path, host, pid, socket
        directory and settings; picklable, and ``str()`` of it is accepted too).  The
        Connection is closed; the master stops only when an attachment closes it with
        ``stop=True``, or one made with ``attach(..., own=True)`` closes."""
        return self._master.detach()

    @classmethod
    def attached_to(
        cls,
        target: str | os.PathLike[str] | Detached,
        destination: str | None = None,
        *,
        own: bool = False,
        **options: Unpack[ConnectOptions],
    ) -> Connection:
        """The Connection of ``sshwrap.attach`` (same arguments), not opened yet."""
        d = attach_target(target)
        merged = cast(ConnectOptions, {"reconnect": False, **d.settings, **options})
        conn = cls(destination or d.destination or d.control_path, **merged)
        conn.master.adopt(d.control_path, own=own, directory=d.directory)
        return conn

    @property
    def alive(self) -> bool:
        """True if the master answers an alive check now (``ssh -O check``, 5 s at most)."""
        return self._master.alive

    # -- commands ----------------------------------------------------------------------
    def run(self, args: Command, **options: Unpack[ChannelRunOptions]) -> CompletedProcess:
        """Run a command over the master and wait for it, like ``sshwrap.run``.

        Returns a ``CompletedProcess`` (with ``host``).  ``returncode`` is the remote exit
        status, or ``-signum`` if a signal killed the command.  A timeout sends TERM, then
        KILL after ``kill_after`` seconds, then closes the channel, and raises
        ``TimeoutExpired`` with the output so far.  ``timeout`` bounds the whole call: a
        dead master's restart comes out of it (``SSHConnectionError`` when the master is not
        back in time), and so does the stop; the call returns within ``timeout + kill_after +
        0.5`` seconds (1 s past the timeout with the default ``kill_after``), even when the
        host or the session is frozen (the remote command may then outlive the call).
        A connection lost before the command's exit status and the end of its output
        arrived raises ``CommandLostError`` (an ``SSHConnectionError``; ``stdout`` and
        ``command_stderr`` hold what came), never a returncode.  A command longer than
        ``sshwrap.io.pump.MAX_COMMAND`` bytes raises ``ValueError`` before anything is sent.
        ``connect_timeout`` bounds restarting a dead master (as ``run_many``'s does).
        stdin defaults to DEVNULL, as in ``sshwrap.run``.  ``tty=True`` asks for a remote
        terminal of ``size=(rows, cols)``: output merged on stdout, CR LF line ends.
        """
        return run_sync(run_command(self._master, args, **options))

    def Popen(self, args: Command, **options: Unpack[ChannelPopenOptions]) -> Any:
        """Start a command over the master, like ``sshwrap.Popen`` / ``subprocess.Popen``.

        Returns a ``ChannelPopen`` (``stdin``/``stdout``/``stderr`` pipes, ``poll``, ``wait``,
        ``communicate``, ``send_signal``/``terminate``/``kill`` reaching the remote process
        group; ``tty=True``: a remote terminal, ``resize(rows, cols)``), or with the ``ssh -S``
        fallback an ``sshwrap.Popen`` running ``ssh`` through the master.
        """
        popen = run_sync(start_command(self._master, args, **options))
        if popen is not None:
            return popen
        from .process import Popen as ProcessPopen

        return ProcessPopen(self.destination, args, **options, **self._master.fallback_settings())

    def getstatusoutput(self, args: Command, **options: Unpack[OutputOptions]) -> tuple[int, str]:
        """``(returncode, output)``, stderr merged; like ``subprocess.getstatusoutput``
        (``encoding``, ``errors``, ``timeout``)."""
        return status_output(self.run(args, **getoutput_options(options)))

    def getoutput(self, args: Command, **options: Unpack[OutputOptions]) -> str:
        """The output, stderr merged; like ``subprocess.getoutput``."""
        return self.getstatusoutput(args, **options)[1]

    def call(self, args: str | Sequence[str], **kwargs: Any) -> int:
        """Run a command and return its returncode (like ``subprocess.call``)."""
        rc: int = self.run(args, **kwargs).returncode
        return rc

    def check_call(self, args: str | Sequence[str], **kwargs: Any) -> int:
        """Run a command; ``CalledProcessError`` if it fails; return 0."""
        self.run(args, check=True, **kwargs)
        return 0

    def check_output(self, args: str | Sequence[str], **kwargs: Any) -> Any:
        """Run a command and return its stdout; ``CalledProcessError`` if it fails."""
        if "stdout" in kwargs:
            raise ValueError("stdout argument not allowed, it will be overridden.")
        return self.run(args, stdout=subprocess.PIPE, check=True, **kwargs).stdout

    def shell(self, *, tty: bool = False, program: str = "sh") -> Shell:
        """A persistent remote shell on one channel of the master (:class:`sshwrap.Shell`):
        ``cd``, variables, functions and an activated virtualenv persist between its
        ``run`` calls.  ``program`` is the POSIX shell to run (``sh``, whatever the login
        shell is); ``tty=True`` is refused (``ValueError``).  The Connection stays open when
        the shell closes."""
        check_shell_options(tty, program)
        return Shell.start(self._master, program)

    # -- forwards ----------------------------------------------------------------------
    def forward_local(
        self, listen_port: int, host: str, port: int, *, listen_host: str = "127.0.0.1"
    ) -> Forward:
        """``ssh -L``: listen on ``listen_host:listen_port`` here, connect to ``host:port``
        from the server.  Port 0 picks a free port.  Returns a ``Forward`` (the port)."""
        return self._master.add_forward(
            "local", (MUX_FWD_LOCAL, listen_host, listen_port, host, port)
        )

    def forward_dynamic(self, listen_port: int = 0, *, listen_host: str = "127.0.0.1") -> Forward:
        """``ssh -D``: a SOCKS4/5 proxy here whose connections leave from the server."""
        # ssh -D names the target "socks" (readconf.c); the master requires a name.
        spec = (MUX_FWD_DYNAMIC, listen_host, listen_port, "socks", 0)
        return self._master.add_forward("dynamic", spec)

    def forward_remote(
        self, listen_port: int, host: str, port: int, *, listen_host: str = "127.0.0.1"
    ) -> Forward:
        """``ssh -R``: the server listens on ``listen_host:listen_port`` (0: the server picks
        and the Forward holds its choice); connections come back to ``host:port`` from here."""
        return self._master.add_forward(
            "remote", (MUX_FWD_REMOTE, listen_host, listen_port, host, port)
        )

    @property
    def forwards(self) -> list[Forward]:
        """The forwards opened through this Connection and not cancelled."""
        return list(self._master.forwards)

    # -- files and terminals (sshwrap.transfer, sshwrap.spawn) over the master ------------
    def put(
        self,
        local: str | os.PathLike[str],
        remote: str,
        **options: Unpack[AbortableCopyOptions],
    ) -> None:
        """Copy a local file or directory (recursively, modes kept) to ``remote`` over the
        master (SFTP; see ``sshwrap.transfer.put``).  ``progress(done, total)`` in bytes;
        ``preserve_times`` (default True); ``abort`` (``sshwrap.transfer.Abort``) lets another
        thread stop it."""
        from .transfer import put

        put(local, remote, **self._over_master("put", options))

    def get(
        self,
        remote: str,
        local: str | os.PathLike[str],
        **options: Unpack[AbortableCopyOptions],
    ) -> None:
        """Copy a remote file or directory to ``local`` over the master
        (see ``sshwrap.transfer.get``); the keywords as for ``put``."""
        from .transfer import get

        get(remote, local, **self._over_master("get", options))

    def _over_master(self, func: str, options: AbortableCopyOptions) -> TransferOptions:
        """The keywords of ``sshwrap.transfer``'s ``func`` that copy over the master."""
        from .transfer import AbortableCopyOptions

        check_keywords(func, options, AbortableCopyOptions)
        return {
            **options,
            "destination": self.destination,
            "ssh_args": self.ssh_args(),
            "ssh": self._master.ssh,
            "control_path": None,
        }

    @overload
    def spawn(
        self, command: Command | None, *, encoding: str = "utf-8", **options: Unpack[SpawnOptions]
    ) -> Spawned[str]: ...
    @overload
    def spawn(
        self, command: Command | None, *, encoding: None, **options: Unpack[SpawnOptions]
    ) -> Spawned[bytes]: ...
    def spawn(
        self,
        command: Command | None,
        *,
        encoding: str | None = "utf-8",
        **options: Unpack[SpawnOptions],
    ) -> Spawned[str] | Spawned[bytes]:
        """An expect-style ``Spawned`` program (``ssh -tt -e none`` in a local pty) over the
        master; ``command`` None starts a login shell.  The keywords are ``Spawned``'s:
        ``tty``, ``size=(rows, cols)`` (``dimensions`` is its deprecated alias), ``timeout``,
        ``encoding`` (None: bytes mode), ``errors``, and ``env``/``cwd`` as for ``run``.  See
        ``sshwrap.spawn.Spawned``."""
        from .spawn import Spawned, SpawnOptions, spawn_command_line, spawn_size

        check_keywords("spawn", options, SpawnOptions)
        settings = spawn_size(options, stacklevel=2)
        line = spawn_command_line(command, env=settings.get("env"), cwd=settings.get("cwd"))
        if line is not None:
            check_exec_size(line)
        return Spawned(
            command,
            destination=self.destination,
            ssh_args=self.ssh_args(),
            ssh=self._master.ssh,
            control_path=self.control_path,
            encoding=encoding,
            **settings,
        )

    def interact(
        self, escape: bytes | None = b"\x1d", **options: Unpack[InteractOptions]
    ) -> RelayResult:
        """Hand the user's terminal to a login shell over the master until it exits or the
        user types ``escape`` (default ``^]``; the shell is then hung up).  Raw mode, resizes
        and signals as in ``Spawned.interact``.  The result's ``returncode`` is the remote
        shell's exit status (``-128`` for a signal death; None when escaped).  The keywords
        (``stdin_fd``, ``stdout_fd``, ``record``: an asciicast v2 recording of the session)
        are ``Spawned.interact``'s."""
        from .spawn import InteractOptions

        check_keywords("interact", options, InteractOptions)
        with self.spawn(None, tty=True, timeout=None) as s:
            return s.interact(escape, **options)

    # -- ssh argv for other tools ------------------------------------------------------
    def ssh_args(self) -> list[str]:
        """Options that make ``ssh``/``scp``/``sftp`` use this master: ``-o ControlPath=...``
        ``-o ControlMaster=no`` plus the connection's settings (no destination)."""
        return self._master.ssh_args()

    def __repr__(self) -> str:
        m = self._master
        state = "closed" if m.closed else ("open" if m.opened else "new")
        return f"<Connection {self.destination!r} {state} master_pid={m.pid}>"


def attach(
    target: str | os.PathLike[str] | Detached,
    destination: str | None = None,
    *,
    own: bool = False,
    **options: Unpack[ConnectOptions],
) -> Connection:
    """A Connection over a ControlMaster already running at ``target`` (a socket path, a
    ``Detached`` or its ``str()``), not owned by it unless ``own``: ``close()`` leaves it
    running (``own=True``: stops it and removes a detached master's directory).

    ``destination`` names the host for errors and for ``ssh -S``, scp and sftp over the
    master (default: the Detached's, else the socket path); ``options`` as for ``connect``
    (a Detached's settings are the defaults).  ``reconnect`` defaults to False: a lost
    master raises ``SSHConnectionError``; ``reconnect=True`` starts sshwrap's own in its
    place.  Commands run on proxy channels (OpenSSH >= 7.4 masters), else through ``ssh -S``.
    Raises ``SSHConnectionError`` when no master answers there."""
    conn = Connection.attached_to(target, destination, own=own, **options)
    try:
        return conn.open()
    except BaseException:
        conn.close()
        raise


def connect(destination: str, **options: Unpack[ConnectOptions]) -> Connection:
    """Start an OpenSSH master to ``destination`` owned by sshwrap; return the ``Connection``.

    Use it as a context manager (``with sshwrap.connect("web1") as c: c.run(...)``) or call
    ``close()``.  Raises ``AuthenticationError``, ``HostKeyError``, ``SSHConnectionError``
    like ``sshwrap.run`` when the master cannot connect.
    """
    return Connection(destination, **options).open()


def shell(
    destination: str,
    *,
    tty: bool = False,
    program: str = "sh",
    **options: Unpack[ConnectOptions],
) -> Shell:
    """A persistent remote shell on a Connection of its own: ``sshwrap.connect(destination,
    **options)`` and its :meth:`Connection.shell`; closing the shell closes the connection.

    ::

        with sshwrap.shell("web1") as sh:
            sh.run("cd /srv/app && . venv/bin/activate")
            r = sh.run("pytest -q", timeout=600)   # CompletedProcess: stdout, stderr apart

    The framing, the bounds and the limits are in :mod:`sshwrap.core.shell`."""
    check_shell_options(tty, program)
    conn = connect(destination, **options)
    try:
        return Shell.start(conn.master, program, owner=conn)
    except BaseException:
        conn.close()
        raise
