"""``run`` and ``Popen`` for commands on session channels of a ``Connection``'s master.

Same keywords and results as ``sshwrap.run`` / ``sshwrap.Popen`` (and ``subprocess``), but no
local process: the command runs on a channel of ``sshwrap.io.pump.ProxyCore``.

- ``run_channel`` needs no pipes at all: ``PIPE`` output is collected straight into memory by
  the pump, ``input`` is sent from memory, files and fds are read or written directly;
- ``ChannelPopen`` hands out real pipes (``stdin``/``stdout``/``stderr`` file objects like
  ``subprocess``); their far ends belong to the pump, which moves data between them and the
  channel, so the pipes work with ``select``, ``readline`` and other threads.

``returncode`` is exact: the remote exit status, or ``-signum`` when the remote command was
killed by a signal (``exit-signal``).  When the channel ends with neither (the server refused
the command), or the connection to the master is lost before both the status and the end of
the output came (sshd may send ``exit-status`` while output still waits for window), ``run``
raises an ``SSHError`` (``CommandLostError``, with what arrived, for a lost connection) and
``Popen.returncode`` is 255 with the error kept in ``Popen.ssh_error`` (``wait`` and
``communicate`` raise it), as ``sshwrap.Popen`` does when ssh itself fails.

``tty=True`` asks sshd for a terminal (``pty-req``, ``size=(rows, cols)``, ``$TERM``) without
any local pty: the command's output (stdout and stderr merged by the remote terminal, line
ends sent as CR LF) arrives on stdout, input is typed into it, ``Popen.resize`` sends
``window-change``; the returncode stays exact.

A timeout sends ``TERM`` to the remote process group, then ``KILL`` after ``kill_after`` seconds
(default 0.5), then closes the channel after ``CLOSE_AFTER`` (0.4 s) more, and raises
``TimeoutExpired``: the call returns within ``timeout + kill_after + 0.5`` s whatever the host
does.  On a host that answers, the remote command is gone by then; on a frozen one it may not
be (nothing can reach it).
stdin defaults to ``DEVNULL`` as in ``sshwrap.run`` (the remote command reads end-of-file at
once); ``stdin=None`` reads this process's own stdin (from the I/O thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import io
import locale
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any, cast

from ..errors import (
    CalledProcessError,
    CommandLostError,
    SSHError,
    TimeoutExpired,
)
from ..io.pump import ChannelOpenTimeout, ProxyCore, Session, SessionPacer, Sink, Source

__all__ = [
    "KILL_AFTER",
    "ChannelPopen",
    "CommandLostError",
    "run_channel",
    "run_channel_async",
]

PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT
DEVNULL = subprocess.DEVNULL

KILL_AFTER = 0.5
"""Seconds between the TERM and the KILL a timeout sends (default)."""
CLOSE_AFTER = 0.4
"""Seconds after the KILL before the channel is closed without waiting any more."""

_OPEN_TIMEOUT = 60.0
_PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

Stream = int | IO[Any] | None


def _fileno(spec: int | IO[Any]) -> int:
    if isinstance(spec, int):
        return spec
    return spec.fileno()


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, _F_SETPIPE_SZ, _PIPE_SIZE)
    return r, w


def _source(stdin: Stream, input_: bytes | None) -> Source:
    if input_ is not None:
        if stdin not in (DEVNULL, PIPE):
            raise ValueError("stdin and input arguments may not both be used.")
        return Source(data=input_)
    if stdin == DEVNULL:
        return Source()
    if stdin is None:
        return Source(fd=os.dup(0), own=True)
    if stdin == PIPE:
        return Source(data=b"")
    if isinstance(stdin, int) and stdin < 0:
        raise ValueError(f"invalid stdin: {stdin}")
    return Source(fd=os.dup(_fileno(stdin)), own=True)


def _sink(spec: Stream, *, collect_pipe: bool) -> tuple[Sink, int | None]:
    """A sink for ``spec`` and, for Popen's PIPE, the read end to hand out."""
    if spec == PIPE:
        if collect_pipe:
            return Sink(collect=True), None
        r, w = _pipe()
        os.set_blocking(w, False)
        return Sink(fd=w, own=True, nonblocking=True), r
    if spec == DEVNULL:
        return Sink(), None
    if spec is None:
        return Sink(fd=os.dup(1), own=True), None
    if isinstance(spec, int) and spec < 0:
        raise ValueError(f"invalid output: {spec}")
    return Sink(fd=os.dup(_fileno(spec)), own=True), None


