"""Host ranges and groups: ``web[01-50]``, ``rack[1-2]-node[001-016]``, ``@web``, and back.

The syntax is ClusterShell's and pdsh's (the habit of HPC sites):

- ``web[01-50]``: a range in brackets; zero padding is kept (``web01`` ... ``web50``).
- ``db[1,3,5-7]``: a list of numbers and ranges; ``h[1-10/2]`` takes every second one
  (``h1,h3,h5,h7,h9``).
- ``rack[1-2]-node[001-016]``: several brackets give every combination, the first bracket
  varying slowest (``rack1-node001``, ``rack1-node002``, ... ``rack2-node016``).
- ``a,b[1-3]``: a comma joins patterns; commas inside brackets belong to the range.
- ``h[1-8]!h[3-4]`` takes names away, ``h[1-8]&h[4-12]`` keeps the names in both,
  ``h[1-8]^h[4-12]`` keeps the names in exactly one.  As in ClusterShell, these and the comma
  apply from left to right with no precedence: ``a,b!b`` is ``a``; ``!h3,h1`` is an error.
- ``@web``: the names of the group ``web`` (``@rack[1-2]`` names the groups ``rack1`` and
  ``rack2``).  Groups come from a groups file's text, read by :func:`parse_groups`: one
  ``name: pattern`` a line, ``#`` starts a comment, and a group may name other groups.

Spaces around the names and inside brackets are ignored; a name itself has none and no
``, ! & ^ [ ]``, and does not start with ``@``.  The names come out in the order they first
appear, without duplicates, as a :class:`HostSet`; ``str()`` of one folds it back into the
shortest form (``h1,h2,h3`` gives ``h[1-3]``, ``web01 ... web10`` gives ``web[01-10]``; names
that differ in their zero padding stay apart: ``h[9,09-10]``).  A pattern that would give
more than :data:`MAX_HOSTS` names is refused with the count, so a typo cannot eat the memory.
A bad pattern raises :class:`HostPatternError`, naming the pattern and the position of the
fault.  Negative numbers, ClusterShell's group sources (``@source:name``) and its ``autostep``
folding (``h[1-9/2]``) are not supported.

This module is pure (no IO), written here rather than taken from ClusterShell: the syntax is
small; ``ClusterShell.NodeSet`` sorts the names (a fleet command keeps the order it was given),
folds a product of 100,000 names in ~20 s (here ~0.1 s), and costs the fleet command ~5 ms of
start-up (here ~2 ms; ~20 ms each alone).  ``bench/bench_hostset.py`` measures the two.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Set
from itertools import pairwise
from typing import NamedTuple, TypeAlias

__all__ = [
    "MAX_HOSTS",
    "Groups",
    "HostPatternError",
    "HostSet",
    "expand",
    "fold",
    "hosts",
    "parse_groups",
]

MAX_HOSTS = 1_000_000
"""The most names one pattern may give (``limit=`` changes it per call)."""

_OPS = ",!&^"
_MAX_DIGITS = 40
_DIGIT_RUNS = re.compile(r"([0-9]+)")
_ELEMENT = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*(?:/\s*([0-9]+)\s*)?)?", re.ASCII)
_GROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\Z", re.ASCII)
_NOT_IN_NAME = re.compile(r"[\s,!&^\[\]]")
_BAD_NAMES = re.compile(r"[\s,!&^\[\]]|\A@|\x00@|\A\x00|\x00\x00|\x00\Z")
_NOT_IN_LITERAL = re.compile(r"[\s\]]")
_SPECIAL = re.compile(r"[\[\],!&^]")


class HostPatternError(ValueError):
    """A host pattern (or a groups file) that cannot be read.

    ``pattern`` is the pattern, ``position`` the 0-based index of the fault in it (``None``
    when it is about the whole pattern), ``reason`` what is wrong, and ``line`` the groups
    file's line (1-based) when the pattern came from one.
    """

    def __init__(
        self, pattern: str, position: int | None, reason: str, line: int | None = None
    ) -> None:
        self.pattern = pattern
        self.position = position
        self.reason = reason
        self.line = line
        where = "" if position is None else f" at position {position}"
        text = f"bad host pattern {pattern!r}{where}: {reason}"
        super().__init__(text if line is None else f"groups file line {line}: {text}")


# A range: (start, stop, step, width); width 0 is unpadded.
_Range: TypeAlias = tuple[int, int, int, int]
_Part: TypeAlias = "str | list[_Range]"


class _Operand(NamedTuple):
    op: str  # the operator before it: "," for the first
    pos: int  # where it starts in the pattern
    parts: list[_Part]  # literal text and ranges, in order
    group: bool  # "@name": the parts give group names
    size: int  # how many names it gives at most (a group: how many group names)


def _parse_range(pattern: str, start: int, end: int) -> list[_Range]:
    """The ranges between ``pattern[start]`` (after ``[``) and ``pattern[end]`` (``]``)."""
    out: list[_Range] = []
    pos = start
    for piece in pattern[start:end].split(","):
        where = pos + len(piece) - len(piece.lstrip())
        m = _ELEMENT.fullmatch(piece)
        if not piece.strip():
            raise HostPatternError(pattern, where, "an empty element in a range")
        if m is None:
            why = f"{piece.strip()!r} is not a number or a range like 1-10 or 1-10/2"
            raise HostPatternError(pattern, where, why)
        lo, hi, step_text = m.group(1), m.group(2), m.group(3)
        if max(len(lo), len(hi or ""), len(step_text or "")) > _MAX_DIGITS:
            raise HostPatternError(pattern, where, f"a number longer than {_MAX_DIGITS} digits")
        hi = hi or lo
        padded = (len(lo) > 1 and lo[0] == "0") or (len(hi) > 1 and hi[0] == "0")
        if padded and len(lo) != len(hi):
            why = f"{lo}-{hi}: a zero-padded range needs both ends as wide"
            raise HostPatternError(pattern, where, why)
        first, last = int(lo), int(hi)
        if first > last:
            raise HostPatternError(pattern, where, f"the range {lo}-{hi} goes down")
        step = 1 if step_text is None else int(step_text)
        if step < 1:
            raise HostPatternError(pattern, where, "a range's step must be at least 1")
        out.append((first, last, step, len(lo) if padded else 0))
        pos += len(piece) + 1
    return out


def _parse_operand(pattern: str, op: str, start: int, end: int) -> _Operand:
    """One operand: ``pattern[start:end]`` with the spaces around it already stripped."""
    group = pattern[start] == "@"
    i = start + 1 if group else start
    if i == end:
        raise HostPatternError(pattern, start, "'@' without a group name")
    parts: list[_Part] = []
    count = 1
    while i < end:
        opening = pattern.find("[", i, end)
        literal = pattern[i : end if opening < 0 else opening]
        bad = _NOT_IN_LITERAL.search(literal)
        if bad is not None:
            why = "']' without '['" if bad.group() == "]" else "a space inside a host name"
            raise HostPatternError(pattern, i + bad.start(), why)
        if literal:
            parts.append(literal)
        if opening < 0:
            break
        if parts and not isinstance(parts[-1], str):
            raise HostPatternError(pattern, opening, "two ranges side by side")
        closing = pattern.find("]", opening + 1, end)
        nested = pattern.find("[", opening + 1, end if closing < 0 else closing)
        if nested >= 0:
            raise HostPatternError(pattern, nested, "a '[' inside a range")
        if closing < 0:
            raise HostPatternError(pattern, opening, "this '[' is never closed")
        ranges = _parse_range(pattern, opening + 1, closing)
        count *= sum((last - first) // step + 1 for first, last, step, _ in ranges)
        parts.append(ranges)
        i = closing + 1
    return _Operand(op, start, parts, group, count)


def _parse(pattern: str) -> list[_Operand]:
    """A pattern's operands with their operators, checked (nothing is expanded yet)."""
    out: list[_Operand] = []
    depth = 0
    op, start = ",", 0
    for m in _SPECIAL.finditer(pattern + ","):
        i, ch = m.start(), m.group()
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif depth == 0 or i == len(pattern):
            text = pattern[start:i]
            lo = start + len(text) - len(text.lstrip())
            hi = lo + len(text.strip())
            if lo == hi:
                if i == len(pattern) and not out and op == ",":
                    return []  # an empty pattern: no names
                where = f"after {op!r}" if out else f"before {ch!r}"
                raise HostPatternError(pattern, i if out else lo, f"no host name {where}")
            out.append(_parse_operand(pattern, op, lo, hi))
            op, start = ch, i + 1
    return out


