"""Starting a fan-out's children: ``os.posix_spawn`` with the environment taken once.

:class:`ChildStarter` starts each ssh of a run in a session of its own, its stdio the fds
given (``/dev/null`` for -1), no other fd inherited; :class:`SpawnedChild` is what it gives
back (``poll``/``wait`` as in ``subprocess.Popen``), or a ``Popen`` where posix_spawn cannot
do the job (:class:`Child` is either).  Used by :mod:`sshwrap.io.host_process`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Protocol

__all__ = ["Child", "ChildStarter", "SpawnedChild", "dev_null"]


_devnull: int | None = None


def dev_null() -> int:
    global _devnull
    if _devnull is None:
        _devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _devnull


class Child(Protocol):
    """A started child: ``subprocess.Popen`` or :class:`SpawnedChild`."""

    @property
    def pid(self) -> int: ...  # pragma: no cover - protocol

    @property
    def returncode(self) -> int | None: ...  # pragma: no cover - protocol

    def poll(self) -> int | None: ...  # pragma: no cover - protocol

    def wait(self) -> int: ...  # pragma: no cover - protocol


class SpawnedChild:
    """A child started by ``os.posix_spawn``: its pid, and ``poll``/``wait`` as in
    ``subprocess.Popen`` (``returncode`` is ``-signum`` for a signal)."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Reap the child if it has exited (never blocks); its ``returncode`` or None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 0  # reaped elsewhere (SIGCHLD ignored): as subprocess does
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        """Reap the child, blocking until it exits; its ``returncode``."""
        while self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                self.returncode = 0  # as subprocess does
            else:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


_MAX_CLOSES = 64
"""Inheritable fds that posix_spawn closes one by one in the child; more: ``subprocess``."""


