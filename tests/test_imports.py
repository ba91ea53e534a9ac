"""The house's import rules, checked from the source: no circles, bots → core only.

Every import counts: at module level, inside functions, and under `if TYPE_CHECKING`
(an annotation-only import is still a dependency of the design; it merely does not run).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "bots")
# Known edges still to remove, each with its reason. core/store/records.py imports
# core.config under TYPE_CHECKING for `Limits.from_settings(settings)` while core.config
# reads DATABASE_URL with core.store.url: the store is being reworked elsewhere; the fix is
# for records.py to stop naming Settings (take the four limits, or a small Protocol).
ALLOWED_EDGES: set[tuple[str, str]] = set()  # none left: every circle is gone


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Return the modules of ours that `name` imports, anywhere in its source."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from core import x` may name a module (core.x) or a name in core/__init__.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            # `import core.store.sqlite` depends on core.store.sqlite (and runs its package).
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {
        name: {t for t in imports_of(name, path, modules) if (name, t) not in ALLOWED_EDGES}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import circle as a path, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_walker_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "core.messages" in graph["core.types"]  # module level
    assert "core.types" in graph["core.errors"]  # under TYPE_CHECKING
    assert "core.messages" in graph["core.errors"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circles_in_core_or_bots() -> None:
    assert find_cycle(import_graph()) is None


def test_core_imports_no_front_end() -> None:
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("core"):
            assert not [t for t in targets if t.startswith("bots")], name


def test_front_ends_draw_only_through_the_runner() -> None:
    # One job flow: a front end hands its Reply to core.runner.JobRunner; it never drives
    # the service's draw/replay itself, nor reaches the ledger.
    for name, path in our_modules().items():
        if not name.startswith("bots."):
            continue
        source = path.read_text(encoding="utf-8")
        for call in ("service.draw(", "service.replay(", ".ledger"):
            assert call not in source, f"{name} calls {call}"
