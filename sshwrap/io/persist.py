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

**The index** (:class:`MasterIndex`, the file ``index`` in the directory, 0600): which socket
serves which host, so a later run finds a host's master without any ssh process.  A run with
``persist=`` asks ``ssh -G`` once for each host that it reached through ssh and that the index
did not know (``controlpath``, and the ``sendenv``/``setenv`` lines that say a session's
``env``), after its hosts are done; a later run looks the host up by a key (:func:`index_key`)
of the ssh binary, the ssh settings (``ControlPersist`` aside), the destination and the
config files' stamps (:func:`config_stamp`: size and mtime of the ``-F`` file, ``~/.ssh/config``,
``/etc/ssh/ssh_config``, and the entries of ``~/.ssh`` and ``/etc/ssh/ssh_config.d``), so a
changed config is a new key.  An entry names a socket of this directory only (a ``%C`` name:
the index cannot send a host elsewhere); a file that is not this user's regular 0600 file, or
that does not parse, counts as empty.  An ``Include`` outside those paths is not stamped: after
changing such a file, ``close_persisted()`` (``--close``) first.

**Closing** (:func:`close_masters`): each socket is asked for its master's pid (the mux
protocol's alive check, ``ssh -O check``; a master that cannot answer, stopped or frozen, by
the process title OpenSSH gives it, ``ssh: PATH [mux]``), every master is sent SIGTERM by
that pid (a process of another user's is never signalled), and each is waited for, bounded,
until it exited (SIGKILL after the bound) and its socket is gone.  A socket nothing listens
on is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import select
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .attach import own_cmdlines
from .master import SUN_PATH_MAX
from .mux_control import MuxControl, MuxError

__all__ = [
    "PERSIST_DEFAULT",
    "IndexEntry",
    "MasterIndex",
    "PersistDirError",
    "close_masters",
    "config_stamp",
    "control_paths",
    "index_key",
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


# -- the index -------------------------------------------------------------------------

_INDEX = "index"
_ENV_KEYS = ("sendenv", "setenv")


def config_stamp(settings: Sequence[str]) -> list[object]:
    """Size and mtime of the config files ssh reads with ``settings`` (module docstring)."""
    paths = [settings[i + 1] for i, a in enumerate(settings[:-1]) if a == "-F"]
    home = os.path.expanduser("~/.ssh")
    paths += [os.path.join(home, "config"), "/etc/ssh/ssh_config", home, "/etc/ssh/ssh_config.d"]
    stamp: list[object] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamp.append(None)
            continue
        stamp.append([st.st_size, st.st_mtime_ns])
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(OSError), os.scandir(path) as it:
                for e in sorted(it, key=lambda e: e.name):
                    with contextlib.suppress(OSError):
                        es = e.stat()
                        stamp.append([e.name, es.st_size, es.st_mtime_ns])
    return stamp


def index_key(ssh: str, settings: Sequence[str], destination: str, stamp: object) -> str:
    """The index key of ``destination`` reached by ``ssh`` with ``settings``."""
    kept = [a for a in settings if not a.lower().startswith("controlpersist=")]
    text = json.dumps([ssh, kept, destination, stamp], separators=(",", ":"))
    return hashlib.sha256(text.encode(errors="surrogateescape")).hexdigest()


@dataclass(frozen=True)
class IndexEntry:
    """A host's master: its socket, and ``ssh -G``'s ``sendenv``/``setenv`` lines."""

    control_path: str
    env_lines: tuple[str, ...] = ()


class MasterIndex:
    """The index of the persisted masters' directory (module docstring)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.entries: dict[str, IndexEntry] = {}
        self._new: dict[str, IndexEntry] = {}
        self._read()

    def _read(self) -> None:
        path = os.path.join(self.directory, _INDEX)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                return
            try:
                data = json.loads(f.read())
            except ValueError:
                return
        if not isinstance(data, dict):
            return
        for key, value in data.items():
            if not (isinstance(key, str) and isinstance(value, dict)):
                continue
            sock, env = value.get("path"), value.get("env", [])
            if not isinstance(env, list) or not all(isinstance(x, str) for x in env):
                continue
            if isinstance(sock, str) and self._ours(sock):
                self.entries[key] = IndexEntry(sock, tuple(env))

    def _ours(self, sock: str) -> bool:
        return os.path.dirname(sock) == self.directory and bool(_HASH.match(os.path.basename(sock)))

    def get(self, key: str) -> IndexEntry | None:
        """The entry of ``key``, if any."""
        return self.entries.get(key)

    def add(self, key: str, config: str) -> None:
        """Record ``key`` from its ``ssh -G`` output (a socket outside the directory: not)."""
        sock = _controlpath("", config) if "controlpath " in config else ""
        if not self._ours(sock):
            return
        env = tuple(ln for ln in config.splitlines() if ln.partition(" ")[0] in _ENV_KEYS)
        self.entries[key] = self._new[key] = IndexEntry(sock, env)

    def prune(self) -> None:
        """Drop the entries whose socket is gone (the file too, once none is left)."""
        gone = [k for k, e in self.entries.items() if not os.path.lexists(e.control_path)]
        if not gone:
            return
        for k in gone:
            del self.entries[k]
        if not self.entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, _INDEX))
            return
        self._new = dict(self.entries)
        self.save(merge=False)

    def save(self, *, merge: bool = True) -> None:
        """Write the entries added (merged with the file's, read again now) atomically."""
        if not self._new:
            return
        merged = MasterIndex(self.directory).entries if merge else {}
        merged.update(self._new)
        data = {k: {"path": e.control_path, "env": list(e.env_lines)} for k, e in merged.items()}
        fd, tmp = tempfile.mkstemp(prefix=".index.", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, os.path.join(self.directory, _INDEX))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._new.clear()


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
