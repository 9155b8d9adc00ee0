"""Run a command on a remote host the way :mod:`subprocess` runs one locally.

::

    r = sshwrap.run("web1", ["printf", "%s\\n", "a b", "$HOME"], capture_output=True, text=True,
                    check=True, timeout=10)      # r.args r.returncode r.stdout r.stderr r.host
    sshwrap.check_output("web1", "uname -a")     # a str goes to the remote shell as it is
    with sshwrap.Popen("web1", ["cat"], stdin=PIPE, stdout=PIPE) as p:
        out, err = p.communicate(b"data", timeout=5)

Each call runs the system ``ssh`` once (a fresh connection, unless the user's ssh_config
multiplexes).  What sshwrap adds, and why:

- **Quoting.** A list is quoted item by item (:func:`shlex.quote`) so every item arrives
  byte identical as one argument; a ``str`` is handed to the remote shell as it is.
- **stdin defaults to DEVNULL**, not to the caller's stdin as in :mod:`subprocess`.  ssh reads
  its stdin eagerly, so inheriting it silently swallows input meant for something else, the
  classic ``while read host; do ssh "$host" uptime; done < hosts`` bug (the first ssh eats the
  rest of the host list).  Remote commands rarely want the local stdin, and when they wait for
  it they hang where nobody sees a prompt.  Pass ``stdin=None`` to inherit, ``input=`` or
  ``stdin=PIPE`` to feed data.
- **Pipes mode** (default): ``ssh -T``, stdout and stderr separate and byte exact.
  ``tty=True``: ``ssh -tt -e none`` in a local pty of ``size=(rows, cols)``; the remote command
  sees a terminal, stdout and stderr arrive merged (``\\r\\n`` line ends, input echoed by the
  remote terminal), ``-e none`` so data cannot trigger ssh's ``~.`` escapes.
- **returncode** is the remote command's exit status.  ssh exits 255 for its own failures,
  for a remote ``exit 255`` and for a remote command killed by a signal; sshwrap tells them
  apart from ssh's debug log (``-E`` into a private file, never shown to the user; ssh's
  ordinary messages from it still go where ssh's stderr would go): an ssh failure raises an
  :class:`~sshwrap.errors.SSHError` subclass, a remote signal gives a negative returncode: minus
  the signal sshwrap sent when it sent one (timeout, ``terminate``, ``kill``,
  ``send_signal``), else :data:`~sshwrap.errors.UNKNOWN_SIGNAL` (-128): ssh does not report
  which signal it was.  Over a :class:`Connection` it is exact.
- **Timeouts and signals reach the remote command.**  Without a terminal, sshd does not stop a
  command when the client goes away.  sshwrap exports a random ``SSHWRAP_SESSION`` id in front
  of every command; on a timeout (and for ``send_signal``/``terminate``/``kill``) a second
  ssh finds the processes carrying it (``/proc``, Linux remotes) and signals their
  process group: SIGTERM, then SIGKILL after 2 s unless they are gone sooner (see
  :data:`STOP_MARGIN` for its bound).  With ``tty=True`` the hang-up does it too.
  When the local ssh is stopped by a signal sshwrap did not send (the user's ^C reaches ssh
  as well: ``returncode`` is then ``-SIGINT``), the remote command gets SIGHUP the same way,
  as a closing terminal would give it (``nohup``'d commands survive).
- **ssh's own messages** (warnings, errors) still reach the caller: written where ``stderr``
  goes, or appended to the ``stderr`` that ``communicate()``/``run()`` return with
  ``stderr=PIPE``, and kept in ``Popen.ssh_messages``.  ssh's debug lines never appear.
  ssh prints some failures (an unknown option, a bad port or value, a destination it
  rejects) on its stderr *before* its log opens: unless ``stderr=PIPE`` (then
  ``communicate()``/``run()`` read it) or ``STDOUT``, ssh's stderr passes through a relay
  on its way to ``stderr`` (the user sees it as it comes; ``run`` serves it with the other
  pipes, a ``Popen`` with a small thread) that keeps a bounded copy, so the
  :class:`~sshwrap.errors.SSHError` message is ssh's own last words either way
  (:class:`~sshwrap.errors.SSHConfigError` for a setting ssh refused).  Reading a
  ``stderr=PIPE`` yourself and calling ``wait()``: those early words are in what you read,
  and the message comes from the log alone.
- **Bounds.**  ``timeout`` bounds the call, its cleanup included: the call returns at most
  :data:`STOP_MARGIN` (0.8 s) after it passes, having stopped the remote command or given up on
  the unreachable host (the second ssh killed and reaped).  ``send_signal``/``terminate``
  return within :data:`SIGNAL_TIMEOUT` (5 s, or their ``timeout=``) and raise
  :class:`~sshwrap.errors.SSHConnectionError` when the signal could not be delivered.  A
  command over the kernel's argument limits raises
  :class:`~sshwrap.errors.CommandTooLongError` (a ``ValueError``) before ssh starts.

``run``/``call``/``check_*`` are the procedure :func:`sshwrap.core.ssh_run.run_ssh` run by
the sync driver (:func:`~sshwrap.core.waiting.run_sync`); :mod:`sshwrap.aio` runs the same
procedure on the event loop.  :class:`Popen` shares its start (argv, log, spawn, relay) and its
signals with :class:`sshwrap.aio.Process` (:mod:`sshwrap.core.invocation`).  Linux: ssh's
pipes and exit are waited for together through epoll and a pidfd.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import threading
from types import TracebackType
from typing import IO, Any, Unpack, cast

from .core.child_steps import Expired, exchange
from .core.completed import CompletedProcess, popen_repr, popen_state
from .core.getoutput import GetoutputSettings, getoutput_options, status_output
from .core.invocation import (
    SIGNAL_TIMEOUT,
    STOP_MARGIN,
    TEE_GRACE,
    Invocation,
    stop_failure,
)
from .core.options import (
    Command,
    PopenOptions,
    SSHRunOptions,
    SSHSettings,
    StdSpec,
    check_keywords,
    check_terminal,
    invocation_settings,
    popen_text,
)
from .core.ssh_run import decode_output, run_ssh, serve_terminal, terminal_reader
from .core.tty_process import terminal_sink, until_raw
from .core.waiting import run_sync
from .errors import CalledProcessError, SSHError, TimeoutExpired
from .io import ssh_child
from .io.deadline import deadline_after
from .io.pty import PtyWriter
from .terminal.modes import set_size

__all__ = [
    "DEVNULL",
    "PIPE",
    "SIGNAL_TIMEOUT",
    "STDOUT",
    "STOP_MARGIN",
    "Command",
    "CompletedProcess",
    "Invocation",
    "Popen",
    "PopenOptions",
    "SSHExitState",
    "SSHRunOptions",
    "SSHSettings",
    "StdSpec",
    "call",
    "check_call",
    "check_output",
    "getoutput",
    "getstatusoutput",
    "run",
    "stop_failure",
]

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT


class SSHExitState:
    """How a command's ssh ended, kept alike by both faces (:class:`Popen` and
    ``sshwrap.aio.Process``): ``host``, ``ssh_args`` (ssh's argv), then ``ssh_error`` and
    ``ssh_messages`` once ssh exited, its messages written where the caller's ``stderr`` goes
    or added to the pipes ``communicate()`` reads."""

    host: str
    ssh_args: list[str]
    ssh_error: SSHError | None
    ssh_messages: str
    _call: Invocation
    _stdout_arg: Any
    _stderr_arg: Any

    def _begin(self, call: Invocation, stdout: Any, stderr: Any) -> None:
        """Keep ``call`` and where the caller's ``stdout`` and ``stderr`` go."""
        self._call = call
        self.host = call.host
        self.ssh_args = call.argv
        self.ssh_error = None
        self.ssh_messages = ""
        self._stdout_arg = stdout
        self._stderr_arg = stderr

    def _settle(self, raw: int) -> int:
        """ssh exited with status ``raw``: the remote returncode (read once), with
        ``ssh_error`` and ``ssh_messages`` set and the messages written."""
        call = self._call
        if call.returncode is None:
            call.finish(raw)
            self.ssh_messages = call.messages
            call.write_messages(self._stdout_arg, self._stderr_arg, call.tty)
        self.ssh_error = call.error
        assert call.returncode is not None
        return call.returncode

    def _with_messages(self, out: Any, err: Any) -> tuple[Any, Any]:
        """``communicate()``'s ``(out, err)`` with ssh's messages added where they belong."""
        return self._call.append_messages(
            out, err, self._stdout_arg, self._stderr_arg, self._call.tty
        )


class Popen(SSHExitState, subprocess.Popen[Any]):
    """A remote command in a local ``ssh`` process, with the :class:`subprocess.Popen` API.

    ``Popen(host, command, stdin=DEVNULL, stdout=None, stderr=None, bufsize=-1, text=...,
    encoding=..., errors=..., env=..., cwd=..., tty=False, size=None, config=..., user=...,
    port=..., identity=..., jump=..., options=..., ssh=...)``: the keywords are
    :class:`~sshwrap.core.options.PopenOptions`.

    - ``args`` is the command as given; ``ssh_args`` the full ssh argv; ``pid`` is the local
      ssh's pid; ``host`` the destination.
    - ``stdout`` can be read line by line as the remote writes it (nothing waits for exit).
    - ``wait()`` and ``communicate()`` raise :class:`~sshwrap.errors.SSHError` when ssh itself
      failed (``poll()`` never raises; it sets ``ssh_error``).  ``ssh_messages`` holds what ssh
      printed at its normal log level (also written where ``stderr`` goes, or appended to the
      stderr that ``communicate()`` returns when ``stderr=PIPE``).
    - ``send_signal(sig)``/``terminate()`` deliver the signal to the remote command (through a
      second ssh, waiting for it at most :data:`SIGNAL_TIMEOUT` or ``timeout=``; raising
      :class:`~sshwrap.errors.SSHConnectionError` when it could not be delivered); ``kill()``
      sends SIGKILL there (in the background, at most :data:`STOP_MARGIN`) and kills the local
      ssh at once.
    - ``stdin`` defaults to DEVNULL (see the module docs for why).
    - ``tty=True``: ``stdout`` reads the terminal (stdout and stderr merged), ``stdin`` (with
      ``stdin=PIPE``) writes to it, ``resize(rows, cols)`` changes its size.
    """

    def __init__(self, host: str, args: Command, **kwargs: Unpack[PopenOptions]) -> None:
        check_keywords("Popen", kwargs, PopenOptions)
        check_terminal(kwargs)
        stdin = kwargs.get("stdin", DEVNULL)
        stdout, stderr = kwargs.get("stdout"), kwargs.get("stderr")
        textual, encoding = popen_text(kwargs)
        text, errors = textual or None, kwargs.get("errors")
        tty, bufsize = kwargs.get("tty", False), kwargs.get("bufsize", -1)
        self._begin(Invocation(host, args, tty=tty, **invocation_settings(kwargs)), stdout, stderr)
        self._tty = tty
        self._quiet = False
        self._master = -1  # the pty master (tty=True)
        self._pty_out: io.BufferedReader[Any] | None = None  # its reader
        self._deferring = False  # inside communicate(): wait() leaves the error to it
        self._tee: threading.Thread | None = None
        try:
            if tty:
                self._start_tty(stdin, stdout, bufsize, text, encoding, errors, kwargs.get("size"))
            else:
                _, self._tee = ssh_child.start_with_pipes(
                    super().__init__,
                    self._call.argv,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    seen=self._call.stderr,
                    relay_thread=True,
                    bufsize=bufsize,
                    text=text,
                    encoding=encoding,
                    errors=errors,
                )
        except BaseException:
            self._call.close()
            raise
        self.args = args

    def _start_tty(
        self,
        stdin: StdSpec,
        stdout: StdSpec,
        bufsize: int,
        text: bool | None,
        encoding: str | None,
        errors: str | None,
        size: tuple[int, int] | None,
    ) -> None:
        master = ssh_child.start_in_pty(super().__init__, self._call.argv, size)
        self.text_mode = bool(text)
        self.encoding = encoding
        self.errors = errors
        self._master = master
        buffered = terminal_reader(master, bufsize)
        reader: IO[Any] = buffered
        writer: IO[Any] | None = None
        if stdin == PIPE:
            pty_writer = PtyWriter(os.dup(master), self._ssh_in_raw_mode)
            writer = cast(IO[Any], pty_writer)
            if self.text_mode:
                writer = io.TextIOWrapper(
                    io.BufferedWriter(pty_writer),
                    encoding=encoding,
                    errors=errors,
                    write_through=True,
                )
        self._pty_out = buffered
        if self.text_mode:
            reader = io.TextIOWrapper(reader, encoding=encoding, errors=errors)
        # Like subprocess, ``stdout`` is there only with stdout=PIPE; otherwise communicate()
        # copies the terminal's output to where stdout goes (inherited: this stdout).
        self.stdout = reader if stdout == PIPE else None
        self.stdin = writer
        self.stderr = None

    def _ssh_in_raw_mode(self, timeout: float) -> bool:
        """Wait until ssh has put the local terminal in raw mode (or exited); True if raw."""
        return run_sync(until_raw(self._master, lambda: self.poll() is not None, timeout))

    # -- exit status ------------------------------------------------------------------------
    def _finish(self) -> None:
        if self._call.returncode is not None or self.returncode is None:
            return
        if self._tee is not None:
            # ssh has exited: its stderr relay reaches EOF at once (unless something ssh
            # started still holds the pipe: then it goes on alone, to that EOF).
            self._tee.join(TEE_GRACE)
            self._tee = None
        self.returncode = self._settle(self.returncode)

    def poll(self) -> int | None:
        """The remote returncode if ssh has exited, else None; never raises SSHError."""
        if super().poll() is not None:
            self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for ssh to exit; return the remote returncode or raise SSHError."""
        try:
            raw = super().wait(timeout)
        except TimeoutExpired:
            raise
        except subprocess.TimeoutExpired:
            raise TimeoutExpired(self.args, timeout or 0.0, host=self.host) from None
        if self._deferring:
            return raw  # communicate() finishes once it has ssh's stderr
        self._finish()
        if self.ssh_error is not None and not self._quiet:
            raise self.ssh_error
        assert self.returncode is not None
        return self.returncode

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]:
        """Send ``input``, read stdout and stderr to EOF together, wait; like subprocess."""
        if self._tty:  # the terminal merged stderr into stdout: a stderr PIPE reads nothing
            empty = "" if self.text_mode else b""
            out = self._tty_communicate(input, timeout)
            err = empty if self._stderr_arg == PIPE else None
        else:
            self._deferring = True
            try:
                out, err = super().communicate(input, timeout)
            except TimeoutExpired as e:
                e.timeout = timeout or 0.0
                raise
            except subprocess.TimeoutExpired as e:
                raise TimeoutExpired(
                    self.args, timeout or 0.0, e.output, e.stderr, host=self.host
                ) from None
            finally:
                self._deferring = False
            if self._stderr_arg == PIPE:
                self._call.note_stderr(err)
            self._finish()
            self.ssh_error = self._call.error
            if self.ssh_error is not None and not self._quiet:
                raise self.ssh_error
        return self._with_messages(out, err)

    def _tty_communicate(self, input: Any, timeout: float | None) -> Any:
        """communicate() through the terminal: input is typed, then ^D; output merged."""
        data = b""
        if input:
            if self.stdin is None:
                raise ValueError("input needs stdin=PIPE")
            self.stdin.flush()
            if isinstance(input, str):
                data = input.encode(self.encoding or "utf-8", self.errors or "strict")
            else:
                data = bytes(input)
        reader = self._pty_out
        assert reader is not None
        collect = self._stdout_arg == PIPE
        chunks = bytearray()

        collected = chunks.extend if collect else None
        seen = terminal_sink(self._call, self._stdout_arg, collected, self._master)
        pipes = ssh_child.ChildPipes(self)
        serve_terminal(pipes, reader, seen, data)
        try:
            run_sync(exchange(pipes, deadline_after(timeout)))
        except Expired:
            out = bytes(chunks) if collect else None
            raise TimeoutExpired(self.args, timeout or 0.0, out, None, host=self.host) from None
        finally:
            pipes.close()
        self.wait()
        if not collect:
            return None
        if not self.text_mode:
            return bytes(chunks)
        return decode_output(bytes(chunks), self.encoding, self.errors)

    # -- signals ----------------------------------------------------------------------------
    def send_signal(self, sig: int, *, timeout: float = SIGNAL_TIMEOUT) -> None:
        """Deliver ``sig`` to the remote command (through a second ssh; waits for it).

        Returns within ``timeout`` (default :data:`SIGNAL_TIMEOUT`, 5 s); raises
        :class:`~sshwrap.errors.SSHConnectionError` with ssh's words when the signal could not
        be delivered (host unreachable or not answering in time, ssh failed).
        """
        if self.poll() is not None:
            return
        error = run_sync(self._call.deliver(sig, budget=timeout))
        if error is not None and self.poll() is None:
            raise error

    def terminate(self, *, timeout: float = SIGNAL_TIMEOUT) -> None:
        """SIGTERM to the remote command (the returncode will say -15 when it dies of it).

        Bounded and raising like :meth:`send_signal`.
        """
        self.send_signal(signal.SIGTERM, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL to the remote command (in the background) and to the local ssh, at once."""
        if self.poll() is not None:
            return
        self._call.stop_in_background(signal.SIGKILL, escalate=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def resize(self, rows: int, cols: int) -> None:
        """Change the terminal size (``tty=True`` only); ssh forwards it to the remote pty.

        The pty is ssh's controlling terminal, so the kernel sends ssh the SIGWINCH."""
        if not self._tty:
            raise ValueError("resize() needs tty=True")
        set_size(self._master, rows, cols)

    # -- lifetime ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        """subprocess's ``<Popen: returncode: ... args: ...>`` with the host and the state."""
        state = popen_state(self.returncode, getattr(self, "ssh_error", None))
        return popen_repr(self, getattr(self, "host", ""), state)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._quiet = True
        try:
            super().__exit__(exc_type, value, traceback)
        finally:
            self._quiet = False
            self._call.close()
            if self._pty_out is not None:
                self._pty_out.close()

    def __del__(self, *args: Any, **kwargs: Any) -> None:
        call = getattr(self, "_call", None)
        if call is not None and self.returncode is not None:
            call.close()
        with contextlib.suppress(AttributeError):
            super().__del__(*args, **kwargs)


def run(
    host: str,
    args: Command,
    *,
    input: Any = None,
    capture_output: bool = False,
    timeout: float | None = None,
    check: bool = False,
    **kwargs: Unpack[SSHRunOptions],
) -> CompletedProcess:
    """Run ``args`` on ``host`` and wait; like :func:`subprocess.run`.

    Raises :class:`~sshwrap.errors.SSHError` (a subclass, its message ssh's own last words)
    when ssh failed, :class:`~sshwrap.errors.TimeoutExpired` once ``timeout`` has passed and
    the remote command is stopped (at most :data:`STOP_MARGIN` later),
    :class:`~sshwrap.errors.CalledProcessError` with ``check=True`` and a non-zero returncode.

    ``sudo=True`` runs the command through ``sudo -S`` on the host, as ``sudo_user`` (default
    root), with ``sudo_password`` (``str``, ``bytes`` or a callable returning one, called
    once, only if sudo asks) sent on the command's stdin when sudo prompts, then ``input``:
    the password is never in an argv, the environment, a log, the result or an exception; a
    password sudo refuses raises :class:`~sshwrap.errors.SudoError` at once (no retry), as
    does a sudo that ends before the command starts.  Not with ``tty=True`` or a ``stdin``.
    """
    return run_sync(run_ssh(host, args, input, timeout, capture_output, check, **kwargs))


def call(
    host: str, args: Command, *, timeout: float | None = None, **kwargs: Unpack[SSHRunOptions]
) -> int:
    """Run ``args`` on ``host`` and return its returncode; like :func:`subprocess.call`."""
    return run(host, args, timeout=timeout, **kwargs).returncode


def check_call(
    host: str, args: Command, *, timeout: float | None = None, **kwargs: Unpack[SSHRunOptions]
) -> int:
    """Like :func:`call` but raise CalledProcessError on a non-zero returncode."""
    retcode = call(host, args, timeout=timeout, **kwargs)
    if retcode:
        raise CalledProcessError(retcode, args, host=host)
    return 0


def check_output(
    host: str,
    args: Command,
    *,
    input: Any = None,
    timeout: float | None = None,
    **kwargs: Unpack[SSHRunOptions],
) -> Any:
    """Run ``args`` on ``host`` and return its stdout; CalledProcessError if non-zero."""
    if "stdout" in kwargs:
        raise ValueError("stdout argument not allowed, it will be overridden.")
    kwargs["stdout"] = PIPE
    return run(host, args, input=input, timeout=timeout, check=True, **kwargs).stdout


def getstatusoutput(
    host: str, cmd: Command, **options: Unpack[GetoutputSettings]
) -> tuple[int, str]:
    """``(returncode, output)`` of ``cmd`` on ``host``; like :func:`subprocess.getstatusoutput`.

    stderr is merged into the output, which is decoded (the locale's encoding unless
    ``encoding`` is given) with one trailing newline stripped; the status is the remote
    returncode (negative for a signal).  An ssh failure raises its
    :class:`~sshwrap.errors.SSHError`, a ``timeout`` :class:`~sshwrap.errors.TimeoutExpired`.
    Keywords: ``encoding``, ``errors``, ``timeout`` and the ssh settings.
    """
    return status_output(run(host, cmd, **getoutput_options(options)))


def getoutput(host: str, cmd: Command, **options: Unpack[GetoutputSettings]) -> str:
    """The output of ``cmd`` on ``host`` (stderr merged); like :func:`subprocess.getoutput`:
    :func:`getstatusoutput` without the status."""
    return getstatusoutput(host, cmd, **options)[1]
