"""Masters that outlive a run: their private directory, how long they stay, closing them.

A run with ``persist=`` (``sshwrap-many --persist``) gives every host's ssh OpenSSH's own
``ControlMaster=auto``, ``ControlPersist=<seconds>`` and ``ControlPath=<dir>/%C``
(:func:`persist_options`).  The first ssh to a host logs in, forks its master into the
background and runs its command through it; every later ssh to that host (this run's remote
stop, the next run) finds the socket and runs as a client of that master: no new connection,
no key exchange.  ``%C`` is ssh's hash of the local host name, the remote host, port, user
and ProxyJump, so the same host reached with the same settings finds the same master.
Two aliases of one address, port and user share one master, and so that server's
``MaxSessions`` (10 by default): a session beyond it is refused by the server, and ssh logs
in anew on a connection of its own for it (it still runs).

**Pitfall 8** (a ControlPersist master that inherits a pipe keeps it open forever): OpenSSH's
``control_persist_detach`` (ssh.c) forks, and the child that stays the master puts its stdin,
stdout and stderr on ``/dev/null`` (``stdfd_devnull``; stderr kept only when the log goes to
stderr in debug mode, never with ``-E``), then ``daemon(1, 1)`` (a session of its own: a stop
of the run's ssh by process group does not reach it).  So the run's stdout and stderr pipes
close when the client ssh exits, and the run ends at once.  The one fd the master keeps is
ssh's ``-E`` log (a pipe of the run's); the run closes its end when the host is done, and
the master's later log lines fail with ``EPIPE`` (ssh ignores ``SIGPIPE``).

**A master that died** (killed, its connection gone) leaves its socket behind; ssh itself
removes it (``Stale control socket, unlinking``, mux.c ``muxclient``: the connect is refused)
and logs in anew, becoming the new master: not a host failure.

**The directory** (:func:`persist_dir`): ``$XDG_RUNTIME_DIR/sshwrap/cm`` when that variable
names a directory and the socket paths fit; else ``$TMPDIR/sshwrap-<uid>/cm``, else
``/tmp/sshwrap-<uid>/cm``.  A socket path must fit ``sun_path`` (104 bytes, macOS's; Linux
has 108) with the 17-byte ``.XXXXXXXXXXXXXXXX`` suffix OpenSSH appends while binding.  Both
directories are created mode 0700 and checked before every use: a real directory (not a
symbolic link), owned by this user, no group or other access, in a parent that only its
owner or root can change (or a sticky one such as ``/tmp``).  Anything else raises
:class:`PersistDirError` naming the path and what is wrong: masters are never shared across
users.

**Closing** (:func:`close_masters`): each socket is asked for its master's pid (the mux
protocol's alive check, ``ssh -O check``; a master that cannot answer, stopped or frozen, by
the process title OpenSSH gives it, ``ssh: PATH [mux]``), every master is sent SIGTERM by
that pid (a process of another user's is never signalled), and each is waited for, bounded,
until it exited (SIGKILL after the bound) and its socket is gone.  A socket nothing listens
on is removed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import select
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping
from typing import TypeVar

from .attach import own_cmdlines
from .master import SUN_PATH_MAX
from .mux_control import MuxControl, MuxError

__all__ = [
    "PERSIST_DEFAULT",
    "PersistDirError",
    "close_masters",
    "control_paths",
    "persist_dir",
    "persist_options",
    "persist_seconds",
    "persisted_sockets",
    "ssh_seconds",
]

PERSIST_DEFAULT = 600
"""Seconds a master stays up after its last client with ``persist=True`` (10 minutes).

