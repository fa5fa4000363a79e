"""The cache-cost study: does a feature bank match the paper's online encoding, and how little bank is enough?

``make study`` (full grid, about an hour on 2 CPU cores) or ``make study ARGS=--quick`` (about 10 minutes). On the
demo data and teacher, every variant -- fresh online encoding (the paper's procedure), banks of K = 1, 2, 4, 8
single draws, the mean of 8 draws, mirrored flips, each codec, and the compact combination -- distils the same
student with the same recipe, steps and batch, for every seed; a seed fixes the student's initialisation, the
data order (``bank.sampler``: the image order does not depend on the bank's views, every bank has the same images
per shard) and the fine-tuning run, so variants are compared by paired differences against fresh online per seed.

Per variant: held-out feature fidelity (``distill.evaluate``: whitened MSE, cosine and attention-transfer distance
to the teacher's expected features from M fresh draws, on scenes in no bank), few-label mIoU after fine-tuning,
bank bytes per image, encode time per image and distill step time. Output: ``<out>/results.json``, the report
``cache-cost.md`` with its plot ``cache-cost.png`` (``docs/`` for the full grid). Finished banks and runs are
reused on a re-run (banks resume; a job with its ``result.json`` is read back).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the project's packages come from this checkout

from configlib import atomic_write_text  # noqa: E402
from dreamteacher.demo import derive  # noqa: E402
from dreamteacher.resolve import resolve  # noqa: E402
from dreamteacher.schema import PipelineConfig, load_pipeline  # noqa: E402

T_CRIT_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95% Student-t critical values by degrees of freedom (seeds - 1) for the paired intervals."""


@dataclass(frozen=True)
class Variant:
    """One way of getting distill targets: a bank's encode/bank settings, or fresh online encoding."""

    name: str
    label: str
    settings: tuple[str, ...] = ()
    """``encode.*`` / ``bank.*`` overrides of the bank (on top of :data:`BANK_BASE`)."""
    targets: str = "bank"
    bank_of: str = ""
    """``online``: the bank whose pixels the teacher re-encodes (its rows are not read)."""


BANK_BASE = ("encode.flips=both", "encode.store=draws", "bank.codec=fp16", "bank.pixels=rows",
             "bank.pixel_compressor=none", "bank.projection={}", "bank.projection_energy={}",
             "bank.projection_budget=0")  # fmt: skip
"""Every bank setting a variant may change, pinned, so that the variants do not move with pipeline.yaml's defaults."""
COMPACT = ("encode.draws=4", "encode.store=mean", "bank.codec=int4", "bank.pixels=image",
           "bank.pixel_compressor=zstd")  # fmt: skip
