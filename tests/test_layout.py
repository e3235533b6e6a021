"""The house's layout, checked: the first-party packages' modules import one way (no cycle, function-level
imports included), none is over 600 lines, ``--structure`` is decided in at most three places, and the stages
are sub-packages of ``sapp_compress`` (README, "How it works")."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sapp_compress", "converters", "calib_data")
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The first-party modules ``name`` imports anywhere in its body: each ``import`` / ``from ... import``
    statement, at any depth, resolved to the module it names (``from pkg import mod`` names ``pkg.mod`` when
    that is a module). A module's own package ``__init__`` is not an edge unless imported by name (Python runs
    it first either way, and it holds no imports of its children except where a test below allows it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for t in targets:
            # ``import a.b.c`` where only ``a.b`` is first-party, or a non-module name
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    found: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        if state.get(m) == 1:
            found.extend(path[path.index(m):] + [m])
            return True
        if state.get(m) == 2:
            return False
        state[m] = 1
        if any(visit(d, path + [m]) for d in sorted(graph.get(m, ()))):
            return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if visit(m, []):
            break
    return found


def test_no_import_cycle_among_first_party_modules():
    cycle = _cycle(_graph())
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_finds_a_cycle():
    """The check itself: a two-module cycle through a function-level import is found."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_layers_point_down():
    """``converters`` imports neither of the others; ``calib_data`` does not import ``sapp_compress``."""
    graph = _graph()
    up = [(m, d) for m, deps in graph.items() for d in deps
          if (m.startswith("converters") and not d.startswith("converters"))
          or (m.startswith("calib_data") and d.startswith("sapp_compress"))]
    assert not up, up


def test_no_module_over_600_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_stages_are_sub_packages():
    """At least three stage sub-packages, each named in the README's map of the layout."""
    subs = sorted(p.parent.name for p in (ROOT / "sapp_compress").glob("*/__init__.py"))
    assert len(subs) >= 3, subs
    readme = (ROOT / "README.md").read_text()
    assert all(f"sapp_compress/{s}/" in readme for s in subs), \
        [s for s in subs if f"sapp_compress/{s}/" not in readme]


GRANULARITY_TYPES = {"LayerPlan", "FamilyPlan", "MaskedLayer", "MaskedFamily", "StructureResult", "Blocks",
                     "Channels"}


def _decides_granularity(node: ast.AST) -> bool:
    """A test of which granularity a run has: a comparison against ``"blocks"`` / ``"channels"`` of something
    named ``structure``; an ``isinstance`` against a granularity's own types; a lookup in ``GRANULARITIES``; a
    report's or result's ``structure`` tested for presence."""
    if isinstance(node, ast.Compare):
        text = ast.unparse(node)
        consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
        if "structure" in text and ({"blocks", "channels"} & set(consts) or any(
                isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops)):
            return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
        return bool(GRANULARITY_TYPES & {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)})
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and \
            node.value.id == "GRANULARITIES":
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return any(isinstance(a, ast.Constant) and a.value == "structure" for a in node.args)
    return False


def _granularity_decisions() -> list[str]:
    """``module:definition`` of every place in ``sapp_compress`` (the package that reads ``--structure``;
    converters only ever see a report's) that tests which granularity a run has, each at its innermost
    enclosing definition. The entries of :mod:`sapp_compress.granularity` are not scanned: each is one
    granularity's own code; the registry that chooses between them (``granularity/__init__``) is."""
    places = set()

    def walk(node: ast.AST, where: str, module: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = child.name
            if _decides_granularity(child):
                places.add(f"{module}:{inner}")
            walk(child, inner, module)

    for name, path in _modules().items():
        if name.startswith("sapp_compress") and not name.startswith("sapp_compress.granularity."):
            walk(ast.parse(path.read_text()), "<module>", name)
    return sorted(places)


def test_the_granularity_is_decided_in_at_most_three_places():
    places = _granularity_decisions()
    assert len(places) <= 3, places


def test_the_decision_check_finds_a_decision():
    """The check itself: a comparison of ``structure`` with a granularity's name, and an ``isinstance`` on a
    plan type, are decisions; an unrelated comparison is not."""
    tree = ast.parse("if cfg.structure == 'channels': pass\nisinstance(p, LayerPlan)\nx == 'blocks'")
    assert [_decides_granularity(n) for n in ast.walk(tree) if isinstance(n, (ast.Compare, ast.Call))] == [
        True, True, False]


def test_every_structure_has_an_entry():
    from sapp_compress.config import STRUCTURES
    from sapp_compress.granularity import GRANULARITIES

    assert set(STRUCTURES) == set(GRANULARITIES)
