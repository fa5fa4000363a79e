"""The mix-distillation study's plan (benchmarks/study_mix.py): which runs a seed means, which are the demo's own."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from dreamteacher.demo import plan_demo
from dreamteacher.schema import load_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_mix", REPO / "benchmarks" / "study_mix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_mix"] = module
    spec.loader.exec_module(module)
    return module


def test_a_seed_fixes_the_distill_and_the_finetune_run_of_every_init(study, tmp_path: Path) -> None:
    cfg = load_pipeline(REPO / "pipeline.yaml", [f"demo.out={tmp_path}"])
    demo = plan_demo(cfg, "full")
    distills, finetunes = study.plan_runs(cfg, [0, 1])

    # nothing is exported yet: every distill run of both seeds is to be made; seed 0 IS the demo's
    assert set(distills) == {("distilled", 0), ("mix", 0), ("distilled", 1), ("mix", 1)}
    assert distills[("distilled", 0)].distill == demo.distill.distill
    assert distills[("mix", 0)].distill == demo.mix_distill.distill
    for init in ("distilled", "mix"):
        seeded = distills[(init, 1)].distill
        assert seeded.seed == 1 and seeded.exp.endswith("-dseed1")
        assert seeded.loss.mix is (init == "mix")
        assert seeded.max_steps == demo.distill.distill.max_steps  # the same recipe otherwise

    # fine-tuning: seed 0 runs are the demo's (same folder, ckpt, seed); seed 1 reads seed 1's own backbone
    for init in ("distilled", "mix", "random"):
        assert finetunes[("fewshot", init, 0)].finetune == demo.finetune[("fewshot", init, 0)].finetune
        one = finetunes[("fewshot", init, 1)].finetune
        assert one.seed == 1
        if init == "random":
            assert one.ckpt == "" and one.exp == demo.finetune[("fewshot", "random", 1)].finetune.exp
        else:
            exp = distills[(init, 1)].distill.exp
            assert one.ckpt == str(Path(distills[(init, 1)].distill.out) / exp / "backbone.safetensors")
            assert one.exp != demo.finetune[("fewshot", init, 1)].finetune.exp  # not the demo's seed-1 run
    assert {key[1] for key in finetunes} == {"distilled", "mix", "random"}
