"""The pure protocol layer: bytes in and values out.

Modules here parse and build SSH wire data and hold protocol state; they never do IO.  They
import no ``os``, ``socket``, ``select``, ``threading``, ``asyncio`` or ``subprocess`` (enforced
by ``tests/test_architecture.py``), so each can be tested byte by byte without an sshd, and
the sync and async drivers above them share one copy.

- ``sshwrap.protocol.wire``: the SSH wire codec (RFC 4251 section 5 types: ``byte``,
  ``boolean``, ``uint32``, ``uint64``, ``string``, ``name-list``), used by the mux protocol
  (``sshwrap.io.mux_control``), the session channels (``sshwrap.io.pump``) and SFTP
  (``sshwrap.protocol.sftp``).
- ``sshwrap.protocol.sftp``: the SFTP v3 codec (packets, ATTRS, requests, replies), no IO.
"""
