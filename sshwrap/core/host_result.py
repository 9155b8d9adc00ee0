"""What a fan-out reports per host: ``HostResult`` (a fleet copy: ``CopyResult``), and how
ssh's exit turns into one.

ssh exits 255 for its own failure, for a remote command that exited 255 and for one killed
by a signal; its ``-E`` log tells them apart (:func:`interpret_ssh_exit`).
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import (
    SkippedError,
    SSHConnectionError,
    SSHError,
    SudoError,
    interpret_exit,
    ssh_messages,
)

__all__ = [
    "CopyInterrupted",
    "CopyResult",
    "FanoutInterrupted",
    "HostOutcome",
    "HostResult",
    "Interrupted",
    "Status",
    "connect_timeout_error",
    "in_input_order",
    "interpret_ssh_exit",
    "result_status",
    "skipped_result",
    "unfinished_result",
]

Status = Literal["ok", "failed", "timeout", "ssh_error", "cancelled", "skipped"]


class HostOutcome:
    """What every per-host result of a fleet call (``HostResult``, ``CopyResult``) derives
    from ``status``: ``ok`` and ``timed_out``."""

    status: Status

    @property
    def ok(self) -> bool:
        """True when the host's work completed (a command: it ran and exited 0)."""
        return self.status == "ok"

    @property
    def timed_out(self) -> bool:
        """True when ``timeout`` or ``deadline`` stopped this host."""
        return self.status == "timeout"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a sync fleet call, raised after every host stopped: ``results`` holds one
    result per host, in input order (those that finished, the others ``cancelled``)."""

    def __init__(self, results: list[Any]) -> None:
        super().__init__("interrupted")
        self.results = results


@dataclass
class HostResult(HostOutcome):
    """What happened on one host.

    - ``returncode``: the remote command's exit status; ``-signum`` (see ``signalled``) when
      a signal killed it; ``None`` when there is no remote status (ssh failed, timed out,
      cancelled).
    - ``stdout`` / ``stderr``: the remote command's bytes (complete, or up to the moment the
      host was stopped).  ssh's own messages are not mixed in (see ``error`` and
      ``ssh_log``), except what ssh prints before its log opens (a setting it refuses):
      that stays in ``stderr`` and is the ``error``'s message too.
    - ``error``: the typed ``SSHError`` when ssh itself failed (refused, timed out, name not
      resolved, authentication, host key); with ``sudo=True``, a ``SudoError`` when sudo did
      not run the command (status ``failed``, ``returncode`` None; see ``sudo``); a
      ``SkippedError`` saying why for a ``skipped`` host.
    - ``status``: ``ok`` (exit 0), ``failed`` (non-zero exit or signal), ``timeout``
      (``timeout`` or ``deadline`` ran out), ``ssh_error``, ``cancelled``, ``skipped`` (never
      started: ``max_fail`` was exceeded or a canary did not succeed; no ``returncode``).
    - ``started``: wall clock (``time.time()``) when its ssh started (``None`` if it never
      did); ``duration``: seconds until it ended; ``connect_time``: seconds until the
      session was up (``None`` if it never was).
    - ``ssh_log``: ssh's ``-E`` log for the host.  With OpenSSH 8.5 or later it is the short
      log the fan-out asks for (:data:`sshwrap.protocol.sshlog.SHORT_LOG_SETTINGS`:
      ``LogLevel=VERBOSE``, debug lines only from ssh's session and mux code, those tagged
      ``file:function():line (pid=N):``), about 14 lines for a command; with an older ssh,
      its ``LogLevel=DEBUG1`` log.  Empty for a host given as a connection.
    - ``attempts``: how many ssh were started for the host (more than 1 only with
      ``retries``: a connection-level failure before the session was up is tried again);
      the other fields are those of the last attempt, except ``started`` and ``duration``,
      which cover them all.
    """

    host: str
    returncode: int | None
    stdout: bytes
    stderr: bytes
    error: SSHError | SudoError | SkippedError | None
    started: float | None
    duration: float
    status: Status = "ok"
    connect_time: float | None = None
    signalled: bool = False
    ssh_log: str = field(default="", repr=False)
    index: int = field(default=0, repr=False)
    attempts: int = 1


class FanoutInterrupted(Interrupted):
    """Raised by ``run_many`` on Ctrl-C, after every ssh child has ended.

    ``results`` holds one ``HostResult`` per host, in input order: those that finished, and
    the others with status ``cancelled`` and whatever output they had produced.
    """

    results: list[HostResult]


@dataclass(frozen=True)
class CopyResult(HostOutcome):
    """What happened on one host: the fields of ``HostResult`` that mean the same here.

    - ``status``: ``ok``, ``failed`` (a transfer error: ``error`` is the exception, such as
      ``FileNotFoundError``, ``PermissionError`` or another ``TransferError``), ``ssh_error``
      (``error`` is the ``SSHError``: refused, authentication, host key, connect timeout, or
      the connection lost mid-transfer), ``timeout`` (``timeout`` or ``deadline`` ran out),
      ``cancelled``, ``skipped`` (never started: ``error`` a ``SkippedError`` saying why);
      ``error`` is None for ``ok``, ``timeout`` and ``cancelled``.
    - ``started``: wall clock when the host started (None if it never did); ``duration``:
      seconds until it ended; ``connect_time``: seconds until its master was up.
    - ``source`` / ``target``: the paths of this host's copy, ``%h`` replaced (for
      ``get_many`` into ``local_dir/HOST/`` the target is that directory);
      ``transferred``: bytes acknowledged (of ``total``, the bytes to copy).
    """

    host: str
    status: Status
    error: BaseException | None
    started: float | None
    duration: float
    connect_time: float | None = None
    source: str = ""
    target: str = ""
    transferred: int = 0
    total: int | None = None
    index: int = field(default=0, repr=False)


class CopyInterrupted(Interrupted):
    """Raised by the sync ``put_many``/``get_many`` on Ctrl-C, after every host stopped.

    ``results`` holds one ``CopyResult`` per host, in input order: those that finished, the
    others ``cancelled``."""

    results: list[CopyResult]


def unfinished_result(host: str, index: int, status: Status) -> HostResult:
    """The result of a host that never ran: ``cancelled``, or ``timeout`` (the deadline)."""
    return HostResult(host, None, b"", b"", None, None, 0.0, status, index=index)


def skipped_result(host: str, index: int, reason: str) -> HostResult:
    """The result of a host that was never started because of ``reason`` (``skipped``)."""
    error = SkippedError(host, reason)
    return HostResult(host, None, b"", b"", error, None, 0.0, "skipped", index=index)


def in_input_order(hosts: Sequence[str], results: Mapping[int, HostResult]) -> list[HostResult]:
    """One result per host of ``hosts`` (by index), those missing marked ``cancelled``."""
    return [results.get(i) or unfinished_result(h, i, "cancelled") for i, h in enumerate(hosts)]


def result_status(returncode: int | None, error: SSHError | SudoError | None) -> Status:
    """``ssh_error`` with an error, else ``ok`` for exit 0 and ``failed`` for the rest."""
    if error is not None:
        return "ssh_error"
    return "ok" if returncode == 0 else "failed"


_SIGNALS = {int(s) for s in signal.Signals}


def interpret_ssh_exit(
    host: str, returncode: int, log: str, stderr: Sequence[bytes] = ()
) -> tuple[int | None, SSHError | None, bool]:
    """(remote returncode, ssh error, signalled) from ssh's exit status and its log.

    ``stderr`` is what came on ssh's stderr pipe: when no session was up, those are ssh's own
    words (a refused option, a bad port: printed before its log opened), and the error says
    them.
    """
    if returncode < 0:
        # ssh itself died of a signal that sshwrap did not send.
        sig = signal.Signals(-returncode).name if -returncode in _SIGNALS else str(-returncode)
        return (
            None,
            SSHError(host, f"ssh was killed by {sig}", ssh_messages(log), returncode),
            False,
        )
    if returncode != 255:
        # The remote command's own status (ssh exits 255 only for its own failure or a
        # remote signal): nothing in the log can change it.
        return returncode, None, False
    text = b"".join(stderr).decode(errors="replace") if stderr else ""
    info = interpret_exit(host, returncode, log, stderr=text)
    if info.error is not None:
        return None, info.error, False
    return info.returncode, None, info.returncode < 0


def connect_timeout_error(host: str, seconds: float, log: str) -> SSHError:
    """The error of a host whose session was not up within ``connect_timeout``."""
    return SSHConnectionError(
        host, f"connection not up after {seconds:g} s (connect_timeout)", ssh_messages(log)
    )
