"""The one-way house: imports point down (app -> stages -> contracts -> ground) and form no circle.

Every ``import`` / ``from ... import`` of every project module is read from its source (module level, inside
functions, and under ``TYPE_CHECKING`` alike: a lazy import is still a dependency), so the rule holds for the code
as written, not only for what a test run happens to execute.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> (layer, rank). A module may import its own package or a package of strictly lower rank; packages of
# one layer do not import each other (no stage reaches into another; the two contracts stay independent).
LAYERS: dict[str, tuple[str, int]] = {
    "configlib": ("ground", 0),
    "sources": ("ground", 1),
    "training": ("ground", 1),
    "teachers": ("contracts", 2),
    "bank": ("contracts", 2),
    "encode": ("stages", 3),
    "distill": ("stages", 3),
    "finetune": ("stages", 3),
    "teacher_training": ("stages", 3),
    "interpret": ("stages", 3),
    "dreamteacher": ("app", 4),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Project modules named by the file's import statements (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name` may name a submodule: count both candidates, keep those that exist
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in LAYERS)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in LAYERS for p in (REPO / pkg).rglob("*.py")}
    return {mod: {m for m in _imports(path, mod) if m in files and m != mod} for mod, path in files.items()}


GRAPH = _graph()


def test_every_layer_package_is_found() -> None:
    assert {m.split(".")[0] for m in GRAPH} == set(LAYERS)


def test_imports_only_point_down() -> None:
    violations = []
    for mod, targets in sorted(GRAPH.items()):
        src = mod.split(".")[0]
        for target in sorted(targets):
            dst = target.split(".")[0]
            if dst != src and LAYERS[dst][1] >= LAYERS[src][1]:
                violations.append(f"{mod} ({LAYERS[src][0]}) imports {target} ({LAYERS[dst][0]})")
    assert not violations, "upward or sideways imports:\n  " + "\n  ".join(violations)


def test_no_import_circles() -> None:
    # Tarjan's strongly connected components; any component of more than one module is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
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
                circles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from teachers.base import Teacher\n", {"teachers.base", "teachers.base.Teacher"}),
        ("from . import spec\n", {"bank", "bank.spec"}),
        ("import numpy\nfrom bank.spec import BankError as E\n", {"bank.spec", "bank.spec.BankError"}),
    ],
)
def test_import_reader_on_hand_written_sources(tmp_path: Path, source: str, expected: set[str]) -> None:
    # the reader itself: absolute, relative (inside bank/), and non-project imports ignored
    path = tmp_path / "mod.py"
    path.write_text(source)
    assert _imports(path, "bank.reader") == expected
