"""The whole demo at debug size: every stage runs for real, every artifact exists, every metric is finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dreamteacher.demo import derive, format_table, parallel_runs, plan_demo, run_demo, summarise
from dreamteacher.probe import STRIDE, linear_probe_miou
from dreamteacher.schema import DemoConfig, load_pipeline
from sources import demo_scenes as demo_data

SHIPPED_TEACHER = Path("assets/demo-teacher")


@pytest.fixture()
def small_data(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = dict.fromkeys(demo_data.COUNTS, 8)
    counts["unlabeled"] = 16
    monkeypatch.setattr(demo_data, "COUNTS", counts)


def _cfg(tmp_path: Path, *extra: str):  # noqa: ANN202
    return load_pipeline("pipeline.yaml", [
        f"demo.out={tmp_path / 'demo'}", "demo.size=debug",
        *(f"datasets.{name}.root={tmp_path / 'data' / name}" for name in ("demo", "demo-fewshot", "demo-coco")),
        *extra,
    ])  # fmt: skip


def test_debug_demo_end_to_end(tmp_path: Path, small_data: None) -> None:
    cfg = _cfg(tmp_path)
    results = run_demo(cfg, "debug", progress=False)
    out = tmp_path / "demo"
    for name in ("report.md", "results.json", "config.yaml", "report/data.png", "report/features.png",
                 "report/losses.png", "distill/student-debug/backbone.safetensors",
                 "distill/student-debug/regressor.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    for task, inits in (("fewshot", ("distilled", "mix", "random")), ("coco", ("distilled", "random"))):
        for init in inits:
            run = out / "finetune" / f"debug-{task}-{init}-seed0"
            assert (run / "results.json").is_file() and (run / "predictions.png").is_file()
            assert (out / "report" / f"predictions_{task}_{init}.png").is_file()
    report = (out / "report.md").read_text()
    for link in ("report/data.png", "report/features.png", "report/losses.png",
                 "report/predictions_coco_distilled.png", "report/predictions_fewshot_random.png"):  # fmt: skip
        assert link in report
    # Each distilled level's error is printed (mse against the whitened teacher, a finite number).
    errors = [line.split("|") for line in report.splitlines() if line.startswith("| s")]
    assert {row[1].strip() for row in errors} == {"s4", "s8", "s16", "s32"}
    assert all(math.isfinite(float(row[2])) for row in errors)
    assert [row["metric"] for row in results["table"]] == ["mIoU", "segm_AP", "bbox_AP"]
    for row in results["table"]:
        for init in ("distilled", "random"):
            assert len(row[init]["values"]) == 1 and all(math.isfinite(v) for v in row[init]["values"])
    # the mix column: the few-label task only (the paper's semi-supervised setting), its paired deltas with it
    fewshot, coco = results["table"][0], results["table"][1]
    assert len(fewshot["mix"]["values"]) == 1 and math.isfinite(fewshot["delta_mix"])
    assert coco["mix"] is None and coco["delta_mix"] is None
    # the interpreter was trained, scored, and its soft labels are in the bank, complete
    interpreter = results["interpreter"]
    assert 0.0 <= interpreter["mIoU"] <= 100.0 and len(interpreter["sha256"]) == 64
    assert "interpreter" in report and "mix-distilled" in report
    from bank import Bank

    labels = Bank.open(out / "bank-debug.zarr").labels
    assert labels is not None and labels.interpreter["sha256"] == interpreter["sha256"]
    # the mix student logged both terms of L_mix
    logged = [json.loads(line) for line in (out / "distill" / "student-debug-mix" / "metrics.jsonl").open()]
    assert any("label" in r and "feat" in r for r in logged)
    assert json.loads((out / "results.json").read_text())["size"] == "debug"
    probe = results["teacher_probe_mIoU"]
    assert set(probe) == {"teacher", "random teacher", "pixels", "pixels 4x4 patch"}
    assert all(0.0 <= v <= 100.0 for v in probe.values())
    # The distilled runs really started from the distilled backbone, the random ones from nothing.
    ckpts = {json.loads((out / "finetune" / f"debug-fewshot-{i}-seed0" / "results.json").read_text())["ckpt"]
             for i in ("distilled", "mix", "random")}  # fmt: skip
    assert ckpts == {
        str(out / "distill" / f"student-debug{s}" / "backbone.safetensors") for s in ("", "-mix")
    } | {""}

    # A second run reuses everything that is finished.
    again = run_demo(cfg, "debug", progress=False)
    assert again["table"] == results["table"]
    assert again["timings_s"]["distill"] < 1.0


def test_plan_validates_every_stage_before_running(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    plan = plan_demo(cfg, "full")
    # fewshot x (distilled, mix, random) + coco x (distilled, random), per seed
    assert len(plan.finetune) == (3 + 2) * len(cfg.demo.seeds)
    assert plan.mix_distill.distill.loss.mix and not plan.distill.distill.loss.mix
    assert plan.encode.encode.bank == plan.distill.distill.bank
    with pytest.raises(ValueError, match="choices: debug, full"):
        plan_demo(cfg, "huge")
    bad = derive(cfg, ["demo.sizes.debug.distill=[distill.student.name=resnet34]"])
    with pytest.raises(ValueError, match="same timm model"):
        plan_demo(bad, "debug")
    with pytest.raises(ValueError, match="unknown key"):
        derive(cfg, ["distill.nope=1"])


def test_results_table_mean_and_std() -> None:
    runs = {}
    for seed, (a, b) in enumerate([(50.0, 40.0), (54.0, 42.0)]):
        runs[("fewshot", "distilled", seed)] = {"mIoU": a}
        runs[("fewshot", "random", seed)] = {"mIoU": b}
        runs[("coco", "distilled", seed)] = {"segm_AP": 10.0, "bbox_AP": 12.0}
        runs[("coco", "random", seed)] = {"segm_AP": 8.0, "bbox_AP": 9.0}
    rows = summarise(runs)
    miou = rows[0]
    assert miou["distilled"]["mean"] == 52.0 and miou["random"]["mean"] == 41.0 and miou["delta"] == 11.0
    assert miou["distilled"]["std"] == pytest.approx(math.sqrt(8.0))  # sample std of (50, 54)
    assert miou["delta_std"] == pytest.approx(math.sqrt(2.0))  # per-seed differences (10, 12)
    text = format_table(rows, 2)
    assert "52.00 +- 2.83" in text and "+11.00 +- 1.41" in text


def test_shipped_teacher_is_complete() -> None:
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "samples.png"):  # fmt: skip
        assert (SHIPPED_TEACHER / name).is_file(), name
    size = sum(p.stat().st_size for p in SHIPPED_TEACHER.rglob("*") if p.is_file())
    assert size < 10.5e6


def test_linear_probe_scores_separable_and_uninformative_features() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = (
        torch.randint(0, 3, (6, 8, 8), generator=gen)
        .repeat_interleave(STRIDE, 1)
        .repeat_interleave(STRIDE, 2)
    )
    cells = labels[:, STRIDE // 2 :: STRIDE, STRIDE // 2 :: STRIDE]  # (6, 8, 8) label of each stride-4 cell
    onehot = F.one_hot(cells, 3).permute(0, 3, 1, 2).float()  # features that name the class
    assert linear_probe_miou(onehot[:4], labels[:4], onehot[4:], labels[4:], 3) == pytest.approx(100.0)
    noise = torch.randn(onehot.shape, generator=gen)
    assert linear_probe_miou(noise[:4], labels[:4], noise[4:], labels[4:], 3) < 60.0


def test_parallel_runs_split_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    assert parallel_runs(DemoConfig(), "cpu", pending=12) == (4, 1)  # one run per core, one thread each
    assert parallel_runs(DemoConfig(), "cpu", pending=2) == (2, 2)  # fewer runs than cores: more threads each
    assert parallel_runs(DemoConfig(parallel_runs=1), "cpu", pending=12) == (1, 4)
    assert parallel_runs(DemoConfig(cpu_threads=1, parallel_runs=2), "cpu", pending=12) == (2, 1)
    assert parallel_runs(DemoConfig(), "cuda", pending=12) == (1, 0)  # GPU: in turn, torch's thread default
