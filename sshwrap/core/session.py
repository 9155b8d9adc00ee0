"""The procedures of a command on a session channel, written once for both faces.

Each is a generator of :mod:`sshwrap.core.waiting` (it yields what it waits for: a channel's
``opened``/``closed`` flag, the pump's ``closes`` counter), so ``run_sync`` runs it in the
caller's thread and ``run_async`` on the event loop, with the same steps and messages:

- :func:`open_session`: a ``session`` channel, waiting for a slot when the server's
  ``MaxSessions`` is reached (:class:`SessionPacer`);
- :func:`run_on_channel`: open, attach the streams, ``exec`` (``pty-req`` first for a tty),
  wait for the channel to close within the deadline; on timeout :func:`stop` (TERM, KILL after
  ``kill_after``, close after :data:`CLOSE_AFTER`) and ``TimeoutExpired`` with the output so
  far.  The call returns within ``timeout + kill_after + 0.5`` s whatever the host does; on a
  host that answers, the remote command is gone by then (on a frozen one nothing can reach it);
- :func:`hang_up`: the one cleanup for Ctrl-C (sync) and cancellation (async), whatever step
  was interrupted: a channel not open yet is closed as soon as it opens, an open one gets
  TERM and is closed, so nothing is left running.

``returncode`` is exact: the remote exit status, or ``-signum`` when the remote command was
killed by a signal (``exit-signal``).  ``tty=True`` asks sshd for a terminal (``pty-req``,
``size=(rows, cols)``, ``$TERM``) without any local pty: the output (stdout and stderr merged by
the remote terminal, CR LF line ends) arrives on stdout; the returncode stays exact.  As on a
terminal, the input has no end: ``run``'s ``input`` is typed and ended by ^D (as ``sshwrap.run``
does), and a ``Popen``'s stdin reaching its end sends nothing (sshd would take EOF as closing
the terminal's input side, after which a ``resize`` never reaches the remote command).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..io.deadline import capped, deadline_after
from ..io.pump import ChannelOpenTimeout, ProxyCore, Session
from ..protocol.channel import SESSION_LIMIT_CODES
from .channel_streams import RunStreams
from .options import tty_input
from .waiting import Procedure, WaitChange, WaitFlag

__all__ = [
    "CLOSE_AFTER",
    "KILL_AFTER",
    "NO_SLOT",
    "OPEN_TIMEOUT",
    "Backoff",
    "ChannelStreams",
    "SessionPacer",
    "hang_up",
    "open_session",
    "run_on_channel",
    "start_command",
    "start_on_channel",
    "stop",
]

KILL_AFTER = 0.5
"""Seconds between the TERM and the KILL a timeout sends (default)."""
CLOSE_AFTER = 0.4
"""Seconds after the KILL before the channel is closed without waiting any more."""
OPEN_TIMEOUT = 60.0
"""Seconds a channel open may take when the call has no timeout of its own."""

OPEN_TIMED_OUT = "timed out waiting for the server to open a session channel"
NO_SLOT = "timed out waiting for the server to allow another session"


class Backoff:
    """A retry's growing delay: 10 ms, doubled each time, at most 250 ms."""

    def __init__(self, first: float = 0.01, most: float = 0.25) -> None:
        self._delay = first
        self._most = most

    def next(self) -> float:
        """The delay before the next try."""
        delay = self._delay
        self._delay = min(self._delay * 2, self._most)
        return delay


class SessionPacer:
    """When to try a session open again after the server refused it for its session limit.

    sshd refuses a session beyond ``MaxSessions`` ("open failed") and frees a slot only once
    it has our CLOSE for a finished channel, a moment after we learn the channel ended.  So a
    refused open is tried again when one of our channels closes or after a delay growing
    from 10 ms to 250 ms, whichever comes first.  With no channel of ours open, the refusal
    is taken as final after ``patience`` seconds (someone else holds the sessions, or the
    server refuses sessions for another reason).
    """

    def __init__(self, core: ProxyCore, patience: float = 2.0) -> None:
        self.core = core
        self.patience = patience
        self._backoff = Backoff()
        self._alone_since: float | None = None

    def pause(self, ch: Session) -> float | None:
        """Seconds to wait at most before trying again, or None: do not try again."""
        if ch.open_code not in SESSION_LIMIT_CODES or ch.lost or ch.open_error is None:
            return None
        now = time.monotonic()
        if self.core.open_channels:
            self._alone_since = None
        elif self._alone_since is None:
            self._alone_since = now
        elif now - self._alone_since > self.patience:
            return None
        return self._backoff.next()


