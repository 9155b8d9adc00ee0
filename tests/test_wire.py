"""The SSH wire codec (``sshwrap.protocol.wire``) byte by byte, with no sshd.

The same codec reads mux messages (``sshwrap.io.mux_control.Reader``: ``MuxError``), channel packets
and SFTP replies (``sshwrap.protocol.sftp.Reader``: ``SFTPReplyError``); each protocol's
reader only chooses the exception a truncated message raises.  The SFTP codec's own tests
(requests, replies, ATTRS) are in ``tests/test_protocol_sftp.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sshwrap.io.mux_control import MuxError
from sshwrap.io.mux_control import Reader as MuxReader
from sshwrap.protocol import sftp
from sshwrap.protocol.wire import (
    Reader,
    WireError,
    pack_bool,
    pack_name_list,
    pack_string,
    pack_u8,
    pack_u32,
    pack_u64,
)

# -- packers: exact bytes ------------------------------------------------------------------


def test_packers_give_the_rfc_4251_bytes() -> None:
    assert pack_u8(0x7F) == b"\x7f"
    assert pack_bool(True) == b"\x01"
    assert pack_bool(False) == b"\x00"
    assert pack_u32(1) == b"\x00\x00\x00\x01"
    assert pack_u32(0x01020304) == b"\x01\x02\x03\x04"
    assert pack_u64(0x0102030405060708) == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert pack_string(b"ab") == b"\0\0\0\x02ab"
    assert pack_string(b"") == b"\0\0\0\0"
    assert pack_string("é") == b"\0\0\0\x02\xc3\xa9"  # str: UTF-8
    assert pack_name_list(["zlib", "none"]) == b"\0\0\0\x09zlib,none"
    assert pack_name_list([]) == b"\0\0\0\0"


def test_integers_are_taken_modulo_their_width() -> None:
    """As OpenSSH's C code stores them (and as the mux module always packed them)."""
    assert pack_u8(0x1FF) == b"\xff"
    assert pack_u32(-1) == b"\xff\xff\xff\xff"
    assert pack_u32(2**32 + 5) == pack_u32(5)
    assert pack_u64(-2) == b"\xff" * 7 + b"\xfe"


# -- the reader ----------------------------------------------------------------------------


def test_reader_reads_each_type_in_order() -> None:
    msg = (
        pack_u8(200)
        + pack_bool(True)
        + b"\x07"  # any non-zero byte is a true boolean
        + pack_bool(False)
        + pack_u32(0xDEADBEEF)
        + pack_u64(2**63 + 1)
        + pack_string(b"\x00\xffbin")
        + pack_string("ünï")
        + pack_string(b"bad \xff utf-8")
        + pack_name_list(["a", "bc", "d@e"])
        + pack_name_list([])
        + b"tail"
    )
    r = Reader(msg)
    assert r.pos == 0
    assert r.u8() == 200
    assert r.boolean() is True
    assert r.boolean() is True
    assert r.boolean() is False
    assert r.pos == 4
    assert r.u32() == 0xDEADBEEF
    assert r.u64() == 2**63 + 1
    assert r.string() == b"\x00\xffbin"
    assert r.text() == "ünï"
    assert r.text() == "bad \ufffd utf-8"
    assert r.name_list() == ["a", "bc", "d@e"]
    assert r.name_list() == []
    assert not r.at_end()
    assert r.rest() == b"tail"
    assert r.rest() == b"tail"  # rest() does not move pos
    assert r.byte() == ord("t")
    r.pos = len(msg)
    assert r.at_end()
    assert r.rest() == b""


def test_string_copies_and_view_does_not() -> None:
    buf = bytearray(pack_string(b"abc") + pack_string(b"xyz"))
    r = Reader(memoryview(buf))
    s = r.string()
    v = r.view()
    assert type(s) is bytes and s == b"abc"
    assert isinstance(v, memoryview) and bytes(v) == b"xyz"
    buf[4] = ord("A")
    buf[11] = ord("X")
    assert s == b"abc"  # a copy
    assert bytes(v) == b"Xyz"  # the buffer itself
    assert bytes(Reader(b"\0\0\0\x01q").view()) == b"q"  # over bytes too


def test_a_string_read_from_bytes_is_that_slice() -> None:
    r = Reader(b"\0\0\0\x02hi")
    s = r.string()
    assert type(s) is bytes and s == b"hi"


# -- truncation: every cut of a multi-field message ----------------------------------------

_FIELDS: list[tuple[bytes, Callable[[Reader], object], object]] = [
    (pack_u8(9), Reader.u8, 9),
    (pack_bool(True), Reader.boolean, True),
    (pack_u32(70000), Reader.u32, 70000),
    (pack_u64(2**40 + 3), Reader.u64, 2**40 + 3),
    (pack_string(b"hello"), Reader.string, b"hello"),
    (pack_string(b"view"), lambda r: bytes(r.view()), b"view"),
    (pack_string("text"), Reader.text, "text"),
    (pack_name_list(["a", "bc"]), Reader.name_list, ["a", "bc"]),
    (pack_string(b""), Reader.string, b""),
]
_MESSAGE = b"".join(f[0] for f in _FIELDS)