def _stderr_sink(spec: Stream, out: Sink, *, collect_pipe: bool) -> tuple[Sink, int | None]:
    if spec == STDOUT:
        return out, None
    if spec is None:
        return Sink(fd=os.dup(2), own=True), None
    return _sink(spec, collect_pipe=collect_pipe)


def _release(src: Source, sinks: list[Sink]) -> None:
    """Close descriptors of a channel that never started."""
    for fd, own in [(src.fd, src.own), *((s.fd, s.own) for s in sinks)]:
        if fd is not None and own:
            with contextlib.suppress(OSError):
                os.close(fd)


def _text_mode(text: bool | None, encoding: str | None, errors: str | None) -> bool:
    return bool(text or encoding or errors)


def _decode(data: bytes, encoding: str | None, errors: str | None) -> str:
    s = data.decode(encoding or locale.getpreferredencoding(False), errors or "strict")
    return s.replace("\r\n", "\n").replace("\r", "\n")


def notify_event(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    """Set ``event`` from another thread (ignored once the loop is closed)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(event.set)


def _start(ch: Session, command: str, tty: bool, size: tuple[int, int] | None) -> None:
    """``exec`` the command, after asking for a remote terminal when ``tty``."""
    if tty:
        rows, cols = size or (24, 80)
        ch.request_pty(os.environ.get("TERM") or "xterm", rows, cols)
    ch.exec(command, env=ch.core.session_env or None)


def _ended_error(
    host: str, ch: Session, outputs: Callable[[], tuple[Any, Any]] | None = None
) -> SSHError | None:
    """The SSHError for a channel that ended without its exit status and all its output
    (``outputs()`` gives what arrived, for the exception), else None."""
    if ch.lost and not (ch.remote_eof and ch.returncode is not None):
        reason = ch.core.dead_reason or "the connection to the control master was lost"
        if ch.returncode is not None:
            reason += " before the end of the command's output"
        else:
            reason += " before the command's exit status arrived"
        o, e = outputs() if outputs is not None else (None, None)
        return CommandLostError(host, reason, stdout=o, command_stderr=e, exit_status=ch.returncode)
    if ch.returncode is not None:
        return None
    if ch.exec_failed:
        return SSHError(host, "the server refused to run the command (exec request failed)")
    if ch.exit_signal is not None:
        return None
    return SSHError(host, "the remote command ended without an exit status")


def _stop(ch: Session, kill_after: float) -> None:
    """TERM, then KILL after ``kill_after`` s, then close the channel after ``CLOSE_AFTER``.

    Bounded: it returns within ``kill_after + CLOSE_AFTER`` seconds whatever the host does (a
    frozen host or session never answers; the channel is closed on our side and the pump
    forgets it when the peer's CLOSE comes, or the connection ends)."""
    ch.send_signal(signal.SIGTERM)
    if ch.closed.wait(kill_after):
        return
    ch.send_signal(signal.SIGKILL)
    if not ch.closed.wait(CLOSE_AFTER):
        ch.close()


class _RunPlan:
    """The streams of one ``run``: prepared before the channel opens, read after it ends."""

    def __init__(
        self,
        host: str,
        args: object,
        *,
        input: bytes | str | None,
        stdin: Stream,
        stdout: Stream,
        stderr: Stream,
        capture_output: bool,
        text: bool | None,
        encoding: str | None,
        errors: str | None,
    ) -> None:
        if capture_output:
            if stdout is not None or stderr is not None:
                raise ValueError("stdout and stderr arguments may not be used with capture_output.")
            stdout = stderr = PIPE
        self.host, self.args = host, args
        self.stdout_spec, self.stderr_spec = stdout, stderr
        self.textual = _text_mode(text, encoding, errors)
        self.encoding, self.errors = encoding, errors
        data: bytes | None
        if isinstance(input, str):
            enc = encoding or locale.getpreferredencoding(False)
            data = input.encode(enc, errors or "strict")
        else:
            data = input
        self.src = _source(stdin, data)
        try:
            self.out, _ = _sink(stdout, collect_pipe=True)
            self.err, _ = _stderr_sink(stderr, self.out, collect_pipe=True)
        except BaseException:
            _release(self.src, [])
            raise

    def release(self) -> None:
        """Close our descriptors when the channel never started."""
        _release(self.src, [self.out, self.err])

    def outputs(self) -> tuple[Any, Any]:
        return _outputs(
            self.out,
            self.err,
            self.stdout_spec,
            self.stderr_spec,
            self.textual,
            self.encoding,
            self.errors,
        )

    def timed_out(self, timeout: float) -> TimeoutExpired:
        o, e = self.outputs()
        return TimeoutExpired(cast(Any, self.args), timeout, o, e, host=self.host)

    def result(self, ch: Session, check: bool, make_result: Callable[..., Any]) -> Any:
        failure = _ended_error(self.host, ch, self.outputs)
        if failure is not None:
            raise failure
        rc = ch.returncode
        assert rc is not None
        o, e = self.outputs()
        if check and rc != 0:
            raise CalledProcessError(rc, cast(Any, self.args), o, e, host=self.host)
        return make_result(self.args, rc, o, e)


def run_channel(
    core: ProxyCore,
    host: str,
    args: object,
    command: str,
    *,
    input: bytes | str | None = None,
    stdin: Stream = DEVNULL,
    stdout: Stream = None,
    stderr: Stream = None,
    capture_output: bool = False,
    timeout: float | None = None,
    deadline: float | None = None,
    check: bool = False,
    text: bool | None = None,
    encoding: str | None = None,
    errors: str | None = None,
    kill_after: float = KILL_AFTER,
    tty: bool = False,
    size: tuple[int, int] | None = None,
    make_result: Callable[..., Any] = subprocess.CompletedProcess,
) -> Any:
    """Run ``command`` on a new session channel and wait for it; see the module docstring.

    ``deadline`` (``time.monotonic()``; default: ``timeout`` from now) is when the timeout
    runs out, when the caller already spent part of it (restarting the master)."""
    if deadline is None and timeout is not None:
        deadline = time.monotonic() + timeout
    plan = _RunPlan(
        host,
        args,
        input=input,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        capture_output=capture_output,
        text=text,
        encoding=encoding,
        errors=errors,
    )
    try:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ch = core.open_session(_OPEN_TIMEOUT if left is None else left)
    except ChannelOpenTimeout:
        plan.release()
        if timeout is None:
            raise
        raise plan.timed_out(timeout) from None
    except BaseException:
        plan.release()
        raise
    ch.setup_io(plan.src, plan.out, plan.err)
    _start(ch, command, tty, size)
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        ended = ch.closed.wait(remaining)
    except BaseException:
        # KeyboardInterrupt and the like: like subprocess.run, do not leave the command running.
        ch.send_signal(signal.SIGTERM)
        ch.close()
        raise
    if not ended:
        _stop(ch, kill_after)
        assert timeout is not None
        raise plan.timed_out(timeout)
    return plan.result(ch, check, make_result)


async def run_channel_async(
    core: ProxyCore,
    host: str,
    args: object,
    command: str,
    *,
    input: bytes | str | None = None,
    stdin: Stream = DEVNULL,
    stdout: Stream = None,
    stderr: Stream = None,
    capture_output: bool = False,
    timeout: float | None = None,
    deadline: float | None = None,
    check: bool = False,
    text: bool | None = None,
    encoding: str | None = None,
    errors: str | None = None,
    kill_after: float = KILL_AFTER,
    tty: bool = False,
    size: tuple[int, int] | None = None,
    make_result: Callable[..., Any] = subprocess.CompletedProcess,
) -> Any:
    """``run_channel`` for asyncio: no thread waits; the pump wakes the loop.

    Cancelling it stops the remote command (TERM, then the channel is closed).  ``deadline``
    is in ``time.monotonic()`` terms, as for ``run_channel``.
    """
    loop = asyncio.get_running_loop()
    if deadline is None and timeout is not None:
        deadline = time.monotonic() + timeout
    # the same instant on the loop's clock
    loop_deadline = None if deadline is None else loop.time() + (deadline - time.monotonic())
    event = asyncio.Event()

    def notify() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(event.set)

    async def until(cond: Callable[[], bool]) -> None:
        while True:
            event.clear()
            if cond():
                return
            await event.wait()

    plan = _RunPlan(
        host,
        args,
        input=input,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        capture_output=capture_output,
        text=text,
        encoding=encoding,
        errors=errors,
    )
    open_deadline = (loop.time() + _OPEN_TIMEOUT) if loop_deadline is None else loop_deadline
    pacer = SessionPacer(core)
    ch: Session | None = None
    try:
        while True:
            generation = core.close_generation
            ch = core.start_session(notify)
            try:
                await asyncio.wait_for(until(ch.opened.is_set), open_deadline - loop.time())
            except TimeoutError:
                core.abandon(ch)
                if timeout is None:
                    raise ChannelOpenTimeout("timed out opening a session channel") from None
                raise plan.timed_out(timeout) from None
            pause = pacer.pause(ch)
            if pause is None:
                break
            # The server's MaxSessions is reached: try again when one of ours closes (or soon).
            left = open_deadline - loop.time()
            if left <= 0:
                if timeout is None:
                    raise ChannelOpenTimeout("timed out waiting for a session slot")
                raise plan.timed_out(timeout)
            freed = asyncio.Event()
            core.add_close_waiter(functools.partial(notify_event, loop, freed))
            if core.close_generation == generation:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(freed.wait(), min(pause, left))
        core.check_opened(ch)
    except asyncio.CancelledError:
        plan.release()
        if ch is not None:
            core.abandon(ch)
        raise
    except BaseException:
        plan.release()
        raise
    try:
        ch.setup_io(plan.src, plan.out, plan.err)
        _start(ch, command, tty, size)
        remaining = None if loop_deadline is None else max(0.0, loop_deadline - loop.time())
        try:
            await asyncio.wait_for(until(ch.closed.is_set), remaining)
        except TimeoutError:
            await asyncio.to_thread(_stop, ch, kill_after)
            assert timeout is not None
            raise plan.timed_out(timeout) from None
    except asyncio.CancelledError:
        if ch.opened.is_set() and not ch.closed.is_set():
            ch.send_signal(signal.SIGTERM)
            ch.close()
        else:
            core.abandon(ch)
        raise
    return plan.result(ch, check, make_result)


def _outputs(
    out: Sink,
    err: Sink,
    stdout: Stream,
    stderr: Stream,
    textual: bool,
    encoding: str | None,
    errors: str | None,
) -> tuple[Any, Any]:
    o: bytes | str | None = bytes(out.buf) if stdout == PIPE else None
    e: bytes | str | None = bytes(err.buf) if stderr == PIPE else None
    if textual:
        o = None if o is None else _decode(o, encoding, errors)  # type: ignore[arg-type]
        e = None if e is None else _decode(e, encoding, errors)  # type: ignore[arg-type]
    return o, e


class ChannelPopen:
    """A remote command on a session channel, with the interface of ``subprocess.Popen``.

    ``stdin``/``stdout``/``stderr`` are file objects for ``PIPE`` (binary, or text with
    ``text``/``encoding``/``errors``), else None.  ``pid`` is None: there is no local process.
    ``send_signal``/``terminate``/``kill`` send RFC 4254 ``signal`` requests, which sshd
    delivers to the remote command's process group.
    """

    def __init__(
        self,
        core: ProxyCore,
        host: str,
        args: object,
        command: str,
        *,
        stdin: Stream = DEVNULL,
        stdout: Stream = None,
        stderr: Stream = None,
        text: bool | None = None,
        encoding: str | None = None,
        errors: str | None = None,
        bufsize: int = -1,
        kill_after: float = KILL_AFTER,
        tty: bool = False,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.args = args
        self.host = host
        self.pid: int | None = None
        self.returncode: int | None = None
        self.ssh_error: SSHError | None = None
        self.kill_after = kill_after
        self.stdin: IO[Any] | None = None
        self.stdout: IO[Any] | None = None
        self.stderr: IO[Any] | None = None
        self.text_mode = _text_mode(text, encoding, errors)
        self._encoding = encoding
        self._errors = errors
        self._comm: dict[int, bytearray] = {}
        stdin_w: int | None = None
        if stdin == PIPE:
            r, w = _pipe()
            os.set_blocking(r, False)
            src = Source(fd=r, own=True)
            stdin_w = w
        else:
            src = _source(stdin, None)
        out, out_r = _sink(stdout, collect_pipe=False)
        err, err_r = _stderr_sink(stderr, out, collect_pipe=False)
        mine = [fd for fd in (stdin_w, out_r, err_r) if fd is not None]
        try:
            self._ch = core.open_session(_OPEN_TIMEOUT)
        except BaseException:
            _release(src, [out, err])
            for fd in mine:
                os.close(fd)
            raise
        self._ch.setup_io(src, out, err)
        _start(self._ch, command, tty, size)
        if stdin_w is not None:
            self.stdin = self._wrap(stdin_w, "wb", bufsize)
        if out_r is not None:
            self.stdout = self._wrap(out_r, "rb", bufsize)
        if err_r is not None:
            self.stderr = self._wrap(err_r, "rb", bufsize)

    def _wrap(self, fd: int, mode: str, bufsize: int) -> IO[Any]:
        if self.text_mode:
            raw = open(fd, mode, buffering=-1 if bufsize in (0, 1) else bufsize)  # noqa: SIM115
            return io.TextIOWrapper(
                raw,
                encoding=self._encoding or locale.getpreferredencoding(False),
                errors=self._errors or "strict",
                line_buffering=bufsize == 1 and mode == "wb",
                write_through=mode == "wb",
            )
        return open(fd, mode, buffering=bufsize)

    # -- status ------------------------------------------------------------------------
    def _finish(self) -> int:
        if self.returncode is None:
            ch = self._ch
            self.ssh_error = _ended_error(self.host, ch)
            rc = ch.returncode
            self.returncode = 255 if rc is None or self.ssh_error is not None else rc
        return self.returncode

    def poll(self) -> int | None:
        """The returncode if the remote command has ended, else None."""
        if self.returncode is not None:
            return self.returncode
        if self._ch.closed.is_set():
            return self._finish()
        return None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the remote command to end; ``TimeoutExpired`` if it does not in time."""
        if self.returncode is not None:
            if self.ssh_error is not None:
                raise self.ssh_error
            return self.returncode
        if not self._ch.closed.wait(timeout):
            assert timeout is not None
            raise TimeoutExpired(cast(Any, self.args), timeout, host=self.host)
        rc = self._finish()
        if self.ssh_error is not None:
            raise self.ssh_error
        return rc

    def resize(self, rows: int, cols: int) -> None:
        """Change the remote terminal's size (``tty=True``): the command gets SIGWINCH."""
        self._ch.resize(rows, cols)

    def send_signal(self, sig: int) -> None:
        """Send signal ``sig`` to the remote command's process group (if still running).

        sshd signals the session's process group, which is first the remote shell that
        starts the command: a signal sent in that first instant meets the shell, not the
        command (dash, Debian's ``sh``, catches SIGINT there and may lose it when it execs
        the command).  Signal a command once it runs (e.g. after its first output).
        """
        if self.poll() is None:
            self._ch.send_signal(sig)

    def terminate(self) -> None:
        """Send SIGTERM to the remote command."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL to the remote command."""
        self.send_signal(signal.SIGKILL)

    # -- communicate -------------------------------------------------------------------
    def communicate(
        self, input: bytes | str | None = None, timeout: float | None = None
    ) -> tuple[Any, Any]:
        """Send ``input``, read stdout and stderr to their end, wait; like subprocess."""
        deadline = None if timeout is None else time.monotonic() + timeout
        data: bytes | None
        if isinstance(input, str):
            data = input.encode(self._encoding or locale.getpreferredencoding(False))
        else:
            data = input
        if data and self.stdin is None:
            raise ValueError("input given but stdin is not a pipe")
        sel = selectors.DefaultSelector()
        try:
            if self.stdin is not None and not self.stdin.closed:
                with contextlib.suppress(BrokenPipeError, ValueError):
                    self.stdin.flush()
                if data:
                    fd = self.stdin.fileno()
                    os.set_blocking(fd, False)
                    self._input = memoryview(data)
                    sel.register(fd, selectors.EVENT_WRITE, "in")
                else:
                    with contextlib.suppress(BrokenPipeError, OSError):
                        self.stdin.close()
            for name, f in (("out", self.stdout), ("err", self.stderr)):
                if f is not None and not f.closed:
                    self._comm.setdefault(f.fileno(), bytearray())
                    sel.register(f.fileno(), selectors.EVENT_READ, name)
            while sel.get_map():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutExpired(cast(Any, self.args), timeout or 0.0, host=self.host)
                for key, _ in sel.select(remaining):
                    if key.data == "in":
                        try:
                            n = os.write(key.fd, self._input[:65536])
                        except BlockingIOError:
                            continue
                        except OSError:
                            n = len(self._input)
                        self._input = self._input[n:]
                        if not self._input:
                            sel.unregister(key.fd)
                            assert self.stdin is not None
                            with contextlib.suppress(OSError):
                                self.stdin.close()
                    else:
                        chunk = os.read(key.fd, 262144)
                        if chunk:
                            self._comm[key.fd] += chunk
                        else:
                            sel.unregister(key.fd)
        finally:
            sel.close()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.wait(remaining)
        except TimeoutExpired:
            assert timeout is not None
            raise TimeoutExpired(cast(Any, self.args), timeout, host=self.host) from None
        out = self._collected(self.stdout)
        err = self._collected(self.stderr)
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        return out, err

    def _collected(self, f: IO[Any] | None) -> Any:
        if f is None:
            return None
        data = bytes(self._comm.pop(f.fileno(), b""))
        if self.text_mode:
            return _decode(data, self._encoding, self._errors)
        return data

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> ChannelPopen:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for f in (self.stdout, self.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        if self.stdin is not None:
            with contextlib.suppress(OSError):
                self.stdin.close()
        if exc_type is KeyboardInterrupt:
            self._ch.close()
            return
        self.wait()

    def __repr__(self) -> str:
        return f"<ChannelPopen host={self.host!r} returncode={self.returncode} args={self.args!r}>"
