"""The pure protocol layer: bytes in and values out.

Modules here parse and build SSH wire data and hold protocol state; they never do IO.  They
import no ``os``, ``socket``, ``select``, ``threading``, ``asyncio`` or ``subprocess`` (enforced
by ``tests/test_architecture.py``), so each can be tested byte by byte without an sshd, and
the sync and async drivers above them share one copy.

- ``sshwrap.protocol.wire``: the SSH wire codec (RFC 4251 section 5 types: ``byte``,
  ``boolean``, ``uint32``, ``uint64``, ``string``, ``name-list``), used by the mux protocol
  (``sshwrap.protocol.mux``), the session channels (``sshwrap.protocol.channel``) and SFTP
  (``sshwrap.protocol.sftp``).
- ``sshwrap.protocol.mux``: OpenSSH's ControlMaster protocol (``PROTOCOL.mux``) as typed
  requests and replies (``encode()``/``decode()``); ``sshwrap.io.mux_control`` does the IO.
- ``sshwrap.protocol.channel``: the RFC 4254 channel multiplexer as a state machine
  (``ChannelMux``: ``receive(bytes)`` -> events, outgoing bytes to send, one state per
  channel and its windows); ``sshwrap.protocol.channel_events``: its events.
  ``sshwrap.io.pump`` drives it.
- ``sshwrap.protocol.sftp``: the SFTP v3 codec (packets, ATTRS, requests, replies), no IO.
- ``sshwrap.protocol.sshlog``: reading ssh's ``-E`` log and stderr (its words, which kind of
  failure, the remote exit against ssh's own).
- ``sshwrap.protocol.asciicast``: the asciicast v2 format (header, events, the JSON escaping)
  and which typed keys may be recorded (``EchoGate``).
"""
