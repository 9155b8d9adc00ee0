"""The README's examples, read from its fenced code blocks (for tests/test_readme.py).

A ```python block is one example.  A shell block (```sh, ```console, ```bash, ```shell or a
bare ```) is one example per command line: its lines are separate commands with their own
comments, and some need a terminal where others do not.  Every example knows the heading it
is under and the README line it starts on, which together make its test id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

SHELL_LANGS = frozenset({"", "sh", "console", "bash", "shell"})
"""Fence languages whose lines are shell commands."""

_FENCE = re.compile(r"^```\s*(\S*)\s*$")
_HEADING = re.compile(r"^(#{2,6})\s+(.*?)\s*$")


@dataclass(frozen=True)
class Example:
    """One example of the README: a python block, or one command line of a shell block."""

    section: str
    """The ``##`` heading it is under (its namespace: examples of one section share one)."""
    heading: str
    """The nearest heading above it (``##`` or deeper)."""
    line: int
    """README line (1-based) of its first line of code."""
    lang: str
    """``python`` or ``sh`` (every shell dialect is run by ``sh``)."""
    code: str

    @property
    def id(self) -> str:
        """The test id: the nearest heading as a slug and the README line."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{slug[:40].rstrip('-')}:L{self.line}"


def read_examples(path: Path = README) -> list[Example]:
    """Every example of the README at ``path``, in file order.

    Raises ValueError for a fence that is never closed or a language that is neither
    Python nor a shell (a new kind of block needs a decision in the test, not a guess).
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Example] = []
    section = heading = ""
    i = 0
    while i < len(lines):
        if m := _HEADING.match(lines[i]):
            heading = m.group(2)
            if len(m.group(1)) == 2:
                section = heading
        elif m := _FENCE.match(lines[i]):
            lang = m.group(1).lower()
            start = i + 1
            end = start
            while end < len(lines) and lines[end].rstrip() != "```":
                end += 1
            if end == len(lines):
                raise ValueError(f"{path.name}:{i + 1}: code block never closed")
            body = lines[start:end]
            if lang == "python":
                out.append(Example(section, heading, start + 1, "python", "\n".join(body) + "\n"))
            elif lang in SHELL_LANGS:
                for n, text in enumerate(body, start + 1):
                    if text.strip() and not text.lstrip().startswith("#"):
                        out.append(Example(section, heading, n, "sh", text.strip()))
            else:
                raise ValueError(f"{path.name}:{i + 1}: a ```{lang} block: python or a shell?")
            i = end
        i += 1
    return out
