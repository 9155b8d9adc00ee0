"""The SFTP version 3 codec (draft-ietf-secsh-filexfer-02, as OpenSSH's sftp-server speaks it).

Pure: requests are built as ``bytes`` and replies are parsed from ``bytes`` or a
``memoryview``; nothing here reads or writes a file descriptor.  The session that sends and
receives them is ``sshwrap.io.sftp_session``.

Framing: every packet is ``uint32 length``, ``byte type``, then the type's fields; every
request and reply but ``SSH_FXP_INIT``/``SSH_FXP_VERSION`` carries a ``uint32`` request id
right after the type.  The builders below return whole packets (length, type, id and fields);
``write_head`` returns all of an ``SSH_FXP_WRITE`` packet but its data, which the caller sends
right after it, unjoined (no copy of the bulk bytes).  A reply's *payload* is what follows its
type byte; ``Reader`` reads it (the id first).

Extensions used (announced by the server in ``SSH_FXP_VERSION``): ``posix-rename@openssh.com``
(a rename that replaces the target atomically), ``statvfs@openssh.com`` (free space, for the
"disk full" hint) and ``limits@openssh.com`` (the server's largest read and write, so requests
can be larger than the 32 KiB every server must accept).

Errors: a reply that breaks the protocol (truncated, too short for its fields) raises the
exception ``Reader.error(what)`` returns: ``SFTPReplyError`` here; the session's reader
subclass returns its own (``SFTPProtocolError``, a ``TransferError``) by overriding it.  A
request the server answered with a status other than ``SSH_FX_OK`` is a ``StatusError`` (not
a protocol error: the protocol worked, the operation did not).
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from typing import NamedTuple

from .wire import Reader as WireReader
from .wire import pack_string, pack_u32, pack_u64

__all__ = [
    "ATTR_ACMODTIME",
    "ATTR_EXTENDED",
    "ATTR_PERMISSIONS",
    "ATTR_SIZE",
    "ATTR_UIDGID",
    "DEFAULT_CHUNK",
    "FXF_APPEND",
    "FXF_CREAT",
    "FXF_EXCL",
    "FXF_READ",
    "FXF_TRUNC",
    "FXF_WRITE",
    "FXP_ATTRS",
    "FXP_CLOSE",
    "FXP_DATA",
    "FXP_EXTENDED",
    "FXP_EXTENDED_REPLY",
    "FXP_FSETSTAT",
    "FXP_FSTAT",
    "FXP_HANDLE",
    "FXP_INIT",
    "FXP_LSTAT",
    "FXP_MKDIR",
    "FXP_NAME",
    "FXP_OPEN",
    "FXP_OPENDIR",
    "FXP_READ",
    "FXP_READDIR",
    "FXP_READLINK",
    "FXP_REALPATH",
    "FXP_REMOVE",
    "FXP_RENAME",
    "FXP_RMDIR",
    "FXP_SETSTAT",
    "FXP_STAT",
    "FXP_STATUS",
    "FXP_VERSION",
    "FXP_WRITE",
    "FX_EOF",
    "FX_FAILURE",
    "FX_NO_SUCH_FILE",
    "FX_OK",
    "FX_PERMISSION_DENIED",
    "LIMITS",
    "MAX_CHUNK",
    "POSIX_RENAME",
    "STATVFS",
    "Attrs",
    "Limits",
    "Reader",
    "SFTPReplyError",
    "StatusError",
    "Version",
    "chunk_size",
    "handle_request",
    "init_request",
    "limits_request",
    "open_request",
    "path_request",
    "posix_rename_request",
    "read_request",
    "rename_request",
    "request",
    "status_name",
    "statvfs_request",
    "write_head",
]

# -- numbers ---------------------------------------------------------------------------------
FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_READ, FXP_WRITE = 1, 2, 3, 4, 5, 6
FXP_LSTAT, FXP_FSTAT, FXP_SETSTAT, FXP_FSETSTAT, FXP_OPENDIR, FXP_READDIR = 7, 8, 9, 10, 11, 12
FXP_REMOVE, FXP_MKDIR, FXP_RMDIR, FXP_REALPATH, FXP_STAT, FXP_RENAME = 13, 14, 15, 16, 17, 18
FXP_READLINK = 19
FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_NAME, FXP_ATTRS = 101, 102, 103, 104, 105
FXP_EXTENDED, FXP_EXTENDED_REPLY = 200, 201
"""Packet types (``SSH_FXP_*``)."""

FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED, FX_FAILURE = 0, 1, 2, 3, 4
"""Status codes (``SSH_FX_*``) of an ``SSH_FXP_STATUS`` reply."""

ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME = 0x1, 0x2, 0x4, 0x8
ATTR_EXTENDED = 0x80000000
"""ATTRS flags (``SSH_FILEXFER_ATTR_*``): which fields follow."""

FXF_READ, FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC, FXF_EXCL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
"""Open flags (``SSH_FXF_*``)."""

POSIX_RENAME = "posix-rename@openssh.com"
STATVFS = "statvfs@openssh.com"
LIMITS = "limits@openssh.com"
"""The names of the extended requests used (as in ``Version.extensions``)."""

DEFAULT_CHUNK = 32768
"""The read and write size every SFTP server must accept."""
MAX_CHUNK = 255 * 1024
"""The largest read or write asked for, whatever ``limits@openssh.com`` allows."""

_STATUS_NAMES = {
    1: "SSH_FX_EOF",
    2: "SSH_FX_NO_SUCH_FILE",
    3: "SSH_FX_PERMISSION_DENIED",
    4: "SSH_FX_FAILURE",
    5: "SSH_FX_BAD_MESSAGE",
    6: "SSH_FX_NO_CONNECTION",
    7: "SSH_FX_CONNECTION_LOST",
    8: "SSH_FX_OP_UNSUPPORTED",
}

_HEAD = struct.Struct(">IBI")  # uint32 length, byte type, uint32 request id
_OFFSET_LEN = struct.Struct(">QI")  # uint64 offset, uint32 length


def status_name(code: int) -> str:
    """``SSH_FX_FAILURE`` for 4 ..., ``status 99`` for a code the draft does not name."""
    return _STATUS_NAMES.get(code, f"status {code}")


# -- errors ----------------------------------------------------------------------------------
class SFTPReplyError(ValueError):
    """A reply breaks SFTP v3: it is truncated, or too short for the fields it must hold."""


class StatusError(Exception):
    """A request was answered with an ``SSH_FXP_STATUS`` other than ``SSH_FX_OK``.

    ``code`` is the status code (``FX_*``), ``message`` the server's text.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- ATTRS -----------------------------------------------------------------------------------
