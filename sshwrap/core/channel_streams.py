"""The local ends of a command on a session channel: ``subprocess``-style stream arguments
turned into the pump's :class:`~sshwrap.io.pump.Source` and :class:`~sshwrap.io.pump.Sink`.

- :class:`RunStreams` (``run``) needs no pipes at all: ``PIPE`` output is collected straight
  into memory by the pump, ``input`` is sent from memory, files and fds are read or written
  directly; after the channel ends it gives the outputs, the result or the typed error;
- :class:`PopenStreams` (``Popen``) makes real pipes: the far ends belong to the pump, which
  moves data between them and the channel, the near ends are handed to the caller.

``stdin`` defaults to ``DEVNULL`` as in ``sshwrap.run`` (the remote command reads end-of-file
at once); ``stdin=None`` reads this process's own stdin (from the pump thread); output
``None`` goes to this process's stdout / stderr.  Text mode decodes the collected bytes
(universal newlines, as ``subprocess``).  :meth:`RunStreams.for_run` and
:meth:`PopenStreams.for_popen` take a call's keywords as given and make :mod:`subprocess`'s
checks first (:mod:`sshwrap.core.options`), as the other faces make them.

``sudo=True`` (:mod:`sshwrap.core.sudo`; ``run`` only): :meth:`RunStreams.wrap` puts the
command line behind ``sudo -S``; the stdin source is held, the stderr sink has the sudo
machine as its filter (in the pump thread): when sudo prompts, the password is released
into the source, once the command started ``input`` and the end; a refused password closes
the channel at once and :meth:`RunStreams.result` raises
:class:`~sshwrap.errors.SudoError`.  A ``sudo_password`` callable is asked before the
command starts (never in the pump thread).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Callable, Mapping
from typing import IO, Any, cast

from ..errors import CalledProcessError, CommandLostError, SSHError, TimeoutExpired
from ..io.pump import Session, Sink, Source
from .options import check_terminal, run_streams, text_encoding, text_option
from .sudo import SudoRun, SudoSettings, sudo_settings

__all__ = ["PopenStreams", "RunStreams", "Stream", "decode", "ended_error", "text_mode"]

PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT
DEVNULL = subprocess.DEVNULL

_PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

Stream = int | IO[Any] | None
"""A stream argument as in :mod:`subprocess`: PIPE, DEVNULL, STDOUT, None, an fd, a file."""


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
        # DEVNULL is sshwrap's default stdin, so it is let through here; run_streams refuses
        # it when given (RunStreams.for_run).
        if stdin not in (DEVNULL, None):
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


def text_mode(text: bool | None, encoding: str | None, errors: str | None) -> bool:
    """Whether ``text``/``encoding``/``errors`` ask for ``str`` streams (as subprocess)."""
    return bool(text or encoding or errors)


def decode(data: bytes, encoding: str | None, errors: str | None) -> str:
    """Bytes of a stream as text: the locale's encoding by default, universal newlines."""
    s = data.decode(encoding or text_encoding(), errors or "strict")
    return s.replace("\r\n", "\n").replace("\r", "\n")


def ended_error(
    host: str, ch: Session, outputs: Callable[[], tuple[Any, Any]] | None = None
) -> SSHError | None:
    """The SSHError for a channel that ended without its exit status and all its output
    (``outputs()`` gives what arrived, for the exception), else None.

    A connection lost before the status and the end of the output came (sshd may send
    ``exit-status`` while output still waits for window) is ``CommandLostError``; a channel
    that ended with neither status nor signal (the server refused the command) an
    ``SSHError``: never a returncode for a command whose end was not seen."""
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


