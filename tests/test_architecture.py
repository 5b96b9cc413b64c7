"""The package's shape, read from its source with `ast`: no import cycle (imports under
TYPE_CHECKING and inside functions included), and no module reaching into another module's
private names."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "eventwire"


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _imported(module: str, tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in `module`, wherever it is."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("eventwire"):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if _is_package(module) else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("eventwire"):
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES]
            yield from ((sub, []) for sub in submodules)
            yield target, [name for name in names if f"{target}.{name}" not in MODULES]


def _graph() -> dict[str, dict[str, list[str]]]:
    graph: dict[str, dict[str, list[str]]] = {}
    for module, path in MODULES.items():
        edges: dict[str, list[str]] = {}
        for target, names in _imported(module, ast.parse(path.read_text())):
            if target in MODULES and target != module:
                edges.setdefault(target, []).extend(names)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_the_package_has_no_import_cycle() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    detail = [
        " <-> ".join(cycle)
        + ": "
        + "; ".join(f"{a} -> {b}" for a in cycle for b in graph[a] if b in cycle)
        for cycle in cycles
    ]
    assert not cycles, "import cycles (TYPE_CHECKING imports included):\n" + "\n".join(detail)


def test_the_cycle_check_finds_a_cycle() -> None:
    # The check itself must be able to fail.
    graph = {"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _private_imports(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    return [
        f"{module} imports {name} from {target}"
        for module, edges in graph.items()
        for target, names in edges.items()
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]


def _defined_private_names(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, attributes and slots."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries, setattr names
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


# Public despite the underscore: the named-tuple API, and documented functions of os and sys.
_CONVENTIONALLY_PUBLIC = frozenset(
    {"_replace", "_asdict", "_fields", "_make", "_exit", "_current_frames"}
)


def _foreign_private_attributes() -> list[str]:
    """`obj._name` where this module defines no `_name`: a reach into another's privates."""
    found: list[str] = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        own = _defined_private_names(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in own
                and node.attr not in _CONVENTIONALLY_PUBLIC
            ):
                found.append(f"{module}:{node.lineno} uses .{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    graph = _graph()
    problems = _private_imports(graph) + _foreign_private_attributes()
    assert not problems, "\n".join(problems)
