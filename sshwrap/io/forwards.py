"""Port forwards over a ControlMaster (``ssh -O forward`` / ``-O cancel``), and their restore.

A forward is asked of the master over its control socket (:mod:`sshwrap.io.mux_control`).
The master does not report the port it bound for a local port 0, so a free port is picked
here and asked for (another process may take it in between: then another is tried); for a
remote port 0 the server's choice is reported and kept in :attr:`Forward.port`.  After a
restart of the master (:class:`sshwrap.io.master.Master`) the new master is asked for the
same forwards (:func:`restore_forwards`): same ports; a remote forward of port 0 gets the
server's new choice; one that cannot be restored becomes inactive.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from ..errors import SSHConnectionError, SSHError
from ..protocol.mux import ForwardSpec
from .mux_control import MUX_FWD_REMOTE, MuxControl, MuxError, MuxRefused

__all__ = ["Forward", "ForwardError", "ForwardSpec", "open_forward", "restore_forwards"]


Forget = Callable[["Forward"], bool]
"""What ``cancel`` calls first: drops the forward from its master's list; False: nothing to
cancel any more (cancelled, or the master is closed)."""


class ForwardError(SSHError):
    """A port forward could not be set up or cancelled (the master's or the server's reason)."""


class Forward:
    """A port forward over a Connection's master: ``port`` is the listening port (the local
    one for ``forward_local``/``forward_dynamic``, the server's for ``forward_remote``; the one
    picked when 0 was asked for).  ``int(fwd)`` is the port too.

    ``cancel()`` removes it (``ssh -O cancel``); as a context manager it cancels on exit.
    """

    def __init__(
        self,
        port: int,
        kind: str,
        spec: ForwardSpec,
        *,
        host: str,
        control_path: str,
        forget: Forget,
    ) -> None:
        self.port = port
        self.kind = kind
        self.spec = spec
        """The request as the master got it (see :data:`ForwardSpec`)."""
        self.listen_host = spec[1]
        self.connect_host = spec[3]
        self.connect_port = spec[4]
        self._host = host
        self.control_path = control_path
        """The control socket of the master that holds it."""
        self._forget: Forget | None = forget
        self.cancelled = False
        """True once :meth:`cancel` was called."""

    def __int__(self) -> int:
        return self.port

    def __index__(self) -> int:
        return self.port

    @property
    def active(self) -> bool:
        """False once cancelled (or lost with a master that could not restore it)."""
        return self._forget is not None

    def deactivate(self) -> None:
        """Mark it gone without asking the master (its master is gone, or refused it back)."""
        self._forget = None

    def cancel(self) -> None:
        """Remove the forward (idempotent; a no-op when the master is gone)."""
        what = self._describe()
        forget, self._forget = self._forget, None
        self.cancelled = True
        if forget is None or not forget(self):
            return
        try:
            with MuxControl(self.control_path, timeout=10) as m:
                m.close_forward(self.spec)
        except MuxRefused as e:
            raise ForwardError(self._host, f"cancelling the forward {what}: {e}") from None
        except MuxError:
            pass  # the master is gone, and its forwards with it

    def __enter__(self) -> Forward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    def _describe(self) -> str:
        target = "socks" if self.kind == "dynamic" else f"{self.connect_host}:{self.connect_port}"
        return f"{self.kind} {self.listen_host}:{self.port} -> {target}"

    def __repr__(self) -> str:
        """Kind, ports, the host, and the state: ``active``, ``cancelled``, or ``inactive``
        (lost with a master that could not restore it)."""
        state = "active" if self.active else ("cancelled" if self.cancelled else "inactive")
        return f"<Forward {self._describe()} host={self._host!r} {state}>"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("", "*", "localhost") else "127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def open_forward(
    host: str, control_path: str, kind: str, spec: ForwardSpec, forget: Forget
) -> Forward:
    """Ask the master on ``control_path`` for the forward ``spec``; the ``Forward``.

    ``ForwardError`` when the master or the server refuses it, ``SSHConnectionError`` when the
    master does not answer.  A local (or dynamic) port 0 is a free port picked here (up to 20
    tries when another process takes it first)."""
    ftype, listen_host, listen_port, connect_host, connect_port = spec
    remote = ftype == MUX_FWD_REMOTE
    tries = 20 if listen_port == 0 and not remote else 1
    last = ""
    for _ in range(tries):
        lport = listen_port if remote else (listen_port or _free_port(listen_host))
        asked = (ftype, listen_host, lport, connect_host, connect_port)
        try:
            with MuxControl(control_path) as m:
                got = m.open_forward(asked)
        except MuxRefused as e:
            if remote:
                raise ForwardError(host, f"remote forward refused: {e}") from None
            last = str(e)
            continue
        except MuxError as e:
            raise SSHConnectionError(host, str(e)) from None
        port = got if remote and got is not None else lport
        return Forward(port, kind, asked, host=host, control_path=control_path, forget=forget)
    raise ForwardError(host, f"{kind} forward on {listen_host}:{listen_port}: {last}")


def restore_forwards(
    control_path: str, forwards: list[Forward], timeout: float = 10.0
) -> list[Forward]:
    """Ask a new master on ``control_path`` for ``forwards``; those it took (a remote port 0
    gets the server's new choice), the others deactivated."""
    kept: list[Forward] = []
    for fwd in forwards:
        try:
            with MuxControl(control_path, timeout=timeout) as m:
                got = m.open_forward(fwd.spec)
        except MuxError:
            fwd.deactivate()  # its port is taken now, or the server refuses: gone
            continue
        if got is not None:
            fwd.port = got  # a remote forward of port 0: the server's new choice
        fwd.control_path = control_path
        kept.append(fwd)
    return kept
