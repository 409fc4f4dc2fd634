"""The package's imports point one way: no circle, nothing imported from a layer above."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edge_infer"

# Lowest first. A module may import from its own unit or from a unit of a lower layer;
# units of one layer are siblings and import nothing from each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "config"),
    ("formats",),
    ("models", "kernels"),
    ("vision",),  # preprocessing, dropping, towers: below cache_store so image keys can use it
    ("cache_store",),
    ("offload",),  # numpy only: page abstracts, bounds, selection
    ("backends",),
    ("generation",),
    ("agents",),
    ("engine",),
    ("server",),
    ("cli",),
    ("__init__",),  # the public API at the package root
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit_of(module: str) -> str:
    """``edge_infer.agents.turn`` -> ``agents``; the package root is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every edge_infer module ``path`` imports, at any depth (functions, TYPE_CHECKING)."""
    out: set[str] = set()
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = me.split(".")[: len(me.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name.startswith("edge_infer"):
                # "from pkg import submodule" names the submodule; "from mod import thing" the mod
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != me:
                    out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imported_modules(p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in all_modules()}
    assert units <= set(RANK), f"add to LAYERS: {sorted(units - set(RANK))}"


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_imports_point_down():
    upward = []
    for mod, deps in import_graph().items():
        for dep in deps:
            a, b = unit_of(mod), unit_of(dep)
            if a != b and RANK[b] >= RANK[a]:
                upward.append(f"{mod} imports {dep} ({b} is not below {a})")
    assert not upward, "\n".join(sorted(upward))


def test_no_underscore_names_imported_from_another_module():
    modules = all_modules()
    found = []
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edge_infer"):
                found += [
                    f"{mod}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not found, "\n".join(found)


def test_the_checks_catch_a_circle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert RANK["backends"] < RANK["agents"]
