"""Layering: the import graph of api/ -> engine/ -> kernels/ flows one way, without cycles.

The graph is built with `ast` from every `import`/`from` statement in a module: top level,
inside functions, and under `if TYPE_CHECKING:` alike (a type-only cycle is still a cycle of
concepts). Checked:
- no import cycle among the modules of engine/, nor among those of kernels/;
- nothing in api/, engine/, kernels/ or llamatron_tools/ imports scripts/ (entry points, not library);
- api/ imports neither kernels/ nor torch (it reaches the model only through engine/);
- engine/ imports neither api/ nor starlette (it never sees HTTP);
- llamatron_tools/ (the load generator, a client of any server) imports none of api/, engine/, kernels/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "engine", "kernels", "llamatron_tools")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # `from pkg import sub` may name a submodule: record pkg.sub too (kept only if it exists)
            found.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules it imports (all names, inside the tree or not)."""
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            graph[_module_name(path)] = _imports(path)
    return graph


def _internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between modules of the tree only; `import a.b.c` also depends on a and a.b."""
    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        edges: set[str] = set()
        for d in deps:
            parts = d.split(".")
            edges.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in graph)
        edges.discard(mod)
        out[mod] = edges
    return out


def cycles(graph: dict[str, set[str]], within: str) -> list[list[str]]:
    """Strongly connected components (size > 1) among the modules under package `within`.
    A package's __init__ importing its own submodules is not counted: that edge is how a
    package re-exports, and a submodule importing its package's __init__ is what closes it."""
    nodes = {m for m in graph if m == within or m.startswith(within + ".")}
    edges = {m: {d for d in graph[m] if d in nodes and not d.startswith(m + ".")} for m in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def _violations(graph: dict[str, set[str]], importer: str, banned: tuple[str, ...]) -> list[str]:
    return sorted(f"{mod} imports {d}" for mod, deps in graph.items()
                  if mod == importer or mod.startswith(importer + ".")
                  for d in deps if any(d == b or d.startswith(b + ".") for b in banned))


def test_no_import_cycles_in_engine_or_kernels() -> None:
    graph = _internal(import_graph())
    for pkg in ("engine", "kernels"):
        assert cycles(graph, pkg) == [], f"import cycles in {pkg}/"


def test_nothing_imports_scripts() -> None:
    graph = import_graph()
    assert [v for p in PACKAGES for v in _violations(graph, p, ("scripts",))] == []


def test_api_reaches_the_model_only_through_engine() -> None:
    assert _violations(import_graph(), "api", ("kernels", "torch")) == []


def test_engine_never_sees_http() -> None:
    assert _violations(import_graph(), "engine", ("api", "starlette")) == []


def test_tools_are_clients_only() -> None:
    assert _violations(import_graph(), "llamatron_tools", ("api", "engine", "kernels", "torch")) == []


def test_the_checker_finds_a_cycle() -> None:
    graph = {"engine": set(), "engine.a": {"engine.b"}, "engine.b": {"engine.c"}, "engine.c": {"engine.a"},
             "engine.d": {"engine.a"}}
    assert cycles(graph, "engine") == [["engine.a", "engine.b", "engine.c"]]


def test_api_layer_objects_are_typed() -> None:
    """The objects api/ passes around for the layers (its context, the engine, the settings) carry
    their real types, never `Any` or nothing (TYPE_CHECKING imports keep that cycle-free)."""
    layer_params = {"ctx", "engine", "settings", "app_ctx"}
    untyped = []
    for path in sorted((ROOT / "api").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                    if a.arg in layer_params and (a.annotation is None or "Any" in ast.unparse(a.annotation)):
                        untyped.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({a.arg})")
    assert untyped == []
