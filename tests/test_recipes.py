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


DISTILL_RECIPES = sorted(p.stem for p in (RECIPES / "distill").glob("*.yaml"))


@pytest.mark.parametrize("name", DISTILL_RECIPES)
def test_distill_recipe_validates_through_the_typed_loader(name: str) -> None:
    cfg = load_pipeline(REPO / "pipeline.yaml", [f"distill.recipe={name}"])
    assert cfg.distill.recipe == name


def test_imagenet_distill_recipe_is_the_papers_and_is_picked_by_dataset() -> None:
    # ../shared/reference/paper.md, "Pretraining recipe", ImageNet column
    by_data = load_pipeline(REPO / "pipeline.yaml", ["encode.data=imagenet"]).distill
    o = by_data.optim
    assert by_data.recipe == "imagenet" and by_data.batch_size == 2048
    assert (o.name, o.lr, o.weight_decay, o.betas, o.epochs, o.warmup_epochs) == (
        "lamb", 4e-3, 0.05, (0.9, 0.95), 200, 30,
    )  # fmt: skip
    assert load_pipeline(REPO / "pipeline.yaml", ["encode.data=imagenet"]).dataset("imagenet").t == 150
    # the LSUN recipe stays the default elsewhere; `none` turns the dataset's recipe off; the command line wins
    assert load_pipeline(REPO / "pipeline.yaml").distill.optim.name == "adamw"
    off = load_pipeline(REPO / "pipeline.yaml", ["encode.data=imagenet", "distill.recipe=none"]).distill
    assert (off.recipe, off.optim.name, off.batch_size) == ("none", "adamw", 256)
    wins = load_pipeline(REPO / "pipeline.yaml", ["encode.data=imagenet", "distill.batch_size=512"]).distill
    assert (wins.batch_size, wins.optim.name) == (512, "lamb")


def test_make_distill_data_imagenet_selects_the_imagenet_recipe() -> None:
    import subprocess

    dry = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed-stamp", "distill", "DATA=imagenet"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "encode.data=imagenet" in dry


def test_distill_recipe_unknown_name_or_key_is_rejected(tmp_path: Path, monkeypatch) -> None:
    from dreamteacher import schema

    with pytest.raises(ConfigError, match=r"distill.recipe='nope'.*shipped recipes: imagenet"):
        load_pipeline(REPO / "pipeline.yaml", ["distill.recipe=nope"])
    (tmp_path / "bad.yaml").write_text("optim: {nme: lamb}\n")
    monkeypatch.setattr(schema, "DISTILL_RECIPES", tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key 'distill\.optim\.nme'"):
        load_pipeline(REPO / "pipeline.yaml", ["distill.recipe=bad"])