def open_session(core: ProxyCore, deadline: float | None) -> Procedure[Session]:
    """A ``session`` channel, confirmed by the server before ``deadline``.

    A refusal for the server's session limit is tried again when one of our channels closes
    (``core.closes``) or after the pacer's delay (:class:`SessionPacer`).
    ``ChannelOpenTimeout`` when the deadline passes, ``ChannelLost`` when the master went
    away, ``ChannelError`` for another refusal.  Interrupted (Ctrl-C, cancel), the channel
    is given up: closed as soon as it opens."""
    pacer = SessionPacer(core)
    refused = False  # the server refused an open for its session limit: waiting for a slot
    while True:
        seen = core.closes.value
        ch = core.start_session()
        try:
            opened = yield WaitFlag(ch.opened, capped(None, deadline))
        except BaseException:
            core.abandon(ch)
            raise
        if not opened:
            core.abandon(ch)
            raise ChannelOpenTimeout(NO_SLOT if refused else OPEN_TIMED_OUT)
        pause = pacer.pause(ch)
        if pause is None:
            break
        refused = True
        left = capped(None, deadline)
        if left is not None:
            if left <= 0:
                raise ChannelOpenTimeout(NO_SLOT)
            pause = min(pause, left)
        if core.alive:
            yield WaitChange(core.closes, seen, pause)
    core.check_opened(ch)
    return ch


def start_command(
    core: ProxyCore, ch: Session, command: str, tty: bool, size: tuple[int, int] | None
) -> None:
    """``exec`` the command (with the session environment of the user's ssh config), after
    asking for a remote terminal when ``tty``."""
    env = core.session_env
    if tty:
        rows, cols = size or (24, 80)
        ch.request_pty(os.environ.get("TERM") or "xterm", rows, cols)
    ch.exec(command, env=env or None)


def hang_up(core: ProxyCore, ch: Session) -> None:
    """The cleanup of an interrupted call (Ctrl-C, cancel, an error): TERM to the remote
    command if the channel is open, and the channel closed (at once, or as soon as it opens)."""
    if ch.opened.is_set() and ch.open_error is None and not ch.lost:
        ch.send_signal(signal.SIGTERM)
    core.abandon(ch)


def stop(ch: Session, kill_after: float) -> Procedure[None]:
    """TERM, then KILL after ``kill_after`` s, then close the channel after ``CLOSE_AFTER``.

    Bounded: it ends within ``kill_after + CLOSE_AFTER`` seconds whatever the host does (a
    frozen host or session never answers; the channel is closed on our side and the pump
    forgets it when the peer's CLOSE comes, or the connection ends)."""
    ch.send_signal(signal.SIGTERM)
    if (yield WaitFlag(ch.closed, kill_after)):
        return
    ch.send_signal(signal.SIGKILL)
    if not (yield WaitFlag(ch.closed, CLOSE_AFTER)):
        ch.close()


class ChannelStreams(Protocol):
    """The local ends of a command (:mod:`sshwrap.core.channel_streams`)."""

    def attach(self, ch: Session) -> None:
        """Give the streams to the channel (before ``exec``)."""

    def release(self) -> None:
        """Close every descriptor (the channel never got them)."""

    def abandon(self) -> None:
        """After ``attach``, the start failed: close what the channel does not own."""


def start_on_channel(
    core: ProxyCore,
    streams: ChannelStreams,
    command: str,
    *,
    tty: bool,
    size: tuple[int, int] | None,
    deadline: float | None,
) -> Procedure[Session]:
    """Open a session channel (by ``deadline``), attach ``streams``, start ``command``: the
    channel.  Interrupted or failing, the streams are released and the channel hung up."""
    try:
        ch = yield from open_session(core, deadline)
    except BaseException:
        streams.release()
        raise
    try:
        streams.attach(ch)
        if tty and ch.src.data is not None:
            # typed into a terminal: the input's end is a ^D (a terminal's input gets no EOF)
            ch.src.data = memoryview(tty_input(bytes(ch.src.data)))
        start_command(core, ch, command, tty, size)
    except BaseException:
        hang_up(core, ch)
        streams.abandon()
        raise
    return ch


def run_on_channel(
    core: ProxyCore,
    streams: RunStreams,
    command: str,
    *,
    timeout: float | None,
    deadline: float | None,
    check: bool,
    kill_after: float,
    tty: bool,
    size: tuple[int, int] | None,
    make_result: Callable[..., Any],
) -> Procedure[Any]:
    """Run ``command`` on a new session channel and wait for it (see the module docstring).

    ``deadline`` (``time.monotonic()``) is when ``timeout`` runs out (the caller may have spent
    part of it restarting the master).  The result is ``make_result(args, returncode, stdout,
    stderr)``; the errors are ``TimeoutExpired``, ``CalledProcessError`` (``check``) and those
    of :func:`~sshwrap.core.channel_streams.ended_error`."""
    open_by = deadline_after(OPEN_TIMEOUT) if deadline is None else deadline
    try:
        ch = yield from start_on_channel(
            core, streams, command, tty=tty, size=size, deadline=open_by
        )
    except ChannelOpenTimeout:
        if timeout is None:
            raise
        raise streams.timed_out(timeout) from None
    try:
        if not (yield WaitFlag(ch.closed, capped(None, deadline))):
            yield from stop(ch, kill_after)
            assert timeout is not None
            raise streams.timed_out(timeout)
    except BaseException:
        hang_up(core, ch)  # Ctrl-C, cancel, or the stop itself interrupted: nothing left running
        raise
    return streams.result(ch, check, make_result)
