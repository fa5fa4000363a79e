"""``run_finetune``: one downstream run, dispatched by ``finetune.task`` (the demo and the CLI call this)."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from configlib import save_resolved, to_dict
from finetune.inputs import FinetuneInputs
from finetune.report import write_json
from sources.datasets import ensure_available
from training.checkpoint import CHECKPOINT_NAME
from training.runtime import seed_everything, setup_runtime, teardown_runtime

# task -> (dataset layout it needs, "module:function" running it)
TASKS: dict[str, tuple[str, str]] = {
    "ade20k": ("ade20k", "finetune.segmentation:run_segmentation"),
    "fewshot": ("fewshot", "finetune.segmentation:run_segmentation"),
    "coco": ("coco", "finetune.detection:run_detection"),
    "imagenet": ("imagefolder", "finetune.classification:run_classification"),
    "linear": ("imagefolder", "finetune.classification:run_classification"),
}


def check_run_folder(out_dir: Path, *, resume: bool, eval_only: bool) -> None:
    """Refuse to start a new run over one that left a checkpoint (it would overwrite it and append to its logs),
    as distill does; ``--resume`` / ``--eval-only`` need the checkpoint. A folder whose run never reached a
    checkpoint is started over (its metrics.jsonl / TensorBoard records are dropped: nothing can resume them)."""
    checkpoint = out_dir / CHECKPOINT_NAME
    if resume or eval_only:
        if not checkpoint.is_file():
            flag = "--resume" if resume else "--eval-only"
            raise FileNotFoundError(
                f"{flag}: no checkpoint at {checkpoint}; run without {flag} to train first"
            )
    elif checkpoint.exists():
        raise ValueError(
            f"{out_dir} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it, --eval-only to "
            "evaluate it, or choose finetune.exp=NEW"
        )


def run_finetune(
    inputs: FinetuneInputs, *, resume: bool = False, eval_only: bool = False, progress: bool = True
) -> dict[str, object]:
    """Fine-tune and evaluate; writes ``<out>/<exp>/`` (config.yaml, results.json, summary.md, predictions.png,
    metrics.jsonl, tb/, checkpoint.pt) and returns the metrics."""
    ft, ds_cfg = inputs.finetune, inputs.dataset
    if ft.task not in TASKS:
        raise ValueError(f"finetune.task={ft.task!r}; choices: {', '.join(TASKS)}")
    layout, target = TASKS[ft.task]
    # 1. Data location and layout check.
    if ds_cfg.layout != layout:
        raise ValueError(
            f"finetune.task={ft.task} needs a dataset with layout {layout!r}, but datasets.{ft.data}.layout is "
            f"{ds_cfg.layout!r}; set finetune.data to a {layout} dataset"
        )
    root = ensure_available(ft.data, ds_cfg)
    # 2. The run folder: a new run never lands on an old one; --resume / --eval-only need its checkpoint.
    out_dir = Path(ft.out) / ft.exp
    check_run_folder(out_dir, resume=resume, eval_only=eval_only)
    # 3. Process setup.
    runtime = setup_runtime(ft.device, key="finetune.device", amp=ft.amp, channels_last=ft.channels_last)
    seed_everything(ft.seed + runtime.rank)

    def on_start() -> None:
        """Called by the task once data, model and checkpoint are built: the resolved config goes beside the
        run before any training, and a run that fails to start leaves no config.yaml (nor folder) behind."""
        if runtime.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(inputs, out_dir)
        runtime.barrier()

    # 4. The task.
    module_name, attr = target.split(":")
    run_task = getattr(importlib.import_module(module_name), attr)
    started = time.perf_counter()
    try:
        metrics = run_task(
            ft,
            root,
            out_dir,
            runtime,
            resume=resume,
            eval_only=eval_only,
            progress=progress,
            on_start=on_start,
        )
    finally:
        teardown_runtime(runtime)
    # 5. Results file.
    metrics["seconds"] = time.perf_counter() - started
    if runtime.is_main:
        write_json(
            out_dir / "results.json",
            {
                "task": ft.task,
                "data": ft.data,
                "backbone": ft.backbone,
                "ckpt": ft.ckpt,
                "seed": ft.seed,
                "metrics": metrics,
                "config": to_dict(ft),
            },
        )
    return metrics
