"""The mux protocol messages (``sshwrap.protocol.mux``) byte by byte, and ``MuxControl``
against a scripted master on a unix socket: no sshd."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshwrap.io.mux_control import MuxControl, MuxError, MuxRefused, MuxUnsupported
from sshwrap.protocol import mux
from sshwrap.protocol.wire import pack_string, pack_u32

REPLIES: list[mux.Reply] = [
    mux.Ok(7),
    mux.ProxyReady(7),
    mux.Failure(7, "no such forward"),
    mux.PermissionDenied(7, "denied"),
    mux.Alive(7, 4242),
    mux.RemotePort(7, 40001),
    mux.SessionOpened(7, 3),
    mux.ExitMessage(3, 1),
    mux.TtyAllocFail(3),
]
REQUESTS: list[mux.Request] = [
    mux.AliveCheck(1),
    mux.Terminate(2),
    mux.StopListening(3),
    mux.Proxy(4),
    mux.OpenForward(5, mux.MUX_FWD_REMOTE, "127.0.0.1", 0, "localhost", 22),
    mux.CloseForward(6, mux.MUX_FWD_LOCAL, "", 8080, "/run/sock", mux.PORT_STREAMLOCAL),
    mux.NewSession(7, subsystem=1, command="sftp"),
]


def test_requests_are_the_bytes_openssh_reads() -> None:
    assert mux.Hello().encode() == pack_u32(8) + pack_u32(1) + pack_u32(4)
    assert mux.AliveCheck(9).encode() == pack_u32(8) + pack_u32(0x10000004) + pack_u32(9)
    body = (
        pack_u32(0x10000006)
        + pack_u32(5)
        + pack_u32(2)
        + pack_string("127.0.0.1")
        + pack_u32(0)
        + pack_string("localhost")
        + pack_u32(22)
    )
    assert REQUESTS[4].encode() == pack_u32(len(body)) + body
    assert mux.Proxy(4).encode()[4:8] == pack_u32(0x1000000F)
    # mux.c's process_mux_new_session: reserved string, four u32 flags (tty, x11, agent,
    # subsystem), the escape char, terminal type, command; no environment strings after
    body = pack_u32(0x10000002) + pack_u32(7) + pack_string("")
    body += pack_u32(0) * 3 + pack_u32(1) + pack_u32(0xFFFFFFFF) + pack_string("")
    body += pack_string("sftp")
    assert REQUESTS[6].encode() == pack_u32(len(body)) + body


@pytest.mark.parametrize("message", [*REQUESTS, *REPLIES, mux.Hello(4)], ids=repr)
def test_every_message_round_trips(message: object) -> None:
    encoded = message.encode()  # type: ignore[attr-defined]
    assert mux.message_length(encoded[:4]) == len(encoded) - 4
    payload = encoded[4:]
    assert type(message).decode(payload) == message  # type: ignore[attr-defined]
    if isinstance(message, mux.Hello):
        return
    decode = mux.decode_request if message in REQUESTS else mux.decode_reply
    assert decode(payload) == message


@pytest.mark.parametrize("reply", REPLIES, ids=repr)
def test_a_truncated_reply_is_a_protocol_error_at_every_offset(reply: mux.Reply) -> None:
    payload = reply.encode()[4:]
    for cut in range(len(payload)):
        with pytest.raises(mux.MuxProtocolError):
            mux.decode_reply(payload[:cut])


def test_unknown_and_oversized_messages() -> None:
    with pytest.raises(mux.MuxProtocolError, match="unexpected mux reply 0x12345678"):
        mux.decode_reply(pack_u32(0x12345678) + pack_u32(1))
    with pytest.raises(mux.MuxProtocolError, match="oversized"):
        mux.message_length(pack_u32(mux.MAX_MESSAGE + 1))
    with pytest.raises(mux.MuxProtocolError, match="expected mux message"):
        mux.Hello.decode(mux.Ok(1).encode()[4:])


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda kind, rest: pack_u32(kind) + rest,
            st.sampled_from([r.KIND for r in REPLIES] + [0, 0xFFFFFFFF]),
            st.binary(max_size=40),
        ),
    )
)
def test_fuzzed_replies_raise_only_the_protocol_error(payload: bytes) -> None:
    try:
        reply = mux.decode_reply(payload)
    except mux.MuxProtocolError:
        return
    assert isinstance(reply, mux.Reply)


# -- MuxControl over a scripted master ---------------------------------------------------------
@pytest.fixture
def master(tmp_path: Path) -> Iterator[tuple[str, list[bytes]]]:
    """A unix socket that answers hello, then sends the scripted byte strings, one per request."""
    path = os.path.join(str(tmp_path), "m")
    script: list[bytes] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(12)
            conn.sendall(script.pop(0) if script else mux.Hello().encode())
            while script:
                if not conn.recv(4096):
                    return
                conn.sendall(script.pop(0))
            conn.recv(4096)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, script
    listener.close()
    t.join(10)


def test_control_client_reads_typed_replies(master: tuple[str, list[bytes]]) -> None:
    path, script = master
    script += [mux.Hello().encode(), mux.Alive(1, 99).encode(), mux.Failure(2, "nope").encode()]
    with MuxControl(path, timeout=10) as c:
        assert c.alive_check() == 99
        with pytest.raises(MuxRefused, match="nope"):
            c.stop_listening()


@pytest.mark.parametrize(
    ("reply", "error", "match"),
    [
        (mux.frame(mux.Alive(1, 9).encode()[4:-2]), MuxError, "truncated mux message"),
        (pack_u32(8) + pack_u32(0x87654321) + pack_u32(1), MuxError, "unexpected mux reply"),
        (mux.Alive(5, 9).encode(), MuxError, "reply for request 5, expected 1"),
        (mux.Ok(1).encode(), MuxError, "unexpected reply"),
        (pack_u32(mux.MAX_MESSAGE + 1), MuxError, "oversized"),
    ],
)
def test_control_client_turns_bad_replies_into_mux_errors(
    master: tuple[str, list[bytes]], reply: bytes, error: type[Exception], match: str
) -> None:
    path, script = master
    script += [mux.Hello().encode(), reply]
    with MuxControl(path, timeout=2) as c, pytest.raises(error, match=match):
        c.alive_check()


def test_control_client_refuses_another_protocol_version(master: tuple[str, list[bytes]]) -> None:
    path, script = master
    script.append(mux.Hello(3).encode())
    with pytest.raises(MuxUnsupported, match="protocol 3"):
        MuxControl(path, timeout=10)
