"""The converters' modules point one way: no module imports, at any depth (a function-level import included),
a module that imports it back, and none imports ``sapp_compress`` (layers point downwards)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "converters"


def _imports(path: Path) -> set[str]:
    """The converters modules ``path`` imports anywhere in its body (``from . import x`` counts as ``x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                out |= {node.module} if node.module else {a.name for a in node.names}
            elif node.module and node.module.split(".")[0] == "converters":
                out.add(node.module.split(".")[1] if "." in node.module else "__init__")
            elif node.module and node.module.split(".")[0] == "sapp_compress":
                out.add("sapp_compress")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("converters", "sapp_compress"):
                    out.add(a.name.split(".")[1] if a.name.startswith("converters.")
                            else a.name.split(".")[0])
    return out


def test_converter_modules_import_one_way_and_never_sapp_compress():
    graph = {p.stem: _imports(p) for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert not [m for m, deps in graph.items() if "sapp_compress" in deps]
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        if state.get(m) == 1:
            cycle.extend(path[path.index(m):] + [m])
            return True
        if state.get(m) == 2 or m not in graph:
            return False
        state[m] = 1
        if any(visit(d, path + [m]) for d in sorted(graph[m])):
            return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if visit(m, []):
            break
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"