Not ssh's own ``ControlPersist=yes`` (forever): a master nobody closes would hold a login on
every host until it is killed."""

_MAX_SECONDS = 2**31 - 1  # ssh's time values are ints
_BIND_SUFFIX = 17  # ".%16s" that OpenSSH appends to ControlPath while binding
_HASH = re.compile(r"[0-9a-f]{40}\Z")  # what %C expands to (a SHA-1 in hex)
_PERSIST_KEYS = ("ControlMaster", "ControlPersist", "ControlPath")
_ALIVE_TIMEOUT = 2.0  # longest wait for one master's answer to the alive check
_TIME = re.compile(r"(\d+)([smhdw]?)", re.IGNORECASE)
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

V = TypeVar("V")


class PersistDirError(OSError):
    """The persisted masters' directory is not safe to use (a symbolic link, another user's,
    group or world accessible, in a directory others can change) or cannot be made."""


# -- persist times ---------------------------------------------------------------------


def ssh_seconds(value: str) -> float | None:
    """Seconds in ssh's time format (``30``, ``1m``, ``1h30m``; a plain ``2.5`` too), or None
    if ``value`` is none, or not positive."""
    text = value.strip()
    with contextlib.suppress(ValueError):
        seconds = float(text)
        return seconds if seconds > 0 and math.isfinite(seconds) else None
    pos, total = 0, 0
    while pos < len(text):
        m = _TIME.match(text, pos)
        if m is None:
            return None
        total += int(m.group(1)) * _TIME_UNITS[m.group(2).lower()]
        pos = m.end()
    return float(total) if total > 0 else None


def persist_seconds(persist: object) -> int:
    """``persist=`` as whole seconds for ``ControlPersist`` (a fraction rounds up).

    ``True`` is :data:`PERSIST_DEFAULT`; a positive number is seconds; a ``str`` is ssh's time
    format (``"30s"``, ``"10m"``, ``"1h"``, ``"1h30m"``, ``"600"``).  Anything else, zero,
    negative or over ``2**31 - 1`` seconds raises ``ValueError`` (``TypeError`` for a type
    that is none of these)."""
    if persist is True:
        return PERSIST_DEFAULT
    if isinstance(persist, bool):
        raise ValueError("persist=False: leave persist out (or None) for no persisted masters")
    seconds: float | None
    if isinstance(persist, int | float):
        seconds = float(persist) if persist > 0 and math.isfinite(persist) else None
    elif isinstance(persist, str):
        seconds = ssh_seconds(persist)
    else:
        raise TypeError(
            "persist must be True, seconds (a number) or a time such as '10m', "
            f"not {type(persist).__name__}"
        )
    if seconds is None or seconds > _MAX_SECONDS:
        raise ValueError(
            f"persist={persist!r}: want True, positive seconds or a time such as "
            "'30s', '10m', '1h', '1h30m'"
        )
    return max(1, math.ceil(seconds))


def persist_options(
    seconds: int | None, directory: str, options: Mapping[str, V] | None = None
) -> dict[str, V | str]:
    """``options`` with the persisted masters' ssh options in front (they win: ssh takes the
    first value).  ``seconds`` None: only ``ControlPath`` (what ``%C`` needs for ``ssh -G``).

    An option of the three given in ``options`` too is a ``ValueError``."""
    for key in options or {}:
        for name in _PERSIST_KEYS:
            if key.lower() == name.lower():
                raise ValueError(
                    f"persisted masters set {name} themselves: do not give it in the "
                    "ssh options too"
                )
    ours: dict[str, V | str] = {"ControlPath": os.path.join(directory, "%C")}
    if seconds is not None:
        ours = {"ControlMaster": "auto", "ControlPersist": str(seconds), **ours}
    return {**ours, **(options or {})}


# -- the directory ---------------------------------------------------------------------


def _fits(directory: str) -> bool:
    path = os.path.join(directory, "0" * 40)
    return len(os.fsencode(path)) + _BIND_SUFFIX <= SUN_PATH_MAX


def _candidates() -> list[tuple[str, str]]:
    """(parent, top directory) pairs, in order of preference."""
    uid = os.geteuid()
    out = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        out.append((runtime, os.path.join(runtime, "sshwrap")))
    tmp = os.environ.get("TMPDIR")
    for base in ([tmp] if tmp and os.path.isabs(tmp) and os.path.isdir(tmp) else []) + ["/tmp"]:
        out.append((base, os.path.join(base, f"sshwrap-{uid}")))
    return out


def _check_parent(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise PersistDirError(f"{path}: {e.strerror}") from None
    if st.st_uid not in (0, os.geteuid()):
        raise PersistDirError(
            f"{path}: owned by uid {st.st_uid}: refusing to keep ssh masters under it"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise PersistDirError(
            f"{path}: writable by others and not sticky: refusing to keep ssh masters under it"
        )


def _check_private(path: str) -> None:
    """``path`` is a directory of this user's with no group or other access, else raise."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise PersistDirError(f"{path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise PersistDirError(f"{path}: is a symbolic link, not sshwrap's private directory")
    if not stat.S_ISDIR(st.st_mode):
        raise PersistDirError(f"{path}: is not a directory")
    if st.st_uid != os.geteuid():
        raise PersistDirError(
            f"{path}: owned by uid {st.st_uid}, not by this user ({os.geteuid()}): "
            "persisted masters are never shared"
        )
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        raise PersistDirError(
            f"{path}: mode {mode:04o} gives others access; it must be 0700 (chmod 700 {path})"
        )


