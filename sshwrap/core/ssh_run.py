"""Running ssh once, as one procedure for both faces: ``sshwrap.run`` and ``sshwrap.aio.run``.

:func:`run_ssh` is a generator (see :mod:`sshwrap.core.waiting`): ``sshwrap.run`` is
``run_sync(run_ssh(...))``, ``sshwrap.aio.run`` is ``await run_async(run_ssh(...))``, and a
Connection's ``ssh -S`` fallback ``yield from``'s it.  Its steps:

1. start: the argv and the private ``-E`` log (:class:`~sshwrap.core.invocation.Invocation`),
   ssh spawned by ``subprocess.Popen`` (exec-only, safe with threads), with pipes (``ssh -T``)
   or in a local pty (``tty=True``: ``ssh -tt``, a terminal of ``size``);
2. communicate: feed the input, drain stdout and stderr together, relay ssh's stderr (its
   early words, printed before the log opens, are kept for the error message), wait for
   ssh's exit (a pidfd): all on one fd (:class:`~sshwrap.io.ssh_child.ChildPipes`);
   with a tty the input waits until ssh has put the terminal in raw mode, and ends with ^D;
3. on the deadline: the local ssh is killed, a second ssh stops the remote command
   (SIGTERM, SIGKILL ~2 s later), bounded by :data:`~sshwrap.core.invocation.STOP_MARGIN`,
   then :class:`~sshwrap.errors.TimeoutExpired` with the output so far; on Ctrl-C or a
   cancel (thrown in at a wait) the same stop is left to a helper thread and the local ssh
   is killed and reaped at once;
4. the result: the remote returncode (negative for a signal) or the typed
   :class:`~sshwrap.errors.SSHError` (ssh's own words), ssh's messages where ``stderr`` goes.

With ``sudo=True`` (:mod:`sshwrap.core.sudo`) the remote command is wrapped in ``sudo -S``,
stdin and stderr are always pipes of ours: the stderr goes through the sudo state machine
(prompt and start mark cut out, the rest where the caller's ``stderr`` goes), and stdin gets
the password when sudo prompts, then ``input`` once the command started, then its end.  A
refused password kills the local ssh at once (sudo, left waiting on a closed stdin, ends by
itself) and raises :class:`~sshwrap.errors.SudoError`.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any, Unpack, cast

from ..errors import CalledProcessError, SudoError, TimeoutExpired
from ..io.deadline import deadline_after
from ..io.pty import PtyReader
from ..io.ssh_child import (
    ChildPipes,
    popen_with_pipes,
    terminal_is_raw,
    write_to,
)
from .argv import remote_command
from .child_steps import Expired, exchange, reap_killed
from .completed import CompletedProcess
from .invocation import STOP_MARGIN, TEE_GRACE, Invocation
from .options import (
    COMMAND_KEYS,
    Command,
    SSHRunOptions,
    check_keywords,
    check_terminal,
    invocation_settings,
    popen_text,
    run_streams,
    text_encoding,
    tty_input,
)
from .sudo import SudoRun, sudo_settings
from .tty_process import start_in_terminal, terminal_sink
from .waiting import Procedure

__all__ = [
    "decode_output",
    "prepare_run",
    "run_ssh",
    "serve_terminal",
    "terminal_reader",
    "tty_input",
]

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT


def prepare_run(input: Any, capture_output: bool, kwargs: dict[str, Any]) -> None:
    """``run``'s ``input`` and ``capture_output`` as stream arguments in ``kwargs``, refusing
    the combinations :func:`subprocess.run` refuses
    (:func:`~sshwrap.core.options.run_streams`)."""
    stdin, stdout, stderr = run_streams(input, capture_output, kwargs)
    kwargs["stdin"] = stdin
    if capture_output:
        kwargs["stdout"], kwargs["stderr"] = stdout, stderr


def decode_output(data: bytes, encoding: str | None, errors: str | None) -> str:
    """Text mode's output: decoded, with universal newlines (as :mod:`subprocess` does)."""
    text = data.decode(encoding or text_encoding(), errors or "strict")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def terminal_reader(master: int, buffer_size: int = 65536) -> io.BufferedReader[Any]:
    """A buffered reader of the terminal of ``master`` (:class:`~sshwrap.io.pty.PtyReader`:
    EIO is its end, ssh's closing line dropped); closing it closes ``master``."""
    return io.BufferedReader(PtyReader(master), buffer_size if buffer_size > 1 else 65536)


def serve_terminal(
    pipes: ChildPipes, reader: io.BufferedReader[Any], sink: Callable[[bytes], None], data: bytes
) -> None:
    """Let ``pipes`` read the terminal of ``reader`` (see :func:`terminal_reader`) into
    ``sink`` and type ``data`` into it, ended by ^D, once ssh has put it in raw mode: before
    that the terminal is still cooked, would echo the bytes and eat ^D/^C/^U (ssh takes the
    remote terminal's modes from that state, so it cannot simply start raw)."""
    master = reader.fileno()
    pipes.read_into(master, sink, read=lambda: reader.read1(65536))
    if data:
        typed = os.dup(master)
        pipes.feed(
            typed, tty_input(data), lambda: os.close(typed), gate=lambda: terminal_is_raw(master)
        )


