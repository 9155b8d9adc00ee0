"""Where a fan-out's hosts come from: patterns, groups files, hosts files and lists.

Host patterns themselves are :mod:`sshwrap.core.hostset`'s (pure).  This module adds what
needs files and the environment, shared by ``sshwrap.run_many`` / ``sshwrap.aio.run_many``
and ``sshwrap-many``:

- :func:`load_groups`: ``groups=`` as given (a :class:`Groups`, a mapping of name to pattern,
  or the path of a groups file); with none, the default groups file named by the environment
  variable ``SSHWRAP_GROUPS`` (:data:`GROUPS_ENV`), read only when a pattern names a group.
- :func:`pattern_hosts`: one pattern's names with those groups.
- :func:`literal_hosts`: a list's items are host names, never patterns: an item that reads
  as a pattern of other names (``"h[1-3]"``, ``"a,b"``, ``"@web"``) is refused with a
  ``ValueError`` that says to pass the pattern as a ``str``; an item that is no pattern at all
  (``"ssh://[::1]:2222"``) stays as it is.
- :func:`cli_hosts`: ``sshwrap-many``'s hosts: ``-H`` minus ``-x``, ``--groups`` for ``@``.
- :func:`read_host_specs`: ``sshwrap-many``'s ``-H`` / ``-x`` values: ``-`` (stdin), a hosts
  file (``~`` expanded; a pattern a line, ``#`` comments), or a pattern; whitespace between
  names is a comma (``h1 h2`` is ``h1,h2``).  A word that looks like a path but names no
  file is an ``OSError``, never a host.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeAlias

from .argv import check_destination
from .hostset import Groups, HostPatternError, HostSet, hosts, parse_groups

__all__ = [
    "GROUPS_ENV",
    "GroupsSource",
    "cli_hosts",
    "default_groups",
    "literal_hosts",
    "load_groups",
    "pattern_hosts",
    "read_host_specs",
]

GROUPS_ENV = "SSHWRAP_GROUPS"
"""The environment variable naming the default groups file (for ``@name`` in a pattern)."""

GroupsSource: TypeAlias = "Groups | Mapping[str, str] | str | os.PathLike[str]"
"""What ``groups=`` takes: groups, a mapping of name to pattern, or a groups file's path."""


