"""The errors of SFTP transfers (re-exported by :mod:`.sftp_session`, where they are raised).

Every one is a ``TransferError`` (an ``SSHWrapError``); those with a Python counterpart are
that too (``FileNotFoundError``, ``PermissionError``, ``TimeoutError``), so callers catch
either.  ``ReplyReader`` is the codec's reply reader raising ``SFTPProtocolError``.
"""

from __future__ import annotations

from ..errors import SSHWrapError
from ..protocol import sftp

__all__ = [
    "RemoteFileNotFoundError",
    "RemotePermissionError",
    "ReplyReader",
    "SFTPProtocolError",
    "SFTPTimeout",
    "TransferCancelled",
    "TransferError",
]


class TransferError(SSHWrapError):
    """A file transfer failed (the message says which path and why)."""


class RemoteFileNotFoundError(TransferError, FileNotFoundError):
    """A remote file or directory does not exist (``errno.ENOENT``)."""


class RemotePermissionError(TransferError, PermissionError):
    """The remote side refused access to a path (``errno.EACCES``)."""


class TransferCancelled(TransferError):
    """The transfer was stopped by :meth:`Abort.abort` (from another thread)."""


class SFTPTimeout(TransferError, TimeoutError):
    """The SFTP server did not answer within the bound (the session is broken)."""


class SFTPProtocolError(TransferError, sftp.SFTPReplyError):
    """The server's replies break the SFTP protocol (a malformed reply, or one answering a
    request that was never sent): the session cannot be trusted and is closed."""


class ReplyReader(sftp.Reader):
    """The codec's reader, raising ``SFTPProtocolError`` (a ``TransferError``)."""

    __slots__ = ()

    def error(self, what: str) -> Exception:
        return SFTPProtocolError(f"{self.who}: {what}")