class _SudoPipes:
    """The sudo side of a child's pipes: its stderr through the :class:`SudoRun` machine,
    its stdin written in the machine's order (password, then input, then the end)."""

    def __init__(self, child: _Child, sudo: SudoRun, stdout: Any, stderr: Any) -> None:
        self.sudo = sudo
        self._child = child
        self._stdout, self._stderr = stdout, stderr
        self._queue = bytearray()
        self._end = False
        self._writing = False
        self.closed = False

    def stderr(self, chunk: bytes) -> None:
        """A chunk of the command's stderr (raises the SudoError of a refused password)."""
        out, _, send, end = self.sudo.feed(chunk)
        self.emit(out)
        if send or end:
            self._queue += send
            self._end = self._end or end
            self._next()
        if self.sudo.failed is not None:
            raise self.sudo.failed

    def emit(self, data: bytes) -> None:
        """Stderr bytes for the caller, where its ``stderr`` goes."""
        if not data:
            return
        child = self._child
        if self._stderr == PIPE:
            child.err.extend(data)
            return
        child.call.stderr.feed(data)  # ssh's early words stay known, as the relay keeps them
        if self._stderr == STDOUT and self._stdout == PIPE:
            child.out.extend(data)
        else:
            write_to(self._stderr, data, stdout_target=self._stdout)

    def _next(self) -> None:
        proc_stdin = self._child.proc.stdin
        if self._writing or self.closed or proc_stdin is None:
            return
        if self._queue:
            data = bytes(self._queue)
            self._queue.clear()
            self._writing = True
            self._child.pipes.feed(proc_stdin.fileno(), data, self._written)
        elif self._end:
            self.closed = True
            with contextlib.suppress(OSError):
                proc_stdin.close()

    def _written(self) -> None:
        self._writing = False
        self._next()