@dataclass
class Attrs:
    """The ATTRS fields sshwrap uses (uid/gid and extended attributes are skipped when read
    and never sent).  ``None``: not present."""

    size: int | None = None
    perm: int | None = None
    atime: int | None = None
    mtime: int | None = None

    def is_dir(self) -> bool:
        """True when the permissions say directory."""
        return self.perm is not None and stat.S_ISDIR(self.perm)

    def is_link(self) -> bool:
        """True when the permissions say symbolic link."""
        return self.perm is not None and stat.S_ISLNK(self.perm)

    def pack(self) -> bytes:
        """The ATTRS bytes: flags, then size, permissions, times (both or neither)."""
        flags = 0
        out = b""
        if self.size is not None:
            flags |= ATTR_SIZE
            out += pack_u64(self.size)
        if self.perm is not None:
            flags |= ATTR_PERMISSIONS
            out += pack_u32(self.perm)
        if self.atime is not None and self.mtime is not None:
            flags |= ATTR_ACMODTIME
            out += pack_u32(self.atime) + pack_u32(self.mtime)
        return pack_u32(flags) + out


# -- replies ---------------------------------------------------------------------------------
class Version(NamedTuple):
    """The server's ``SSH_FXP_VERSION``: its version and its extensions (name -> data)."""

    version: int
    extensions: dict[str, bytes]


class Limits(NamedTuple):
    """The ``limits@openssh.com`` reply (0: no limit given)."""

    max_packet: int
    max_read: int
    max_write: int
    max_open: int


def chunk_size(limit: int) -> int:
    """The read (or write) size to use under a server's limit: ``DEFAULT_CHUNK`` when it
    gives none (0), otherwise the limit kept within ``[DEFAULT_CHUNK, MAX_CHUNK]``."""
    return max(DEFAULT_CHUNK, min(MAX_CHUNK, limit)) if limit else DEFAULT_CHUNK


class Reader(WireReader):
    """Reads one reply payload (after the type byte); ``who`` (the destination) prefixes its
    error messages.  Every malformed field raises ``self.error(what)``."""

    __slots__ = ("who",)

    def __init__(self, data: bytes | memoryview, who: str = "") -> None:
        # (the wire reader's fields set directly: one reader per reply, no super() call)
        self.buf = data
        self.pos = 0
        self.who = who

    def error(self, what: str) -> Exception:
        """The exception for a reply that breaks the protocol (``SFTPReplyError`` here)."""
        return SFTPReplyError(f"{self.who}: {what}")

    def truncated(self) -> Exception:
        """``self.error`` saying the reply is truncated."""
        return self.error("malformed SFTP reply (truncated)")

    def attrs(self) -> Attrs:
        """Next ATTRS (uid/gid and extended pairs read past)."""
        a = Attrs()
        flags = self.u32()
        if flags & ATTR_SIZE:
            a.size = self.u64()
        if flags & ATTR_UIDGID:
            self.u32()
            self.u32()
        if flags & ATTR_PERMISSIONS:
            a.perm = self.u32()
        if flags & ATTR_ACMODTIME:
            a.atime = self.u32()
            a.mtime = self.u32()
        if flags & ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.view()
                self.view()
        return a

    def version(self) -> Version:
        """All of an ``SSH_FXP_VERSION`` payload: the version and the extension pairs."""
        version = self.u32()
        extensions = {}
        while not self.at_end():
            name = self.text()
            extensions[name] = self.string()
        return Version(version, extensions)

    def status(self) -> StatusError | None:
        """An ``SSH_FXP_STATUS`` after its id: None for ``SSH_FX_OK``, else the error.

        The message (and language tag) are optional for OK, as old servers omit them.
        """
        code = self.u32()
        return None if code == FX_OK else StatusError(code, self.text())

    def names(self) -> list[tuple[bytes, Attrs]]:
        """An ``SSH_FXP_NAME`` after its id: (file name, attributes) of each entry."""
        out = []
        for _ in range(self.u32()):
            name = self.string()
            self.view()  # the long name (``ls -l`` style): not used
            out.append((name, self.attrs()))
        return out

    def limits(self) -> Limits:
        """A ``limits@openssh.com`` reply after its id."""
        return Limits(self.u64(), self.u64(), self.u64(), self.u64())

    def statvfs(self) -> tuple[int, int]:
        """A ``statvfs@openssh.com`` reply after its id: (bytes, inodes) free to the user."""
        _bsize, frsize, _blocks, _bfree, bavail = (self.u64() for _ in range(5))
        _files, _ffree, favail = (self.u64() for _ in range(3))
        return bavail * frsize, favail


