"""Every shipped recipe file loads into its schema, and every override in it is a valid pipeline key."""

from __future__ import annotations

from pathlib import Path

import pytest

from configlib import ConfigError
from dreamteacher.demo import plan_demo
from dreamteacher.schema import RECIPES, load_demo_sizes, load_pipeline

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPES = sorted(p.stem for p in (RECIPES / "demo").glob("*.yaml"))


def test_recipes_folder_is_the_repositorys_and_holds_the_demo_sizes() -> None:
    assert RECIPES == REPO / "configs"
    assert {"full", "debug"} <= set(DEMO_RECIPES)


@pytest.mark.parametrize("size", DEMO_RECIPES)
def test_demo_recipe_validates_every_stage(size: str) -> None:
    # plan_demo applies each stage's overrides to pipeline.yaml and validates the result (unknown keys, types)
    plan = plan_demo(load_pipeline(REPO / "pipeline.yaml"), size)
    assert plan.finetune, f"configs/demo/{size}.yaml plans no fine-tuning run"


def test_a_recipe_with_an_unknown_key_names_its_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("encode: [encode.draws=1]\ndistil: []\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml: .*unknown key 'distil'"):
        load_demo_sizes(tmp_path)


def test_a_recipe_override_of_an_unknown_pipeline_key_is_rejected(tmp_path: Path) -> None:
    cfg = load_pipeline(REPO / "pipeline.yaml")
    cfg.demo.sizes["broken"] = load_demo_sizes(RECIPES / "demo")["debug"]
    cfg.demo.sizes["broken"].distill.append("distill.nope=1")
    with pytest.raises(ConfigError, match=r"unknown key 'distill\.nope'"):
        plan_demo(cfg, "broken")
