"""The top-level package names are checked at import: another distribution's ``bank`` is named, not used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dreamteacher import PROJECT_PACKAGES, shadowed_packages

REPO = Path(__file__).resolve().parents[1]


def test_every_project_package_resolves_inside_the_repository() -> None:
    assert shadowed_packages() == {}
    assert sorted(PROJECT_PACKAGES) == sorted(
        p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name != "dreamteacher"
    )


def test_a_shadowing_distribution_is_named_at_import(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "bank"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('"""Core Banking for Python (an unrelated distribution)."""\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}"}
    result = subprocess.run(
        [sys.executable, "-c", "import dreamteacher"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "'bank' ->" in last and str(fake) in last and "own virtual environment" in last
    assert "'encode'" not in last  # only the shadowed one is named
