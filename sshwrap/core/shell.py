"""A persistent remote shell on one session channel: the framing, written once for both faces.

``Connection.shell()`` / ``await AsyncConnection.shell()`` / ``sshwrap.shell(host)`` keep one
POSIX ``sh`` running on a session channel of the master (a
:class:`~sshwrap.core.channel_popen.ChannelPopen` of ``exec sh`` with three pipes) and run
each command *in* that shell, so ``cd``, variables, functions and an activated virtualenv
persist from one ``run`` to the next.  :class:`ShellSession` holds the shell; its
:meth:`~ShellSession.run` and :meth:`~ShellSession.close` are procedures of
:mod:`sshwrap.core.waiting` (``run_sync`` for the sync face, ``run_async`` for the async one).

**Why sh.**  The framing needs POSIX sh semantics (``command eval``, fds 8 and 9,
``printf``), so the channel runs ``exec sh`` whatever the user's login shell is (bash, zsh,
fish...: the login shell only execs it).  ``program`` picks another POSIX shell (``bash``,
``dash``, ``ksh``; not fish or csh).

**Framing, no prompts.**  At the start the shell saves its stdout and stderr as fds 8 and 9
and says its pid after a random token on both streams (what a login script printed before is
dropped).  Each ``run`` sends, on the shell's stdin::

    __sw_c='<the command, single-quoted>'
    { command eval "$__sw_c"; } </dev/null 8>&- 9>&-
    __sw_s=$?; printf '\\n%s\\n' TOKEN >&9; printf '\\n%s %s\\n' TOKEN "$__sw_s" >&8

with a fresh random token (128 bits) per run: the command's stdout ends with a newline and
``TOKEN STATUS``, its stderr with a newline and ``TOKEN``, each matched as whole lines, and
that newline is taken off again, so the output is byte exact.  Output printing a look-alike
marker cannot end a command early: it does not know the token.  ``command eval`` keeps a
syntax error from ending the shell; the command's stdin is ``/dev/null``, or with ``input=``
a temporary file ``$TMPDIR/.sshwrap-shell-TOKEN`` (created 0600 with ``set -C``, written
by ``printf`` builtins, removed after the command).

**Timeout and interrupts.**  There is no job control without a terminal (dash refuses
``set -m``), and the command runs in the shell process itself (that is what keeps its state),
so a timeout opens a second channel that kills every process the shell started (its
descendants, found with ``ps``, or in ``/proc``, and ``awk``: TERM, then KILL after
``kill_after``; the shell itself is spared) until the end markers arrive; the call then raises
``TimeoutExpired`` with the output so far and the shell serves the next ``run``.  Builtins
left in the same command line still run (``sleep 100; echo after`` prints ``after``), and
background jobs the shell started are killed too.  A command that does not end in that bound
(a loop of builtins) gets the shell stopped: ``TimeoutExpired``, and the next ``run`` raises
:class:`ShellError`.  Ctrl-C and cancellation do the same within the same bound.  The call
returns within ``timeout + kill_after + 2.5`` s (about ``timeout`` when the command dies at
its first TERM).

**Not supported.**  ``set -e`` makes the shell exit at the first failing command (as it
would in a terminal).  ``tty=True`` is refused (a terminal would merge stdout and stderr and
echo the framing; use ``Connection.spawn`` for a terminal).  A command that ``exit``\\ s, or
``exec``\\ s another program, ends the shell (:class:`ShellError` on that run and after).  Output
a background job writes after its run ended arrives with the next run's output.  A command
killed by a signal has the shell's status ``128 + signum``.  The ``ssh -S`` fallback (a master
that refuses proxy mode) has no shell: :class:`ShellError`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import subprocess
from collections.abc import Sequence
from typing import Any, Unpack, cast

from ..errors import CalledProcessError, SSHError, TimeoutExpired
from ..io.channel_io import read_ready
from ..io.deadline import capped, deadline_after
from ..io.master import Master
from ..io.pump import ProxyCore, Session
from .argv import remote_command
from .channel_popen import ChannelPopen
from .channel_streams import RunStreams, decode
from .commands import start_command
from .completed import CompletedProcess
from .options import Command, TextOptions, check_keywords, text_encoding, text_option
from .session import KILL_AFTER, hang_up, start_on_channel, stop
from .waiting import Procedure, WaitFd, WaitFlag, run_sync

__all__ = [
    "KILL_POLL",
    "START_TIMEOUT",
    "Shell",
    "ShellError",
    "ShellRunOptions",
    "ShellSession",
    "check_shell_options",
    "open_shell",
    "quote",
]

START_TIMEOUT = 30.0
"""Seconds the shell may take to answer its start (login scripts included)."""
KILL_POLL = 0.1
"""Seconds between two rounds of the timeout's kill of the shell's processes."""
_SETTLE = 1.0
"""Seconds after the KILL round starts that a timed-out command may take to reach its end
marker before the shell itself is stopped."""
_CLOSE_WAIT = 2.0
"""Seconds ``close()`` waits for the shell to exit at the end of its input."""
_READ = 256 * 1024


class ShellRunOptions(TextOptions, total=False):
    """The keywords of ``Shell.run`` (and ``AsyncShell.run``) after the command: text mode as
    in ``subprocess``, ``input``, ``timeout``, ``check`` and ``kill_after`` (TERM -> KILL of
    a timed-out command's processes)."""

    input: bytes | str | None
    timeout: float | None
    check: bool
    kill_after: float


class ShellError(SSHError):
    """The remote shell is gone (it exited, was killed, or its connection was lost) or
    could not start; ``host`` names the host.  ``returncode`` is the shell's exit status when
    it is known, else 255."""


def quote(data: bytes) -> bytes:
    """``data`` as one single-quoted sh word (exact for every byte but NUL)."""
    return b"'" + data.replace(b"'", b"'\\''") + b"'"


def _printf_words(data: bytes) -> bytes:
    """sh builtins that write ``data`` exactly (NUL bytes as ``printf '\\000'``)."""
    parts = data.split(b"\0")
    out = []
    for i, part in enumerate(parts):
        if part:
            out.append(b"printf '%s' " + quote(part))
        if i < len(parts) - 1:
            out.append(b"printf '\\000'")
    return b"; ".join(out) or b":"


# The timeout's killer, run by sh -c on its own channel: every descendant of the shell $1
# (not the shell), TERM each round, KILL once $2 rounds passed, at most $3 rounds.  The
# processes' parents come from ps, or from /proc/*/status where there is no ps.
_KILLER = (
    "n=0; s=TERM; while [ $n -lt $3 ]; do "
    "k=$({ ps -A -o pid= -o ppid= 2>/dev/null || for d in /proc/[0-9]*; do "
    'while read -r f v; do [ "$f" = PPid: ] && echo "${d#/proc/} $v" && break; '
    'done <"$d/status"; done 2>/dev/null; } | awk -v p=$1 '
    '\'{c[$2]=c[$2] " " $1} END {q=p; o=""; while (q != "") {m=split(q, a, " "); q=""; '
    "for (i=1; i<=m; i++) if (a[i] in c) {o=o c[a[i]]; q=q c[a[i]]; delete c[a[i]]}} print o}'); "
    '[ -n "$k" ] && kill -$s $k 2>/dev/null; '
    "n=$((n+1)); [ $n -ge $2 ] && s=KILL; sleep {poll}; done"
).replace("{poll}", str(KILL_POLL))


class _Frame:
    """The bytes of one run so far, and whether each stream reached its end marker."""

    def __init__(self, token: bytes, out: bytearray, err: bytearray) -> None:
        self.out_end = b"\n" + token + b" "
        self.err_end = b"\n" + token + b"\n"
        self.out, self.err = out, err
        self.status: bytes | None = None
        self.err_done = False

    @property
    def done(self) -> bool:
        return self.status is not None and self.err_done

    def feed_out(self, data: bytes) -> None:
        start = max(0, len(self.out) - len(self.out_end) - 24)
        self.out += data
        if self.status is not None:
            return
        i = self.out.find(self.out_end, start)
        if i < 0:
            return
        j = self.out.find(b"\n", i + len(self.out_end))
        if j < 0:  # the status line is not complete yet: look again from here
            return
        self.status = bytes(self.out[i + len(self.out_end) : j])
        self.rest_out = bytes(self.out[j + 1 :])
        del self.out[i:]

    def feed_err(self, data: bytes) -> None:
        start = max(0, len(self.err) - len(self.err_end))
        self.err += data
        if self.err_done:
            return
        i = self.err.find(self.err_end, start)
        if i >= 0:
            self.err_done = True
            self.rest_err = bytes(self.err[i + len(self.err_end) :])
            del self.err[i:]


def check_shell_options(tty: bool, program: str) -> None:
    """``ValueError`` for what a shell cannot do: ``tty=True`` (a terminal would merge stdout
    and stderr and echo the framing; ``Connection.spawn`` gives a terminal)."""
    if tty:
        raise ValueError(
            "shell(tty=True) is not supported: a terminal merges stdout and stderr and echoes "
            "the framing; use Connection.spawn() or interact() for a terminal"
        )
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, not {type(program).__name__}")


def open_shell(master: Master, program: str = "sh") -> Procedure[ShellSession]:
    """Start ``exec PROGRAM`` on a session channel of ``master`` with three pipes and wait
    for its first answer (bounded by :data:`START_TIMEOUT`): the :class:`ShellSession`."""
    if not program or any(c in program for c in " \t\n;&|<>()$`'\"\\"):
        raise ValueError(f"program must be a shell's name or path, not {program!r}")
    pipe = subprocess.PIPE
    popen = yield from start_command(
        master, f"exec {program}", stdin=pipe, stdout=pipe, stderr=pipe, bufsize=0
    )
    if popen is None:
        raise ShellError(master.host, "shell() needs a master in proxy mode (not ssh -S)")
    session = ShellSession(master, popen)
    try:
        yield from session.handshake()
    except BaseException:
        session.discard()
        raise
    return session


class ShellSession:
    """One remote shell on a channel: the state both faces share (see the module docstring).

    ``pid`` is the remote shell's pid.  One ``run`` at a time (a second one at once raises
    ``RuntimeError``)."""

    def __init__(self, master: Master, popen: ChannelPopen) -> None:
        self.master = master
        self.host = master.host
        self.popen = popen
        self.pid = 0
        self.error: ShellError | None = None
        self.busy = False
        self.closed = False
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        self._in = popen.stdin.fileno()
        self._out = popen.stdout.fileno()
        self._err = popen.stderr.fileno()
        for fd in (self._in, self._out, self._err):
            os.set_blocking(fd, False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._out, selectors.EVENT_READ, "out")
        self._sel.register(self._err, selectors.EVENT_READ, "err")
        self._wake = self._sel.fileno() if hasattr(self._sel, "fileno") else -1
        self._out_buf = bytearray()
        self._err_buf = bytearray()

    # -- the steps ---------------------------------------------------------------------
    def handshake(self) -> Procedure[None]:
        """Save stdout/stderr as fds 8/9 and read the shell's pid after a random token."""
        token = secrets.token_hex(16).encode()
        deadline = deadline_after(START_TIMEOUT)
        sent = yield from self._send(
            b"exec 8>&1 9>&2; printf '\\n%s\\n' " + token + b" >&9; "
            b"printf '\\n%s %s\\n' " + token + b' "$$" >&8\n',
            deadline,
        )
        frame = _Frame(token, self._out_buf, self._err_buf)
        if sent:
            yield from self._read(frame, deadline)
        if not frame.done:
            raise self._gone("the remote shell did not answer its start in time")
        if frame.status is None or not frame.status.isdigit():
            raise self._gone(f"the remote shell answered its start with {frame.status!r}")
        self.pid = int(frame.status)
        self._out_buf[:] = frame.rest_out
        self._err_buf[:] = frame.rest_err

    def run(self, args: Command, **options: Unpack[ShellRunOptions]) -> Procedure[CompletedProcess]:
        """Run ``args`` in the shell (a ``str`` is a command line, a list is quoted word by
        word) and wait: a ``CompletedProcess`` with ``returncode``, ``stdout`` and ``stderr``
        (always captured, apart).  See the module docstring for ``timeout``; ``check`` raises
        ``CalledProcessError``; ``input`` is the command's stdin (else ``/dev/null``)."""
        check_keywords("run", options, ShellRunOptions)
        text = text_option(options)
        encoding, errors = options.get("encoding"), options.get("errors")
        timeout = options.get("timeout")
        kill_after = options.get("kill_after", KILL_AFTER)
        textual = bool(text or encoding or errors)
        line = remote_command(args).encode("utf-8", "surrogateescape")
        input_ = options.get("input")
        data: bytes | None
        if isinstance(input_, str):
            data = input_.encode(encoding or text_encoding(), errors or "strict")
        else:
            data = None if input_ is None else bytes(input_)
        self._check_usable()
        token = secrets.token_hex(16).encode()
        script = self._script(token, line, data)
        self.busy = True
        frame = _Frame(token, self._out_buf, self._err_buf)
        deadline = deadline_after(timeout)
        sent = stopping = timed_out = False
        try:
            sent = yield from self._send(script, deadline)
            if sent:
                yield from self._read(frame, deadline)
            timed_out = not frame.done
            if timed_out and self.error is None:
                stopping = True
                yield from self._stop_command(frame, kill_after)
        except GeneratorExit:  # abandoned by its driver: nothing may wait any more
            if not frame.done:
                self._gone("the remote shell was stopped: a run was abandoned")
                self.discard()
            raise
        except BaseException:  # Ctrl-C, a cancel, an error: the shell must be left idle
            if self.error is None and not frame.done:
                if sent and not stopping:
                    with contextlib.suppress(BaseException):
                        yield from self._stop_command(frame, kill_after)  # bounded
                if not frame.done and self.error is None:
                    self._gone("the remote shell was stopped: a run was interrupted")
                    self.discard()
            raise
        finally:
            self.busy = False

        def outputs() -> tuple[Any, Any]:
            o, e = bytes(frame.out), bytes(frame.err)
            if textual:
                return decode(o, encoding, errors), decode(e, encoding, errors)
            return o, e

        if timed_out:
            assert timeout is not None
            o, e = outputs()
            self._next_run(frame)
            raise TimeoutExpired(args, timeout, o, e, host=self.host)
        if self.error is not None:
            raise self.error
        self._next_run(frame)
        if frame.status == b"x":
            raise ShellError(self.host, "could not write the command's input to a file on the host")
        assert frame.status is not None
        rc = int(frame.status)
        o, e = outputs()
        if options.get("check", False) and rc != 0:
            raise CalledProcessError(rc, args, o, e, host=self.host)
        return CompletedProcess(args, rc, o, e, host=self.host)

    def close(self) -> Procedure[None]:
        """End the shell: its input ends (sh exits), waited for up to 2 s, then the channel is
        hung up; every descriptor is closed.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            with contextlib.suppress(OSError):
                os.close(self._in)
            if self.error is None:
                yield WaitFlag(self.popen.closed, _CLOSE_WAIT)
        finally:
            self.discard()

    def discard(self) -> None:
        """Hang the channel up (if still open) and close every descriptor, now."""
        self.closed = True
        ch = self.popen.channel
        if not ch.closed.is_set():
            hang_up(cast(ProxyCore, ch.core), ch)
        self._sel.close()
        for f in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    # -- helpers -----------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.error is not None:
            raise self.error
        if self.closed:
            raise ShellError(self.host, "the shell is closed")
        if self.busy:
            raise RuntimeError("this shell is running a command already (one at a time)")

    @staticmethod
    def _script(token: bytes, line: bytes, data: bytes | None) -> bytes:
        end = (
            b"__sw_s=$?; printf '\\n%s\\n' " + token + b" >&9; "
            b"printf '\\n%s %s\\n' " + token + b' "$__sw_s" >&8\n'
        )
        head = b"__sw_c=" + quote(line) + b"\n"
        run = b'{ command eval "$__sw_c"; } '
        if data is None:
            return head + run + b"</dev/null 8>&- 9>&-\n" + end
        path = b'"${TMPDIR:-/tmp}/.sshwrap-shell-' + token + b'"'
        return (
            head
            + b"if (umask 077; set -C; { "
            + _printf_words(data)
            + b"; } >"
            + path
            + b") 8>&- 9>&-; then "
            + run
            + b"<"
            + path
            + b" 8>&- 9>&-; __sw_s=$?; rm -f "
            + path
            + b"; else __sw_s=x; fi; "
            + end[len(b"__sw_s=$?; ") :]
        )

    def _next_run(self, frame: _Frame) -> None:
        """What came after this run's markers belongs to the next run."""
        self._out_buf = bytearray(getattr(frame, "rest_out", b""))
        self._err_buf = bytearray(getattr(frame, "rest_err", b""))

    def _gone(self, why: str, stderr: bytes = b"") -> ShellError:
        """Mark the shell unusable with ``why`` (and how it ended, when known); ``stderr``:
        what the shell last said there."""
        ch = self.popen.channel
        lost = self.popen.poll() if ch.closed.is_set() else None
        reason = why
        if self.popen.ssh_error is not None:
            reason += f" ({self.popen.ssh_error.message})"
        elif ch.exit_signal is not None:
            reason += f" (killed by SIG{ch.exit_signal})"
        elif lost is not None:
            reason += f" (exit status {lost})"
        rc = 255 if lost is None else lost
        text = stderr.decode("utf-8", "replace")
        self.error = ShellError(self.host, reason, text, rc)
        return self.error

    def _send(self, data: bytes, deadline: float | None) -> Procedure[bool]:
        """Write ``data`` to the shell's stdin; False if ``deadline`` passed first (the shell
        then holds part of a script: it is stopped)."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._in, view) :]
            except BlockingIOError:
                left = capped(None, deadline)
                if left is not None and left <= 0:
                    self._gone("the remote shell was stopped: it did not take a command in time")
                    self.discard()
                    return False
                yield WaitFd(self._in, write=True, timeout=left)
            except OSError:
                raise self._gone("the remote shell is gone") from None
        return True

    def _read(self, frame: _Frame, deadline: float | None) -> Procedure[None]:
        """Read both streams into ``frame`` until both markers came, ``deadline`` passed,
        or the shell ended (then :attr:`error` is set)."""
        eof = set()
        while not frame.done:
            left = capped(None, deadline)
            if left is not None and left <= 0:
                return
            if self._wake >= 0:
                yield WaitFd(self._wake, timeout=left)
            else:  # a selector without a descriptor: poll stdout, look at stderr often
                yield WaitFd(self._out, timeout=0.05 if left is None else min(left, 0.05))
            for key, _ in self._sel.select(0):
                fd = key.fd
                chunk = read_ready(fd, _READ)
                if chunk is None:
                    continue
                if not chunk:
                    eof.add(key.data)
                    self._sel.unregister(fd)
                elif key.data == "out":
                    frame.feed_out(chunk)
                else:
                    frame.feed_err(chunk)
            if "out" in eof and not frame.done:
                # both streams end with the shell: wait (bounded) for the status to arrive
                yield WaitFlag(self.popen.closed, 1.0)
                raise self._gone("the remote shell ended", bytes(frame.err))

    def _stop_command(self, frame: _Frame, kill_after: float) -> Procedure[None]:
        """Kill what the shell started (a second channel, see the module docstring) until
        the run's markers arrive; if they do not within the bound, stop the shell."""
        core = self.popen.channel.core
        rounds_term = max(1, int(kill_after / KILL_POLL))
        rounds = rounds_term + int(_SETTLE / KILL_POLL) + 1
        bound = deadline_after(kill_after + _SETTLE)
        killer: Session | None = None
        if isinstance(core, ProxyCore) and self.pid:
            killer = yield from _start_killer(core, self.host, self.pid, rounds_term, rounds, bound)
        try:
            yield from self._read(frame, bound)
        finally:
            if killer is not None:
                yield from stop(killer, 0.2)
        if not frame.done and self.error is None:
            self._gone("a timed-out command did not end when its processes were killed")
            yield from stop(self.popen.channel, 0.2)
            self.discard()


class Shell:
    """The sync face (``Connection.shell()``, ``sshwrap.shell(host)``): a remote ``sh`` kept
    between commands, each ``run`` a procedure of :class:`ShellSession` run by ``run_sync``.

    ``host`` is the destination, ``pid`` the remote shell's pid.  Use it as a context
    manager or call :meth:`close`.  One ``run`` at a time.
    """

    def __init__(self, session: ShellSession, owner: Any = None) -> None:
        self._session = session
        self._owner = owner
        self.host = session.host
        self.pid = session.pid

    @property
    def connection(self) -> Any:
        """The ``Connection`` ``sshwrap.shell`` opened for this shell (closed with it), else
        None."""
        return self._owner

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (or once the shell had to be stopped)."""
        return self._session.closed

    def run(self, args: Command, **options: Unpack[ShellRunOptions]) -> CompletedProcess:
        """Run ``args`` in the shell and wait; a ``CompletedProcess`` (``returncode``, and
        ``stdout`` and ``stderr`` always captured, apart; ``str`` with ``text``/``encoding``).

        A ``str`` is a shell command line, a list is quoted word by word.  ``input`` is the
        command's stdin (else ``/dev/null``).  ``timeout`` kills what the command started
        (TERM, KILL after ``kill_after``) and raises ``TimeoutExpired`` with the output so
        far; the shell then serves the next run.  ``check=True`` raises
        ``CalledProcessError`` for a non-zero status.  A shell that ended (``exit``, killed,
        the connection lost) raises ``ShellError`` (with the host).
        """
        return run_sync(self._session.run(args, **options))

    def close(self) -> None:
        """End the shell (its input ends; hung up after 2 s) and, for ``sshwrap.shell``,
        close its Connection."""
        try:
            run_sync(self._session.close())
        finally:
            if self._owner is not None:
                self._owner.close()

    @classmethod
    def start(cls, master: Master, program: str = "sh", owner: Any = None) -> Shell:
        """Start a shell over ``master`` (:func:`open_shell`); ``owner`` (a Connection) is
        closed with it."""
        return cls(run_sync(open_shell(master, program)), owner)

    def __enter__(self) -> Shell:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Shell {self.host!r} pid={self.pid} {state}>"


def _start_killer(
    core: ProxyCore, host: str, pid: int, rounds_term: int, rounds: int, deadline: float | None
) -> Procedure[Session | None]:
    """The killer channel (``sh -c _KILLER``), or None when it could not start in time."""
    devnull = subprocess.DEVNULL
    streams = RunStreams.for_run(host, "kill", {"stdout": devnull, "stderr": devnull})
    words: Sequence[str] = ["sh", "-c", _KILLER, "sh", str(pid), str(rounds_term), str(rounds)]
    try:
        ch: Session = yield from start_on_channel(
            core,
            streams,
            "exec " + remote_command(list(words)),
            tty=False,
            size=None,
            deadline=deadline,
        )
    except OSError:  # ChannelError: no slot, or the master went away
        return None
    return ch
