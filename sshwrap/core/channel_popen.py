"""``Popen`` for a command on a session channel: :class:`ChannelPopen`, like ``subprocess.Popen``.

The command runs on a channel of :class:`sshwrap.io.pump.ProxyCore`, no local process: the
``stdin``/``stdout``/``stderr`` pipes are real pipes whose far ends belong to the pump (see
:class:`sshwrap.core.channel_streams.PopenStreams`), so they work with ``select``,
``readline`` and other threads.  :func:`start_popen` is the procedure that opens the channel
and starts the command (both faces: ``Connection.Popen`` and
``AsyncConnection.create_process``).

``returncode`` is exact (``-signum`` for a remote signal death).  A channel that ended without
its exit status and all its output gives returncode 255, the error kept in ``ssh_error``
(``wait`` and ``communicate`` raise it), as ``sshwrap.Popen`` does when ssh itself fails.
"""

from __future__ import annotations

import contextlib
import io
import locale
import os
import selectors
import signal
import time
from types import TracebackType
from typing import IO, Any, Unpack, cast

from ..errors import SSHError, TimeoutExpired
from ..io.deadline import deadline_after
from ..io.flags import Flag
from ..io.pump import ProxyCore, Session
from .channel_streams import PopenStreams, decode, ended_error
from .completed import popen_repr, popen_state
from .options import (
    CommandOptions,
    StreamOptions,
    TerminalOptions,
    TextOptions,
    popen_text,
    text_option,
)
from .session import KILL_AFTER, OPEN_TIMEOUT, start_on_channel
from .waiting import Procedure

__all__ = ["ChannelPopen", "ChannelPopenOptions", "start_popen"]


class ChannelPopenOptions(CommandOptions, StreamOptions, TextOptions, TerminalOptions, total=False):
    """The keywords of ``Connection.Popen`` after the command: those of ``sshwrap.Popen``
    without the ssh settings (the master has them)."""

    bufsize: int


def start_popen(
    core: ProxyCore, host: str, args: object, command: str, **options: Unpack[ChannelPopenOptions]
) -> Procedure[ChannelPopen]:
    """Open a session channel, attach the pipes, start ``command`` (``env`` and ``cwd`` are
    in it already): the ``ChannelPopen``.

    Interrupted (Ctrl-C, cancel) or failing, every descriptor is closed and the channel hung
    up (:func:`sshwrap.core.session.hang_up`)."""
    streams = PopenStreams.for_popen(options)
    ch = yield from start_on_channel(
        core,
        streams,
        command,
        tty=options.get("tty", False),
        size=options.get("size"),
        deadline=deadline_after(OPEN_TIMEOUT),
    )
    return ChannelPopen(
        ch,
        host,
        args,
        streams,
        text=text_option(options),
        encoding=options.get("encoding"),
        errors=options.get("errors"),
        bufsize=options.get("bufsize", -1),
    )


class ChannelPopen:
    """A remote command on a session channel, with the interface of ``subprocess.Popen``.

    ``stdin``/``stdout``/``stderr`` are file objects for ``PIPE`` (binary, or text with
    ``text``/``encoding``/``errors``), else None.  ``pid`` is None: there is no local process.
    ``send_signal``/``terminate``/``kill`` send RFC 4254 ``signal`` requests, which sshd
    delivers to the remote command's process group.
    """

    def __init__(
        self,
        channel: Session,
        host: str,
        args: object,
        streams: PopenStreams,
        *,
        text: bool | None = None,
        encoding: str | None = None,
        errors: str | None = None,
        bufsize: int = -1,
        kill_after: float = KILL_AFTER,
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
        self.text_mode, self.encoding = popen_text(
            {"text": text, "encoding": encoding, "errors": errors}
        )
        self.errors = errors
        self._encoding = self.encoding
        self._errors = errors
        self._comm: dict[int, bytearray] = {}
        self._ch = channel
        if streams.stdin is not None:
            self.stdin = self._wrap(streams.stdin, "wb", bufsize)
        if streams.stdout is not None:
            self.stdout = self._wrap(streams.stdout, "rb", bufsize)
        if streams.stderr is not None:
            self.stderr = self._wrap(streams.stderr, "rb", bufsize)

    @property
    def channel(self) -> Session:
        """The session channel the command runs on."""
        return self._ch

    @property
    def closed(self) -> Flag:
        """Set when the channel is over (the command ended, or the connection was lost)."""
        return self._ch.closed

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
            self.ssh_error = ended_error(self.host, ch)
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
            return decode(data, self._encoding, self._errors)
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
        """subprocess's ``<ChannelPopen: returncode: ... args: ...>`` with the host and the
        state (core.completed.popen_repr): ``running``, ``ended`` (not waited for yet),
        ``exited``, ``killed by a signal``, ``failed (CommandLostError)``."""
        state = popen_state(self.returncode, self.ssh_error)
        if self.returncode is None and self._ch.closed.is_set():
            state = "ended"
        return popen_repr(self, self.host, state)
