"""Job control for the interactive relay, so that ssh's ``~^Z`` suspends as under plain ssh.

ptyprocess makes the program it starts the leader of a new session on the pty.  A session
leader's process group has no parent in another group of the same session: it is *orphaned*,
and the kernel discards SIGTSTP sent to an orphaned group.  ssh's ``~^Z`` is
``kill(getpid(), SIGTSTP)``, so it did nothing.

Here the pty's session leader is instead a small supervisor: the child that ptyprocess forks,
which never execs.  It forks ssh into a process group of its own and makes that group the
pty's foreground group, so ssh's group has a parent (the supervisor) in the same session and
stops as it would under a shell.  The supervisor then waits, with every signal it cares about
blocked and taken by ``sigwait`` (no handler runs in it):

- ssh stopped: the supervisor stops itself with SIGSTOP (which an orphaned group does not
  discard).  sshwrap, its parent, sees the stop (:func:`child_stopped`), gives the user's
  terminal its own modes back and stops itself with SIGTSTP, as ssh would have (the shell
  prints "Stopped").  On ``fg`` sshwrap goes raw again, sets the pty's size, and continues
  the supervisor, which continues ssh (:func:`resume_child`).
- SIGTERM/SIGHUP/SIGINT/SIGQUIT sent to the supervisor (sshwrap forwards them there) go to ssh.
- ssh exited: the supervisor exits with ssh's status, or dies of ssh's signal, so sshwrap
  sees exactly what it would have seen from ssh itself.

The supervisor keeps no descriptor of the pty or of ptyprocess's exec-error pipe: EOF on the
pty master and the "exec succeeded" signal come from ssh alone, as before.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Callable

__all__ = ["child_stopped", "resume_child", "supervised_preexec"]

_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
_WATCHED = {signal.SIGCHLD, *_FORWARDED}


def supervised_preexec(then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` for ``PtyProcess.spawn`` that puts a job-control supervisor first.

    In the forked child it forks once more: the new process (which goes on to exec the
    program) gets a process group of its own, made the pty's foreground group, and runs
    ``then`` (if given); the child itself becomes the supervisor and never returns.
    """

    def preexec() -> None:
        for sig in _WATCHED:
            signal.signal(sig, signal.SIG_DFL)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            # tcsetpgrp from a background group raises SIGTTOU unless it is ignored.
            previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(0, os.getpid())
            signal.signal(signal.SIGTTOU, previous)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if then is not None:
                then()
            return
        _supervise(pid)

    return preexec


def _supervise(pid: int) -> None:
    """The supervisor's life (see the module docstring); ends the process, never returns."""
    try:
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also done by the child: whichever runs first wins
        # Dying of ssh's signal (below) must not leave a core of this process behind.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        while True:
            sig = signal.sigwait(_WATCHED)
            if sig != signal.SIGCHLD:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                continue
            while True:
                got, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
                if got == 0:
                    break
                if os.WIFSTOPPED(status):
                    os.kill(os.getpid(), signal.SIGSTOP)
                    # Continued (by sshwrap, once its user is back): continue ssh.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGCONT)
                    continue
                if os.WIFSIGNALED(status):
                    sig = os.WTERMSIG(status)
                    with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler
                        signal.signal(sig, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
                    os.kill(os.getpid(), sig)
                    os._exit(128 + sig)
                os._exit(os.waitstatus_to_exitcode(status))
    except BaseException:
        pass
    os._exit(255)


def child_stopped(pid: int) -> bool:
    """True (once per stop) if child ``pid`` has stopped; never reaps an exited child."""
    try:
        info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG)
    except ChildProcessError:
        return False
    return info is not None and info.si_code == os.CLD_STOPPED


def resume_child(pid: int) -> None:
    """Continue a stopped supervisor (it then continues ssh)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