def _read_groups_file(path: str | os.PathLike[str], label: str) -> Groups:
    """A groups file's groups; ``label`` names it in an error (``groups file PATH``)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{label}: is a directory") from None
    try:
        return parse_groups(text)
    except HostPatternError as e:
        e.add_note(f"in the groups file {os.fspath(path)}")
        raise


def load_groups(groups: GroupsSource | None) -> Groups | None:
    """``groups=`` as :class:`Groups` (``None`` stays ``None``), checked now.

    A ``str`` or path is a groups file (lines ``name: pattern``); reading it may raise
    ``OSError``, a bad line :class:`HostPatternError` (with the line, and a note naming the
    file); anything else but a mapping is a ``TypeError``.
    """
    if groups is None or isinstance(groups, Groups):
        return groups
    if isinstance(groups, str | os.PathLike):
        return _read_groups_file(groups, f"groups file {os.fspath(groups)}")
    if isinstance(groups, Mapping):
        return Groups(groups)
    raise TypeError(
        "groups must be a Groups, a mapping of name to pattern or a groups file's path, "
        f"not {type(groups).__name__}"
    )


def default_groups() -> Groups | None:
    """The groups of the file ``$SSHWRAP_GROUPS`` names, or ``None`` when it is unset."""
    path = os.environ.get(GROUPS_ENV)
    return _read_groups_file(path, f"{GROUPS_ENV}={path}") if path else None


def pattern_hosts(pattern: str, groups: Groups | None) -> HostSet:
    """The names of ``pattern``; an ``@name`` without ``groups`` uses :func:`default_groups`
    (``user@host`` is no group: the file is not read for it)."""
    if groups is None and _GROUP_REF.search(_masked(pattern)):
        groups = default_groups()
    return hosts(pattern, groups)


_GROUP_REF = re.compile(r"(?:\A|[,!&^])\s*@")
_PATTERN_CHARS = re.compile(r"[\[\],!&^]|(?:\A|\x00)@")


def literal_hosts(items: Sequence[object], what: str = "hosts") -> None:
    """Refuse a ``str`` item of a hosts list that reads as a pattern of other names.

    ``ValueError`` names the item and says to pass the pattern as a ``str``.  Items that are
    no valid pattern (an ssh URI with an IPv6 address in brackets) are host names as given.
    """
    names = [h for h in items if isinstance(h, str)]
    if _PATTERN_CHARS.search("\x00".join(names)) is None:
        return  # the usual case: plain names, one search
    for i, item in enumerate(items):
        if not isinstance(item, str) or _PATTERN_CHARS.search(item) is None:
            continue
        if item.startswith("@"):
            found = "a group"
        else:
            try:
                found = f"a host pattern ({len(hosts(item))} hosts)"
            except HostPatternError:
                continue  # no pattern: a name ssh may know
        raise ValueError(
            f"{what}[{i}] {item!r} is {found}, but the items of a list are host names: "
            f"pass the pattern as one str (run_many({item!r}, ...)), or sshwrap.hosts({item!r})"
        )


# What a hosts file is called, never a host name's last label.
_FILE_SUFFIXES = (".txt", ".hosts", ".list", ".lst", ".conf", ".cfg")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_WORDS = re.compile(r"[^\s,!&^]+")
_SPACES = re.compile(r"\s+")
_OPERATORS = ",!&^"


def _looks_like_a_path(word: str) -> bool:
    """A ``/``, a leading ``.`` or ``~``, or a hosts-file suffix: no host name looks so."""
    return "/" in word or word.startswith((".", "~")) or word.lower().endswith(_FILE_SUFFIXES)


def _masked(text: str) -> str:
    """``text`` with what is inside brackets blanked out, as long as it was."""
    return _BRACKETS.sub(lambda m: "[" + "x" * (len(m.group()) - 2) + "]", text)


def _spaces_as_commas(line: str) -> str:
    """``h1 h2`` as ``h1,h2`` (the same length, so a fault's position stays right); spaces
    inside brackets, around an operator, or at either end stay."""
    masked = _masked(line)
    out = list(line)
    for m in _SPACES.finditer(masked):
        start, end = m.span()
        inside = start > 0 and end < len(line)
        if inside and masked[start - 1] not in _OPERATORS and masked[end] not in _OPERATORS:
            out[start] = ","
    return "".join(out)


def _check_words(spec: str, option: str) -> None:
    """Refuse a word of a pattern that ssh would read as an option, or that looks like a path
    (a mistyped hosts file) before it can become a host."""
    masked = _masked(spec)
    words = [spec[m.start() : m.end()] for m in _WORDS.finditer(masked)]
    for word in words:
        check_destination(word, f"{option} host")
    for word in words:
        if word.startswith("@") or not _looks_like_a_path(word):
            continue
        if os.path.isdir(os.path.expanduser(word)):
            raise IsADirectoryError(f"{option} {word}: is a directory")
        raise FileNotFoundError(f"{option} {word}: no such file")


def read_host_specs(
    specs: Sequence[str],
    groups: Groups | None,
    *,
    option: str = "-H",
    stdin: Callable[[], IO[str]] | None = None,
) -> HostSet:
    """The hosts of ``sshwrap-many``'s ``-H`` (or ``-x``) values, in order, no duplicates.

    Each value is ``-`` (stdin: ``stdin()``), an existing file (``~`` expanded), or a pattern;
    a file's or stdin's every line is a pattern (``#`` starts a comment).  A bad pattern or an
    unknown group raise ``ValueError`` naming the option, the value (and line) and the
    :class:`HostPatternError`'s pattern, position and reason; a word that looks like a path
    (a ``/``, a leading ``.`` or ``~``, a suffix such as ``.txt``) but names no file
    ``FileNotFoundError`` (or ``IsADirectoryError``).
    """
    found: dict[str, None] = {}
    for spec in specs:
        path = os.path.expanduser(spec) if spec.startswith("~") else spec
        if spec == "-":
            lines, where = (stdin() if stdin else sys.stdin).read().splitlines(), f"{option} -"
        elif os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                lines, where = f.read().splitlines(), f"{option} {spec}"
        else:
            _check_words(spec, option)
            lines, where = [spec], option
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0]
            if not line.strip():
                continue
            pattern = _spaces_as_commas(line)
            try:
                found.update(dict.fromkeys(pattern_hosts(pattern, groups)))
            except HostPatternError as e:
                raise ValueError(_explain(e, pattern, line, where, number, option)) from None
    return HostSet(found)


def cli_hosts(specs: Sequence[str], exclude: Sequence[str], groups_file: str | None) -> list[str]:
    """``sshwrap-many``'s hosts: those of ``-H`` (``specs``) less those of ``-x``
    (``exclude``), with the groups of ``--groups`` (``groups_file``; else
    ``$SSHWRAP_GROUPS``) for ``@name``; errors as :func:`read_host_specs`'s."""
    groups: Groups | None = None
    if groups_file is not None:
        try:
            groups = load_groups(groups_file)
        except HostPatternError as e:
            raise ValueError(f"--groups {groups_file}: {e}") from None
    chosen = read_host_specs(specs, groups)
    if exclude:
        chosen -= read_host_specs(exclude, groups, option="-x")
    return list(chosen)


def _explain(
    e: HostPatternError, pattern: str, line: str, where: str, number: int, option: str
) -> str:
    """The usage error of a bad ``-H``/``-x`` pattern: where it came from, and the fault."""
    if e.pattern == pattern and e.line is None:  # in the line itself: show it as typed
        e = HostPatternError(line, e.position, e.reason)
    at = "" if where == option else f" line {number}"
    notes = "".join(f" ({note})" for note in getattr(e, "__notes__", ()))
    if e.reason == "a @group but no groups given":
        notes += f" (give --groups FILE, or set {GROUPS_ENV})"
    return f"{where}{at}: {e}{notes}"