# -- requests --------------------------------------------------------------------------------
def request(ptype: int, rid: int, *fields: bytes) -> bytes:
    """A whole request packet: length, ``ptype``, request id ``rid``, then ``fields``."""
    body = b"".join(fields)
    return _HEAD.pack(5 + len(body), ptype, rid) + body


def init_request(version: int = 3) -> bytes:
    """``SSH_FXP_INIT`` (it has no request id: ``version`` takes its place)."""
    return _HEAD.pack(5, FXP_INIT, version)


def open_request(rid: int, path: bytes, pflags: int, attrs: Attrs) -> bytes:
    """``SSH_FXP_OPEN`` of ``path`` with open flags ``pflags`` (``FXF_*``)."""
    return request(FXP_OPEN, rid, pack_string(path), pack_u32(pflags), attrs.pack())


def read_request(rid: int, handle_field: bytes, offset: int, length: int) -> bytes:
    """``SSH_FXP_READ`` of ``length`` bytes at ``offset``; ``handle_field`` is the handle
    already packed as a string (``pack_string(handle)``, packed once per file)."""
    return _HEAD.pack(17 + len(handle_field), FXP_READ, rid) + (
        handle_field + _OFFSET_LEN.pack(offset, length)
    )


def write_head(rid: int, handle_field: bytes, offset: int, size: int) -> bytes:
    """``SSH_FXP_WRITE`` up to its data: the caller sends ``size`` bytes of data after it.
    ``handle_field`` as for ``read_request``."""
    return _HEAD.pack(17 + len(handle_field) + size, FXP_WRITE, rid) + (
        handle_field + _OFFSET_LEN.pack(offset, size)
    )


def path_request(ptype: int, rid: int, path: bytes, attrs: Attrs | None = None) -> bytes:
    """A request on a path: ``FXP_STAT`` (links followed), ``FXP_LSTAT`` (not followed),
    ``FXP_OPENDIR``, ``FXP_REMOVE`` (a file), ``FXP_RMDIR`` (an empty directory),
    ``FXP_REALPATH`` (the canonical absolute path, answered by a one-entry ``FXP_NAME``),
    ``FXP_READLINK`` (a link's target, likewise); with ``attrs``: ``FXP_MKDIR``,
    ``FXP_SETSTAT``."""
    fields = (pack_string(path),) if attrs is None else (pack_string(path), attrs.pack())
    return request(ptype, rid, *fields)


def handle_request(ptype: int, rid: int, handle: bytes, attrs: Attrs | None = None) -> bytes:
    """A request on an open handle: ``FXP_CLOSE``, ``FXP_FSTAT``, ``FXP_READDIR`` (the next
    batch of entries, ``SSH_FX_EOF`` after the last); with ``attrs``: ``FXP_FSETSTAT``."""
    fields = (pack_string(handle),) if attrs is None else (pack_string(handle), attrs.pack())
    return request(ptype, rid, *fields)


def rename_request(rid: int, old: bytes, new: bytes) -> bytes:
    """``SSH_FXP_RENAME`` (OpenSSH's refuses an existing ``new``)."""
    return request(FXP_RENAME, rid, pack_string(old), pack_string(new))


def posix_rename_request(rid: int, old: bytes, new: bytes) -> bytes:
    """``posix-rename@openssh.com``: rename, atomically replacing an existing ``new``."""
    return request(FXP_EXTENDED, rid, pack_string(POSIX_RENAME), pack_string(old), pack_string(new))


def statvfs_request(rid: int, path: bytes) -> bytes:
    """``statvfs@openssh.com`` of the filesystem holding ``path``."""
    return request(FXP_EXTENDED, rid, pack_string(STATVFS), pack_string(path))


def limits_request(rid: int) -> bytes:
    """``limits@openssh.com``: the server's packet, read and write size limits."""
    return request(FXP_EXTENDED, rid, pack_string(LIMITS))
