"""One session channel as its caller sees it (``Session``), and the channel errors.

A ``Session`` is the caller's handle on a channel that :class:`sshwrap.io.pump.ProxyCore`
pumps: requests go through the core's channel machine (under the core's lock), and the pump
fills in what the server said (exit status, refusals) and sets the ``opened`` and ``closed``
flags.  The protocol state itself (``state``, the EOF flags, the windows) lives in the
machine's record of the channel; the session only reads it.
"""

from __future__ import annotations

import threading
from typing import Protocol

from ..errors import UNKNOWN_SIGNAL, CommandTooLongError
from ..protocol.channel import (
    MAX_COMMAND,
    PACKET_LIMIT,
    PAYLOAD_MAX,
    ChannelMux,
    ChannelState,
    env_request_size,
    exec_command_size,
)
from .channel_io import Sink, Source, signal_name, signal_number
from .flags import Flag

__all__ = [
    "ChannelError",
    "ChannelHost",
    "ChannelLost",
    "ChannelOpenTimeout",
    "Session",
    "check_exec_size",
]


class ChannelHost(Protocol):
    """What a session needs of the core that pumps it (``ProxyCore``)."""

    lock: threading.Lock
    mux: ChannelMux
    session_env: dict[str, str]
    dead_reason: str

    def send_queued_locked(self) -> None:
        """(lock held) Write what the machine queued."""

    def start_input_locked(self, ch: Session) -> None:
        """(lock held) The command runs: send what its input has within the window."""

    def close_channel_locked(self, ch: Session) -> None:
        """(lock held) Close the channel and its input."""


class ChannelError(OSError):
    """A channel could not be opened or a request on it failed."""


class ChannelOpenTimeout(ChannelError):
    """The server did not confirm a channel open in time."""


class ChannelLost(ChannelError):
    """The connection to the master ended while the channel was open (master gone)."""


def check_exec_size(command: str, env: dict[str, str] | None = None) -> None:
    """``CommandTooLongError`` (a ``ValueError``) naming the limit when ``command`` (or an
    ``env`` request) would not fit in one packet (see :data:`MAX_COMMAND`); checked before
    anything is sent, since an oversized request breaks every channel of the connection."""
    size = exec_command_size(command)
    if size > MAX_COMMAND:
        raise CommandTooLongError(
            f"the command is {size} bytes; one exec request over an OpenSSH master carries at "
            f"most {MAX_COMMAND} bytes (its {PACKET_LIMIT // 1024} KiB packet limit)",
            limit=MAX_COMMAND,
            size=size,
        )
    for k, v in (env or {}).items():
        n = env_request_size(k, v)
        if n > PAYLOAD_MAX:
            raise CommandTooLongError(
                f"the environment variable {k!r} is too long for one env request "
                f"({n} bytes; at most {PAYLOAD_MAX}, OpenSSH's packet limit)",
                limit=PAYLOAD_MAX,
                size=n,
            )


class Session:
    """One ``session`` channel: exec a command, move its data, learn how it ended.

    Created by ``ProxyCore.start_session``; the caller then calls ``setup_io`` and ``exec``.
    ``closed`` is set when the channel is over (or the master went away: ``lost``).
    """

    def __init__(self, core: ChannelHost, local_id: int) -> None:
        self.core = core
        self.local_id = local_id
        self._record = core.mux.channel(local_id)
        self.opened = Flag()
        self.closed = Flag()
        self.open_error: str | None = None
        self.open_code = 0
        self.exec_failed = False
        self.pty_refused = False
        self.started = False  # exec was sent: input may flow
        self.tty = False  # a remote terminal was asked for: its input never gets EOF
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.exit_core_dumped = False
        self.exit_message = ""
        self.out = Sink()
        self.err = Sink()
        self.src = Source()

    @property
    def state(self) -> ChannelState:
        """The channel's protocol state (opening, open, closing, closed, failed, lost)."""
        return self._record.state

    @property
    def lost(self) -> bool:
        """True when the connection ended before the channel was closed."""
        return self._record.state is ChannelState.LOST

    @property
    def remote_eof(self) -> bool:
        """True once the remote side sent EOF (or closed the channel)."""
        return self._record.eof_received or self._record.state is ChannelState.CLOSED

    # -- caller side -------------------------------------------------------------------
    def setup_io(self, src: Source, out: Sink, err: Sink) -> None:
        """Attach input and output (before ``exec``)."""
        with self.core.lock:
            self.src, self.out, self.err = src, out, err

    def exec(self, command: str, env: dict[str, str] | None = None) -> None:
        """Send ``env`` (best effort) and ``exec`` requests; input starts flowing at once.

        The exec reply is not awaited (it comes before any output); a refusal marks the
        session ``exec_failed`` and closes it.
        """
        try:
            check_exec_size(command, env)
        except ValueError:
            self.close()
            raise
        core = self.core
        with core.lock:
            self._check_open()
            if self._record.state is ChannelState.OPENING:
                raise ChannelError("the channel is not open yet")
            for k, v in (env or {}).items():
                core.mux.env(self.local_id, k, v)
            core.mux.exec(self.local_id, command)
            core.start_input_locked(self)
            core.send_queued_locked()

    def request(self, name: str, body: bytes = b"", *, want_reply: bool = False) -> None:
        """Send a raw channel request ``name`` with its encoded ``body`` (its reply, if
        asked for, is only counted).  For what the typed methods do not cover."""
        with self.core.lock:
            self.core.mux.request(self.local_id, name, body, want_reply=want_reply)
            self.core.send_queued_locked()

    def request_pty(self, term: str, rows: int, cols: int) -> None:
        """Ask for a remote terminal (``pty-req``, before ``exec``).  Not awaited: a refusal
        only means the command runs without a terminal, as with ``ssh -t``."""
        with self.core.lock:
            self._check_open()
            self.tty = True
            self.core.mux.pty_req(self.local_id, term, rows, cols)
            self.core.send_queued_locked()

    def resize(self, rows: int, cols: int) -> None:
        """Tell the remote terminal its new size (``window-change``)."""
        with self.core.lock:
            self.core.mux.window_change(self.local_id, rows, cols)
            self.core.send_queued_locked()

    def send_signal(self, sig: int) -> None:
        """Send a ``signal`` request (delivered by sshd >= 7.9 to the session's process group)."""
        with self.core.lock:
            self.core.mux.signal(self.local_id, signal_name(sig))
            self.core.send_queued_locked()

    def send_eof(self) -> None:
        """Tell the remote side there is no more input."""
        with self.core.lock:
            self.core.mux.send_eof(self.local_id)
            self.core.send_queued_locked()

    def close(self) -> None:
        """Close the channel (the remote command gets a hang-up of its channel)."""
        with self.core.lock:
            self.core.close_channel_locked(self)

    @property
    def returncode(self) -> int | None:
        """``exit-status``, or ``-signum`` for ``exit-signal`` (``UNKNOWN_SIGNAL`` for a name
        this system does not know); None when neither came."""
        if self.exit_status is not None:
            return self.exit_status
        if self.exit_signal is not None:
            num = signal_number(self.exit_signal)
            return -num if num is not None else UNKNOWN_SIGNAL
        return None

    def _check_open(self) -> None:
        state = self._record.state
        if state is ChannelState.LOST:
            raise ChannelLost("the connection to the control master was lost")
        if state in (ChannelState.CLOSED, ChannelState.FAILED):
            raise ChannelError("channel is closed")

    def __repr__(self) -> str:
        return f"<Session {self.local_id} {self.state.value}>"