class _SudoFilter:
    """The stderr filter of a ``run`` under sudo (pump thread): the :class:`SudoRun`
    machine, its stdin bytes released into the held source, a refusal closing the channel."""

    def __init__(self, sudo: SudoRun, src: Source) -> None:
        self.sudo = sudo
        self.src = src
        self.channel: Session | None = None

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """See :class:`~sshwrap.io.channel_io.StreamFilter`."""
        out, consumed, send, end = self.sudo.feed(data)
        ch = self.channel
        if ch is not None and (send or end or self.sudo.failed is not None):
            with ch.core.lock:
                if self.sudo.failed is not None:
                    ch.core.close_channel_locked(ch)
                else:
                    self.src.release(send, last=end)
                    ch.core.start_input_locked(ch)  # (started already: sends what came)
        return out, consumed

    def end(self) -> bytes:
        """See :class:`~sshwrap.io.channel_io.StreamFilter`."""
        return self.sudo.end()


def _sudo_ends(
    host: str, sudo: SudoSettings, data: bytes | None, err: Sink, out: Sink
) -> tuple[Source, Sink, _SudoFilter]:
    """The held source and the filtered stderr sink of a ``run`` under sudo (a stderr merged
    into stdout gets a sink of its own that writes where stdout's goes)."""
    if sudo.password.given:
        sudo.password.get()  # a callable is asked here, in the caller's thread
    machine = _SudoFilter(SudoRun(host, sudo, data), Source(held=True))
    if err is out:
        err = Sink(collect=out.collect, fd=out.fd)
        err.buf = out.buf
    err.filter = machine
    return machine.src, err, machine


class RunStreams:
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
        sudo: SudoSettings | None = None,
    ) -> None:
        _, stdout, stderr = run_streams(None, capture_output, {"stdout": stdout, "stderr": stderr})
        if sudo is not None and stdin != DEVNULL:
            raise ValueError(
                "sudo=True takes the command's input from input= only (stdin must stay "
                "DEVNULL): sudo reads the password from that same stdin"
            )
        self.host, self.args = host, args
        self.stdout_spec, self.stderr_spec = stdout, stderr
        self.textual = text_mode(text, encoding, errors)
        self.encoding, self.errors = encoding, errors
        data: bytes | None
        if isinstance(input, str):
            data = input.encode(encoding or text_encoding(), errors or "strict")
        else:
            data = input
        self.src = _source(stdin, None if sudo is not None else data)
        self._sudo: _SudoFilter | None = None
        try:
            self.out, _ = _sink(stdout, collect_pipe=True)
            self.err, _ = _stderr_sink(stderr, self.out, collect_pipe=True)
            if sudo is not None:
                self.src, self.err, self._sudo = _sudo_ends(host, sudo, data, self.err, self.out)
        except BaseException:
            made = [getattr(self, "out", None), getattr(self, "err", None)]
            _release(self.src, [s for i, s in enumerate(made) if s and s not in made[:i]])
            raise

    @classmethod
    def for_run(cls, host: str, args: object, options: Mapping[str, Any]) -> RunStreams:
        """The streams of ``run(args, **options)`` (the keywords as the caller gave them),
        refusing what :func:`subprocess.run` refuses (``input`` with a ``stdin``,
        ``capture_output`` with ``stdout``/``stderr``, ``text`` and ``universal_newlines``
        disagreeing) and ``size`` without ``tty``, as every face does."""
        check_terminal(options)
        sudo = sudo_settings(options)
        input_ = options.get("input")
        stdin, stdout, stderr = run_streams(input_, options.get("capture_output", False), options)
        return cls(
            host,
            args,
            input=input_,
            stdin=DEVNULL if input_ is not None else stdin,
            stdout=stdout,
            stderr=stderr,
            capture_output=False,
            text=text_option(options),
            encoding=options.get("encoding"),
            errors=options.get("errors"),
            sudo=sudo,
        )

    def wrap(self, command: str) -> str:
        """The command line to ``exec``: ``command`` itself, or behind ``sudo -S`` when the
        call has ``sudo=True`` (its prompt and start mark are this object's)."""
        return command if self._sudo is None else self._sudo.sudo.command(command)

    def attach(self, ch: Session) -> None:
        """Give the streams to the channel (before ``exec``)."""
        if self._sudo is not None:
            self._sudo.channel = ch
        ch.setup_io(self.src, self.out, self.err)

    def release(self) -> None:
        """Close our descriptors when the channel never started."""
        _release(self.src, [self.out, self.err])

    def abandon(self) -> None:
        """After ``attach``: nothing to close here (every descriptor is the channel's)."""

    def outputs(self) -> tuple[Any, Any]:
        """What was collected for ``PIPE`` (None for the others), decoded in text mode."""
        o: bytes | str | None = bytes(self.out.buf) if self.stdout_spec == PIPE else None
        e: bytes | str | None = bytes(self.err.buf) if self.stderr_spec == PIPE else None
        if self.textual:
            o = None if o is None else decode(cast(bytes, o), self.encoding, self.errors)
            e = None if e is None else decode(cast(bytes, e), self.encoding, self.errors)
        return o, e

    def timed_out(self, timeout: float) -> TimeoutExpired:
        """``TimeoutExpired`` with the output so far."""
        o, e = self.outputs()
        return TimeoutExpired(cast(Any, self.args), timeout, o, e, host=self.host)

    def result(self, ch: Session, check: bool, make_result: Callable[..., Any]) -> Any:
        """``make_result(args, returncode, stdout, stderr)`` for the ended channel, or the
        typed error (:func:`ended_error`; ``CalledProcessError`` with ``check``; under sudo
        a :class:`~sshwrap.errors.SudoError` first, for a refused password or a sudo that
        ended before the command started)."""
        if self._sudo is not None and self._sudo.sudo.failed is not None:
            raise self._sudo.sudo.failed
        failure = ended_error(self.host, ch, self.outputs)
        if failure is not None:
            raise failure
        rc = ch.returncode
        if self._sudo is not None:
            refused = self._sudo.sudo.outcome(rc)
            if refused is not None:
                raise refused
        assert rc is not None
        o, e = self.outputs()
        if check and rc != 0:
            raise CalledProcessError(rc, cast(Any, self.args), o, e, host=self.host)
        return make_result(self.args, rc, o, e)


