"""Masters sshwrap does not own: the user's own ControlMasters, and detached ones.

**Attaching.**  A :class:`sshwrap.io.master.Master` can use a ControlMaster that already
listens on a socket instead of starting one (:meth:`~sshwrap.io.master.Master.adopt`): an alive
check (``ssh -O check``) gives its pid, proxy mode (``MUX_C_PROXY``, OpenSSH >= 7.4) is asked
for as with sshwrap's own masters (commands then run on channels over it), and a master that
refuses it is used through ``ssh -S`` instead.  An attached master that sshwrap does not own
is never stopped by ``close()`` and never restarted: once it is gone, a call raises
``SSHConnectionError`` (no new master behind the user's back), unless ``reconnect=True`` was
asked for (then a new master of sshwrap's own, in a private directory, takes its place).

**The user's configured master** (:func:`configured_master`): ``ssh -G`` with the
connection's settings tells the ``ControlPath`` ssh would use for the host (with ``%C`` and
the other tokens expanded); a master that answers an alive check there is the one to attach.
:func:`config_env` reads the ``env`` ssh would send for a session from the same output.

**Detaching** (:class:`Detached`): a master sshwrap started outlives the program once its
Master is detached (:meth:`~sshwrap.io.master.Master.detach`): the finalizer that would stop it
at exit is turned off, and its private socket directory (``$XDG_RUNTIME_DIR/sshwrap-XXXXXXXX``,
else ``$TMPDIR`` or ``/tmp``, mode 0700) stays, with the socket and the master's log.  The
:class:`Detached` value (picklable; ``str()`` gives a JSON text that :meth:`Detached.parse`
reads back) is what a later process needs to attach again; attaching it with ``own=True``
(or closing an attachment with ``stop=True``) finally stops the master (``-O exit``, its pid
waited for, SIGKILL after 2 s) and removes that directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .deadline import local_step
from .mux_control import MuxControl, MuxError, master_answers

__all__ = [
    "SUN_PATH_MAX",
    "Detached",
    "attach_target",
    "config_env",
    "configured_control_path",
    "configured_master",
    "own_cmdlines",
    "pid_alive",
    "processes_with_arg",
    "socket_dir",
    "stop_master",
]

SUN_PATH_MAX = 104
"""Longest unix socket path sshwrap accepts (macOS's ``sun_path``; Linux allows 108)."""
_BIND_SUFFIX = 17  # ".%16s" that OpenSSH appends to ControlPath while binding
_STOP_WAIT = 2.0  # -O exit, then SIGKILL: bounded, also in the finalizer at interpreter exit
_G_TIMEOUT = 30.0  # ssh -G reads only the config files
_ANSWER_TIMEOUT = 5.0  # a local master's answer to an alive check


@dataclasses.dataclass(frozen=True)
class Detached:
    """What a later process needs to attach to a detached master of sshwrap's.

    ``control_path``: the master's socket; ``destination``: the host it is logged in to;
    ``pid``: the master's pid when it was detached; ``directory``: its private socket
    directory (removed when it is finally stopped); ``settings``: the connection's ssh
    settings (``config``, ``user``, ``port``, ...: for ``ssh -S``, scp and sftp over it).
    Picklable; ``str(d)`` is a JSON text and ``Detached.parse(str(d)) == d``.
    """

    control_path: str
    destination: str
    pid: int
    directory: str | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return json.dumps(
            {"sshwrap_detached": 1, **dataclasses.asdict(self), "settings": dict(self.settings)},
            default=os.fspath,
            sort_keys=True,
        )

    @classmethod
    def parse(cls, text: str) -> Detached:
        """The ``Detached`` whose ``str()`` is ``text`` (``ValueError`` for anything else)."""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.pop("sshwrap_detached", None) != 1:
            raise ValueError("not the text of a detached sshwrap master (str(Detached))")
        try:
            d = cls(**data)
        except TypeError as e:
            raise ValueError(f"not the text of a detached sshwrap master: {e}") from None
        if not isinstance(d.control_path, str) or not isinstance(d.pid, int):
            raise ValueError("not the text of a detached sshwrap master (its fields)")
        return d


def attach_target(target: str | os.PathLike[str] | Detached) -> Detached:
    """``target`` as a :class:`Detached`: a socket path (destination and pid unknown: empty
    and 0), the text of ``str(Detached)``, or a ``Detached`` as it is."""
    if isinstance(target, Detached):
        return target
    path = os.fspath(target)
    if not isinstance(path, str) or not path:
        raise ValueError("attach needs a control socket path or a Detached master")
    if path.lstrip().startswith("{"):
        return Detached.parse(path)
    return Detached(control_path=os.path.expanduser(path), destination="", pid=0)


def config_env(config: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``env`` ssh sends for a session, from ``ssh -G``'s output ``config`` (its
    ``sendenv`` and ``setenv`` lines: others are ignored): the ``SendEnv`` matches of
    ``environ`` (default ``os.environ``), then the ``SetEnv`` values."""
    send: list[str] = []
    env: dict[str, str] = {}
    for line in config.splitlines():
        key, _, value = line.partition(" ")
        if key == "sendenv":
            send.append(value)
        elif key == "setenv":
            name, eq, val = value.partition("=")
            if eq:
                env[name] = val
    if not send:
        return env
    source = os.environ if environ is None else environ
    sent = {k: v for k, v in source.items() if any(fnmatch.fnmatchcase(k, p) for p in send)}
    return {**sent, **env}


def configured_control_path(
    ssh: str, settings_args: Sequence[str], destination: str, deadline: float | None = None
) -> str | None:
    """The ``ControlPath`` ssh would use for ``destination`` with these settings (``ssh -G``,
    tokens expanded), or None when there is none (or ``ssh -G`` fails)."""
    try:
        out = subprocess.run(
            [ssh, "-G", *settings_args, "--", destination],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=local_step(_G_TIMEOUT, deadline),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        if key == "controlpath" and value and value.lower() != "none":
            return os.path.expanduser(value)
    return None


def configured_master(
    ssh: str, settings_args: Sequence[str], destination: str, deadline: float | None = None
) -> str | None:
    """The user's configured ControlPath for ``destination`` if a master answers there now."""
    path = configured_control_path(ssh, settings_args, destination, deadline)
    if path is None or not master_answers(path, local_step(_ANSWER_TIMEOUT, deadline)):
        return None
    return path


def socket_dir() -> str:
    """A new private (0700) directory for a master of sshwrap's, whose ``m`` socket path
    fits ``sun_path``."""
    candidates = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        candidates.append(runtime)
    candidates += [tempfile.gettempdir(), "/tmp"]
    for base in candidates:
        # mkdtemp adds 8 characters to the prefix: check before creating anything.
        probe = os.path.join(base, "sshwrap-" + "x" * 8, "m")
        if len(os.fsencode(probe)) + _BIND_SUFFIX > SUN_PATH_MAX:
            continue
        with contextlib.suppress(OSError):
            d = tempfile.mkdtemp(prefix="sshwrap-", dir=base)
            os.chmod(d, 0o700)
            return d
    raise OSError("no temporary directory short enough for a control socket (sun_path)")


def stop_master(control_path: str, pid: int, directory: str | None) -> None:
    """``-O exit``, wait for the master's pid to go (SIGKILL after 2 s), remove its dir.

    Bounded (about 4 s at most: a master that does not answer on its socket within 2 s is
    killed), so it may run from a finalizer at interpreter exit."""
    with contextlib.suppress(MuxError), MuxControl(control_path, timeout=_STOP_WAIT) as m:
        m.terminate()
    if pid:
        deadline = time.monotonic() + _STOP_WAIT
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def own_cmdlines() -> Iterator[tuple[int, bytes]]:
    """``(pid, /proc/PID/cmdline)`` of each of this user's processes (none without /proc)."""
    uid = os.getuid()
    try:
        names = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return
    for name in names:
        try:
            mine = os.stat(f"/proc/{name}").st_uid == uid
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes() if mine else None
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if cmdline is not None:
            yield int(name), cmdline


def processes_with_arg(arg: str) -> list[int]:
    """Pids of this user's processes that have ``arg`` as one of their arguments."""
    want = arg.encode()
    return [pid for pid, cmdline in own_cmdlines() if want in cmdline.split(b"\0")]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        return st[st.rindex(b")") + 2 : st.rindex(b")") + 3] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
