"""The SFTP v3 codec (``sshwrap.protocol.sftp``) byte by byte, with no sshd.

Requests: the exact bytes of each builder, written out by hand from the draft
(draft-ietf-secsh-filexfer-02).  Replies: every type sshwrap reads, parsed from scripted bytes;
a reply cut at any offset raises the codec's ``SFTPReplyError`` (never ``IndexError``,
``struct.error`` ...); random bytes and random ATTRS are fuzzed with hypothesis.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sshwrap.protocol import sftp
from sshwrap.protocol.sftp import Attrs, Limits, Reader, SFTPReplyError, StatusError, Version
from sshwrap.transfer import SFTPProtocolError, TransferError


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def s(b: bytes) -> bytes:
    return u32(len(b)) + b


def packet(ptype: int, body: bytes) -> bytes:
    return u32(1 + len(body)) + bytes([ptype]) + body


# -- requests: exact bytes -----------------------------------------------------------------

ATTRS_600 = u32(0x4) + u32(0o600)


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (sftp.init_request(), b"\0\0\0\x05\x01\0\0\0\x03"),
        (
            sftp.open_request(7, b"/tmp/f", 0x1A, Attrs(perm=0o600)),
            packet(3, u32(7) + s(b"/tmp/f") + u32(0x1A) + ATTRS_600),
        ),
        (sftp.handle_request(sftp.FXP_CLOSE, 8, b"H1"), packet(4, u32(8) + s(b"H1"))),
        (
            sftp.read_request(9, s(b"H1"), 2**33 + 5, 32768),
            packet(5, u32(9) + s(b"H1") + u64(2**33 + 5) + u32(32768)),
        ),
        (sftp.path_request(sftp.FXP_STAT, 10, b"a b"), packet(17, u32(10) + s(b"a b"))),
        (sftp.handle_request(sftp.FXP_FSTAT, 11, b"H"), packet(8, u32(11) + s(b"H"))),
        (
            sftp.path_request(sftp.FXP_SETSTAT, 12, b"d", Attrs(perm=0o755, atime=1, mtime=2)),
            packet(9, u32(12) + s(b"d") + u32(0xC) + u32(0o755) + u32(1) + u32(2)),
        ),
        (
            sftp.handle_request(sftp.FXP_FSETSTAT, 13, b"H", Attrs(perm=0o644)),
            packet(10, u32(13) + s(b"H") + u32(0x4) + u32(0o644)),
        ),
        (sftp.path_request(sftp.FXP_OPENDIR, 14, b"."), packet(11, u32(14) + s(b"."))),
        (sftp.handle_request(sftp.FXP_READDIR, 15, b"D"), packet(12, u32(15) + s(b"D"))),
        (sftp.path_request(sftp.FXP_REMOVE, 16, b"x"), packet(13, u32(16) + s(b"x"))),
        (
            sftp.path_request(sftp.FXP_MKDIR, 17, b"new", Attrs(perm=0o700)),
            packet(14, u32(17) + s(b"new") + u32(0x4) + u32(0o700)),
        ),
        (sftp.rename_request(18, b"o", b"n"), packet(18, u32(18) + s(b"o") + s(b"n"))),
        (
            sftp.posix_rename_request(19, b"o", b"n"),
            packet(200, u32(19) + s(b"posix-rename@openssh.com") + s(b"o") + s(b"n")),
        ),
        (
            sftp.statvfs_request(20, b"/"),
            packet(200, u32(20) + s(b"statvfs@openssh.com") + s(b"/")),
        ),
        (sftp.limits_request(21), packet(200, u32(21) + s(b"limits@openssh.com"))),
        (sftp.request(4, 0xFFFFFFFF), packet(4, u32(0xFFFFFFFF))),
        (sftp.path_request(sftp.FXP_LSTAT, 22, b"l"), packet(7, u32(22) + s(b"l"))),
        (sftp.path_request(sftp.FXP_RMDIR, 23, b"d"), packet(15, u32(23) + s(b"d"))),
        (sftp.path_request(sftp.FXP_REALPATH, 24, b"."), packet(16, u32(24) + s(b"."))),
        (sftp.path_request(sftp.FXP_READLINK, 25, b"l"), packet(19, u32(25) + s(b"l"))),
        (
            sftp.open_request(26, b"f", sftp.FXF_WRITE | sftp.FXF_APPEND, Attrs()),
            packet(3, u32(26) + s(b"f") + u32(0x6) + u32(0)),
        ),
    ],
    ids=[
        *["init", "open", "close", "read", "stat", "fstat", "setstat", "fsetstat", "opendir"],
        *["readdir", "remove", "mkdir", "rename", "posix-rename", "statvfs", "limits", "any"],
        *["lstat", "rmdir", "realpath", "readlink", "open-append"],
    ],
)
def test_request_bytes(built: bytes, expected: bytes) -> None:
    assert built == expected


def test_a_write_is_its_head_then_the_data() -> None:
    """``write_head`` is all of the packet but the data; its length field counts the data."""
    data = b"payload!"
    head = sftp.write_head(22, s(b"H"), 4096, len(data))
    assert head + data == packet(6, u32(22) + s(b"H") + u64(4096) + s(data))


def test_the_numbers_are_the_drafts() -> None:
    assert (sftp.FXP_STATUS, sftp.FXP_HANDLE, sftp.FXP_DATA, sftp.FXP_NAME) == (101, 102, 103, 104)
    assert (sftp.FXP_ATTRS, sftp.FXP_EXTENDED, sftp.FXP_EXTENDED_REPLY) == (105, 200, 201)
    assert (sftp.FXF_READ, sftp.FXF_WRITE, sftp.FXF_CREAT, sftp.FXF_TRUNC) == (1, 2, 8, 0x10)
    assert sftp.FXF_EXCL == 0x20
    assert sftp.status_name(4) == "SSH_FX_FAILURE"
    assert sftp.status_name(8) == "SSH_FX_OP_UNSUPPORTED"
    assert sftp.status_name(99) == "status 99"


# -- ATTRS ---------------------------------------------------------------------------------


def test_attrs_bytes() -> None:
    a = Attrs(size=5, perm=0o644, atime=7, mtime=8)
    assert a.pack() == u32(0x1 | 0x4 | 0x8) + u64(5) + u32(0o644) + u32(7) + u32(8)
    assert Attrs().pack() == u32(0)
    assert Attrs(atime=1).pack() == u32(0)  # times go in pairs: one alone is not sent


def test_attrs_read_skips_owner_and_extended_pairs() -> None:
    raw = (
        u32(0x1 | 0x2 | 0x4 | 0x8 | 0x80000000)
        + u64(2**40)
        + u32(1000)  # uid
        + u32(1001)  # gid
        + u32(0o100755)
        + u32(11)
        + u32(22)
        + u32(2)
        + s(b"ext@x")
        + s(b"data")
        + s(b"e2")
        + s(b"")
    )
    r = Reader(raw + b"next")
    assert r.attrs() == Attrs(size=2**40, perm=0o100755, atime=11, mtime=22)
    assert r.rest() == b"next"


def test_attrs_kind() -> None:
    assert Attrs(perm=stat.S_IFDIR | 0o755).is_dir()
    assert not Attrs(perm=stat.S_IFREG | 0o755).is_dir()
    assert Attrs(perm=stat.S_IFLNK | 0o777).is_link()
    assert not Attrs().is_dir() and not Attrs().is_link()


@pytest.mark.parametrize(
    "attrs",
    [Attrs(), Attrs(perm=0o100644), Attrs(size=2**40, perm=0o40755, atime=1, mtime=2**31)],
)
def test_attrs_round_trip_and_every_cut_raises(attrs: Attrs) -> None:
    packed = attrs.pack()
    r = Reader(packed, "h")
    assert r.attrs() == attrs
    assert r.at_end()
    for cut in range(len(packed)):
        with pytest.raises(SFTPReplyError, match=r"^h: malformed SFTP reply \(truncated\)$"):
            Reader(packed[:cut], "h").attrs()


# -- replies: every type sshwrap reads -----------------------------------------------------

FILE_ATTRS = u32(0x1 | 0x4) + u64(3) + u32(0o100600)
NAMES = (
    u32(2)
    + s(b"a.txt")
    + s(b"-rw------- 1 u u 3 Jan 1 a.txt")
    + FILE_ATTRS
    + s(b"\xffbin")  # names are bytes: not necessarily UTF-8
    + s(b"")
    + u32(0)
)
VERSION = u32(3) + s(b"posix-rename@openssh.com") + s(b"1") + s(b"limits@openssh.com") + s(b"1")
STATVFS = b"".join(u64(v) for v in (4096, 1024, 100, 50, 40, 1000, 500, 400, 0, 0, 255))

# (payload after the type byte, how it is read, what it gives)
REPLIES: list[tuple[str, bytes, Callable[[Reader], object], object]] = [
    (
        "version",
        VERSION,
        Reader.version,
        Version(3, {"posix-rename@openssh.com": b"1", "limits@openssh.com": b"1"}),
    ),
    (
        "status ok",
        u32(1) + u32(0) + s(b"Success") + s(b""),
        lambda r: (r.u32(), r.status()),
        (1, None),
    ),
    (
        "status failure",
        u32(2) + u32(4) + s(b"Failure") + s(b"en"),
        lambda r: (r.u32(), _status(r)),
        (2, (4, "Failure")),
    ),
    (
        "handle",
        u32(3) + s(b"\x00\x01handle"),
        lambda r: (r.u32(), r.string()),
        (3, b"\x00\x01handle"),
    ),
    ("data", u32(4) + s(b"some bytes"), lambda r: (r.u32(), bytes(r.view())), (4, b"some bytes")),
    (
        "name",
        u32(5) + NAMES,
        lambda r: (r.u32(), r.names()),
        (5, [(b"a.txt", Attrs(size=3, perm=0o100600)), (b"\xffbin", Attrs())]),
    ),
    ("attrs", u32(6) + FILE_ATTRS, lambda r: (r.u32(), r.attrs()), (6, Attrs(3, 0o100600))),
    (
        "limits",
        u32(7) + u64(262144) + u64(261120) + u64(261120) + u64(0),
        lambda r: (r.u32(), r.limits()),
        (7, Limits(262144, 261120, 261120, 0)),
    ),
    ("statvfs", u32(8) + STATVFS, lambda r: (r.u32(), r.statvfs()), (8, (40 * 1024, 400))),
]


def _status(r: Reader) -> tuple[int, str] | None:
    e = r.status()
    return None if e is None else (e.code, e.message)


@pytest.mark.parametrize(
    ("payload", "read", "want"), [x[1:] for x in REPLIES], ids=[x[0] for x in REPLIES]
)
def test_reply_parsed(payload: bytes, read: Callable[[Reader], object], want: object) -> None:
    for buf in (payload, memoryview(bytearray(payload))):
        r = Reader(buf, "host")
        assert read(r) == want


@pytest.mark.parametrize(
    ("name", "payload", "read"), [x[:3] for x in REPLIES], ids=[x[0] for x in REPLIES]
)
def test_a_reply_cut_anywhere_raises_the_protocol_error(
    name: str, payload: bytes, read: Callable[[Reader], object]
) -> None:
    """Every cut short of what the parser reads raises (a version may end after any whole
    extension pair: those cuts parse).  What it does not read (a status's language tag, a
    statvfs's last three fields) may be missing."""
    whole = Reader(payload)
    read(whole)
    stops = (
        {4, 4 + len(s(b"posix-rename@openssh.com")) + len(s(b"1"))} if name == "version" else set()
    )
    for cut in range(whole.pos):
        r = Reader(payload[:cut], "host")
        if cut in stops:
            read(r)
            assert r.at_end()
            continue
        with pytest.raises(SFTPReplyError) as info:
            read(r)
        assert str(info.value) == "host: malformed SFTP reply (truncated)"


def test_a_failed_status_is_a_status_error() -> None:
    e = Reader(u32(3) + s(b"Permission denied") + s(b"")).status()
    assert isinstance(e, StatusError)
    assert (e.code, e.message, str(e)) == (3, "Permission denied", "Permission denied")
    assert not isinstance(e, SFTPReplyError)  # the protocol worked; the request did not


def test_a_status_ok_may_omit_its_message() -> None:
    assert Reader(u32(0)).status() is None


def test_data_is_a_view_of_the_reply_buffer() -> None:
    buf = bytearray(u32(4) + s(b"abc"))
    r = Reader(memoryview(buf))
    r.u32()
    v = r.view()
    buf[-1] = ord("Z")
    assert bytes(v) == b"abZ"


@pytest.mark.parametrize(
    ("limit", "chunk"),
    [(0, 32768), (1000, 32768), (100_000, 100_000), (10**9, 255 * 1024)],
)
def test_chunk_size_within_bounds(limit: int, chunk: int) -> None:
    assert sftp.chunk_size(limit) == chunk


# -- the error: the session's reader chooses its own ---------------------------------------


def test_a_reader_subclass_chooses_the_error() -> None:
    """How the session's reader raises ``SFTPProtocolError`` (a ``TransferError``)."""

    class SessionReader(Reader):
        __slots__ = ()

        def error(self, what: str) -> Exception:
            return SFTPProtocolError(f"{self.who}: {what}")

    with pytest.raises(SFTPProtocolError, match="truncated") as info:
        SessionReader(u32(1), "h").attrs()
    assert isinstance(info.value, TransferError)
    assert isinstance(info.value, SFTPReplyError)


def test_the_public_protocol_error_is_the_codecs() -> None:
    assert issubclass(SFTPProtocolError, SFTPReplyError)
    assert issubclass(SFTPProtocolError, TransferError)
    assert issubclass(SFTPReplyError, ValueError)


# -- property tests ------------------------------------------------------------------------

_u32 = st.integers(0, 2**32 - 1)
_maybe = st.one_of(st.none(), _u32)


@given(
    size=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    perm=_maybe,
    atime=_u32,
    mtime=_u32,
    times=st.booleans(),
)
def test_attrs_round_trip(
    size: int | None, perm: int | None, atime: int, mtime: int, times: bool
) -> None:
    a = Attrs(size, perm, atime if times else None, mtime if times else None)
    r = Reader(a.pack())
    assert r.attrs() == a
    assert r.at_end()


_READS: list[Callable[[Reader], object]] = [
    Reader.attrs,
    Reader.version,
    Reader.status,
    Reader.names,
    Reader.limits,
    Reader.statvfs,
    Reader.u32,
    Reader.view,
]


@given(
    data=st.binary(max_size=200), reads=st.lists(st.sampled_from(_READS), min_size=1, max_size=6)
)
def test_random_replies_parse_or_raise_the_protocol_error(
    data: bytes, reads: list[Callable[[Reader], object]]
) -> None:
    """Whatever the bytes, each parser returns or raises ``SFTPReplyError``: never anything
    else, and never reads past the end."""
    for buf in (data, memoryview(data)):
        r = Reader(buf, "h")
        for read in reads:
            try:
                read(r)
            except SFTPReplyError as e:
                assert str(e) == "h: malformed SFTP reply (truncated)"
                break
            assert r.pos <= len(data)


@given(flags=_u32, rest=st.binary(max_size=120))
def test_random_attrs_parse_or_raise(flags: int, rest: bytes) -> None:
    """Any flags word (unknown bits too) and any bytes after it."""
    r = Reader(u32(flags) + rest)
    try:
        a = r.attrs()
    except SFTPReplyError:
        return
    assert (a.size is None) == (not flags & sftp.ATTR_SIZE)
    assert (a.perm is None) == (not flags & sftp.ATTR_PERMISSIONS)
    assert r.pos <= 4 + len(rest)
