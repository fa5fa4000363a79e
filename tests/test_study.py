"""The cache-cost study's bookkeeping (benchmarks/study_cache_cost.py): its statistics by hand, its plan against
the config loader, and its debug grid end to end (the real stages at toy size)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "study_cache_cost.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_cache_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_cache_cost"] = module
    spec.loader.exec_module(module)
    return module


def test_mean_and_paired_interval_by_hand(study) -> None:
    got = study.mean_ci([1.0, 2.0, 6.0])
    # mean 3, sample std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7), half-width t(0.975, 2) * sqrt(7) / sqrt(3)
    assert got["mean"] == pytest.approx(3.0)
    assert got["std"] == pytest.approx(math.sqrt(7.0))
    assert got["ci95"] == pytest.approx(4.303 * math.sqrt(7.0) / math.sqrt(3.0))
    assert math.isnan(study.mean_ci([5.0])["ci95"])


def test_within_noise_and_the_pareto_front(study) -> None:
    def row(name, size, mse, d_mse, d_miou, d_at=(0.0, 0.01)):
        stat = lambda m, h: {"mean": m, "ci95": h}  # noqa: E731
        return {"variant": name, "bytes_per_image": size, "mse": stat(mse, 0.0), "d_mse": stat(*d_mse),
                "d_mIoU": stat(*d_miou), "d_at": stat(*d_at)}  # fmt: skip

    rows = [
        row("online", 0, 0.70, (0, 0), (0, 0)),
        row("big", 100, 0.70, (0.00, 0.01), (0.5, 1.0)),  # within noise
        row("worse", 10, 0.80, (0.05, 0.02), (-1.0, 2.0)),  # mse interval entirely above 0
        row("blunt", 50, 0.72, (0.01, 0.02), (-3.0, 1.0)),  # mIoU interval entirely below 0
        row("dominated", 120, 0.75, (0.01, 0.02), (0.0, 1.0)),
        row("blurred", 60, 0.69, (-0.01, 0.005), (0.0, 1.0), d_at=(0.005, 0.002)),  # AT interval above 0
    ]
    assert [study.within_noise(r) for r in rows] == [True, True, False, False, True, False]
    assert study.pareto(rows) == ["worse", "blunt", "blurred"]


def test_variants_pair_with_online_and_with_the_fp16_bank_by_seed(study, tmp_path) -> None:
    grid = study.Grid(images=4, heldout=1, eval_draws=1, seeds=(0, 1), distill_steps=1, finetune_iters=1,
                      variants=("online", "k1", "int4"))  # fmt: skip
    plan = study.StudyPlan(out=tmp_path, grid=grid, banks={}, jobs={}, heldout=tmp_path)
    mse = {("online", 0): 0.50, ("online", 1): 0.60, ("k1", 0): 0.52, ("k1", 1): 0.61, ("int4", 0): 0.55,
           ("int4", 1): 0.62}  # fmt: skip
    miou = {("online", 0): 60.0, ("online", 1): 58.0, ("k1", 0): 59.0, ("k1", 1): 58.5, ("int4", 0): 57.0,
            ("int4", 1): 59.5}  # fmt: skip
    at = {("online", 0): 0.10, ("online", 1): 0.12, ("k1", 0): 0.11, ("k1", 1): 0.12, ("int4", 0): 0.13,
          ("int4", 1): 0.125}  # fmt: skip
    results = {key: {"step_s": 1.0, "mIoU": miou[key], "fidelity": {"mse": m, "cos": 0.5, "at": at[key],
               "floor_mse": 0.02}} for key, m in mse.items()}  # fmt: skip
    banks = {name: {"bytes_per_image": 10.0, "encode_s_per_image": 0.01} for name in ("k1", "int4")}
    int4 = study.summarise(plan, banks, results)[2]
    assert int4["d_mse"]["values"] == pytest.approx([0.05, 0.02])  # - online, per seed
    assert int4["d_mse_fp16"]["values"] == pytest.approx([0.03, 0.01])  # - K=1 fp16, per seed
    assert int4["d_mIoU_fp16"]["values"] == pytest.approx([-2.0, 1.0])
    assert int4["d_at"]["values"] == pytest.approx([0.03, 0.005])
    assert int4["d_at_fp16"]["values"] == pytest.approx([0.02, 0.005])
    # AT: mean 0.0125, half-width t(0.975, 1) * std([0.02, 0.005]) / sqrt(2) = 12.706 * 0.0075
    assert "| K=1 int4 | 0.0 kB | +0.0200 ± 0.1271 | +0.0125 ± 0.0953 | -0.50 ± 19.06 |" in "\n".join(
        study.fp16_lines([int4])
    )


def test_every_grid_plans_valid_stage_configs(study, tmp_path) -> None:
    from dreamteacher.schema import load_pipeline

    cfg = load_pipeline(REPO / "pipeline.yaml")
    for grid in study.GRIDS.values():
        plan = study.plan_study(cfg, grid, tmp_path)
        assert set(plan.jobs) == {(v, s) for v in grid.variants for s in grid.seeds}
        rows_per_shard = {name: c.bank.shard_rows // study._views_per_image(study.VARIANTS[name].settings)
                          for name, c in plan.banks.items()}  # fmt: skip
        assert set(rows_per_shard.values()) == {grid.images_per_shard}  # the same data order for every bank


def test_a_subset_replicates_on_other_seeds_with_its_references(study, tmp_path) -> None:
    compact = study.GRIDS["compact"]
    grid = study.subset(compact, "5,6", "compact-budget40,online")
    assert grid.seeds == (5, 6) and grid.variants == ("online", "k1", "compact-budget40")
    assert (grid.images, grid.distill_steps) == (compact.images, compact.distill_steps)  # the same recipe
    assert study.subset(compact, "", "") == compact
    with pytest.raises(ValueError, match=r"--variants: unknown \['nope'\]"):
        study.subset(compact, "", "k1,nope")
    from dreamteacher.schema import load_pipeline

    plan = study.plan_study(load_pipeline(REPO / "pipeline.yaml"), grid, tmp_path)
    assert set(plan.banks) == {"k1", "compact-budget40"}  # online reads k1's pixels
    # the variant's budget survives the pinned base (which zeroes it for every other bank)
    assert plan.banks["compact-budget40"].bank.projection_budget == 0.4
    assert plan.banks["k1"].bank.projection_budget == 0


def test_the_debug_grid_runs_end_to_end_and_reuses_finished_runs(tmp_path) -> None:
    out, report = tmp_path / "study", tmp_path / "report.md"
    command = [sys.executable, str(SCRIPT), "--grid", "debug", "--no-progress", f"--out={out}", f"--report={report}",
               "--workers=1", f"teachers.demo.path={REPO / 'assets/demo-teacher'}"]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"online", "k1", "mean4", "mirror"}
    assert all(math.isfinite(r["mse"]["mean"]) and 0 <= r["mIoU"]["mean"] <= 100 for r in results["rows"])
    assert (
        report.with_suffix(".png")
    ).stat().st_size > 0 and "| fresh online (paper) |" in report.read_text()
    # hand-written findings survive a rewrite; finished runs are read back, not re-run
    report.write_text(report.read_text() + "\nhand-written finding\n")
    stamp = {p: p.stat().st_mtime for p in out.glob("distill/*/study.json")}
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in out.glob("distill/*/study.json")} == stamp
    assert "hand-written finding" in report.read_text()
    # ... and the re-made report keeps the runs' own timings, saying it was re-made
    remade = json.loads((out / "results.json").read_text())["timings"]
    assert remade["total"] == results["timings"]["total"] and remade["remade_s"] > 0
    assert "this report re-made from those finished runs" in report.read_text()
