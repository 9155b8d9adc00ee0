"""asciicast v2, the recording format of asciinema (pure: bytes in, lines out).

An asciicast v2 file is newline-delimited JSON: the first line is the header (an object with
``version`` 2, ``width``, ``height``, ``timestamp``, ``env`` and ``title``), every later line
one event ``[seconds since start, code, data]``: ``"o"`` output, ``"i"`` input, ``"r"`` a
resize to ``"COLSxROWS"``.  Each event is one line, so a file cut after any line is valid.

- :func:`header_line` and :func:`event_line` build the lines (``bytes``, ``\\n``-terminated).
- :func:`json_string` / :func:`json_content` encode terminal bytes as a JSON string (with or
  without its quotes), :data:`json_quoted` a ``str`` (quotes included).  A relay may record
  GBs, so the encoder is ``orjson``'s: a well-kept library made for exactly this, one pass
  in C (about 0.35 s/GB for text lines, the UTF-8 decode before it included;
  ``bytes.translate`` and ``bytes.replace`` took 1.3-1.6, the standard library's ``json``
  is about 4x slower than orjson).  What it writes is valid asciicast: ``"``, ``\\`` and the C0
  controls escaped (``\\n``, ``\\r``, ``\\t``, ``\\b``, ``\\f``, else ``\\u00XX``), the rest as
  it is, non-ASCII as UTF-8.  Bytes that are not UTF-8 are decoded with U+FFFD for the bad
  ones (as asciinema does) before it: that never makes a lone surrogate, the one ``str``
  orjson refuses.
- :func:`utf8_cut`: where a chunk may be cut without splitting a UTF-8 sequence.
- :class:`EchoGate`: which typed bytes may be recorded as ``"i"`` events at all: only those the
  remote side has echoed.  A password typed at a prompt that does not echo (ssh's, sudo's,
  ``read -s``) is never echoed, so it is never recorded.  The rules (also in the recording
  docs):

  1. A typed chunk's *visible* bytes (escape sequences and control bytes removed) must come
     back at the very start of the first output after it (possibly split over several
     reads), before the next key is typed; then the chunk is released, else it is dropped.
  2. A chunk without visible bytes (Enter, Backspace, arrows, Ctrl-C) is released at once,
     unless the gate is quiet.
  3. A dropped chunk makes the gate quiet: nothing is released until a line end (``\\r`` or
     ``\\n``) has been typed (that chunk is dropped too).  So once one key of a password went
     unechoed, the rest of its line is dropped whatever the output does.

  The residual risk: a program that prints on its own while it reads a secret with echo
  off can, by chance, start its next output with the very key just typed; that one key
  would be released.  Typing faster than the round trip loses input events (dropped, never
  leaked).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping

import orjson

__all__ = [
    "EVENT_END",
    "EchoGate",
    "event_head",
    "event_line",
    "event_parts",
    "header_line",
    "json_content",
    "json_quoted",
    "json_string",
    "resize_data",
    "utf8_cut",
    "visible",
]

json_quoted: Callable[[str], bytes] = orjson.dumps
"""``text`` as a JSON string literal, quotes included (``orjson.dumps`` itself, no wrapper
around it: the recorder calls it for every pty read)."""


def json_string(data: bytes) -> bytes:
    """``data`` (terminal output or input) as a JSON string literal, quotes included."""
    return json_quoted(data.decode("utf-8", "replace"))


def json_content(data: bytes) -> bytes:
    """``data`` escaped for the inside of a JSON string (no quotes around it)."""
    return json_quoted(data.decode("utf-8", "replace"))[1:-1]


def utf8_cut(data: bytes | bytearray) -> int:
    """The length of ``data`` without a UTF-8 sequence left incomplete at its end."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b < 0x80:
            return n
        if b >= 0xC0:  # a lead byte: complete if its sequence fits in what follows it
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n if back >= need else n - back
    return n