def _numbers(ranges: list[_Range]) -> list[str]:
    out: list[str] = []
    for first, last, step, width in ranges:
        numbers = range(first, last + 1, step)
        out += [f"{n:0{width}d}" for n in numbers] if width else map(str, numbers)
    return out


def _expand_parts(parts: list[_Part]) -> list[str]:
    names = [""]
    for part in parts:
        if isinstance(part, str):
            names = [n + part for n in names]
        else:
            numbers = _numbers(part)
            names = [n + x for n in names for x in numbers]
    return names


def _group_names(pattern: str, operand: _Operand) -> list[str]:
    """The group names of an ``@name`` operand (``@rack[1-2]``: ``rack1``, ``rack2``)."""
    if operand.size > MAX_HOSTS:
        raise HostPatternError(pattern, operand.pos, f"{operand.size} group names")
    names = _expand_parts(operand.parts)
    for name in names:
        if not _GROUP_NAME.match(name):
            raise HostPatternError(pattern, operand.pos, f"{name!r} is not a group name")
    return names


class Groups(Mapping[str, str]):
    """Named host patterns, for ``@name`` in a pattern: a mapping of name to pattern.

    Build one from a mapping (``Groups({"web": "web[1-6]", "all": "@web,db1"})``) or from a
    groups file's text with :func:`parse_groups`.  Every pattern is checked when the groups
    are made: a syntax error, a group naming an unknown group, or groups that name each other
    in a cycle raise :class:`HostPatternError` then.  A group's names are expanded the first
    time a pattern asks for it, and kept.
    """

    def __init__(self, groups: Mapping[str, str] | None = None) -> None:
        self._patterns: dict[str, str] = dict(groups or {})
        self._lines: dict[str, int] = {}
        self._parsed: dict[str, list[_Operand]] = {}
        self._refs: dict[str, list[str]] = {}
        self._order: list[str] = []  # every group after the groups it names
        self._resolved: dict[str, HostSet] = {}
        self._check()

    def __getitem__(self, name: str) -> str:
        return self._patterns[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._patterns)

    def __len__(self) -> int:
        return len(self._patterns)

    def __repr__(self) -> str:
        return f"Groups({self._patterns!r})"

    def _fail(self, name: str, position: int | None, reason: str) -> HostPatternError:
        line = self._lines.get(name)
        return HostPatternError(self._patterns[name], position, f"group {name!r}: {reason}", line)

    def _check(self) -> None:
        for name, pattern in self._patterns.items():
            if not isinstance(name, str) or not _GROUP_NAME.match(name):
                raise HostPatternError(f"@{name}", None, "not a group name", self._lines.get(name))
            try:
                self._parsed[name] = operands = _parse(pattern)
                self._refs[name] = refs = []
                for operand in operands:
                    for ref in _group_names(pattern, operand) if operand.group else []:
                        if ref not in self._patterns:
                            raise HostPatternError(pattern, operand.pos, f"no group named {ref!r}")
                        refs.append(ref)
            except HostPatternError as e:
                raise self._fail(name, e.position, e.reason) from None
        # Depth first, without recursion: the order to expand them in, or a cycle.
        done: set[str] = set()
        for root in self._patterns:
            path: list[str] = []
            stack: list[Iterator[str]] = []
            step: str | None = root
            while step is not None or stack:
                if step is None:
                    done.add(path[-1])
                    self._order.append(path.pop())
                    stack.pop()
                elif step in path:
                    cycle = " -> ".join("@" + n for n in [*path[path.index(step) :], step])
                    raise self._fail(path[-1], None, f"groups name each other in a cycle: {cycle}")
                elif step not in done:
                    path.append(step)
                    stack.append(iter(self._refs[step]))
                step = next(stack[-1], None) if stack else None

    def _resolve(self, name: str, limit: int) -> HostSet:
        """A group's names, expanding first the groups it needs (no recursion)."""
        needed, todo = set(), [name]
        while todo:
            current = todo.pop()
            if current not in needed and current not in self._resolved:
                needed.add(current)
                todo += self._refs[current]
        for current in self._order if needed else []:
            if current in needed:
                operands = self._parsed[current]
                try:
                    found = _evaluate(self._patterns[current], operands, self, limit)
                except HostPatternError as e:
                    raise self._fail(current, e.position, e.reason) from None
                self._resolved[current] = found
        return self._resolved[name]