"""The shipped defaults' storage (pipeline.yaml): the ``compact`` variant and the base of its PCA variants."""
VARIANTS = {
    v.name: v
    for v in [
        Variant("online", "fresh online (paper)", targets="online", bank_of="k1"),
        Variant("k1", "K=1 fp16", ("encode.draws=1",)),
        Variant("k2", "K=2 fp16", ("encode.draws=2",)),
        Variant("k4", "K=4 fp16", ("encode.draws=4",)),
        Variant("k8", "K=8 fp16", ("encode.draws=8",)),
        Variant("mean4", "mean of 4, fp16", ("encode.draws=4", "encode.store=mean")),
        Variant("mean8", "mean of 8, fp16", ("encode.draws=8", "encode.store=mean")),
        Variant("mirror", "K=1 mirrored flips, fp16", ("encode.draws=1", "encode.flips=mirror")),
        Variant("int8", "K=1 int8", ("encode.draws=1", "bank.codec=int8")),
        Variant("fp8", "K=1 fp8", ("encode.draws=1", "bank.codec=fp8")),
        Variant("int4", "K=1 int4", ("encode.draws=1", "bank.codec=int4")),
        Variant(
            "int4-once",
            "K=1 int4, pixels once (zstd)",
            ("encode.draws=1", "bank.codec=int4", "bank.pixels=image", "bank.pixel_compressor=zstd"),
        ),
        Variant("compact", "mean of 4, int4, pixels once (zstd)", COMPACT),
        Variant(
            "compact-mirror",
            "mean of 4, mirrored, int4, pixels once (zstd)",
            (*COMPACT, "encode.flips=mirror"),
        ),
        Variant(
            "pca",
            "K=1 int4 + PCA k=C/2 per level, pixels once (zstd)",
            (
                "encode.draws=1",
                "bank.codec=int4",
                "bank.projection={s4: 16, s8: 16, s16: 32, s32: 64}",
                "bank.pixels=image",
                "bank.pixel_compressor=zstd",
            ),
        ),
        Variant(
            "compact-pca-half",
            "mean of 4, int4 + PCA k=C/2 per level, pixels once (zstd)",
            (*COMPACT, "bank.projection={s4: 16, s8: 16, s16: 32, s32: 64}"),
        ),
        Variant(
            "compact-pca99",
            "mean of 4, int4 + PCA keeping 99% of the variance per level, pixels once (zstd)",
            (*COMPACT, "bank.projection_energy={s4: 0.99, s8: 0.99, s16: 0.99, s32: 0.99}"),
        ),
        Variant(
            "compact-pca95",
            "mean of 4, int4 + PCA keeping 95% of the variance per level, pixels once (zstd)",
            (*COMPACT, "bank.projection_energy={s4: 0.95, s8: 0.95, s16: 0.95, s32: 0.95}"),
        ),
        Variant(
            "compact-budget40",
            "mean of 4, int4 + PCA in 40% of the values (k per level by the fit), pixels once (zstd)",
            (*COMPACT, "bank.projection_budget=0.4"),
        ),
        Variant(
            "compact-budget25",
            "mean of 4, int4 + PCA in 25% of the values (k per level by the fit), pixels once (zstd)",
            (*COMPACT, "bank.projection_budget=0.25"),
        ),
    ]
}


@dataclass(frozen=True)
class Grid:
    images: int
    """Unlabeled demo scenes in every bank."""
    heldout: int
    """Held-out scenes (in no bank) the fidelity is measured on."""
    eval_draws: int
    """M: fresh draws per held-out image for the teacher's expected features."""
    seeds: tuple[int, ...]
    distill_steps: int
    finetune_iters: int
    variants: tuple[str, ...]
    images_per_shard: int = 16


GRIDS = {
    "full": Grid(images=1000, heldout=64, eval_draws=16, seeds=(0, 1, 2), distill_steps=150, finetune_iters=100,
                 variants=("online", "k1", "k2", "k8", "mean8", "mirror", "int8", "fp8", "int4", "int4-once",
                           "compact", "pca")),
    "quick": Grid(images=200, heldout=16, eval_draws=8, seeds=(0, 1), distill_steps=80, finetune_iters=60,
                  variants=("online", "k1", "k4", "mean4", "mirror", "int4", "compact")),
    # issue 13: PCA on top of the shipped defaults, 5 seeds, against fresh online and the fp16 bank (~45 min)
    "compact": Grid(images=1000, heldout=64, eval_draws=16, seeds=(0, 1, 2, 3, 4), distill_steps=150,
                    finetune_iters=100, variants=("online", "k1", "compact", "compact-pca-half", "compact-pca99",
                                                  "compact-pca95", "compact-budget40", "compact-budget25")),
    # seconds on a CPU: the whole script on toy sizes (tests/test_study.py)
    "debug": Grid(images=40, heldout=2, eval_draws=2, seeds=(0, 1), distill_steps=2, finetune_iters=2,
                  variants=("online", "k1", "mean4", "mirror"), images_per_shard=8),
}  # fmt: skip
FINDINGS_MARKER = "<!-- findings: written by hand below this line; the study script keeps them when it rewrites the file -->"


# ------------------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------------------
@dataclass
class StudyPlan:
    out: Path
    grid: Grid
    banks: dict[str, PipelineConfig]
    """bank name (a variant's) -> its encode config."""
    jobs: dict[tuple[str, int], tuple[PipelineConfig, PipelineConfig]]
    """(variant, seed) -> (distill config, few-label fine-tune config)."""
    heldout: Path
    results: dict[tuple[str, int], dict] = field(default_factory=dict)
    """(variant, seed) -> the job's result, once run."""


