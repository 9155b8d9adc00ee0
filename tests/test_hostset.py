"""Host ranges and groups (``sshwrap.core.hostset``): expand, fold, set operations, groups.

The expected strings are ClusterShell's (NodeSet 1.10) wherever the syntax is the same; the
property tests check that folding and expanding are inverses.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sshwrap.core.hostset as hostset_module
from sshwrap.core.hostset import (
    MAX_HOSTS,
    Groups,
    HostPatternError,
    HostSet,
    expand,
    fold,
    hosts,
    parse_groups,
)


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("web[01-03]", ["web01", "web02", "web03"]),
        ("h[9-11]", ["h9", "h10", "h11"]),
        ("h[099-101]", ["h099", "h100", "h101"]),
        ("h[00-02]", ["h00", "h01", "h02"]),
        ("db[1,3,5-7]", ["db1", "db3", "db5", "db6", "db7"]),
        ("h[1-10/3]", ["h1", "h4", "h7", "h10"]),
        ("h[1-3/5]", ["h1"]),
        ("h[5]", ["h5"]),
        ("h[3,1,2,1]", ["h3", "h1", "h2"]),
        ("h[1,01,001]", ["h1", "h01", "h001"]),
        (
            "rack[1-2]-node[001-002]",
            ["rack1-node001", "rack1-node002", "rack2-node001", "rack2-node002"],
        ),
        ("x[1-2]-[3-4]z", ["x1-3z", "x1-4z", "x2-3z", "x2-4z"]),
        ("[1-3]", ["1", "2", "3"]),
        ("a,b[1-3]", ["a", "b1", "b2", "b3"]),
        ("a, b[1-2] , c", ["a", "b1", "b2", "c"]),
        ("h[ 1 - 2 , 4 ]", ["h1", "h2", "h4"]),
        ("u@h[1-2]", ["u@h1", "u@h2"]),
        ("h1,h1,h2", ["h1", "h2"]),
        ("h[1-5]!h[2-3]", ["h1", "h4", "h5"]),
        ("h[1-5]&h[4-9]", ["h4", "h5"]),
        ("h[1-5]^h[4-7]", ["h1", "h2", "h3", "h6", "h7"]),
        # Left to right, no precedence (ClusterShell's rule).
        ("h9,h[1-5]!h[1-9]", []),
        ("h[1-3]&h2,h7", ["h2", "h7"]),
        ("a!b!c", ["a"]),
        ("h[1-3] ! h2", ["h1", "h3"]),
        ("", []),
        ("   ", []),
    ],
)
def test_expand(pattern: str, names: list[str]) -> None:
    assert expand(pattern) == names
    assert list(hosts(pattern)) == names


def test_a_list_is_the_union_of_its_patterns() -> None:
    assert list(hosts(["b1", "a[1-2]", "b1", "c"])) == ["b1", "a1", "a2", "c"]
    assert list(hosts(["h[1-3]!h2", "h2"])) == ["h1", "h3", "h2"]  # each read on its own
    assert list(hosts([f"n{i}.dc1" for i in range(3)])) == ["n0.dc1", "n1.dc1", "n2.dc1"]
    assert not hosts([]) and not hosts(["", " "])
    with pytest.raises(TypeError):
        hosts(["a", 3])  # type: ignore[list-item]
    with pytest.raises(HostPatternError, match="never closed"):
        hosts(["a", "b[1-"])


def test_big_ranges_and_product_order() -> None:
    web = hosts("web[01-50]")
    assert len(web) == 50 and list(web)[:2] == ["web01", "web02"] and "web50" in web
    nodes = expand("rack[1-2]-node[001-016]")
    assert len(nodes) == 32
    assert nodes[:2] == ["rack1-node001", "rack1-node002"]  # the first bracket varies slowest
    assert nodes[15:17] == ["rack1-node016", "rack2-node001"]


@pytest.mark.parametrize(
    ("pattern", "position", "reason"),
    [
        ("web[1-", 3, "never closed"),
        ("web[5-1]", 4, "goes down"),
        ("web[a-c]", 4, "not a number"),
        ("web[1-]", 4, "not a number"),
        ("h[1-10/0]", 2, "step"),
        ("h[8-012]", 2, "zero-padded"),
        ("h[01-1]", 2, "zero-padded"),
        ("h[]", 2, "empty element"),
        ("h[1,]", 4, "empty element"),
        ("h[1-3][1-2]", 6, "side by side"),
        ("h1-2]", 4, "']' without '['"),
        ("h[1-[2]]", 4, "'[' inside a range"),
        ("h[1-2,h3", 1, "never closed"),
        ("a,,b", 2, "no host name after ','"),
        ("a,", 2, "no host name after ','"),
        (",a", 0, "no host name before ','"),
        ("!h1", 0, "no host name before '!'"),
        ("h[1-2]!", 7, "no host name after '!'"),
        ("a b", 1, "space"),
        ("@", 0, "without a group name"),
        ("@web", 0, "no groups given"),
        ("h[" + "9" * 50 + "]", 2, "longer than"),
    ],
)
def test_errors_name_pattern_and_position(pattern: str, position: int, reason: str) -> None:
    with pytest.raises(HostPatternError) as info:
        hosts(pattern)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.pattern, err.position) == (pattern, position)
    assert reason in err.reason
    assert repr(pattern) in str(err) and f"position {position}" in str(err)


def test_size_limit_counts_before_expanding() -> None:
    with pytest.raises(HostPatternError, match="2000000 names, more than the limit of 1000000"):
        hosts("h[1-2000000]")
    huge = "h[1-99999999999999999999999999]-x[1-99999999999999]"
    started = time.monotonic()
    with pytest.raises(HostPatternError, match="more than the limit"):
        hosts(huge)
    assert time.monotonic() - started < 5  # counted, never built
    assert MAX_HOSTS == 1_000_000
    assert len(hosts("h[1-5]", limit=5)) == 5
    with pytest.raises(HostPatternError, match="6 names"):
        hosts("h[1-6]", limit=5)
    with pytest.raises(HostPatternError, match="more than the limit of 5 names"):
        hosts("h[1-3],g[1-3]", limit=5)
    with pytest.raises(HostPatternError, match="more than the limit of 5 names"):
        hosts(["h[1-3]", "g[1-3]"], limit=5)
    with pytest.raises(HostPatternError, match="more than the limit"):
        hosts("@big", {"big": "h[1-3],g[1-3]"}, limit=5)


GROUPS_TEXT = """
# the web tier
web: web[1-6]     # six of them
db:  db[1-2]