def parse_groups(text: str) -> Groups:
    """The groups of a groups file's text: one ``name: pattern`` a line.

    ``#`` starts a comment (to the end of the line); blank lines are skipped; a pattern may
    name other groups (``all: @web,@db``).  A line without ``:``, a name given twice, a bad
    pattern, an unknown group or a cycle raise :class:`HostPatternError` with the line.
    Reading the file is the caller's part::

        groups = parse_groups(Path("groups.txt").read_text())
        hosts("@web", groups)
    """
    entries: dict[str, tuple[str, int]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, colon, pattern = line.partition(":")
        name = name.strip()
        if not colon:
            raise HostPatternError(line, None, "expected 'name: pattern'", number)
        if not _GROUP_NAME.match(name):
            raise HostPatternError(line, 0, f"{name!r} is not a group name", number)
        if name in entries:
            first = entries[name][1]
            raise HostPatternError(line, 0, f"group {name!r} is also on line {first}", number)
        entries[name] = (pattern.strip(), number)
    groups = Groups()  # empty, then filled and checked with the lines known
    groups._patterns = {name: pattern for name, (pattern, _) in entries.items()}
    groups._lines = {name: number for name, (_, number) in entries.items()}
    groups._check()
    return groups


class HostSet(Set[str]):
    """An ordered set of host names: the order they first appeared in, no duplicates.

    ``|``, ``-``, ``&`` and ``^`` (and ``union``, ``difference``, ``intersection``,
    ``symmetric_difference``) keep the left side's order, then the right side's new names;
    ``in``, ``len()`` and iteration are as for a set; ``==`` compares the names, not their
    order; ``str()`` is the folded form (``web[01-50]``).  ``HostSet(names)`` takes host names
    (checked: no pattern syntax in them); :func:`hosts` reads a pattern.
    """

    __slots__ = ("_names",)

    def __init__(self, names: Iterable[str] = ()) -> None:
        if isinstance(names, str):
            raise TypeError("HostSet() takes host names; use hosts() for a pattern")
        self._names = dict.fromkeys(names)
        _check_names(self._names)

    @classmethod
    def _of(cls, names: dict[str, None]) -> HostSet:
        made = cls.__new__(cls)
        made._names = names
        return made

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, HostSet):
            return self._names.keys() == other._names.keys()
        if isinstance(other, Set):
            return self._names.keys() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._names))

    def __str__(self) -> str:
        return fold(self._names)

    def __repr__(self) -> str:
        return f"<HostSet {fold(self._names)} ({len(self._names)} hosts)>"

    def __or__(self, other: Set[object]) -> HostSet:
        return _binary(",", self, other)

    def __sub__(self, other: Set[object]) -> HostSet:
        return _binary("!", self, other)

    def __and__(self, other: Set[object]) -> HostSet:
        return _binary("&", self, other)

    def __xor__(self, other: Set[object]) -> HostSet:
        return _binary("^", self, other)

    def union(self, *others: Iterable[str]) -> HostSet:
        """The names of this set, then the new names of each of ``others``.

        Each of ``others`` is a :class:`HostSet`, an iterable of names, or a pattern string
        (read without groups: use :func:`hosts` for those).
        """
        names = dict(self._names)
        for other in others:
            names.update(_coerce(other))
        return HostSet._of(names)

    def difference(self, *others: Iterable[str]) -> HostSet:
        """This set without the names of any of ``others`` (as for :meth:`union`): ``-x``."""
        return HostSet._of(_apply("!", self._names, HostSet().union(*others)._names))

    def intersection(self, *others: Iterable[str]) -> HostSet:
        """The names of this set that are in every one of ``others`` (as for :meth:`union`)."""
        names = self._names
        for other in others:
            names = _apply("&", names, _coerce(other))
        return HostSet._of(dict(names))

    def symmetric_difference(self, other: Iterable[str]) -> HostSet:
        """The names in exactly one of this set and ``other`` (as for :meth:`union`)."""
        return HostSet._of(_apply("^", self._names, _coerce(other)))


