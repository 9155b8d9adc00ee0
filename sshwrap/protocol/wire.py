"""The SSH wire codec: RFC 4251 section 5 data types, packed and read.

One codec for every SSH-framed protocol sshwrap speaks: the ControlMaster mux protocol
(``PROTOCOL.mux``), the RFC 4254 connection protocol on a proxy-mode socket, and SFTP v3.

Packers return ``bytes``.  ``pack_u32`` and ``pack_u64`` take their argument modulo 2**32 and
2**64, as OpenSSH's C code does when it stores an integer in a ``u_int32_t``.

``Reader`` walks one message held in ``bytes`` or a ``memoryview``.  ``string()`` returns a
``bytes`` copy; ``view()`` returns a zero-copy ``memoryview`` slice (for bulk data such as SFTP
reads: it stays valid only as long as the buffer under it does).  A field that runs past the
end of the message raises the exception ``truncated()`` returns: ``WireError`` here; a protocol
subclasses ``Reader`` and overrides ``truncated()`` to raise its own error.  Reads of a
truncated field leave ``pos`` where it was.

Pure: this module imports only ``struct``.
"""

from __future__ import annotations

import struct

__all__ = [
    "Reader",
    "WireError",
    "pack_bool",
    "pack_name_list",
    "pack_string",
    "pack_u8",
    "pack_u32",
    "pack_u64",
]

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U32_MASK = 0xFFFFFFFF
_U64_MASK = 0xFFFFFFFFFFFFFFFF
_BYTES = tuple(bytes((i,)) for i in range(256))


class WireError(ValueError):
    """A message does not parse as the SSH wire types read from it (it is truncated)."""


def pack_u8(n: int) -> bytes:
    """SSH ``byte`` (``n`` modulo 256)."""
    return _BYTES[n & 0xFF]


def pack_bool(b: bool) -> bytes:
    """SSH ``boolean``: one byte, 1 for true, 0 for false."""
    return b"\x01" if b else b"\x00"


def pack_u32(n: int) -> bytes:
    """SSH ``uint32``, big-endian (``n`` modulo 2**32)."""
    return _U32.pack(n & _U32_MASK)


def pack_u64(n: int) -> bytes:
    """SSH ``uint64``, big-endian (``n`` modulo 2**64)."""
    return _U64.pack(n & _U64_MASK)


def pack_string(s: bytes | str) -> bytes:
    """SSH ``string``: ``uint32`` length, then the bytes (a ``str`` is encoded as UTF-8)."""
    b = s.encode() if isinstance(s, str) else s
    return _U32.pack(len(b)) + b


def pack_name_list(names: list[str] | tuple[str, ...]) -> bytes:
    """SSH ``name-list``: the names joined by commas, as a ``string``."""
    return pack_string(",".join(names))


class Reader:
    """Reads SSH wire types, in order, from one message (``bytes`` or a byte ``memoryview``).

    ``pos`` is the offset of the next unread byte.  Every read of a field that does not fit
    in what is left raises ``self.truncated()`` (override it to raise a protocol's own error).
    """

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def truncated(self) -> Exception:
        """The exception raised for a field that runs past the end of the message."""
        return WireError("truncated message")

    def byte(self) -> int:
        """Next ``byte``."""
        p = self.pos
        if p >= len(self.buf):
            raise self.truncated()
        self.pos = p + 1
        return self.buf[p]

    u8 = byte

    def boolean(self) -> bool:
        """Next ``boolean`` (any non-zero byte is true, as RFC 4251 says)."""
        return self.byte() != 0

    def _unsigned(self, codec: struct.Struct) -> int:
        """Next big-endian unsigned integer of ``codec.size`` bytes (``codec``: one of them)."""
        p = self.pos
        end = p + codec.size
        if end > len(self.buf):
            raise self.truncated()
        self.pos = end
        v: int = codec.unpack_from(self.buf, p)[0]
        return v

    def u32(self) -> int:
        """Next ``uint32``."""
        return self._unsigned(_U32)

    def u64(self) -> int:
        """Next ``uint64``."""
        return self._unsigned(_U64)

    def _span(self) -> tuple[int, int]:
        """Start and end of the next ``string``'s bytes; ``pos`` moves past it."""
        p = self.pos
        buf = self.buf
        if p + 4 > len(buf):
            raise self.truncated()
        start = p + 4
        end = start + _U32.unpack_from(buf, p)[0]
        if end > len(buf):
            raise self.truncated()
        self.pos = end
        return start, end

    def string(self) -> bytes:
        """Next ``string``, as a ``bytes`` copy."""
        start, end = self._span()
        return bytes(self.buf[start:end])

    def view(self) -> memoryview:
        """Next ``string``, as a zero-copy ``memoryview`` of the buffer (valid while it is)."""
        start, end = self._span()
        return memoryview(self.buf)[start:end]

    def text(self) -> str:
        """Next ``string``, decoded as UTF-8 (invalid bytes replaced)."""
        start, end = self._span()
        return str(self.buf[start:end], "utf-8", "replace")

    def name_list(self) -> list[str]:
        """Next ``name-list``: its comma-separated names (``[]`` for an empty one)."""
        s = self.text()
        return s.split(",") if s else []

    def rest(self) -> bytes:
        """Everything not read yet, as ``bytes`` (``pos`` does not move)."""
        return bytes(self.buf[self.pos :])

    def at_end(self) -> bool:
        """True when everything was read."""
        return self.pos >= len(self.buf)
