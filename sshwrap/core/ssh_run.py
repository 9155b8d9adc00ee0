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

from ..errors import CalledProcessError, TimeoutExpired
from ..io.deadline import deadline_after
from ..io.pty import PtyReader
from ..io.ssh_child import (
    ChildPipes,
    popen_with_pipes,
    terminal_is_raw,
    write_to,
)
from .child_steps import Expired, exchange, reap_killed
from .completed import CompletedProcess
from .invocation import STOP_MARGIN, TEE_GRACE, Invocation
from .options import (
    Command,
    PopenOptions,
    check_keywords,
    check_terminal,
    invocation_settings,
    popen_text,
    run_streams,
    text_encoding,
)
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


def prepare_run(input: Any, capture_output: bool, kwargs: dict[str, Any]) -> None:
    """``run``'s ``input`` and ``capture_output`` as stream arguments in ``kwargs``, refusing
    the combinations :func:`subprocess.run` refuses
    (:func:`~sshwrap.core.options.run_streams`)."""
    stdin, stdout, stderr = run_streams(input, capture_output, kwargs)
    kwargs["stdin"] = stdin
    if capture_output:
        kwargs["stdout"], kwargs["stderr"] = stdout, stderr


def tty_input(data: bytes) -> bytes:
    """Input typed into a terminal, ended by ^D at the start of a line (nothing: nothing)."""
    if not data:
        return b""
    return data + (b"\x04" if data.endswith(b"\n") else b"\x04\x04")


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


class _Child:
    """ssh as :func:`run_ssh` runs it: the process, its pipes, what they collected."""

    def __init__(
        self, call: Invocation, stdin: Any, stdout: Any, stderr: Any, size: Any, data: bytes
    ) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self._fds: list[int] = []
        self._terminal: io.BufferedReader[Any] | None = None
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
        streams = (stdin, stdout, stderr)
        proc, relay, _ = popen_with_pipes(call.argv, call.stderr, streams, relay_thread=False)
        if relay >= 0:
            self._fds.append(relay)
        self.proc = proc
        self.collect_out = proc.stdout is not None
        self.collect_err = proc.stderr is not None
        self.pipes = ChildPipes(proc)
        if proc.stdin is not None:
            self.pipes.feed(proc.stdin.fileno(), data, proc.stdin.close)
        if proc.stdout is not None:
            self.pipes.read_into(proc.stdout.fileno(), self.out.extend)
        if proc.stderr is not None:
            self.pipes.read_into(proc.stderr.fileno(), self.err.extend)
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
    **kwargs: Unpack[PopenOptions],
) -> Procedure[CompletedProcess]:
    """Run ``args`` on ``host`` with a fresh ssh and wait: the procedure of ``sshwrap.run``
    (same arguments, results, errors and bounds; ``bufsize`` is accepted and unused).

    ``input``, ``timeout``, ``capture_output`` and ``check`` may come by position (in this
    order) or keyword.
    """
    check_keywords("run", kwargs, PopenOptions)
    check_terminal(kwargs)
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
    call = Invocation(host, args, tty=tty, **invocation_settings(options))
    try:
        child = _Child(call, stdin, stdout, stderr, options.get("size"), data)
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
        except BaseException:
            if not child.pipes.exited:  # ^C or cancelled: at once, the stop in the background
                call.stop_in_background()
                child.kill()
            raise
        out, err = child.output()
        if stderr == PIPE:
            call.note_stderr(err)
        returncode = call.finish(cast(int, child.proc.returncode))
        call.write_messages(stdout, stderr, tty)
        if call.error is not None:
            raise call.error
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