def _views_per_image(settings: tuple[str, ...]) -> int:
    values = dict(s.split("=", 1) for s in (*BANK_BASE, *settings))
    draws = 1 if values.get("encode.store") == "mean" else int(values.get("encode.draws", 1))
    return draws * (2 if values["encode.flips"] == "both" else 1)


def plan_study(cfg: PipelineConfig, grid: Grid, out: Path) -> StudyPlan:
    """Every bank's and job's config, validated before any work (unknown keys and bad values fail here)."""
    recipe = cfg.demo.sizes["full"]
    base = derive(cfg, [*recipe.encode, "encode.data=demo", f"encode.teacher={cfg.demo.teacher}",
                        f"datasets.demo.limit={grid.images}"])  # fmt: skip
    banks, jobs = {}, {}
    for name in grid.variants:
        variant = VARIANTS[name]
        bank_name = variant.bank_of or name
        if bank_name not in banks:
            settings = VARIANTS[bank_name].settings
            rows = grid.images_per_shard * _views_per_image(settings)
            banks[bank_name] = derive(base, [*BANK_BASE, *settings, f"bank.shard_rows={rows}",
                                             f"encode.bank={out / 'banks' / f'{bank_name}.zarr'}"])  # fmt: skip
        for seed in grid.seeds:
            exp = f"{name}-seed{seed}"
            dist = derive(banks[bank_name], [
                *recipe.distill, f"distill.bank={banks[bank_name].encode.bank}", f"distill.out={out / 'distill'}",
                f"distill.exp={exp}", f"distill.targets={variant.targets}", f"distill.seed={seed}",
                f"distill.max_steps={grid.distill_steps}",
            ])  # fmt: skip
            backbone = out / "distill" / exp / "backbone.safetensors"
            ft = derive(base, [
                *recipe.fewshot, "finetune.task=fewshot", "finetune.data=demo-fewshot", f"finetune.ckpt={backbone}",
                f"finetune.seed={seed}", f"finetune.out={out / 'finetune'}", f"finetune.exp={exp}",
                f"finetune.segmentation.iters={grid.finetune_iters}",
            ])  # fmt: skip
            jobs[(name, seed)] = (dist, ft)
    return StudyPlan(out=out, grid=grid, banks=banks, jobs=jobs, heldout=out / "heldout")


# ------------------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------------------
def write_heldout(folder: Path, count: int) -> None:
    """Held-out scenes: the unlabeled split's generator past the images the demo dataset holds (in no bank)."""
    from PIL import Image

    from sources.demo_scenes import COUNTS, scene_for

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        file = folder / f"heldout-{i:04d}.png"
        if not file.exists():
            Image.fromarray(scene_for("unlabeled", COUNTS["unlabeled"] + i).image_HW3).save(file)


def encode_banks(plan: StudyPlan, progress: bool) -> dict[str, dict[str, float]]:
    """Encode (or resume / reuse) every bank; bytes per image and encode seconds per image of each."""
    from bank import Bank
    from encode.pipeline import run_encode

    # Equal footing for every bank: the images in the page cache, the teacher loaded (a throwaway encode).
    first = next(iter(plan.banks.values()))
    for file in Path(first.dataset("demo").root).rglob("*"):
        if file.is_file():
            file.read_bytes()
    warmup = derive(first, ["datasets.demo.limit=16", f"encode.bank={plan.out / 'banks' / 'warmup.zarr'}"])
    run_encode(resolve(warmup, "encode"), overwrite=True, use_dask=False, progress=False)
    stats = {}
    for name, cfg in tqdm(
        plan.banks.items(), desc="study 1/3: encode banks", unit="bank", disable=not progress
    ):
        # the time of the call that encoded the whole bank is kept beside it (a re-run finds nothing to do)
        timing_file = Path(cfg.encode.bank).with_suffix(".encode-time.json")
        summary = run_encode(resolve(cfg, "encode"), use_dask=False, progress=False)
        bank = Bank.open(cfg.encode.bank)
        if summary.shards_encoded == bank.spec.num_shards:
            atomic_write_text(timing_file, json.dumps({"wall_seconds": summary.wall_seconds}))
        seconds = json.loads(timing_file.read_text())["wall_seconds"] if timing_file.is_file() else math.nan
        stored = sum(f.stat().st_size for f in Path(bank.path).rglob("*") if f.is_file())
        stats[name] = {
            "bytes_per_image": stored / bank.spec.num_images,
            "encode_s_per_image": seconds / bank.spec.num_images,
            "rows_per_image": bank.spec.views_per_image,
        }
    return stats


