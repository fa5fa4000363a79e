"""``make demo``: the whole method on built-in data, and whether it helped.

Steps (each stage is called in-process through its public function, with a modified copy of the pipeline config):

1. data      generate the demo scenes (unlabeled pool, few-label split, COCO split) on first use;
2. encode    the shipped demo teacher encodes the unlabeled images into a feature bank;
3. interpret the feature interpreter learns the few-label train split from the teacher's features (its own test
             mIoU is reported) and writes its soft labels for every bank row into the bank;
4. distill   a small student (+ FPN/PPM regressor) learns to reproduce the teacher's features from the bank, and
             a second one the features and the soft labels together (mix distillation);
5. finetune  few-label semantic segmentation and COCO-style instance segmentation, each from the distilled
             backbone AND from random init with the same budget, over ``demo.seeds`` (few-label also from the
             mix-distilled backbone);
6. probe     teacher diagnostic: linear-probe mIoU of teacher vs random-teacher vs pixel features;
7. report    results table (mean +- std over seeds), ``<out>/report.md`` with PNGs, ``<out>/results.json``.

Re-running reuses what is finished (the bank, the distilled student, finished fine-tuning runs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from configlib import apply_overrides, atomic_write_text, from_mapping, save_resolved, to_dict
from dreamteacher.resolve import resolve
from dreamteacher.schema import DemoConfig, DemoSizeConfig, PipelineConfig
from sources.datasets import ensure_available

DEMO_DATASETS = ("demo", "demo-fewshot", "demo-coco")
INITS = ("distilled", "mix", "random")
"""Backbone inits: feature-distilled, mix-distilled (features + soft labels; few-label task only), random."""
INIT_LABELS = {"distilled": "distilled", "mix": "mix-distilled", "random": "random init"}
MIX_TASKS = ("fewshot",)
"""Tasks fine-tuned from the mix-distilled backbone too (the results table's mix column)."""
# task -> (dataset, headline metrics of the results table: (metric key, label))
TASKS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "fewshot": ("demo-fewshot", (("mIoU", "few-label seg mIoU"),)),
    "coco": ("demo-coco", (("segm_AP", "instance seg mask AP"), ("bbox_AP", "instance seg box AP"))),
}