all: @web,@db!web3
rack1: r1n[1-2]
rack2: r2n[1-2]
racks: @rack[1-2]
empty:
"""


def test_groups_file() -> None:
    groups = parse_groups(GROUPS_TEXT)
    assert isinstance(groups, Groups)
    assert sorted(groups) == ["all", "db", "empty", "rack1", "rack2", "racks", "web"]
    assert groups["web"] == "web[1-6]"
    assert expand("@web", groups) == [f"web{i}" for i in range(1, 7)]
    assert str(hosts("@all", groups)) == "web[1-2,4-6],db[1-2]"
    assert expand("@racks", groups) == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand("@racks!r1n[1-2],x1", groups) == ["r2n1", "r2n2", "x1"]
    assert expand("@empty", groups) == []
    assert expand("@web", {"web": "h[1-2]"}) == ["h1", "h2"]  # a plain mapping works too
    with pytest.raises(HostPatternError) as info:
        hosts("h1,@nope", groups)
    assert (info.value.position, info.value.reason) == (3, "no group named 'nope'")


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("a: @b\nb: @c\nc: @a\n", 3, "cycle: @a -> @b -> @c -> @a"),
        ("x: @x", 1, "cycle: @x -> @x"),
        ("ok: h1\n\na: h1,@zz", 3, "no group named 'zz'"),
        ("a: h[1-", 1, "never closed"),
        ("just a line", 1, "expected 'name: pattern'"),
        ("a: x\n# c\na: y", 3, "also on line 1"),
        ("a b: x", 1, "not a group name"),
        ("a: @b c", 1, "space"),
    ],
)
def test_groups_file_errors(text: str, line: int, reason: str) -> None:
    with pytest.raises(HostPatternError) as info:
        parse_groups(text)
    assert info.value.line == line
    assert reason in info.value.reason
    assert f"groups file line {line}" in str(info.value)


def test_groups_mapping_errors_and_deep_chains() -> None:
    with pytest.raises(HostPatternError, match="cycle"):
        Groups({"a": "@b", "b": "@a"})
    with pytest.raises(HostPatternError, match="not a group name"):
        Groups({"bad name": "h1"})
    # A long chain of groups is walked without recursion.
    chain = {f"g{i}": f"@g{i + 1},h{i}" for i in range(3000)} | {"g3000": "h3000"}
    assert len(hosts("@g0", chain)) == 3001
    looped = {**chain, "g3000": "@g0"}
    with pytest.raises(HostPatternError, match="cycle"):
        Groups(looped)


NOT_A_NAME: object = 3


def test_hostset_operations_keep_order() -> None:
    a, b = hosts("h[1-5]"), hosts("h[4-7]")
    assert list(a | b) == ["h1", "h2", "h3", "h4", "h5", "h6", "h7"]
    assert list(b | a) == ["h4", "h5", "h6", "h7", "h1", "h2", "h3"]
    assert list(a - b) == ["h1", "h2", "h3"]
    assert list(b & a) == ["h4", "h5"]
    assert list(a ^ b) == ["h1", "h2", "h3", "h6", "h7"]
    assert list(hosts("web[01-50]") - hosts("web[07-09]"))[5:7] == ["web06", "web10"]
    assert list(a.difference("h2", ["h3"], hosts("h9"))) == ["h1", "h4", "h5"]
    assert list(a.union("x[1-2]")) == [*a, "x1", "x2"]
    assert list(a.intersection(b, {"h5"})) == ["h5"]
    assert list(a.symmetric_difference("h[5-6]")) == ["h1", "h2", "h3", "h4", "h6"]
    assert a - {"h1"} == {"h2", "h3", "h4", "h5"}
    assert a == hosts("h5,h4,h3,h2,h1")  # equality is of the names, not their order
    assert hash(a) == hash(hosts("h5,h4,h3,h2,h1"))
    assert a <= hosts("h[0-9]") and a.isdisjoint(hosts("x1"))
    assert len(a) == 5 and "h3" in a and "h6" not in a and NOT_A_NAME not in a
    assert str(a) == "h[1-5]"
    assert repr(a) == "<HostSet h[1-5] (5 hosts)>"
    assert list(HostSet(["b", "a", "b"])) == ["b", "a"] and not HostSet()


@pytest.mark.parametrize(
    ("names", "reason"),
    [(["ok", "a,b"], "','"), (["x y"], "a space"), (["@g"], "'@'"), (["a", ""], "empty")],
)
def test_hostset_refuses_names_a_pattern_would_misread(names: list[str], reason: str) -> None:
    with pytest.raises(HostPatternError, match=reason):
        HostSet(names)


def test_hostset_wants_names_not_a_pattern() -> None:
    with pytest.raises(TypeError, match="hosts"):
        HostSet("web[1-3]")


@pytest.mark.parametrize(
    ("names", "folded"),
    [
        (["h1", "h2", "h3"], "h[1-3]"),
        ([f"web{i:02d}" for i in range(1, 11)], "web[01-10]"),
        (["web1", "web2", "web3", "web7", "db", "web10"], "web[1-3,7,10],db"),
        (["a1"], "a1"),
        (["u@h1", "u@h2"], "u@h[1-2]"),
        (["n01", "n02", "x"], "n[01-02],x"),
        (["h3", "h1", "h2", "h1"], "h[1-3]"),
        # Mixed widths, as ClusterShell folds them.
        (["h1", "h01", "h001", "h2"], "h[1-2,01,001]"),
        (["h9", "h10", "h09"], "h[9,09-10]"),
        (["h08", "h09", "h10", "h11", "h9", "h100"], "h[9,08-11,100]"),
        ([f"h{i}" for i in range(12)], "h[0-11]"),
        (["h0", "h00", "h000"], "h[0,00,000]"),
        (["h9", "h010", "h011"], "h[9,010-011]"),
        (["h98", "h99", "h100", "h0101"], "h[98-100,0101]"),
        (["h1", "h3", "h5", "h7"], "h[1,3,5,7]"),
        # Several numbers: products.
        (["a1b2", "a1b3", "a2b2", "a2b3"], "a[1-2]b[2-3]"),
        (["a1b2", "a1b3", "a2b2"], "a1b[2-3],a2b2"),
        (expand("rack[1-2]-node[001-016]"), "rack[1-2]-node[001-016]"),
        (["10.0.0.1", "10.0.0.2"], "10.0.0.[1-2]"),
        (["1", "2", "3"], "[1-3]"),
        (["h-1", "h-2"], "h-[1-2]"),
        ([], ""),
    ],
)
def test_fold(names: list[str], folded: str) -> None:
    assert fold(names) == folded
    assert hosts(folded) == set(names)


# Host names: text without pattern syntax, with digit runs (some zero-padded) between.
TEXT = st.text(alphabet="abz-._:", min_size=0, max_size=3)
NUMBER = st.one_of(
    st.integers(0, 120).map(str),
    st.tuples(st.integers(0, 120), st.integers(2, 4)).map(lambda t: f"{t[0]:0{t[1]}d}"),
)
NAME = st.builds(
    lambda head, rest: head + "".join(n + t for n, t in rest),
    st.text(alphabet="abz", min_size=0, max_size=2),
    st.lists(st.tuples(NUMBER, TEXT), min_size=0, max_size=3),
).filter(bool)


@given(st.lists(NAME, max_size=40))
@settings(max_examples=300, deadline=None)
def test_property_expand_of_fold_gives_the_names_back(names: list[str]) -> None:
    folded = fold(names)
    assert hosts(folded) == set(names)
    assert fold(hosts(folded)) == folded  # folding what a fold expands to is stable


RANGE = st.tuples(
    st.integers(0, 30), st.integers(0, 12), st.integers(1, 3), st.sampled_from([0, 2, 3])
)


def _bracket(ranges: list[tuple[int, int, int, int]]) -> str:
    items = []
    for lo, span, step, width in ranges:
        hi = lo + span
        one = f"{lo:0{width}d}-{hi:0{width}d}" if width else f"{lo}-{hi}"
        items.append(one + (f"/{step}" if step > 1 else ""))
    return "[" + ",".join(items) + "]"


GLUE = st.text(alphabet="abz-._:", min_size=1, max_size=3)  # between two brackets
OPERAND = st.builds(
    lambda head, brackets: head + "".join(_bracket(r) + t for r, t in brackets),
    st.sampled_from(["h", "web", "r", "n-", ""]),
    st.lists(st.tuples(st.lists(RANGE, min_size=1, max_size=3), GLUE), min_size=1, max_size=2),
)
PATTERN = st.builds(
    lambda first, rest: first + "".join(op + p for op, p in rest),
    OPERAND,
    st.lists(st.tuples(st.sampled_from(",!&^"), OPERAND), max_size=3),
)


def _by_sets(pattern: str) -> set[str]:
    """The same pattern evaluated with Python sets, left to right, one operand at a time."""
    result: set[str] = set()
    op = ","
    depth, start = 0, 0
    for i, ch in enumerate(pattern + ","):
        depth += (ch == "[") - (ch == "]")
        if depth == 0 and (ch in ",!&^" or i == len(pattern)):
            names = set(expand(pattern[start:i]))
            if op == ",":
                result |= names
            elif op == "!":
                result -= names
            elif op == "&":
                result &= names
            else:
                result ^= names
            op, start = ch, i + 1
    return result


@given(PATTERN)
@settings(max_examples=300, deadline=None)
def test_property_patterns_expand_fold_and_combine(pattern: str) -> None:
    names = expand(pattern)
    assert len(names) == len(set(names))
    assert set(names) == _by_sets(pattern)
    folded = fold(names)
    assert hosts(folded) == set(names)
    assert fold(expand(folded)) == folded


@given(st.lists(NAME, max_size=12), st.lists(NAME, max_size=12))
@settings(max_examples=200, deadline=None)
def test_property_set_operations_are_ordered_sets(left: list[str], right: list[str]) -> None:
    a, b = HostSet(left), HostSet(right)
    assert list(a | b) == list(dict.fromkeys([*left, *right]))
    assert list(a - b) == [n for n in dict.fromkeys(left) if n not in set(right)]
    assert list(a & b) == [n for n in dict.fromkeys(left) if n in set(right)]
    assert set(a ^ b) == set(left) ^ set(right)
    assert a.difference(b) == a - b


def test_hundred_thousand_names_are_not_quadratic() -> None:
    """A guard against quadratic work only; the speed itself is measured in bench_hostset."""
    started = time.process_time()
    names = expand("node[000001-100000]")
    scattered = [f"n{i}.dc{i % 7}" for i in range(100_000)]
    assert fold(names) == "node[000001-100000]"
    assert hosts(fold(scattered)) == set(scattered)
    assert hosts(",".join(scattered[:20_000])) == set(scattered[:20_000])
    assert time.process_time() - started < 20


def test_module_is_pure() -> None:
    """hostset sits in core but imports no IO (it could live in the pure layer)."""
    tree = ast.parse(Path(hostset_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0] if node.level == 0 else ".")
    assert imported <= {"__future__", "re", "collections", "dataclasses", "itertools", "typing"}