def run_job(dist: PipelineConfig, ft: PipelineConfig, heldout: str, eval_draws: int, threads: int) -> dict:
    """Distill -> held-out fidelity -> few-label fine-tune for one (variant, seed); a pool process's entry."""
    import torch

    from distill.evaluate import evaluate_run
    from distill.train import run_distill
    from finetune.run import run_finetune
    from training.metrics import read_metrics

    if threads > 0:
        torch.set_num_threads(threads)
    exp_dir = Path(dist.distill.out) / dist.distill.exp
    result_file = exp_dir / "study.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    # 1. distill (resumes a run that left a checkpoint)
    if not (exp_dir / "backbone.safetensors").is_file():
        run_distill(resolve(dist, "distill"), resume=(exp_dir / "checkpoint.pt").is_file(), progress=False)
    records = read_metrics(exp_dir / "metrics.jsonl")
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    rates = rates[1:] or rates or [math.nan]  # the first window holds the warm-up, unless it is the only one
    # 2. held-out fidelity against the teacher's expected features (the same seeds for every run)
    fidelity = evaluate_run(exp_dir, heldout, dist.teachers, draws=eval_draws, device=dist.distill.device)
    # 3. few-label fine-tuning from the distilled backbone
    ft_dir = Path(ft.finetune.out) / ft.finetune.exp
    metrics = run_finetune(
        resolve(ft, "finetune"), resume=(ft_dir / "checkpoint.pt").is_file(), progress=False
    )
    result = {
        "fidelity": fidelity.summary(),
        "fidelity_levels": fidelity.student,
        "floor_levels": fidelity.floor,
        "mIoU": float(metrics["mIoU"]),
        "step_s": dist.distill.batch_size / statistics.fmean(rates),
        "final_loss": records[-1]["loss"],
    }
    atomic_write_text(result_file, json.dumps(result, indent=2))
    return result


def run_jobs(plan: StudyPlan, workers: int, threads: int, progress: bool) -> dict[tuple[str, int], dict]:
    results: dict[tuple[str, int], dict] = {}
    bar = tqdm(
        total=len(plan.jobs), desc="study 2/3: distill + eval + fine-tune", unit="run", disable=not progress
    )
    bar.set_postfix_str(f"{workers} at once x {threads or 'default'} thread(s)")
    args = {
        key: (d, f, str(plan.heldout), plan.grid.eval_draws, threads) for key, (d, f) in plan.jobs.items()
    }
    if workers == 1:
        for key, job in args.items():
            results[key] = run_job(*job)
            bar.update()
    else:  # fresh interpreters: forking a process that runs torch's thread pools is unsafe
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, *job): key for key, job in args.items()}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    return {key: results[key] for key in plan.jobs}


