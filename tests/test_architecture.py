"""The import graph inside ``sshwrap``: layers point down only, no cycles, a pure layer.

Layers, top to bottom:

- **faces** (3): the public API and commands: what users import or run.
- **core** (2): procedures written once (argv building, running on a channel, fan-out, file
  transfer procedures).
- **io** (1): the only code that touches fds, sockets, threads, ptys and terminals.
- **pure** (0): definitions with no IO: the wire protocol (``sshwrap.protocol``), the
  exceptions, ssh's command-line grammar.

A module may import its own layer or lower ones.  The graph is read from the source (every
``import``, also those inside functions, which is how lazy imports are written here), so a
new upward import or cycle fails here.  ``KNOWN_*`` lists what today's code still does
wrong: the one-core refactor removes each entry, and an entry that no longer happens fails
the test too, so the list only ever shrinks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import sshwrap

PACKAGE = Path(sshwrap.__file__).parent

FACES, CORE, IO, PURE = 3, 2, 1, 0

LAYER = {
    "__init__": FACES,
    "__main__": FACES,
    "cli": FACES,
    "many_cli": FACES,
    "many_sudo": FACES,
    "process": FACES,
    "connection": FACES,
    "spawn": FACES,
    "testing": FACES,
    "pytest_plugin": FACES,
    "demo": FACES,
    "fanout": FACES,
    "transfer": FACES,
    "fleet": FACES,
    "filesystem": FACES,
    "errors": PURE,
}
"""The layer of every top-level module: the faces (errors.py: the public exceptions, pure)."""

PACKAGE_LAYER = {"aio": FACES, "core": CORE, "io": IO, "terminal": IO, "protocol": PURE}
"""A sub-package's modules take the layer of the sub-package."""
PURE_PACKAGES = {"protocol"}
PURE_MODULES = {"core.hostset", "core.batches", "core.per_host"}
"""Pure modules inside another layer's package (host patterns: text in, names out)."""

# Imports the pure layer must never make (nor anything of sshwrap outside it).
IO_MODULES = {
    "os",
    "socket",
    "select",
    "selectors",
    "threading",
    "asyncio",
    "subprocess",
    "signal",
    "fcntl",
    "termios",
    "pty",
    "tty",
}

KNOWN_CYCLES: list[set[str]] = []
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_AIO_IMPORTERS: set[str] = set()  # aio is a facade: only __init__ may import it


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if top in PACKAGE_LAYER:
        return PACKAGE_LAYER[top]
    return LAYER[module]


def _resolve(module: str, target: str) -> str | None:
    """The sshwrap module ``target`` names (dotted, relative to sshwrap), if it is one."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(sshwrap modules, outside top-level modules) that ``module`` imports."""
    path = MODULES[module]
    is_pkg = path.name == "__init__.py"
    here = module.split(".") if is_pkg else module.split(".")[:-1]
    if module == "__init__":
        here = []
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "sshwrap" or alias.name.startswith("sshwrap."):
                    dep = _resolve(module, alias.name.removeprefix("sshwrap").lstrip("."))
                    if dep:
                        inside.add(dep)
                else:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and (node.module == "sshwrap" or node.module.startswith("sshwrap.")):
                prefix = node.module.removeprefix("sshwrap").lstrip(".")
            else:
                if node.module:
                    outside.add(node.module.split(".")[0])
                continue
            for alias in node.names:
                name = f"{prefix}.{alias.name}" if prefix else alias.name
                dep = _resolve(module, name) if name in MODULES else _resolve(module, prefix)
                if dep:
                    inside.add(dep)
    inside.discard(module)
    inside.discard("__init__")  # the package itself (lazy names): not a layer edge
    return inside, outside


GRAPH = {m: _imports(m)[0] for m in MODULES}


def _cycles() -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if m.split(".")[0] not in PACKAGE_LAYER and m not in LAYER]
    assert not missing, f"give these modules a layer in LAYER: {missing}"
    stale = [m for m in LAYER if m not in MODULES]
    assert not stale, f"LAYER names modules that no longer exist: {stale}"


def test_no_cycles_but_the_known_ones() -> None:
    cycles = _cycles()
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not new, f"new import cycles: {new}"
    gone = [c for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_imports_point_down_only() -> None:
    upward = {(m, d) for m, deps in GRAPH.items() for d in deps if _layer(d) > _layer(m)}
    assert upward - KNOWN_UPWARD == set(), "upward imports (a lower layer importing a higher one)"
    gone = KNOWN_UPWARD - upward
    assert not gone, f"fixed: remove from KNOWN_UPWARD: {gone}"


def test_aio_is_a_facade() -> None:
    importers = {m for m, deps in GRAPH.items() if "aio" in deps} - {"__init__"}
    importers -= {m for m in MODULES if m.startswith("aio.")}  # the facade's own modules
    assert importers - KNOWN_AIO_IMPORTERS == set(), "library modules must not import sshwrap.aio"
    gone = KNOWN_AIO_IMPORTERS - importers
    assert not gone, f"fixed: remove from KNOWN_AIO_IMPORTERS: {gone}"


def test_pure_layer_does_no_io() -> None:
    pure = [m for m in MODULES if m.split(".")[0] in PURE_PACKAGES or m in PURE_MODULES]
    assert pure, "the pure protocol package has no modules"
    assert set(pure) >= PURE_MODULES, f"listed pure modules missing: {PURE_MODULES - set(pure)}"
    for m in pure:
        inside, outside = _imports(m)
        assert not outside & IO_MODULES, f"{m} imports {sorted(outside & IO_MODULES)}"
        assert all(d.split(".")[0] in PURE_PACKAGES or d in PURE_MODULES for d in inside), (
            f"{m} imports sshwrap modules outside the pure layer: {sorted(inside)}"
        )


def test_the_graph_reader_sees_lazy_and_relative_imports() -> None:
    """The reader itself: a lazy import inside a function and ``from . import x`` count."""
    assert "transfer" in GRAPH["connection"]  # imported inside methods
    assert "cli" in GRAPH["__main__"]  # from .cli import main
    assert "testing" in GRAPH["pytest_plugin"]


MAX_LINES = 600


def test_no_module_over_600_lines() -> None:
    """One responsibility per module: a module that grows past this is doing two things."""
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (lines): {long}"


def test_tests_import_public_names_only() -> None:
    """The tests use public names (or the pure layer), never a module's private ones."""
    tests = Path(__file__).parent
    private = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sshwrap"):
                private += [
                    f"{path.name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not private, private


def test_package_docstrings_name_every_module() -> None:
    """A layer's ``__init__`` docstring is its map: every module of the package is named."""
    for pkg in PACKAGE_LAYER:
        doc = (PACKAGE / pkg / "__init__.py").read_text()
        mods = [p.stem for p in (PACKAGE / pkg).glob("*.py") if p.stem != "__init__"]
        missing = [m for m in mods if not re.search(rf"\b{m}\b", doc)]
        assert not missing, f"sshwrap/{pkg}/__init__.py does not name {missing}"