class _Child:
    """ssh as :func:`run_ssh` runs it: the process, its pipes, what they collected."""

    def __init__(
        self,
        call: Invocation,
        stdin: Any,
        stdout: Any,
        stderr: Any,
        size: Any,
        data: bytes,
        sudo: SudoRun | None = None,
    ) -> None:
        self.call = call
        self.out = bytearray()
        self.err = bytearray()
        self._fds: list[int] = []
        self._terminal: io.BufferedReader[Any] | None = None
        self.sudo: _SudoPipes | None = None
        if call.tty:
            self.proc, master = start_in_terminal(call, size)
            self._terminal = terminal_reader(master)
            self.collect_out = stdout == PIPE
            self.collect_err = stderr == PIPE  # nothing comes: b"", as over a channel
            self.pipes = ChildPipes(self.proc)
            collect = self.out.extend if self.collect_out else None
            sink = terminal_sink(call, stdout, collect, master)
            serve_terminal(self.pipes, self._terminal, sink, data)
            return
        streams = (stdin, stdout, stderr) if sudo is None else (PIPE, stdout, PIPE)
        proc, relay, _ = popen_with_pipes(call.argv, call.stderr, streams, relay_thread=False)
        if relay >= 0:
            self._fds.append(relay)
        self.proc = proc
        self.collect_out = proc.stdout is not None
        self.collect_err = stderr == PIPE
        self.pipes = ChildPipes(proc)
        if sudo is not None:
            self.sudo = _SudoPipes(self, sudo, stdout, stderr)
        elif proc.stdin is not None:
            self.pipes.feed(proc.stdin.fileno(), data, proc.stdin.close)
        if proc.stdout is not None:
            self.pipes.read_into(proc.stdout.fileno(), self.out.extend)
        if proc.stderr is not None:
            sink = self.err.extend if self.sudo is None else self.sudo.stderr
            self.pipes.read_into(proc.stderr.fileno(), sink)
        if relay >= 0:

            def relayed(chunk: bytes) -> None:
                call.stderr.feed(chunk)
                write_to(stderr, chunk)

            self.pipes.read_into(relay, relayed, required=False)

    def output(self) -> tuple[bytes | None, bytes | None]:
        """What stdout and stderr collected (None for a stream not read; with a terminal a
        ``stderr=PIPE`` gets nothing, b"": the terminal merged stderr into stdout)."""
        return (
            bytes(self.out) if self.collect_out else None,
            bytes(self.err) if self.collect_err else None,
        )

    def kill(self) -> None:
        """SIGKILL to the local ssh (if not reaped yet)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def close(self) -> None:
        """Kill and reap ssh if it still runs; release every fd."""
        self.kill()
        self.proc.wait()
        if self.sudo is not None:
            self.sudo.closed = True
        self.pipes.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._terminal is not None:
            self._terminal.close()


def _stop_now(call: Invocation, child: _Child) -> Procedure[None]:
    """The local ssh killed, the remote command stopped (SIGTERM, then SIGKILL), waiting for
    the stop at most :data:`STOP_MARGIN`: what a timed-out call does."""
    call.stopping = True
    try:
        stop = call.start_stop(signal.SIGTERM, escalate=True, budget=STOP_MARGIN)
    except OSError:
        stop = None
    child.kill()
    drain_until = time.monotonic() + TEE_GRACE
    if stop is not None:
        drain_until = min(drain_until, stop.deadline)
    with contextlib.suppress(Expired):  # the last output, and the killed ssh's exit
        yield from exchange(child.pipes, drain_until)
    if stop is not None:
        yield from stop.wait()
    yield from reap_killed(child.pipes)


def run_ssh(
    host: str,
    args: Command,
    input: Any = None,
    timeout: float | None = None,
    capture_output: bool = False,
    check: bool = False,
    **kwargs: Unpack[SSHRunOptions],
) -> Procedure[CompletedProcess]:
    """Run ``args`` on ``host`` with a fresh ssh and wait: the procedure of ``sshwrap.run``
    (same arguments, results, errors and bounds; ``bufsize`` is accepted and unused).

    ``input``, ``timeout``, ``capture_output`` and ``check`` may come by position (in this
    order) or keyword.
    """
    check_keywords("run", kwargs, SSHRunOptions)
    check_terminal(kwargs)
    sudo = sudo_settings(kwargs)
    if sudo is not None and input is None and kwargs.get("stdin", DEVNULL) != DEVNULL:
        raise ValueError(
            "sudo=True takes the command's input from input= only (stdin must stay DEVNULL): "
            "sudo reads the password from that same stdin"
        )
    options = cast(dict[str, Any], dict(kwargs))
    prepare_run(input, capture_output, options)
    stdout, stderr = options.get("stdout"), options.get("stderr")
    stdin = options.get("stdin", DEVNULL)
    text_mode, encoding = popen_text(options)
    errors = options.get("errors")
    tty = bool(options.get("tty", False))
    if isinstance(input, str):
        input = input.encode(encoding or text_encoding(), errors or "strict")
    data = b"" if input is None else bytes(input)
    deadline = deadline_after(timeout)
    settings = invocation_settings(options)
    remote: Command = args
    sudo_run: SudoRun | None = None
    if sudo is not None:
        sudo_run = SudoRun(host, sudo, data)
        inner = remote_command(args, env=options.get("env"), cwd=options.get("cwd"))
        remote = sudo_run.command(inner)
        settings = cast(Any, {k: v for k, v in settings.items() if k not in COMMAND_KEYS})
    call = Invocation(host, remote, tty=tty, **settings)
    try:
        child = _Child(call, stdin, stdout, stderr, options.get("size"), data, sudo_run)
    except BaseException:
        call.close()
        raise
    try:
        try:
            yield from exchange(child.pipes, deadline, TEE_GRACE)
        except Expired:
            yield from _stop_now(call, child)
            call.finish(cast(int, child.proc.returncode))
            call.write_messages(stdout, stderr, tty)
            out, err = child.output()
            raise TimeoutExpired(args, timeout or 0.0, out, err, host=host) from None
        except SudoError:  # nothing ran yet: no remote stop, the session just goes
            child.kill()
            raise
        except BaseException:
            if not child.pipes.exited:  # ^C or cancelled: at once, the stop in the background
                call.stop_in_background()
                child.kill()
            raise
        if child.sudo is not None:
            child.sudo.emit(child.sudo.sudo.end())
        out, err = child.output()
        if stderr == PIPE:
            call.note_stderr(err)
        returncode = call.finish(cast(int, child.proc.returncode))
        call.write_messages(stdout, stderr, tty)
        if call.error is not None:
            # a lost master's CommandLostError carries what arrived, as run would return it
            shown = [
                decode_output(d, encoding, errors) if text_mode and d else d for d in (out, err)
            ]
            lost = call.failure(*shown)
            assert lost is not None
            raise lost
        if sudo_run is not None:
            failure = sudo_run.outcome(returncode)
            if failure is not None:
                raise failure
    finally:
        child.close()
        call.close()
    out, err = call.append_messages(out, err, stdout, stderr, tty)
    result_out: Any = out
    result_err: Any = err
    if text_mode:
        if out is not None:
            result_out = decode_output(out, encoding, errors)
        if err is not None:
            result_err = decode_output(err, encoding, errors)
    if check and returncode:
        raise CalledProcessError(returncode, args, result_out, result_err, host=host)
    return CompletedProcess(args, returncode, result_out, result_err, host=host)