def _inheritable_fds() -> list[int] | None:
    """This process's file descriptors above 2 that a child would inherit (None: unknown)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    found = []
    for name in names:
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # (the listing's own fd, closed since)
                if os.get_inheritable(fd):
                    found.append(fd)
    return found


def _vfork_exec() -> Callable[..., int] | None:
    """CPython's ``_posixsubprocess.fork_exec`` where its arguments are those this module
    passes (CPython 3.11 to 3.13, Linux: vfork + exec), else None."""
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 13):
        return None
    if not sys.platform.startswith("linux"):
        return None
    try:
        import _posixsubprocess
    except ImportError:  # pragma: no cover - CPython on Linux has it
        return None
    fork_exec: Callable[..., int] | None = getattr(_posixsubprocess, "fork_exec", None)
    return fork_exec


class ChildStarter:
    """Starts the children of one run, each in a session of its own.

    On Linux with CPython 3.11-3.13, ``subprocess``'s own C part
    (``_posixsubprocess.fork_exec``: vfork + exec, no Python in the child, safe with
    threads), called directly: the child takes this process's environment as it is
    (``execv``, no conversion), closes every fd but its stdio (``close_range``), and an
    exec failure comes back on the error pipe, as ``Popen`` does it; about half the
    parent's CPU of ``subprocess.Popen`` (whose Python part runs for every child) and less
    than ``os.posix_spawn`` (which converts the environment for every child).  A private
    API: used only where its arguments are known, and a ``TypeError`` from it (a changed
    signature) makes the starter fall back for good.  Elsewhere ``os.posix_spawn``
    (``clone(CLONE_VM | CLONE_VFORK)`` + exec) with the environment taken once, when this
    starter is made; like Popen's ``close_fds``, no fd but the child's stdio reaches it:
    sshwrap's own fds are all close-on-exec, and those this process holds that a child
    would inherit (a shell's, the caller's; listed once) are closed in the child
    (``POSIX_SPAWN_CLOSEFROM`` where there is one).  With more than a few of them, or
    without /proc, or where there is no ``posix_spawn`` with ``setsid``, children start
    through ``subprocess.Popen`` (vfork + exec) as before.
    """

    def __init__(self) -> None:
        self.proc_fds = f"/proc/{os.getpid()}/fd/"
        """This process's fds by path (Linux), for ssh's ``-E``."""
        self._null = dev_null()
        self._fork_exec = _vfork_exec()
        self._executables: dict[str, tuple[bytes, ...]] = {}
        self.env: dict[bytes, bytes] | dict[str, str] = {}
        self._closes: list[tuple[int, ...]] = []
        self.posix_spawn = False
        if self._fork_exec is None:
            self._posix_spawn_setup()

    def _posix_spawn_setup(self) -> None:
        self.env = dict(os.environb) if os.supports_bytes_environ else dict(os.environ)
        closefrom: int | None = getattr(os, "POSIX_SPAWN_CLOSEFROM", None)
        self.posix_spawn = hasattr(os, "posix_spawn")
        if closefrom is not None:
            self._closes = [(closefrom, 3)]
        elif self.posix_spawn:
            inherited = _inheritable_fds()
            if inherited is None or len(inherited) > _MAX_CLOSES:
                self.posix_spawn = False
            else:
                self._closes = [(os.POSIX_SPAWN_CLOSE, fd) for fd in sorted(inherited)]

    def start(self, argv: list[str], stdin: int = -1, stdout: int = -1, stderr: int = -1) -> Child:
        """Start ``argv`` with these fds as its stdio (-1: /dev/null); OSError if it cannot."""
        null = self._null
        if stdin < 0:
            stdin = null
        if stdout < 0:
            stdout = null
        if stderr < 0:
            stderr = null
        # (A source fd among 0-2 would need the dup2-onto-itself care that Popen takes.)
        if stdin > 2 and stdout > 2 and stderr > 2:
            if self._fork_exec is not None:
                try:
                    return SpawnedChild(self._vfork(argv, stdin, stdout, stderr))
                except TypeError:  # not the signature this was written for
                    self._fork_exec = None
                    self._posix_spawn_setup()
            if self.posix_spawn:
                return self._spawn(argv, [stdin, stdout, stderr])
        return subprocess.Popen(
            argv, stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True
        )

    def _vfork(self, argv: list[str], stdin: int, stdout: int, stderr: int) -> int:
        """The child's pid, started by ``_posixsubprocess.fork_exec`` (as ``Popen`` calls it
        with ``close_fds=True, start_new_session=True``, no ``env``)."""
        assert self._fork_exec is not None
        exe = argv[0]
        executables = self._executables.get(exe)
        if executables is None:
            if os.path.dirname(exe):
                executables = (os.fsencode(exe),)
            else:  # searched on PATH, as Popen does
                dirs = os.get_exec_path()
                executables = tuple(os.path.join(os.fsencode(d), os.fsencode(exe)) for d in dirs)
            self._executables[exe] = executables
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                pid = self._fork_exec(
                    argv, executables, True, (err_w,), None, None,
                    stdin, -1, -1, stdout, -1, stderr, err_r, err_w,
                    True, True, -1, None, None, None, -1, None, True,
                )  # fmt: skip
            finally:
                os.close(err_w)
            # vfork: the child has exec'd or failed by now; EOF is the exec's close-on-exec.
            said = os.read(err_r, 4096)
        finally:
            os.close(err_r)
        if not said:
            return pid
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        _, hex_errno, _ = said.split(b":", 2) if said.count(b":") >= 2 else (b"", b"0", b"")
        errno_num = int(hex_errno, 16) if hex_errno else 0
        raise OSError(errno_num, os.strerror(errno_num), exe)

    def _spawn(self, argv: list[str], fds: list[int]) -> Child:
        actions: list[tuple[int, ...]] = [
            (os.POSIX_SPAWN_DUP2, fds[0], 0),
            (os.POSIX_SPAWN_DUP2, fds[1], 1),
            (os.POSIX_SPAWN_DUP2, fds[2], 2),
        ]
        actions += self._closes  # (after the dup2s: one may close a source)
        spawn = os.posix_spawn if "/" in argv[0] else os.posix_spawnp
        try:
            pid = spawn(argv[0], argv, self.env, file_actions=actions, setsid=True)
            return SpawnedChild(pid)
        except NotImplementedError:  # no POSIX_SPAWN_SETSID here
            self.posix_spawn = False
        return subprocess.Popen(
            argv, stdin=fds[0], stdout=fds[1], stderr=fds[2], start_new_session=True
        )
