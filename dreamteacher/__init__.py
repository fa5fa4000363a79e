"""The app floor: the ``dreamteacher`` CLI, the whole-pipeline schema and ``resolve``, the demo, probe and report.

The project's other packages install as top-level modules (``bank``, ``encode``, ... ; docs/design.md says why).
Some of those names belong to other distributions on PyPI too, so importing this package first checks that every
one of them resolves to this project's folder, and says which one is shadowed instead of failing later with a
confusing ``AttributeError`` deep inside a stage.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PROJECT_PACKAGES = (
    "configlib",
    "sources",
    "training",
    "teachers",
    "bank",
    "encode",
    "distill",
    "finetune",
    "teacher_training",
    "interpret",
)
"""Top-level packages of this project, bottom layer first (tests/test_layers.py holds the layer rules)."""


def shadowed_packages(root: Path | None = None) -> dict[str, str]:
    """``{name: where it resolves}`` for each project package that does not resolve inside ``root``."""
    root = (root or Path(__file__).resolve().parents[1]).resolve()
    shadowed = {}
    for name in PROJECT_PACKAGES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None or root not in origin.parents:
            shadowed[name] = str(origin) if origin else "nowhere (not installed)"
    return shadowed


def _check_installation() -> None:
    shadowed = shadowed_packages()
    if shadowed:
        where = "; ".join(f"'{name}' -> {path}" for name, path in shadowed.items())
        raise ImportError(
            f"dreamteacher: these top-level modules do not come from this project ({where}). Another installed "
            "distribution uses the same name: install dreamteacher in its own virtual environment (`make venv`)."
        )


_check_installation()