def _binary(op: str, left: HostSet, right: Set[object]) -> HostSet:
    if not isinstance(right, Set):
        return NotImplemented
    if op == ",":
        return left.union(right)  # type: ignore[arg-type]
    return HostSet._of(_apply(op, left._names, right))


def _apply(op: str, left: dict[str, None], right: Set[object] | dict[str, None]) -> dict[str, None]:
    """``left`` (kept as it is) ``!``, ``&`` or ``^`` ``right``, in order: a new dict."""
    if op == "&":
        return {n: None for n in left if n in right}
    names = {n: None for n in left if n not in right}
    if op == "^":
        names.update((n, None) for n in right if n not in left)  # type: ignore[misc]
    return names


def _check_names(names: dict[str, None]) -> None:
    """Refuse names that a pattern would read otherwise (fast path: one search of them all)."""
    if not names or _BAD_NAMES.search("\x00".join(names)) is None:
        return
    for name in names:
        found = _NOT_IN_NAME.search(name)
        if not name:
            raise HostPatternError(name, None, "an empty host name")
        if found is not None:
            what = "a space" if found.group().isspace() else repr(found.group())
            raise HostPatternError(name, found.start(), f"a host name cannot hold {what}")
        if name.startswith("@"):
            raise HostPatternError(name, 0, "a host name cannot start with '@' (a group)")


