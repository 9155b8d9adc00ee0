"""The events of :class:`sshwrap.protocol.channel.ChannelMux`: what the peer did, per channel.

Small frozen dataclasses, each naming its channel by our local id (``channel``); the driver
dispatches on their type.  Pure: no IO.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SESSION_LIMIT_CODES",
    "Closed",
    "Data",
    "Eof",
    "Event",
    "ExitSignal",
    "ExitStatus",
    "ExtendedData",
    "Lost",
    "OpenFailed",
    "Opened",
    "RequestReply",
    "WindowOpened",
]

OPEN_ADMINISTRATIVELY_PROHIBITED = 1
OPEN_CONNECT_FAILED = 2
OPEN_UNKNOWN_CHANNEL_TYPE = 3
SESSION_LIMIT_CODES = (OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED)
"""What sshd answers a session open beyond ``MaxSessions``: OpenSSH 9.x sends
CONNECT_FAILED, older servers ADMINISTRATIVELY_PROHIBITED."""


@dataclass(frozen=True, slots=True)
class Opened:
    """The peer confirmed the channel (its window and packet size are known now)."""

    channel: int


@dataclass(frozen=True, slots=True)
class OpenFailed:
    """The peer refused to open the channel."""

    channel: int
    code: int
    description: str

    @property
    def session_limit(self) -> bool:
        """True for the codes OpenSSH's sshd refuses a session beyond ``MaxSessions`` with
        (it may also mean another refusal with the same code: callers bound their retries)."""
        return self.code in SESSION_LIMIT_CODES


@dataclass(frozen=True, slots=True)
class Data:
    """Channel data (a remote command's stdout)."""

    channel: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ExtendedData:
    """Extended channel data; ``code`` 1 is stderr."""

    channel: int
    code: int
    data: bytes


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The peer granted window: ``send_data`` accepts up to ``window`` bytes again."""

    channel: int
    window: int


@dataclass(frozen=True, slots=True)
class Eof:
    """The peer sends no more data on the channel."""

    channel: int


@dataclass(frozen=True, slots=True)
class Closed:
    """Both sides closed the channel (our CLOSE was queued in reply if it was not sent)."""

    channel: int


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """The remote command exited with ``status``."""

    channel: int
    status: int


@dataclass(frozen=True, slots=True)
class ExitSignal:
    """The remote command died of signal ``name`` (RFC 4254 name, without ``SIG``)."""

    channel: int
    name: str
    core_dumped: bool
    message: str


@dataclass(frozen=True, slots=True)
class RequestReply:
    """The peer's answer to our request ``request`` (sent with want-reply)."""

    channel: int
    request: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Lost:
    """The connection ended while the channel was not closed yet."""

    channel: int
    reason: str


Event = (
    Opened
    | OpenFailed
    | Data
    | ExtendedData
    | WindowOpened
    | Eof
    | Closed
    | ExitStatus
    | ExitSignal
    | RequestReply
    | Lost
)