# ------------------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------------------
def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean, sample std and the 95% Student-t half-width of the mean (nan for one value, or any nan value)."""
    n = len(values)
    if not all(math.isfinite(v) for v in values):
        return {"mean": math.nan, "std": math.nan, "ci95": math.nan, "values": values}
    std = statistics.stdev(values) if n > 1 else math.nan
    half = T_CRIT_95.get(n - 1, 1.96) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": statistics.fmean(values), "std": std, "ci95": half, "values": values}


def summarise(plan: StudyPlan, banks: dict, results: dict) -> list[dict[str, Any]]:
    """One row per variant: means over seeds and paired differences against fresh online (variant - online)."""
    rows = []
    seeds = plan.grid.seeds
    for name in plan.grid.variants:
        variant = VARIANTS[name]
        per_seed = {s: results[(name, s)] for s in seeds}
        row: dict[str, Any] = {"variant": name, "label": variant.label}
        bank = banks[variant.bank_of or name]
        row["bytes_per_image"] = 0.0 if variant.targets == "online" else bank["bytes_per_image"]
        row["encode_ms_per_image"] = (
            math.nan if variant.targets == "online" else 1e3 * bank["encode_s_per_image"]
        )
        row["step_s"] = mean_ci([r["step_s"] for r in per_seed.values()])
        for metric in ("mse", "cos", "at"):
            row[metric] = mean_ci([r["fidelity"][metric] for r in per_seed.values()])
        row["floor_mse"] = statistics.fmean(r["fidelity"]["floor_mse"] for r in per_seed.values())
        row["mIoU"] = mean_ci([r["mIoU"] for r in per_seed.values()])
        for ref_name, suffix in (("online", ""), ("k1", "_fp16")):  # vs fresh online; vs the K=1 fp16 bank
            if ref_name in plan.grid.variants:
                ref = {s: results[(ref_name, s)] for s in seeds}
                for metric in ("mse", "at"):
                    row[f"d_{metric}{suffix}"] = mean_ci(
                        [per_seed[s]["fidelity"][metric] - ref[s]["fidelity"][metric] for s in seeds]
                    )
                row["d_mIoU" + suffix] = mean_ci([per_seed[s]["mIoU"] - ref[s]["mIoU"] for s in seeds])
        rows.append(row)
    return rows


def within_noise(row: dict[str, Any]) -> bool:
    """Not measurably worse than fresh online: each paired 95% interval (held-out mse and attention-transfer
    distance: lower is better; few-label mIoU: higher is better) reaches the no-loss side."""
    d_mse, d_at, d_miou = row.get("d_mse"), row.get("d_at"), row.get("d_mIoU")
    if d_mse is None or row["variant"] == "online":
        return row["variant"] == "online"
    ok_mse = d_mse["mean"] - d_mse["ci95"] <= 0.0
    ok_at = d_at["mean"] - d_at["ci95"] <= 0.0
    ok_miou = d_miou["mean"] + d_miou["ci95"] >= 0.0
    return bool(ok_mse and ok_at and ok_miou)


def _pm(stat: dict[str, float], digits: int, sign: bool = False) -> str:
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    spread = "" if math.isnan(stat["ci95"]) else f" ± {stat['ci95']:.{digits}f}"
    return fmt.format(stat["mean"]) + spread


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | bank bytes / image | encode ms / image | distill s / step | held-out mse | cos | at | "
        "Δmse vs online | Δat vs online | few-label mIoU | ΔmIoU vs online | within noise |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = "(no bank)" if r["bytes_per_image"] == 0 else f"{r['bytes_per_image'] / 1e3:,.1f} kB"
        enc = "" if math.isnan(r["encode_ms_per_image"]) else f"{r['encode_ms_per_image']:.1f}"
        d_mse = _pm(r["d_mse"], 4, True) if "d_mse" in r else ""
        d_at = _pm(r["d_at"], 4, True) if "d_at" in r else ""
        d_miou = _pm(r["d_mIoU"], 2, True) if "d_mIoU" in r else ""
        lines.append(
            f"| {r['label']} | {size} | {enc} | {r['step_s']['mean']:.3f} | {_pm(r['mse'], 4)} | "
            f"{_pm(r['cos'], 4)} | {_pm(r['at'], 4)} | {d_mse} | {d_at} | {_pm(r['mIoU'], 2)} | {d_miou} | "
            f"{'yes' if within_noise(r) else 'no'} |"
        )
    return "\n".join(lines)


def pareto(rows: list[dict[str, Any]]) -> list[str]:
    """Banks no other bank beats on both bytes per image and held-out mse (lower is better on both)."""
    banks = [r for r in rows if r["bytes_per_image"] > 0]
    front = []
    for r in banks:
        dominated = any(
            o["bytes_per_image"] <= r["bytes_per_image"] and o["mse"]["mean"] <= r["mse"]["mean"]
            and (o["bytes_per_image"], o["mse"]["mean"]) != (r["bytes_per_image"], r["mse"]["mean"])
            for o in banks
        )  # fmt: skip
        if not dominated:
            front.append(r["variant"])
    return sorted(front, key=lambda v: next(r["bytes_per_image"] for r in banks if r["variant"] == v))


def plot(rows: list[dict[str, Any]], file: Path) -> None:
    """Paired differences against fresh online (held-out mse, few-label mIoU) against bank bytes per image: the
    per-seed pairing removes the seed-to-seed spread that the absolute figures carry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    banks = [r for r in rows if r["bytes_per_image"] > 0 and "d_mse" in r]
    front = set(pareto(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = ((axes[0], "d_mse", "Δ held-out whitened MSE vs fresh online (lower is better)"),
              (axes[1], "d_mIoU", "Δ few-label mIoU vs fresh online (higher is better)"))  # fmt: skip
    for ax, key, ylabel in panels:
        ax.axhline(0.0, color="tab:green", label="fresh online (paper)")
        for r in banks:
            colour = "tab:red" if r["variant"] in front and key == "d_mse" else "tab:blue"
            yerr = None if math.isnan(r[key]["ci95"]) else r[key]["ci95"]
            x = r["bytes_per_image"] / 1e3
            ax.errorbar(x, r[key]["mean"], yerr=yerr, fmt="o", color=colour, capsize=3)
            ax.annotate(
                r["variant"], (x, r[key]["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
        if key == "d_mse" and front:
            pts = sorted((r["bytes_per_image"] / 1e3, r[key]["mean"]) for r in banks if r["variant"] in front)
            ax.plot(
                *zip(*pts, strict=True), color="tab:red", lw=1, ls="--", label="Pareto front (bytes, mse)"
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bank bytes per image (kB, log)")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Cache cost on the demo: each bank minus fresh online, paired by seed (mean ± 95% interval)")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def machine() -> str:
    import torch
    from timing import cpu_model

    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {cpu}, {cores} CPU cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


METHOD = """\
The question (issue 12): the paper encodes online, because "an offline dataset could only store one or a few
samples from all possible stochastic encodings"; this project encodes once into a bank and reuses it for many
students. What does the bank cost in quality, and how little bank is enough?

**Variants** (each a bank built by `dreamteacher encode` with the settings named, or no bank):
fresh online = `distill.targets=online`, the paper's procedure: every visit of an image draws new noise (seed from
global seed, image key, visit, flip) and the flipped view is the teacher's encoding of the mirrored pixels; K = 1,
2, 4, 8 single draws per image and flip view (`encode.draws`); mean of K (`encode.store=mean`: one row per image
and flip holding the mean of K draws, the MSE optimum's unbiased estimate); mirrored flips (`encode.flips=mirror`:
the unflipped view only, the flipped one read as its mirror on the device); each codec (`bank.codec`); and the
compact combinations. All banks use the same 16 images per shard, so every variant reads the images in the same
order.

**Recipe**, the same for every variant and seed: the demo's full distill recipe (ResNet-18 student, FPN+PPM
regressor 128 channels, whitened MSE + 10 x attention transfer, batch 32, AdamW lr 2e-3) for the grid's steps,
then the demo's few-label fine-tune (UperNet, 30 labelled scenes, mIoU on 100 test scenes). A seed fixes the
student's initialisation, the data order and the fine-tuning run: differences are paired by seed.

**Metrics.** Held-out fidelity (`dreamteacher distill eval`): on scenes that are in no bank, the student +
regressor's prediction against the teacher's *expected* feature, estimated from M fresh draws, whitened per sample
as in the loss: mse (1.0 = predicting zeros), cosine and attention-transfer distance, averaged over the four
levels; the teacher's own noise floor is one draw against the M-draw mean. Few-label mIoU after fine-tuning. Bank
bytes per image (every file of the bank / images), encode time per image, distill time per step.
"""


def write_report(
    out_file: Path, grid_name: str, plan: StudyPlan, rows: list, timings: dict, command: str
) -> None:
    """The report: method, the measured run, the per-level table; hand-written findings after
    :data:`FINDINGS_MARKER` in an existing file are kept."""
    grid = plan.grid
    chosen = [r for r in rows if r["variant"] != "online" and within_noise(r)]
    cheapest = min(chosen, key=lambda r: r["bytes_per_image"]) if chosen else None
    kept = ""
    if out_file.is_file() and FINDINGS_MARKER in out_file.read_text():
        kept = out_file.read_text().split(FINDINGS_MARKER, 1)[1]
    lines = [
        "# The cache-cost study: does a feature bank match fresh online encoding?",
        "",
        f"Written by `benchmarks/study_cache_cost.py` (`{command}`); the findings at the end are written by hand.",
        "",
        METHOD,
        f"## The measured run ({grid_name} grid)",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- wall time: {timings['total'] / 60:.1f} min (encode {timings['encode'] / 60:.1f} min, runs "
        f"{timings['runs'] / 60:.1f} min, {timings['workers']} runs at once x {timings['threads']} thread(s))"
        + (f"; this report re-made from those finished runs in {timings['remade_s']:.0f} s" if "remade_s" in timings
           else ""),
        f"- grid: {grid.images} bank images (demo scenes), {len(grid.seeds)} seeds {list(grid.seeds)}, distill "
        f"{grid.distill_steps} steps, few-label fine-tune {grid.finetune_iters} iterations, held-out fidelity on "
        f"{grid.heldout} scenes x M = {grid.eval_draws} fresh draws",
        "",
        format_table(rows),
        "",
        "Δ = variant - fresh online per seed, mean ± 95% Student-t interval over the seeds. *Within noise*: no "
        "paired interval excludes no loss (mse and attention transfer not higher, mIoU not lower). Encode ms / image: the bank's encode wall "
        "time (in-process, 2 threads, after a warm-up encode) / images. Distill s / step: the runs' own step time, "
        "measured with the runs side by side as stated above.",
        "",
        *fp16_lines(rows),
        "Held-out mse per level (Δ vs fresh online, mean ± 95% interval):",
        "",
        format_level_table(rows, plan, grid),
        "",
        f"Teacher noise floor (one draw against the M-draw mean, whitened mse averaged over levels): "
        f"{statistics.fmean(r['floor_mse'] for r in rows):.4f}.",
        "",
        f"Pareto front (bytes per image against held-out mse, banks only): {', '.join(pareto(rows))}.",
        "",
        (f"Cheapest bank within the noise of fresh online: **{cheapest['label']}** "
         f"({cheapest['bytes_per_image'] / 1e3:,.1f} kB per image)." if cheapest else
         "No bank is within the noise of fresh online on held-out mse, attention transfer and few-label mIoU."),
        "",
        f"![held-out mse and few-label mIoU against bank bytes per image]({out_file.with_suffix('.png').name})",
        "",
        FINDINGS_MARKER,
    ]  # fmt: skip
    atomic_write_text(out_file, "\n".join(lines) + (kept or "\n"))


def fp16_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The paired differences against the K=1 fp16 bank (the issue's "within the noise of an fp16 bank"), when
    the grid has it."""
    paired = [r for r in rows if "d_mse_fp16" in r and r["variant"] not in ("k1", "online")]
    if not paired:
        return []
    lines = ["Paired against the K=1 fp16 bank (variant - K=1 fp16 per seed, mean ± 95% interval):", "",
             "| variant | bank bytes / image | Δmse vs fp16 bank | Δat vs fp16 bank | ΔmIoU vs fp16 bank |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in paired:
        lines.append(f"| {r['label']} | {r['bytes_per_image'] / 1e3:,.1f} kB | {_pm(r['d_mse_fp16'], 4, True)} | "
                     f"{_pm(r['d_at_fp16'], 4, True)} | {_pm(r['d_mIoU_fp16'], 2, True)} |")  # fmt: skip
    return [*lines, ""]


def format_level_table(rows: list[dict[str, Any]], plan: StudyPlan, grid: Grid) -> str:
    results = plan.results
    levels = sorted(next(iter(results.values()))["fidelity_levels"], key=lambda n: int(n[1:]))
    lines = ["| variant | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
    for r in rows:
        if r["variant"] == "online" or "online" not in grid.variants:
            continue
        cells = []
        for level in levels:
            diffs = [results[(r["variant"], s)]["fidelity_levels"][level]["mse"]
                     - results[("online", s)]["fidelity_levels"][level]["mse"] for s in grid.seeds]  # fmt: skip
            cells.append(_pm(mean_ci(diffs), 4, True))
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def subset(grid: Grid, seeds: str, variants: str) -> Grid:
    """``grid`` with ``--seeds`` / ``--variants`` (comma-separated; empty = the grid's): a replication on other
    seeds, or a few variants. ``online`` brings ``k1`` (the bank whose pixels it re-encodes); the references lead,
    as in the grids."""
    if seeds:
        grid = replace(grid, seeds=tuple(int(s) for s in seeds.split(",")))
    if variants:
        names = variants.split(",")
        unknown = sorted(set(names) - set(VARIANTS))
        if unknown:
            raise ValueError(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
        if "online" in names and "k1" not in names:
            names.append("k1")
        first = {"online": 0, "k1": 1}
        grid = replace(grid, variants=tuple(sorted(dict.fromkeys(names), key=lambda n: first.get(n, 2))))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--grid",
        choices=list(GRIDS),
        default="full",
        help="full (~1 h), quick (~10 min), compact (PCA on the defaults, 5 seeds, ~45 min), debug",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the ~10-minute grid (fewer variants, seeds, steps): --grid quick",
    )
    parser.add_argument("--config", default=str(REPO / "pipeline.yaml"))
    parser.add_argument("--out", default="", help="default runs/study/<grid>")
    parser.add_argument(
        "--report",
        default="",
        help="default docs/cache-cost.md (full), docs/cache-cost-compact.md (compact), else <out>/cache-cost.md",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="runs at once; 0 = one per core on CPU, 1 on GPU"
    )
    parser.add_argument(
        "--seeds",
        default="",
        help="comma-separated seeds instead of the grid's (a replication: e.g. 5,6,7,8,9)",
    )
    parser.add_argument(
        "--variants",
        default="",
        help="comma-separated variants instead of the grid's (online needs k1: added)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="KEY.PATH=VALUE overrides of the pipeline config")
    args = parser.parse_args()
    import torch

    started = time.perf_counter()
    grid_name = "quick" if args.quick else args.grid
    grid = GRIDS[grid_name]
    changed = bool(args.seeds or args.variants)  # not the documented grid: its report stays in <out>
    try:
        grid = subset(grid, args.seeds, args.variants)
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out or f"runs/study/{grid_name}{'-subset' if changed else ''}").resolve()
    in_docs = {"full": "cache-cost.md", "compact": "cache-cost-compact.md"}
    report = Path(args.report) if args.report else (REPO / "docs" / in_docs[grid_name] if grid_name in in_docs
                                                    and not changed else out / "cache-cost.md")  # fmt: skip
    cfg = load_pipeline(args.config, args.overrides)
    progress = not args.no_progress
    # 0. every config, validated up front; the held-out scenes and the demo data
    plan = plan_study(cfg, grid, out)
    out.mkdir(parents=True, exist_ok=True)
    from sources.datasets import ensure_available

    for name in ("demo", "demo-fewshot"):
        ensure_available(name, cfg.dataset(name), progress=progress)
    write_heldout(plan.heldout, grid.heldout)
    # 1. banks
    tick = time.perf_counter()
    banks = encode_banks(plan, progress)
    timings: dict[str, Any] = {"encode": time.perf_counter() - tick}
    # 2. runs, side by side on a multi-core CPU (one thread each: the demo's models do not keep two busy)
    on_gpu = torch.cuda.is_available()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = args.workers or (1 if on_gpu else cores)
    threads = 0 if on_gpu else max(1, cores // workers)
    finished = all(
        (Path(d.distill.out) / d.distill.exp / "study.json").is_file() for d, _ in plan.jobs.values()
    )
    tick = time.perf_counter()
    results = plan.results = run_jobs(plan, workers, threads, progress)
    timings.update(runs=time.perf_counter() - tick, workers=workers, threads=threads or "default")
    timings["total"] = time.perf_counter() - started
    previous = out / "results.json"
    if finished and previous.is_file():  # every run read back: the report keeps the runs' own timings
        timings = {**json.loads(previous.read_text())["timings"], "remade_s": timings["total"]}
    # 3. table, plot, report, results.json
    rows = summarise(plan, banks, results)
    command = "make study" + ("" if grid_name == "full" else f" ARGS=--grid={grid_name}")
    report.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, report.with_suffix(".png"))
    write_report(report, grid_name, plan, rows, timings, command)
    payload = {"grid": asdict(grid), "banks": banks, "rows": rows, "timings": timings, "machine": machine(),
               "runs": {f"{v}-seed{s}": r for (v, s), r in results.items()}}  # fmt: skip
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, default=float))
    print(format_table(rows))
    print(f"\nreport: {report}  ({timings['total'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