def _coerce(other: Iterable[str]) -> dict[str, None]:
    if isinstance(other, HostSet):
        return other._names
    if isinstance(other, str):
        return hosts(other)._names
    return HostSet(other)._names


def _evaluate(pattern: str, operands: list[_Operand], groups: Groups | None, limit: int) -> HostSet:
    result: dict[str, None] = {}
    for operand in operands:
        names: dict[str, None] = {}
        if operand.group:
            if groups is None:
                raise HostPatternError(pattern, operand.pos, "a @group but no groups given")
            for ref in _group_names(pattern, operand):
                if ref not in groups._patterns:
                    raise HostPatternError(pattern, operand.pos, f"no group named {ref!r}")
                names.update(groups._resolve(ref, limit)._names)
            count = len(names)
        else:
            count = operand.size
        if count > limit:
            why = f"it gives {count} names, more than the limit of {limit}"
            raise HostPatternError(pattern, operand.pos, why)
        if not operand.group:
            names = dict.fromkeys(_expand_parts(operand.parts))
        if operand.op != ",":
            result = _apply(operand.op, result, names)
            continue
        result.update(names)
        if len(result) > limit:
            raise HostPatternError(pattern, operand.pos, f"more than the limit of {limit} names")
    return HostSet._of(result)


def hosts(
    pattern: str | Iterable[str],
    groups: Groups | Mapping[str, str] | None = None,
    *,
    limit: int = MAX_HOSTS,
) -> HostSet:
    """The host names of a pattern (``"web[01-50]"``, ``"@web!web3"``), as a :class:`HostSet`.

    ``pattern`` may also be a list of patterns (their union).  ``groups`` gives the ``@name``
    groups (a :class:`Groups` or a mapping of name to pattern).  A pattern that would give more
    than ``limit`` names, or that cannot be read, raises :class:`HostPatternError`.  An empty
    pattern gives an empty set.
    """
    if groups is not None and not isinstance(groups, Groups):
        groups = Groups(groups)
    if isinstance(pattern, str):
        return _evaluate(pattern, _parse(pattern), groups, limit)
    patterns = list(pattern)
    plain = _BAD_NAMES.search("\x00".join(patterns)) is None  # a TypeError if one is no str
    result = dict.fromkeys(patterns) if plain else {}  # plain names: nothing to read
    for one in [] if plain else patterns:
        result.update(_evaluate(one, _parse(one), groups, limit)._names)
        if len(result) > limit:
            break
    if len(result) > limit:
        raise HostPatternError(str(pattern)[:80], None, f"more than the limit of {limit} names")
    return HostSet._of(result)