def _private_dir(path: str, create: bool) -> bool:
    """Check (creating it 0700 first if asked) one private directory; False: absent."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise PersistDirError(f"cannot create {path}: {e.strerror}") from None
    elif not os.path.lexists(path):
        return False
    _check_private(path)
    return True


def persist_dir(*, create: bool = True) -> str | None:
    """The persisted masters' directory, checked (module docstring); None when ``create`` is
    off and it does not exist.  Raises :class:`PersistDirError` if it is unsafe, or if no
    candidate is short enough for a socket path."""
    for parent, top in _candidates():
        cm = os.path.join(top, "cm")
        if not _fits(cm):
            continue
        _check_parent(parent)
        if not _private_dir(top, create) or not _private_dir(cm, create):
            return None
        return cm
    raise PersistDirError("no directory short enough for a control socket path (sun_path)")


def persisted_sockets(directory: str) -> list[str]:
    """The control sockets in ``directory`` (names as ``%C`` makes them), sorted."""
    out = []
    with os.scandir(directory) as it:
        for entry in it:
            if _HASH.match(entry.name) and stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                out.append(entry.path)
    return sorted(out)


def control_paths(
    argvs: Mapping[str, list[str]], *, timeout: float = 10.0, parallel: int = 32
) -> dict[str, str]:
    """Each host's ``controlpath`` from its ``ssh -G`` command line (``argvs``: host -> argv).

    ``parallel`` at a time; the whole is bounded by ``timeout`` (then every ssh left is
    killed and reaped, and ``TimeoutError`` raised).  An ssh that fails raises ``ValueError``
    with its own words."""
    until = time.monotonic() + timeout
    out: dict[str, str] = {}
    items = list(argvs.items())
    for start in range(0, len(items), parallel):
        batch = items[start : start + parallel]
        procs = []
        try:
            for host, argv in batch:
                procs.append((host, _popen(argv)))
            for host, proc in procs:
                left = until - time.monotonic()
                try:
                    stdout, stderr = proc.communicate(timeout=max(0.0, left))
                except subprocess.TimeoutExpired:
                    raise TimeoutError(f"ssh -G {host} took over {timeout:g} s") from None
                if proc.returncode != 0:
                    why = stderr.decode(errors="replace").strip() or f"exit {proc.returncode}"
                    raise ValueError(f"ssh -G {host}: {why}")
                out[host] = _controlpath(host, stdout.decode(errors="replace"))
        finally:
            for _, proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()
    return out


def _popen(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _controlpath(host: str, config: str) -> str:
    for line in config.splitlines():
        key, _, value = line.partition(" ")
        if key == "controlpath":
            return value
    raise ValueError(f"ssh -G {host}: no controlpath in its output")


# -- closing ---------------------------------------------------------------------------


def _owned_by_me(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.geteuid()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc here: the socket was in this user's private directory


def _titled(path: str) -> int:
    """The pid of this user's process titled as OpenSSH titles the master of ``path``
    (``ssh: PATH [mux]``, ssh.c ``control_persist_detach``), else 0."""
    want = f"ssh: {path} [mux]".encode()
    return next((pid for pid, cmdline in own_cmdlines() if cmdline.rstrip(b"\0") == want), 0)


def _refused(path: str) -> bool:
    """True if nothing listens on the unix socket ``path`` (a master that died)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(_ALIVE_TIMEOUT)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
        except OSError:
            return False
    return False


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        return st[st.rindex(b")") + 2 : st.rindex(b")") + 3] in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _wait_exits(pids: Iterable[int], until: float) -> set[int]:
    """Wait until every pid has exited or ``until``; the pids still running."""
    fds: dict[int, int] = {}
    left = set(pids)
    polled: set[int] = set()  # no pidfd for these (not Linux): /proc is read every 10 ms
    poller = select.poll()
    try:
        for pid in list(left):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                left.discard(pid)
                continue
            except (AttributeError, OSError):
                polled.add(pid)
                continue
            fds[fd] = pid
            poller.register(fd, select.POLLIN)  # readable once it has exited (a zombie too)
        while left:
            left -= {p for p in polled & left if _exited(p)}
            now = time.monotonic()
            if not left or now >= until:
                break
            wait = min(until - now, 0.01) if polled & left else until - now
            for fd, _ in poller.poll(max(1, math.ceil(wait * 1000))):
                poller.unregister(fd)
                left.discard(fds[fd])
    finally:
        for fd in fds:
            os.close(fd)
    return left


def close_masters(paths: Iterable[str], timeout: float = 5.0) -> int:
    """End the masters listening on ``paths`` by their own pids; how many were running.

    Each is asked for its pid (alive check), then all get SIGTERM at once; one still running
    after ``timeout`` seconds gets SIGKILL (and is waited for 1 s more).  Every socket of
    ``paths`` is gone afterwards: a master removes its own on exit, the rest (a master that
    died or was killed) are removed here.  A path that does not exist is skipped."""
    until = time.monotonic() + timeout
    masters: dict[int, str] = {}
    sockets: list[str] = []
    for path in paths:
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
        except FileNotFoundError:
            continue
        sockets.append(path)
        try:
            left = max(0.1, min(_ALIVE_TIMEOUT, until - time.monotonic()))
            with MuxControl(path, timeout=left) as m:
                pid = m.alive_check()
        except MuxError:
            # Nothing listens (removed below), or a master that cannot answer (stopped,
            # frozen): that one is found by the title OpenSSH gives it.
            pid = 0 if _refused(path) else _titled(path)
        if pid > 1 and _owned_by_me(pid):
            masters[pid] = path
    for pid in masters:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # a stopped master acts on the TERM too
    running = _wait_exits(masters, until)
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if running:
        _wait_exits(running, time.monotonic() + 1.0)
    for path in sockets:
        if os.path.lexists(path) and (path in masters.values() or _refused(path)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return len(masters)