class PopenStreams:
    """The streams of one ``Popen``: the pump's source and sinks, and the near ends of the
    pipes for ``PIPE`` (``stdin``, ``stdout``, ``stderr``: fds, or None)."""

    def __init__(self, stdin: Stream, stdout: Stream, stderr: Stream) -> None:
        self.stdin: int | None = None
        if stdin == PIPE:
            r, w = _pipe()
            os.set_blocking(r, False)
            self.src = Source(fd=r, own=True)
            self.stdin = w
        else:
            self.src = _source(stdin, None)
        self.stdout: int | None = None
        self.stderr: int | None = None
        try:
            self.out, self.stdout = _sink(stdout, collect_pipe=False)
            self.err, self.stderr = _stderr_sink(stderr, self.out, collect_pipe=False)
        except BaseException:
            self.release()
            raise

    @classmethod
    def for_popen(cls, options: Mapping[str, Any]) -> PopenStreams:
        """The streams of ``Popen(args, **options)``, after the checks every face makes
        (``size`` without ``tty``; ``text`` and ``universal_newlines`` disagreeing; the sudo
        keywords, which are ``run``'s only: never silently run without sudo)."""
        check_terminal(options)
        text_option(options)
        given = sorted(k for k in ("sudo", "sudo_password", "sudo_user") if k in options)
        if given:
            raise TypeError(
                f"Popen() got an unexpected keyword argument {given[0]!r} (sudo= is run's)"
            )
        return cls(options.get("stdin", DEVNULL), options.get("stdout"), options.get("stderr"))

    def attach(self, ch: Session) -> None:
        """Give the far ends to the channel (before ``exec``)."""
        ch.setup_io(self.src, self.out, self.err)

    def release(self) -> None:
        """Close every descriptor (the channel never got them)."""
        sinks = [s for s in (getattr(self, "out", None), getattr(self, "err", None)) if s]
        _release(self.src, sinks)
        self.abandon()

    def abandon(self) -> None:
        """Close the near ends (after ``attach`` the far ones are the channel's)."""
        for fd in (self.stdin, self.stdout, self.stderr):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
