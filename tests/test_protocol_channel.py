"""The RFC 4254 channel machine (``sshwrap.protocol.channel``) byte by byte: no sshd, no socket.

Every test plays the master's side with scripted packets and checks the events and the exact
bytes the machine queues in answer.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshwrap.protocol import channel as proto
from sshwrap.protocol.channel import (
    MAX_PACKET,
    PACKET_LIMIT,
    WINDOW,
    ChannelMux,
    ChannelProtocolError,
    ChannelState,
    ChannelStateError,
)
from sshwrap.protocol.channel_events import (
    Closed,
    Data,
    Eof,
    Event,
    ExitSignal,
    ExitStatus,
    ExtendedData,
    Lost,
    Opened,
    OpenFailed,
    RequestReply,
    WindowOpened,
)
from sshwrap.protocol.wire import Reader, pack_string, pack_u32

REMOTE = 500  # the channel id the "master" gives our channel


def pkt(msg: int, body: bytes = b"") -> bytes:
    """One frame as the master sends it: length, padding length 0, type, payload."""
    return struct.pack(">IBB", len(body) + 2, 0, msg) + body


def parse(out: bytes) -> list[tuple[int, bytes]]:
    """The (type, payload) packets of what the machine queued."""
    packets = []
    while out:
        (n,) = struct.unpack_from(">I", out)
        assert out[4] == 0
        packets.append((out[5], out[6 : 4 + n]))
        out = out[4 + n :]
    return packets


def confirm(local: int, window: int = WINDOW, max_packet: int = MAX_PACKET) -> bytes:
    body = pack_u32(local) + pack_u32(REMOTE + local) + pack_u32(window) + pack_u32(max_packet)
    return pkt(proto.MSG_CHANNEL_OPEN_CONFIRMATION, body)


def data(local: int, payload: bytes) -> bytes:
    return pkt(proto.MSG_CHANNEL_DATA, pack_u32(local) + pack_string(payload))


def request(local: int, name: str, body: bytes, want_reply: bool = False) -> bytes:
    head = pack_u32(local) + pack_string(name) + (b"\x01" if want_reply else b"\x00")
    return pkt(proto.MSG_CHANNEL_REQUEST, head + body)


def only(local: int, msg: int) -> bytes:
    return pkt(msg, pack_u32(local))


def state(record: proto.Channel) -> ChannelState:
    """The record's state (read through a call: it changes under mypy's narrowing)."""
    return record.state


def opened(window: int = WINDOW, max_packet: int = MAX_PACKET) -> tuple[ChannelMux, int]:
    mux = ChannelMux()
    ch = mux.open_session()
    ((msg, body),) = parse(mux.data_to_send())
    r = Reader(body)
    assert msg == proto.MSG_CHANNEL_OPEN
    assert (r.string(), r.u32(), r.u32(), r.u32()) == (b"session", ch, WINDOW, MAX_PACKET)
    assert mux.receive(confirm(ch, window, max_packet)) == [Opened(ch)]
    assert mux.channel(ch).state is ChannelState.OPEN
    return mux, ch


def test_open_exec_output_and_exit_status() -> None:
    mux, ch = opened()
    assert mux.env(ch, "LANG", "C") and mux.exec(ch, "echo hi")
    (m1, env), (m2, exe) = parse(mux.data_to_send())
    assert (m1, m2) == (proto.MSG_CHANNEL_REQUEST, proto.MSG_CHANNEL_REQUEST)
    assert env == pack_u32(REMOTE + ch) + pack_string("env") + b"\0" + pack_string(
        "LANG"
    ) + pack_string("C")
    assert exe == pack_u32(REMOTE + ch) + pack_string("exec") + b"\x01" + pack_string("echo hi")
    script = (
        only(ch, proto.MSG_CHANNEL_SUCCESS)
        + data(ch, b"hi\n")
        + pkt(proto.MSG_CHANNEL_EXTENDED_DATA, pack_u32(ch) + pack_u32(1) + pack_string(b"e"))
        + request(ch, "exit-status", pack_u32(3))
        + only(ch, proto.MSG_CHANNEL_EOF)
        + only(ch, proto.MSG_CHANNEL_CLOSE)
    )
    events = mux.receive(script)
    assert events == [
        RequestReply(ch, "exec", True),
        Data(ch, b"hi\n"),
        ExtendedData(ch, 1, b"e"),
        ExitStatus(ch, 3),
        Eof(ch),
        Closed(ch),
    ]
    # Their CLOSE is answered with ours; the channel is over and no longer counts.
    assert parse(mux.data_to_send()) == [(proto.MSG_CHANNEL_CLOSE, pack_u32(REMOTE + ch))]
    assert mux.open_channels == 0


def test_packets_split_at_every_byte_give_the_same_events() -> None:
    mux, ch = opened()
    script = data(ch, b"abc") + request(ch, "exit-status", pack_u32(0)) + only(ch, 97)
    got = []
    for i in range(len(script)):
        got += mux.receive(script[i : i + 1])
    assert got == [Data(ch, b"abc"), ExitStatus(ch, 0), Closed(ch)]


def test_exit_signal() -> None:
    mux, ch = opened()
    body = pack_string("KILL") + b"\x01" + pack_string("killed") + pack_string("")
    assert mux.receive(request(ch, "exit-signal", body)) == [ExitSignal(ch, "KILL", True, "killed")]


def test_peer_requests_wanting_a_reply_get_a_failure() -> None:
    mux, ch = opened()
    assert mux.receive(request(ch, "keepalive@openssh.com", b"", want_reply=True)) == []
    assert parse(mux.data_to_send()) == [(proto.MSG_CHANNEL_FAILURE, pack_u32(REMOTE + ch))]
    assert mux.receive(pkt(proto.MSG_GLOBAL_REQUEST, pack_string("x") + b"\x01")) == []
    assert parse(mux.data_to_send()) == [(proto.MSG_REQUEST_FAILURE, b"")]


def test_request_replies_name_their_request_in_order() -> None:
    mux, ch = opened()
    mux.pty_req(ch, "xterm", 24, 80)
    mux.exec(ch, "true")
    mux.data_to_send()
    got = mux.receive(only(ch, proto.MSG_CHANNEL_FAILURE) + only(ch, proto.MSG_CHANNEL_SUCCESS))
    assert got == [RequestReply(ch, "pty-req", False), RequestReply(ch, "exec", True)]


def test_a_full_window_holds_data_until_window_adjust() -> None:
    mux, ch = opened(window=10, max_packet=4)
    assert mux.send_room(ch) == 10
    assert mux.send_data(ch, b"0123456789abcdef") == 10  # the rest waits
    sent = parse(mux.data_to_send())
    # Packets of at most the peer's max packet size.
    assert [b for _, b in sent] == [
        pack_u32(REMOTE + ch) + pack_string(p) for p in (b"0123", b"4567", b"89")
    ]
    assert mux.send_room(ch) == 0 and mux.send_data(ch, b"abcdef") == 0
    assert mux.data_to_send() == b""
    adjust = pkt(proto.MSG_CHANNEL_WINDOW_ADJUST, pack_u32(ch) + pack_u32(5))
    assert mux.receive(adjust) == [WindowOpened(ch, 5)]
    assert mux.send_data(ch, b"abcdef") == 5
    assert [b for _, b in parse(mux.data_to_send())] == [
        pack_u32(REMOTE + ch) + pack_string(p) for p in (b"abcd", b"e")
    ]


def test_window_adjust_only_for_what_was_delivered() -> None:
    mux, ch = opened()
    half = WINDOW // 2
    chunk = b"x" * MAX_PACKET
    for _ in range(half // MAX_PACKET):
        mux.receive(data(ch, chunk))
    assert mux.data_to_send() == b""  # nothing delivered yet: no adjust
    mux.consumed(ch, half - 1)
    assert mux.data_to_send() == b""
    mux.consumed(ch, 1)
    assert parse(mux.data_to_send()) == [
        (proto.MSG_CHANNEL_WINDOW_ADJUST, pack_u32(REMOTE + ch) + pack_u32(half))
    ]
    # The peer may now send the whole window again, and no byte more.
    for _ in range(WINDOW // MAX_PACKET):
        mux.receive(data(ch, chunk))
    with pytest.raises(ChannelProtocolError, match="beyond its window"):
        mux.receive(data(ch, b"y"))


def test_session_limit_refusal() -> None:
    for code, limit in ((1, True), (2, True), (4, False)):
        mux = ChannelMux()
        ch = mux.open_session()
        body = pack_u32(ch) + pack_u32(code) + pack_string("open failed") + pack_string("")
        (ev,) = mux.receive(pkt(proto.MSG_CHANNEL_OPEN_FAILURE, body))
        assert ev == OpenFailed(ch, code, "open failed")
        assert isinstance(ev, OpenFailed) and ev.session_limit is limit
        assert mux.open_channels == 0
    assert mux.exec(ch, "true") is False  # nothing to send on a refused channel


def test_eof_then_close() -> None:
    mux, ch = opened()
    record = mux.channel(ch)
    assert mux.receive(only(ch, proto.MSG_CHANNEL_EOF)) == [Eof(ch)]
    assert record.eof_received and state(record) is ChannelState.OPEN
    assert mux.send_eof(ch) and not mux.send_eof(ch)  # once
    assert parse(mux.data_to_send()) == [(proto.MSG_CHANNEL_EOF, pack_u32(REMOTE + ch))]
    assert mux.send_data(ch, b"late") == 0  # nothing after our EOF
    assert mux.receive(only(ch, proto.MSG_CHANNEL_CLOSE)) == [Closed(ch)]
    assert record.state is ChannelState.CLOSED


def test_close_without_eof() -> None:
    mux, ch = opened()
    assert mux.receive(only(ch, proto.MSG_CHANNEL_CLOSE)) == [Closed(ch)]
    assert parse(mux.data_to_send()) == [(proto.MSG_CHANNEL_CLOSE, pack_u32(REMOTE + ch))]
    assert not mux.close(ch) and mux.data_to_send() == b""  # one CLOSE only


def test_our_close_crossing_theirs() -> None:
    mux, ch = opened()
    record = mux.channel(ch)
    assert mux.close(ch)
    assert state(record) is ChannelState.CLOSING and mux.open_channels == 1
    assert parse(mux.data_to_send()) == [(proto.MSG_CHANNEL_CLOSE, pack_u32(REMOTE + ch))]
    assert mux.signal(ch, "TERM") is False  # closing: requests are dropped
    # Data they sent before seeing our CLOSE still arrives, then their CLOSE.
    got = mux.receive(data(ch, b"tail") + only(ch, proto.MSG_CHANNEL_CLOSE))
    assert got == [Data(ch, b"tail"), Closed(ch)]
    assert mux.data_to_send() == b""  # no second CLOSE
    assert record.state is ChannelState.CLOSED and mux.open_channels == 0


def test_closed_while_opening_is_closed_once_confirmed() -> None:
    mux = ChannelMux()
    ch = mux.open_session()
    mux.data_to_send()
    assert mux.close(ch) and mux.data_to_send() == b""  # no remote id yet
    assert mux.receive(confirm(ch)) == [Opened(ch)]
    assert parse(mux.data_to_send()) == [(proto.MSG_CHANNEL_CLOSE, pack_u32(REMOTE + ch))]
    assert mux.channel(ch).state is ChannelState.CLOSING
    assert mux.receive(only(ch, proto.MSG_CHANNEL_CLOSE)) == [Closed(ch)]


def test_master_lost_mid_channel() -> None:
    mux, ch = opened()
    other = mux.open_session()
    mux.exec(ch, "sleep 9")
    mux.receive(data(ch, b"partial"))
    records = mux.channel(ch), mux.channel(other)
    events = mux.connection_lost("master gone")
    assert events == [Lost(ch, "master gone"), Lost(other, "master gone")]
    assert all(r.state is ChannelState.LOST for r in records)
    assert mux.open_channels == 0 and mux.data_to_send() == b""
    assert mux.connection_lost("again") == [] and mux.receive(data(ch, b"x")) == []
    with pytest.raises(ChannelStateError):
        mux.open_session()


def test_peer_channel_open_is_refused() -> None:
    mux = ChannelMux()
    body = pack_string("x11") + pack_u32(7) + pack_u32(100) + pack_u32(100)
    assert mux.receive(pkt(proto.MSG_CHANNEL_OPEN, body)) == []
    ((msg, reply),) = parse(mux.data_to_send())
    assert msg == proto.MSG_CHANNEL_OPEN_FAILURE and reply.startswith(pack_u32(7) + pack_u32(3))


@pytest.mark.parametrize(
    ("script", "match"),
    [
        (struct.pack(">I", PACKET_LIMIT + 1), "length"),
        (struct.pack(">I", 1) + b"\0", "length"),
        (struct.pack(">IBB", 2, 4, 94), "padding"),
        (pkt(proto.MSG_CHANNEL_DATA, pack_u32(999) + pack_string(b"x")), "unknown channel"),
        (pkt(proto.MSG_CHANNEL_DATA, pack_u32(1) + pack_u32(5) + b"ab"), "truncated"),
        (only(1, proto.MSG_CHANNEL_SUCCESS), "nobody asked"),
        (only(1, proto.MSG_CHANNEL_EOF) + data(1, b"x"), "after EOF"),
        (confirm(1), "second open"),
        (pkt(proto.MSG_CHANNEL_WINDOW_ADJUST, pack_u32(1) + pack_u32(2**32 - 1)), "overflow"),
    ],
)
def test_malformed_input_is_a_protocol_error(script: bytes, match: str) -> None:
    mux, _ = opened()
    with pytest.raises(ChannelProtocolError, match=match):
        mux.receive(script)


def test_before_open_only_an_answer_to_the_open_is_allowed() -> None:
    mux = ChannelMux()
    ch = mux.open_session()
    with pytest.raises(ChannelProtocolError, match="not open yet"):
        mux.receive(data(ch, b"x"))
    mux = ChannelMux()
    ch = mux.open_session()
    zero = pack_u32(ch) + pack_u32(1) + pack_u32(10) + pack_u32(0)
    with pytest.raises(ChannelProtocolError, match="maximum packet size 0"):
        mux.receive(pkt(proto.MSG_CHANNEL_OPEN_CONFIRMATION, zero))


_MSGS = st.sampled_from([80, 81, 82, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 0, 255])


@st.composite
def _packets(draw: st.DrawFn) -> bytes:
    """Frames with plausible headers and arbitrary (often malformed) bodies."""
    msg = draw(_MSGS)
    chan = draw(st.sampled_from([1, 2, 3, 999]))
    body = pack_u32(chan) + draw(st.binary(max_size=40))
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    frame = struct.pack(">IBB", len(body) + 2, 0, msg) + body
    if draw(st.integers(0, 20)) == 0:
        frame = draw(st.binary(max_size=12))  # garbage, bad lengths included
    return frame


@settings(max_examples=400, deadline=None)
@given(st.lists(_packets(), max_size=8), st.integers(1, 64))
def test_fuzzed_packets_raise_only_the_protocol_error(frames: list[bytes], step: int) -> None:
    mux, ch = opened()
    mux.open_session()  # one channel still opening
    mux.exec(ch, "true")
    stream = b"".join(frames)
    try:
        for i in range(0, len(stream), step):  # also fed in pieces: never stuck, never else
            for ev in mux.receive(stream[i : i + step]):
                assert isinstance(ev, Event)
    except ChannelProtocolError:
        pass
    mux.data_to_send()
    assert all(isinstance(e, Lost) for e in mux.connection_lost("end"))