def header_line(
    width: int,
    height: int,
    timestamp: int,
    *,
    env: Mapping[str, str] | None = None,
    title: str | None = None,
) -> bytes:
    """The header line: the terminal's first size, the start (Unix seconds), env, title."""
    if width <= 0 or height <= 0:
        raise ValueError(f"terminal size must be positive, not {width}x{height}")
    head: dict[str, object] = {
        "version": 2,
        "width": width,
        "height": height,
        "timestamp": timestamp,
    }
    if env is not None:
        head["env"] = dict(env)
    if title is not None:
        head["title"] = title
    return json.dumps(head, ensure_ascii=False).encode("utf-8") + b"\n"


_CODES = {"o": b', "o", "', "i": b', "i", "', "r": b', "r", "', "m": b', "m", "'}


EVENT_END = b'"]\n'
"""What ends an event line after its data (see :func:`event_head`)."""


def event_head(seconds: float, code: str) -> bytes:
    """The start of an event line, up to its data: ``[seconds, "code", "``; the data (as
    :func:`json_content` escapes it, possibly in several pieces) and :data:`EVENT_END`
    follow.  ``code`` is ``"o"``, ``"i"``, ``"r"`` or ``"m"`` (a marker)."""
    return b"[%.6f" % seconds + _CODES[code]


def event_parts(seconds: float, code: str, data: bytes) -> tuple[bytes, bytes, bytes]:
    """One event line in three parts: :func:`event_head`, the escaped data, :data:`EVENT_END`."""
    return event_head(seconds, code), json_content(data), EVENT_END


def event_line(seconds: float, code: str, data: bytes) -> bytes:
    """One event line: ``[seconds, code, data]`` (``data`` as :func:`json_string` makes it)."""
    return b"".join(event_parts(seconds, code, data))


def resize_data(rows: int, cols: int) -> bytes:
    """A resize event's data, ``COLSxROWS``."""
    return b"%dx%d" % (cols, rows)


_SEQUENCE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|O.|[^\[O])?")
_CONTROL = bytes([*range(0x20), 0x7F])
_LINE_END = re.compile(rb"[\r\n]")


def visible(data: bytes) -> bytes:
    """What of typed ``data`` a terminal that echoes would show as it is: no escape
    sequences (arrows, function keys, Alt+key), no control bytes."""
    return _SEQUENCE.sub(b"", data).translate(None, _CONTROL)


class EchoGate:
    """Releases typed chunks for recording only once the remote side echoed them.

    ``typed(data, t)`` and ``output(data)`` return the chunks released now, as ``(t, data)``
    with the time they were typed, in order.  See the module docstring for the rules.
    """

    def __init__(self) -> None:
        self._pending: bytes | None = None  # the chunk waiting for its echo
        self._time = 0.0
        self._expect = b""  # its visible bytes not echoed yet
        self._quiet = False

    @property
    def waiting(self) -> bool:
        """Whether a typed chunk waits for its echo (the output must be shown to it)."""
        return self._pending is not None

    def _drop(self) -> None:
        assert self._pending is not None
        self._quiet = _LINE_END.search(self._pending) is None
        self._pending = None

    def typed(self, data: bytes, t: float) -> list[tuple[float, bytes]]:
        """A chunk typed at ``t``."""
        if self._pending is not None:
            self._drop()  # no (full) echo before the next key
        if self._quiet:
            if _LINE_END.search(data):
                self._quiet = False
            return []
        expect = visible(data)
        if not expect:
            return [(t, data)]
        self._pending, self._time, self._expect = data, t, expect
        return []

    def output(self, data: bytes | bytearray) -> list[tuple[float, bytes]]:
        """Output that arrived (after every chunk given to :meth:`typed` so far)."""
        if self._pending is None or not data:
            return []
        expect = self._expect
        n = min(len(expect), len(data))
        if data[:n] != expect[:n]:
            self._drop()
            return []
        if n < len(expect):
            self._expect = expect[n:]  # the echo goes on in the next read
            return []
        out = [(self._time, self._pending)]
        self._pending = None
        return out

    def close(self) -> None:
        """The session ended: a chunk still waiting is dropped."""
        self._pending = None
