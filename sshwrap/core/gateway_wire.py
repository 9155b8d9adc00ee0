"""The gateway protocol's framing: JSON lines both ways, no pickle.

The agent first says ``{"t": "ready"}`` (it runs: the control side then knows how much of the
deadline is left). The control node sends it one line, the request (:func:`encode_request`):
the hosts (names, as the gateway's own ssh knows them), the command, and the fan-out's
keywords, with ``input`` as base64; ``via`` (gateway -> names) when some of the hosts are
behind a further gateway, which the agent then reaches itself.  The agent answers with one
line per event (:func:`encode_event`):

- ``{"t": "start", "i": N}``: host ``N`` (its index in the request's hosts) started;
- ``{"t": "out", "i": N, "s": 1|2, "d": BASE64}``: bytes of its stdout (1) or stderr (2), sent
  only when the request asks for them (``"output": true``);
- ``{"t": "result", "i": N, ...}``: its :class:`~sshwrap.core.host_result.HostResult` (status,
  returncode, signalled, stdout/stderr as base64, the typed error as ``{type, message,
  host, stderr, returncode, gateway}``, started, duration, connect_time, ssh_log);
- ``{"t": "done"}``: every host was reported;
- ``{"t": "fail", "message": TEXT}``: the agent could not run the request (a bad request).

After the request, the control node may send one more kind of line, ``{"t": "stop", "reason":
TEXT}`` (:func:`encode_stop`): start no new host, report the hosts never started as
``skipped`` for TEXT (the tree's ``max_fail`` was exceeded elsewhere).  ``max_fail`` in the
request's keywords is a count (the control node resolves a percentage against the whole run).

:func:`decode_event` turns a line back into a :class:`GatewayEvent`, the error into the same
exception class (one of :mod:`sshwrap.errors`' ``SSHError`` family, else ``SSHError``).
A line that is not one of these raises :class:`WireError`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from .. import errors
from .host_result import HostResult, Status

__all__ = [
    "REQUEST_KEYWORDS",
    "START_PREFIX",
    "GatewayEvent",
    "WireError",
    "decode_event",
    "decode_request",
    "encode_event",
    "encode_request",
    "encode_result",
    "encode_stop",
    "read_stop",
]

WIRE_VERSION = 1

REQUEST_KEYWORDS = (
    "concurrency",
    "timeout",
    "connect_timeout",
    "deadline",
    "env",
    "cwd",
    "config",
    "user",
    "port",
    "identity",
    "jump",
    "options",
    "batch_mode",
    "kill_remote",
    "retries",
    "via",
    "forward_agent",
    "max_fail",
)
"""The fan-out keywords a request carries to the agent (besides ``input`` and ``output``)."""

_STATUSES = {"ok", "failed", "timeout", "ssh_error", "cancelled", "skipped"}


class WireError(ValueError):
    """A line of the gateway protocol that does not parse."""


START_PREFIX = b'{"t":"start",'
"""How every ``start`` line begins (:func:`encode_event`'s compact JSON): a reader that does not
want them skips them without decoding."""


def _line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if text == "":
        return b""  # (most outputs are empty: no decode)
    if not isinstance(text, str):
        raise WireError("base64 field is not a string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError as e:
        raise WireError(f"bad base64: {e}") from None


def _load(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise WireError(f"not a JSON line: {line[:80]!r} ({e})") from None
    if not isinstance(obj, dict):
        raise WireError(f"not a JSON object: {line[:80]!r}")
    return obj


def encode_request(
    hosts: Sequence[str],
    command: str | Sequence[str] | Mapping[str, str | Sequence[str]],
    keywords: Mapping[str, Any],
    *,
    input: bytes | None = None,
    output: bool = False,
) -> bytes:
    """The request line: ``hosts``, ``command`` (one, or a mapping of host name to its own:
    the gateway's hosts') and the keywords of :data:`REQUEST_KEYWORDS` (others raise
    ``ValueError``); ``input`` as base64; ``output``: send ``out`` events."""
    unknown = set(keywords) - set(REQUEST_KEYWORDS)
    if unknown:
        raise ValueError(f"keywords a gateway cannot take: {', '.join(sorted(unknown))}")
    kw: dict[str, Any] = {
        k: (str(v) if k in ("config", "identity", "cwd") and v is not None else v)
        for k, v in keywords.items()
    }
    via = keywords.get("via")
    if via is not None:
        kw["via"] = {str(g): [str(h) for h in members] for g, members in via.items()}
    cmd: str | list[str] | dict[str, str | list[str]]
    if isinstance(command, Mapping):
        cmd = {h: _wire_command(command[h]) for h in dict.fromkeys(hosts)}
    else:
        cmd = _wire_command(command)
    req = {
        "v": WIRE_VERSION,
        "hosts": list(hosts),
        "command": cmd,
        "keywords": kw,
        "input": None if input is None else _b64(input),
        "output": output,
    }
    return _line(req)


def _wire_command(command: str | Sequence[str]) -> str | list[str]:
    return command if isinstance(command, str) else [str(c) for c in command]


def _is_command(command: object) -> bool:
    return isinstance(command, str) or (
        isinstance(command, list) and all(isinstance(c, str) for c in command)
    )


@dataclass
class Request:
    """A decoded request: what the agent runs."""

    hosts: list[str]
    command: str | list[str] | dict[str, str | list[str]]
    keywords: dict[str, Any]
    input: bytes | None
    output: bool


def decode_request(line: bytes) -> Request:
    """The request of :func:`encode_request`; :class:`WireError` when it is not one."""
    obj = _load(line)
    if obj.get("v") != WIRE_VERSION:
        raise WireError(f"unsupported request version {obj.get('v')!r}")
    hosts, command, kw = obj.get("hosts"), obj.get("command"), obj.get("keywords")
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise WireError("hosts must be a list of names")
    if isinstance(command, dict):
        if not all(isinstance(h, str) and _is_command(c) for h, c in command.items()):
            raise WireError("a per-host command must map names to commands")
    elif not _is_command(command):
        raise WireError("command must be a string or a list of strings")
    if not isinstance(kw, dict) or set(kw) - set(REQUEST_KEYWORDS):
        raise WireError("bad keywords")
    via = kw.get("via")
    if via is not None and not (
        isinstance(via, dict)
        and all(isinstance(m, list) and all(isinstance(h, str) for h in m) for m in via.values())
    ):
        raise WireError("via must map gateway names to lists of names")
    data = obj.get("input")
    return Request(
        hosts,
        cast(str | list[str] | dict[str, str | list[str]], command),
        kw,
        None if data is None else _unb64(data),
        bool(obj.get("output")),
    )


def encode_result(index: int, r: HostResult) -> bytes:
    """The ``result`` line of host ``index`` (its place in the request)."""
    err = None
    if r.error is not None:
        e = r.error
        err = {
            "type": type(e).__name__,
            "message": e.message,
            "host": e.host,
            "stderr": getattr(e, "stderr", ""),
            "returncode": getattr(e, "returncode", None),
            "gateway": getattr(e, "gateway", None),
        }
    return _line(
        {
            "t": "result",
            "i": index,
            "status": r.status,
            "returncode": r.returncode,
            "signalled": r.signalled,
            "stdout": _b64(r.stdout),
            "stderr": _b64(r.stderr),
            "error": err,
            "started": r.started,
            "duration": r.duration,
            "connect_time": r.connect_time,
            "ssh_log": r.ssh_log,
            "attempts": r.attempts,
        }
    )


def encode_event(kind: str, index: int | None = None, **fields: Any) -> bytes:
    """A ``start`` / ``out`` / ``done`` / ``fail`` line (``out``'s ``data`` bytes as base64)."""
    obj: dict[str, Any] = {"t": kind}
    if index is not None:
        obj["i"] = index
    if "data" in fields:
        fields["d"] = _b64(fields.pop("data"))
    obj.update(fields)
    return _line(obj)


@dataclass
class GatewayEvent:
    """One decoded agent line: ``kind`` (ready, start, out, result, done, fail) and its
    fields."""

    kind: str
    index: int = -1
    stream: int = 0
    data: bytes = b""
    result: HostResult | None = None
    message: str = ""


def _error(obj: object) -> errors.SSHError | errors.SkippedError | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise WireError("error must be an object")
    if obj.get("type") == "SkippedError":
        return errors.SkippedError(str(obj.get("host", "")), str(obj.get("message", "")))
    cls = getattr(errors, str(obj.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.SSHError)):
        cls = errors.SSHError
    host, message = str(obj.get("host", "")), str(obj.get("message", ""))
    e = (
        errors.GatewayError(host, message, gateway=str(obj.get("gateway") or ""))
        if cls is errors.GatewayError
        else cls(host, message)
    )
    e.stderr = str(obj.get("stderr", ""))
    rc = obj.get("returncode", 255)
    e.returncode = rc if isinstance(rc, int) else 255
    return e


def _opt_float(v: object) -> float | None:
    return None if v is None else float(cast(float, v))


def decode_event(line: bytes, hosts: Sequence[str]) -> GatewayEvent:
    """One agent line as a :class:`GatewayEvent`; a result names ``hosts[i]`` (the request's
    host list).  :class:`WireError` for anything else."""
    obj = _load(line)
    kind = obj.get("t")
    if kind in ("ready", "done", "fail"):
        return GatewayEvent(str(kind), message=str(obj.get("message", "")))
    i = obj.get("i")
    if not isinstance(i, int) or not 0 <= i < len(hosts):
        raise WireError(f"bad host index {i!r}")
    if kind == "start":
        return GatewayEvent("start", i)
    if kind == "out":
        s = obj.get("s")
        if s not in (1, 2):
            raise WireError(f"bad stream {s!r}")
        return GatewayEvent("out", i, cast(int, s), _unb64(obj.get("d")))
    if kind != "result":
        raise WireError(f"unknown event {kind!r}")
    status = obj.get("status")
    rc = obj.get("returncode")
    if status not in _STATUSES or not (rc is None or isinstance(rc, int)):
        raise WireError("bad status or returncode")
    try:
        result = HostResult(
            hosts[i],
            rc,
            _unb64(obj.get("stdout")),
            _unb64(obj.get("stderr")),
            _error(obj.get("error")),
            _opt_float(obj.get("started")),
            float(obj.get("duration", 0.0)),
            cast(Status, status),
            _opt_float(obj.get("connect_time")),
            bool(obj.get("signalled")),
            str(obj.get("ssh_log", "")),
            i,
        )
        attempts = obj.get("attempts", 1)
        if type(attempts) is not int or attempts < 1:
            raise WireError(f"bad attempts {attempts!r}")
        result.attempts = attempts
    except (TypeError, ValueError) as e:
        raise WireError(f"bad result: {e}") from None
    return GatewayEvent("result", i, result=result)


def encode_stop(reason: str) -> bytes:
    """The control line that tells an agent to start no new host (``reason``: why)."""
    return _line({"t": "stop", "reason": reason})


def read_stop(line: bytes) -> str | None:
    """The reason of a stop line of :func:`encode_stop`; None for any other line."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("t") != "stop":
        return None
    return str(obj.get("reason") or "stopped by the control node")