def derive(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A copy of ``cfg`` with ``KEY.PATH=VALUE`` overrides applied and validated (unknown keys are errors)."""
    return from_mapping(PipelineConfig, apply_overrides(to_dict(cfg), overrides))


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Every stage's config, built and validated before any work starts."""

    out: Path
    encode: PipelineConfig
    interpret: PipelineConfig
    distill: PipelineConfig
    mix_distill: PipelineConfig
    finetune: dict[tuple[str, str, int], PipelineConfig]
    """(task, init, seed) -> config."""
    backbones: dict[str, Path]
    """init -> the distilled backbone its runs start from (``distilled``, ``mix``)."""

    @property
    def backbone(self) -> Path:
        """The feature-distilled backbone."""
        return self.backbones["distilled"]


def plan_demo(cfg: PipelineConfig, size: str) -> DemoPlan:
    if size not in cfg.demo.sizes:
        raise ValueError(f"demo.size={size!r}; choices: {', '.join(cfg.demo.sizes)}")
    recipe: DemoSizeConfig = cfg.demo.sizes[size]
    out = Path(cfg.demo.out)
    bank = out / f"bank-{size}.zarr"
    enc = derive(
        cfg, [*recipe.encode, "encode.data=demo", f"encode.teacher={cfg.demo.teacher}", f"encode.bank={bank}"]
    )
    interp = derive(enc, [*recipe.interpret, "interpret.data=demo-fewshot", f"interpret.bank={bank}",
                          f"interpret.out={out / 'interpret'}", f"interpret.exp=interpreter-{size}"])  # fmt: skip
    dist = derive(interp, [*recipe.distill, f"distill.bank={bank}", f"distill.out={out / 'distill'}",
                           f"distill.exp=student-{size}"])  # fmt: skip
    mix = derive(dist, [*recipe.mix, "distill.loss.mix=true", f"distill.exp=student-{size}-mix"])
    backbones = {
        init: out / "distill" / cfg.distill.exp / "backbone.safetensors"
        for init, cfg in (("distilled", dist), ("mix", mix))
    }
    seeds = cfg.demo.seeds[: recipe.num_seeds] if recipe.num_seeds else cfg.demo.seeds
    if not seeds:
        raise ValueError("demo.seeds is empty; the demo needs at least one fine-tuning seed")
    finetune = {}
    for task, (data, _) in TASKS.items():
        task_overrides = recipe.fewshot if task == "fewshot" else recipe.coco
        for init in INITS:
            if init == "mix" and task not in MIX_TASKS:
                continue
            for seed in seeds:
                finetune[(task, init, seed)] = derive(enc, [
                    *task_overrides, f"finetune.task={task}", f"finetune.data={data}",
                    f"finetune.ckpt={backbones.get(init, '')}", f"finetune.seed={seed}",
                    f"finetune.out={out / 'finetune'}", f"finetune.exp={size}-{task}-{init}-seed{seed}",
                ])  # fmt: skip
    students = {c.finetune.backbone for c in finetune.values()}
    if students != {dist.distill.student.name}:
        raise ValueError(
            f"the demo fine-tunes backbones {sorted(students)} but distills {dist.distill.student.name!r}; "
            f"set finetune.backbone and distill.student.name to the same timm model in demo.sizes.{size}"
        )
    return DemoPlan(out=out, encode=enc, interpret=interp, distill=dist, mix_distill=mix, finetune=finetune,
                    backbones=backbones)  # fmt: skip


def _finished(folder: Path) -> dict[str, Any] | None:
    results = folder / "results.json"
    return json.loads(results.read_text())["metrics"] if results.is_file() else None


def _mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample std (0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"values": values, "mean": statistics.fmean(values), "std": std}


def summarise(runs: dict[tuple[str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Results table rows: per task metric and init, mean and std over seeds; and the paired differences.

    A seed fixes the head's initialisation and the data order for every init, so distilled - random per seed
    is the paired effect of distillation (``delta``), mix - random that of mix distillation (``delta_mix``),
    mix - distilled what the soft labels add (``delta_mix_vs_distilled``); each std is over seeds. An init a
    task was not fine-tuned from is None.
    """
    rows = []
    for task, (_, metrics) in TASKS.items():
        for key, label in metrics:
            row: dict[str, Any] = {"task": task, "metric": key, "label": label}
            per_seed = {
                init: {s: float(m[key]) for (t, i, s), m in runs.items() if t == task and i == init}
                for init in INITS
            }
            for init in INITS:
                values = [v for _, v in sorted(per_seed[init].items())]
                row[init] = _mean_std(values) if values else None
            for name, (a, b) in {"delta": ("distilled", "random"), "delta_mix": ("mix", "random"),
                                 "delta_mix_vs_distilled": ("mix", "distilled")}.items():  # fmt: skip
                paired = sorted(per_seed[a].keys() & per_seed[b].keys())
                diffs = _mean_std([per_seed[a][s] - per_seed[b][s] for s in paired]) if paired else None
                row[name] = diffs["mean"] if diffs else None
                row[f"{name}_std"] = diffs["std"] if diffs else None
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], seeds: int) -> str:
    cols = [INIT_LABELS[init] for init in INITS]
    deltas = ("delta distilled", "delta mix", "mix - distilled")
    head = f"{'metric':<26}" + "".join(f" {c:>16}" for c in (*cols, *deltas))
    lines = [f"Results over {seeds} seed(s) (mean +- std; delta = init - random init, paired by seed; "
             "mix - distilled: what the soft labels add):", head, "-" * len(head)]  # fmt: skip

    def cell(mean: float | None, std: float | None, sign: str = "") -> str:
        return f" {'n/a':>16}" if mean is None else f" {mean:>{sign}7.2f} +- {std:<5.2f}"

    for r in rows:
        inits = "".join(cell(*((r[i]["mean"], r[i]["std"]) if r[i] else (None, None))) for i in INITS)
        paired = "".join(
            cell(r[d], r[f"{d}_std"], "+") for d in ("delta", "delta_mix", "delta_mix_vs_distilled")
        )
        lines.append(f"{r['label']:<26}{inits}{paired}".rstrip())
    return "\n".join(lines)


def distill_job(cfg: PipelineConfig, threads: int, progress: bool = False) -> None:
    """One distill run (resumed when it left a checkpoint); also the entry point of a pool process."""
    import torch

    from distill.train import run_distill

    if threads > 0:
        torch.set_num_threads(threads)
    folder = Path(cfg.distill.out) / cfg.distill.exp
    run_distill(resolve(cfg, "distill"), resume=(folder / "checkpoint.pt").is_file(), progress=progress)


def finetune_job(cfg: PipelineConfig, threads: int, progress: bool = False) -> dict[str, Any]:
    """One fine-tuning run (resumed when it left a checkpoint); also the entry point of a pool process."""
    import torch

    from finetune.run import run_finetune

    if threads > 0:
        torch.set_num_threads(threads)
    folder = Path(cfg.finetune.out) / cfg.finetune.exp
    return run_finetune(
        resolve(cfg, "finetune"), resume=(folder / "checkpoint.pt").is_file(), progress=progress
    )


def side_by_side(
    run_one: Callable[..., Any],
    cfgs: dict[Any, PipelineConfig],
    demo: DemoConfig,
    device: str,
    *,
    desc: str,
    progress: bool = True,
) -> dict[Any, Any]:
    """``run_one(cfg, threads)`` for every config, :func:`parallel_runs` at once; ``{key: result}``."""
    if not cfgs:
        return {}
    workers, threads = parallel_runs(demo, device, len(cfgs))
    bar = tqdm(total=len(cfgs), desc=desc, unit="run", disable=not progress)
    bar.set_postfix_str(f"{workers} at once x {threads or 'default'} thread(s)")
    results = {}
    if workers == 1:
        for key, cfg in cfgs.items():
            results[key] = run_one(cfg, threads, progress)
            bar.update()
    else:
        # Fresh interpreters (spawn): forking a process that already runs torch's thread pools is unsafe.
        # The runs' own step bars are off here (several would overwrite each other); this bar counts runs.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        with pool:
            futures = {pool.submit(run_one, cfg, threads): key for key, cfg in cfgs.items()}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    return results


def parallel_runs(demo: DemoConfig, device: str, pending: int) -> tuple[int, int]:
    """(runs at once, torch threads per run) for ``pending`` fine-tuning runs on ``device``.

    On CPU the default is one run per core, one thread each: the demo's models are too small to keep two threads
    busy, and torchvision's CPU RoIAlign is single-threaded (measured on 2 cores: two 1-thread Mask R-CNN runs side
    by side finish in 63 s, one after the other with 2 threads in 112 s). With CUDA the runs share the GPU in turn.
    """
    import torch

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = demo.parallel_runs or (1 if on_gpu else cores)
    workers = max(1, min(workers, pending))
    threads = demo.cpu_threads or (0 if on_gpu else max(1, cores // workers))
    return workers, threads


def finetune_all(
    finetunes: dict[Any, PipelineConfig],
    demo: DemoConfig,
    *,
    desc: str = "demo 5/5: fine-tune",
    progress: bool = True,
) -> dict[Any, Any]:
    """Every fine-tuning run of ``finetunes`` (the plan's, by (task, init, seed)), side by side; finished runs
    (with a ``results.json``) are read back."""
    runs: dict[Any, dict[str, Any]] = {}
    pending = {}
    for key, ft_cfg in finetunes.items():
        metrics = _finished(Path(ft_cfg.finetune.out) / ft_cfg.finetune.exp)
        if metrics is None:
            pending[key] = ft_cfg
        else:
            runs[key] = metrics
    if pending:
        device = next(iter(pending.values())).finetune.device
        runs |= side_by_side(finetune_job, pending, demo, device, desc=desc, progress=progress)
    return {key: runs[key] for key in finetunes}


def run_demo(cfg: PipelineConfig, size: str = "full", *, progress: bool = True) -> dict[str, Any]:
    """Run the demo end to end; returns the results (also written to ``<demo.out>/results.json``)."""
    import torch

    from dreamteacher.probe import run_probe
    from dreamteacher.report import ReportInputs, write_report
    from encode.pipeline import run_encode
    from interpret.run import run_interpret

    started = time.perf_counter()
    timings: dict[str, float] = {}
    if cfg.demo.cpu_threads > 0:
        torch.set_num_threads(cfg.demo.cpu_threads)
    # 0. Every stage's config, validated up front; the resolved config goes into the run folder.
    plan = plan_demo(cfg, size)
    plan.out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, plan.out)
    teacher_path = Path(cfg.teacher(cfg.demo.teacher).path)
    if not (teacher_path / "unet").is_dir():
        raise FileNotFoundError(
            f"demo teacher {teacher_path} has no unet/ folder; it ships with the repository (assets/demo-teacher) "
            f"or can be retrained with `make teacher DATA=demo` and teachers.{cfg.demo.teacher}.path set to "
            f"<teacher_train.out>/pipeline"
        )

    # 1. Data (generated on first use).
    tick = time.perf_counter()
    for name in tqdm(DEMO_DATASETS, desc="demo 1/5: data", disable=not progress):
        ensure_available(name, plan.encode.dataset(name), progress=progress)
    timings["data"] = time.perf_counter() - tick

    # 2. Encode the unlabeled images with the teacher into the bank (resumes / no-op when done).
    tick = time.perf_counter()
    click.echo("demo 2/5: encode (teacher -> feature bank)")
    encode_inputs = resolve(plan.encode, "encode")
    encode_summary = run_encode(encode_inputs, use_dask=cfg.demo.use_dask, progress=progress)
    timings["encode"] = time.perf_counter() - tick

    # 3. The feature interpreter: trained on the few-label train split (re-used when done), its soft labels
    #    written into the bank (resumes).
    tick = time.perf_counter()
    click.echo("demo 3/5: interpret (few labels -> interpreter -> soft labels in the bank)")
    interpreter = run_interpret(resolve(plan.interpret, "interpret"), progress=progress)
    timings["interpret"] = time.perf_counter() - tick

    # 4. Distill the students from the bank: features only, and features + soft labels (mix), side by side like
    #    the fine-tuning runs; each is reused when its backbone was already exported.
    tick = time.perf_counter()
    click.echo("demo 4/5: distill (bank -> student; bank + soft labels -> mix-distilled student)")
    pending = {
        init: stage_cfg
        for init, stage_cfg in (("distilled", plan.distill), ("mix", plan.mix_distill))
        if not plan.backbones[init].is_file()
    }
    side_by_side(distill_job, pending, cfg.demo, plan.distill.distill.device, desc="demo 4/5: distill",
                 progress=progress)  # fmt: skip
    exp_dir = plan.backbone.parent
    timings["distill"] = time.perf_counter() - tick

    # 5. Fine-tune every init over the seeds (finished runs are reused; several at once on a multi-core CPU).
    tick = time.perf_counter()
    runs = finetune_all(plan.finetune, cfg.demo, progress=progress)
    timings["finetune"] = time.perf_counter() - tick

    # 6. Teacher diagnostic: linear probes of teacher / random-teacher / pixel features on the few-label split.
    tick = time.perf_counter()
    fewshot = TASKS["fewshot"][0]
    probe = run_probe(encode_inputs, fewshot, plan.encode.dataset(fewshot))
    timings["probe"] = time.perf_counter() - tick

    # 7. Table, results file, report.
    rows = summarise(runs)
    seeds = len({seed for _, _, seed in runs})
    table = format_table(rows, seeds)
    for row in rows:
        for init in INITS:
            if row[init] is not None and not all(math.isfinite(v) for v in row[init]["values"]):
                raise FloatingPointError(
                    f"demo: non-finite {row['metric']} for {init} init: {row[init]['values']}"
                )
    timings["total"] = time.perf_counter() - started
    results = {
        "size": size,
        "seeds": seeds,
        "table": rows,
        "runs": [{"task": t, "init": i, "seed": s, "metrics": m} for (t, i, s), m in sorted(runs.items())],
        "teacher_probe_mIoU": probe,
        "interpreter": {k: interpreter[k] for k in ("mIoU", "mAcc", "sha256", "train_images", "test_images")},
        "encode": {k: v for k, v in encode_summary.as_dict().items() if k != "rejects"},
        "timings_s": timings,
    }
    atomic_write_text(plan.out / "results.json", json.dumps(results, indent=2, default=float))
    dcfg = plan.distill.distill
    report_inputs = ReportInputs(
        out=plan.out,
        bank=Path(dcfg.bank),
        distill_dir=exp_dir,
        student=dcfg.student.name,
        regressor_channels=dcfg.regressor.channels,
        pool_scales=list(dcfg.regressor.pool_scales),
        whiten=dcfg.loss.whiten,
        levels=list(dcfg.levels),
        finetune_dirs={key: Path(c.finetune.out) / c.finetune.exp for key, c in plan.finetune.items()},
        coco_root=Path(plan.encode.dataset(TASKS["coco"][0]).root),
        teacher_dir=teacher_path,
    )
    report = write_report(report_inputs, results, table)
    click.echo("\n" + table)
    click.echo(f"\nreport: {report}  ({timings['total']:.0f} s)")
    return results