def expand(
    pattern: str, groups: Groups | Mapping[str, str] | None = None, *, limit: int = MAX_HOSTS
) -> list[str]:
    """The names of a pattern, as a list in order (see :func:`hosts`)."""
    return list(hosts(pattern, groups, limit=limit))


def _fold_numbers(numbers: list[str]) -> str:
    """Digit strings as a range list, ClusterShell's way (``1-3,7``, ``9,09-10``).

    Sorted by width, then value; a run of consecutive numbers stays within one width when
    zero-padded (``08-10``), and crosses widths when not (``9-10``).
    """
    if len(numbers) == 1:
        return numbers[0]
    by_width: dict[int, list[str]] = {}
    for x in numbers:
        by_width.setdefault(len(x), []).append(x)
    runs: list[list[str]] = []  # [first, last]
    last, joinable = -2, False
    for width in sorted(by_width):
        same = sorted(by_width[width])
        values = list(map(int, same))
        cuts = [0, len(same)]
        if values[-1] - values[0] != len(same) - 1:  # not one run: find the gaps
            cuts[1:1] = [i for i in range(1, len(same)) if values[i] != values[i - 1] + 1]
        for lo, hi in pairwise(cuts):
            first = same[lo]
            unpadded = width == 1 or first[0] != "0"
            if unpadded and joinable and values[lo] == last + 1:
                runs[-1][1] = same[hi - 1]  # an unpadded run goes on into this width
            else:
                runs.append([first, same[hi - 1]])
                joinable = unpadded
            last = values[hi - 1]
    if len(runs) == 1 and runs[0][0] == runs[0][1]:
        return runs[0][0]
    return "[" + ",".join(a if a == b else f"{a}-{b}" for a, b in runs) + "]"


def _fold_rows(rows: list[tuple[str, ...]]) -> list[list[str]]:
    """Rows of numbers (one a name) as a list of products of range lists, in order."""
    if len(rows[0]) == 1:
        return [[_fold_numbers([row[0] for row in rows])]]
    by_prefix: dict[tuple[str, ...], list[str]] = {}
    for row in rows:
        by_prefix.setdefault(row[:-1], []).append(row[-1])
    by_last: dict[str, list[tuple[str, ...]]] = {}
    for prefix in sorted(by_prefix, key=lambda row: [(len(x), x) for x in row]):
        by_last.setdefault(_fold_numbers(by_prefix[prefix]), []).append(prefix)
    return [[*head, last] for last, prefixes in by_last.items() for head in _fold_rows(prefixes)]


def fold(names: Iterable[str]) -> str:
    """Host names in the shortest range form: ``["h1", "h2", "h3", "db"]`` gives ``h[1-3],db``.

    Names that differ only in their numbers fold together (in the order the first of them
    came), each number sorted; zero padding is kept (``web[01-10]``) and names of other padding
    stay apart (``h[9,09-10]``); names with several numbers fold into products
    (``rack[1-2]-node[001-016]``).  :func:`hosts` of the result gives the names back.
    """
    templates: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    split = _DIGIT_RUNS.split
    for name in dict.fromkeys(names):
        parts = split(name)
        templates.setdefault(tuple(parts[0::2]), []).append(tuple(parts[1::2]))
    out: list[str] = []
    for texts, rows in templates.items():
        if len(texts) == 1:
            out.append(texts[0])
            continue
        for numbers in _fold_rows(rows):
            out.append("".join(t + n for t, n in zip(texts, [*numbers, ""], strict=True)))
    return ",".join(out)