_READERS: list[tuple[Callable[[bytes | memoryview], Reader], type[Exception], str]] = [
    (Reader, WireError, "truncated message"),
    (MuxReader, MuxError, "truncated mux message"),
    (
        lambda b: sftp.Reader(b, "host.example"),
        sftp.SFTPReplyError,
        "host.example: malformed SFTP reply (truncated)",
    ),
]


def _read_all(r: Reader) -> list[object]:
    return [read(r) for _, read, _ in _FIELDS]


@pytest.mark.parametrize(("make", "error", "message"), _READERS, ids=["wire", "mux", "sftp"])
@pytest.mark.parametrize("as_view", [False, True], ids=["bytes", "memoryview"])
def test_truncation_at_every_offset_raises_the_readers_error(
    make: Callable[[bytes | memoryview], Reader],
    error: type[Exception],
    message: str,
    as_view: bool,
) -> None:
    whole = make(memoryview(_MESSAGE) if as_view else _MESSAGE)
    assert _read_all(whole) == [want for _, _, want in _FIELDS]
    assert whole.at_end()
    ends = []  # where each field ends: a cut there leaves whole fields, the next one fails
    at = 0
    for packed, _, _ in _FIELDS:
        at += len(packed)
        ends.append(at)
    for cut in range(len(_MESSAGE)):
        data = _MESSAGE[:cut]
        r = make(memoryview(data) if as_view else data)
        with pytest.raises(error) as info:
            _read_all(r)
        assert str(info.value) == message
        whole_fields = sum(1 for e in ends if e <= cut)
        assert r.pos == (ends[whole_fields - 1] if whole_fields else 0)  # pos stays put


def test_protocol_errors_are_their_own_types() -> None:
    """A mux protocol error stays a MuxError (an OSError), an SFTP one an SFTPReplyError."""
    assert issubclass(WireError, ValueError)
    assert not issubclass(MuxError, WireError)
    assert isinstance(MuxReader(b"").truncated(), MuxError)
    assert isinstance(sftp.Reader(b"", "h").truncated(), sftp.SFTPReplyError)
    assert not issubclass(sftp.SFTPReplyError, WireError)


def test_a_subclass_chooses_the_exception() -> None:
    class Oops(Exception):
        pass

    class MyReader(Reader):
        __slots__ = ()

        def truncated(self) -> Exception:
            return Oops("mine")

    with pytest.raises(Oops, match="mine"):
        MyReader(b"\0\0\0\x05abc").string()


# -- property tests ------------------------------------------------------------------------

_value = st.one_of(
    st.tuples(st.just("u8"), st.integers(0, 255)),
    st.tuples(st.just("boolean"), st.booleans()),
    st.tuples(st.just("u32"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("u64"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("string"), st.binary(max_size=40)),
    st.tuples(st.just("text"), st.text(max_size=20)),
    st.tuples(
        st.just("name_list"),
        st.lists(st.text("abcz-@.0", min_size=1, max_size=6), max_size=4),
    ),
)
_PACK: dict[str, Callable[..., bytes]] = {
    "u8": pack_u8,
    "boolean": pack_bool,
    "u32": pack_u32,
    "u64": pack_u64,
    "string": pack_string,
    "text": pack_string,
    "name_list": pack_name_list,
}


@given(st.lists(_value, max_size=12))
def test_round_trip(values: list[tuple[str, object]]) -> None:
    msg = b"".join(_PACK[kind](v) for kind, v in values)
    r = Reader(msg)
    assert [getattr(r, kind)() for kind, _ in values] == [v for _, v in values]
    assert r.at_end()


_READS = ["u8", "byte", "boolean", "u32", "u64", "string", "view", "text", "name_list", "rest"]


@pytest.mark.parametrize(("make", "error", "message"), _READERS, ids=["wire", "mux", "sftp"])
@given(data=st.binary(max_size=64), reads=st.lists(st.sampled_from(_READS), max_size=16))
def test_random_bytes_parse_or_raise_the_readers_error(
    make: Callable[[bytes | memoryview], Reader],
    error: type[Exception],
    message: str,
    data: bytes,
    reads: list[str],
) -> None:
    """Whatever the bytes, a read returns a value or raises the reader's own error: never
    IndexError, struct.error or anything else, and never moves past the end."""
    for buf in (data, memoryview(data)):
        r = make(buf)
        for name in reads:
            before = r.pos
            try:
                getattr(r, name)()
            except error as e:
                assert str(e) == message
                assert r.pos == before
                break
            assert before <= r.pos <= len(data)
