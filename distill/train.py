"""``run_distill``: one experiment on one bank -- construction, the loop, checkpoints, export.

Folder ``<distill.out>/<distill.exp>/``: ``config.yaml`` (resolved), ``bank.json`` (bank path + fingerprint),
``metrics.jsonl``, ``tb/``, ``checkpoint.pt`` (+ ``rng/rank<r>.pt`` per extra DDP rank), and at the end
``backbone.safetensors``, ``backbone_torchvision.safetensors`` (plain ResNets), ``regressor.safetensors``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from configlib import atomic_write_text, save_resolved
from distill.config import DistillConfig
from distill.export import export_artifacts
from distill.inputs import DistillInputs
from distill.model import DistillNet
from distill.student import STUDENT_STRIDES, build_student
from distill.targets import BankLabels, BankTargets, InterpreterLabels, TeacherTargets
from distill.trainer import LabelFn, StepSettings, Trainer
from training.checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training.metrics import MetricsLog, MetricsWindow
from training.runtime import Runtime, seed_everything, setup_runtime, teardown_runtime

log = logging.getLogger(__name__)

BANK_RECORD = "bank.json"


# ------------------------------------------------------------------------------------------------------------
# Bank checks
# ------------------------------------------------------------------------------------------------------------
def check_bank_fits(bank: Any, dcfg: DistillConfig) -> list[str]:
    """Levels to distill; raises ``ValueError`` with every reason the bank does not fit this run."""
    problems = []
    by_name = {lv.name: lv for lv in bank.levels}
    levels = list(dcfg.levels) or [lv.name for lv in bank.levels]
    missing = [name for name in levels if name not in by_name]
    if missing:
        problems.append(f"distill.levels asks for {missing}, the bank has {sorted(by_name)}")
    for name in levels:
        if name in by_name and by_name[name].stride not in STUDENT_STRIDES:
            problems.append(
                f"bank level {name} has stride {by_name[name].stride}; students have {STUDENT_STRIDES}"
            )
    if bank.spec.image_size % max(STUDENT_STRIDES):
        problems.append(f"bank image size {bank.spec.image_size} is not a multiple of {max(STUDENT_STRIDES)}")
    if problems:
        raise ValueError(f"bank {bank.path} does not fit this run:\n  " + "\n  ".join(problems))
    return levels


def record_bank(exp_dir: Path, bank: Any, *, resume: bool, labels: str = "") -> None:
    """Write ``bank.json``; on resume refuse a bank whose fingerprint differs from the recorded one, or soft
    labels (``labels``: their fingerprint, or the interpreter's sha256 for online labels) that differ."""
    record_path = exp_dir / BANK_RECORD
    record = {"path": str(bank.path), "fingerprint": bank.fingerprint}
    if labels:
        record["labels"] = labels
    if resume and record_path.is_file():
        recorded = json.loads(record_path.read_text())
        if recorded["fingerprint"] != bank.fingerprint:
            raise ValueError(
                f"{exp_dir} was trained on bank {recorded['path']} (fingerprint {recorded['fingerprint'][:12]}), "
                f"but {bank.path} has fingerprint {bank.fingerprint[:12]}: a different bank. Point distill.bank at "
                "the original bank or start a new experiment (distill.exp=...)"
            )
        if recorded.get("labels", "") != labels:
            raise ValueError(
                f"{exp_dir} was trained with soft labels {recorded.get('labels', '(none)')[:12]}, this run has "
                f"{labels[:12] or '(none)'}: different labels (re-written by `dreamteacher interpret`, or "
                "distill.loss.mix changed). Restore them or start a new experiment (distill.exp=...)"
            )
        return
    atomic_write_text(record_path, json.dumps(record, indent=2))


# ------------------------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------------------------
def build_labels(bank: Any, dcfg: DistillConfig, device: torch.device) -> tuple[LabelFn, int, list[str], str]:
    """Mix distillation's soft-label source: (label fn, classes, the teacher levels it reads, its identity).

    ``targets=bank`` reads the bank's soft labels (complete, or a one-line error naming ``dreamteacher
    interpret``); online / replay targets run the interpreter on the fresh features, checked against the sha256
    the bank's soft labels record when it holds any (the labels a bank run of the same config would read)."""
    if dcfg.targets == "bank":
        spec = bank.require_labels()
        return BankLabels(device), spec.num_classes, [], spec.fingerprint(bank.fingerprint)
    recorded = bank.labels.interpreter.get("sha256", "") if bank.labels is not None else ""
    labels = InterpreterLabels(dcfg.loss.interpreter, device, sha256=recorded)
    return labels, labels.model.cfg.num_classes, labels.levels, labels.sha256


def build_schedule(
    optimizer: torch.optim.Optimizer, dcfg: DistillConfig, steps_per_epoch: int
) -> tuple[Any, int]:
    """Per-step cosine with linear warm-up (timm's CosineLRScheduler, stepped by update count)."""
    total = dcfg.max_steps or max(1, math.ceil(dcfg.optim.epochs * steps_per_epoch))
    warmup = min(int(dcfg.optim.warmup_epochs * steps_per_epoch), total - 1)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total,
        lr_min=dcfg.optim.min_lr,
        warmup_t=warmup,
        warmup_lr_init=dcfg.optim.warmup_lr,
        t_in_epochs=False,
    )
    scheduler.step_update(0)
    return scheduler, total


def build_optimizer(net: torch.nn.Module, dcfg: DistillConfig) -> torch.optim.Optimizer:
    """AdamW or LAMB from timm; norms and biases (1-D parameters) get no weight decay.

    timm's ``adamw`` is torch's AdamW; it gets the fused kernel (one pass over all tensors, ~4x faster than the
    per-tensor loop torch defaults to on CPU). timm's LAMB has no fused form.
    """
    o = dcfg.optim
    extra = {}
    if o.name == "adamw" and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in net.parameters()
    ):
        extra["fused"] = True
    return create_optimizer_v2(
        net,
        opt=o.name,
        lr=o.lr,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        filter_bias_and_bn=True,
        **extra,
    )


# ------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------
def run_distill(inputs: DistillInputs, *, resume: bool = False, progress: bool = True) -> Path:
    """Train ``inputs.distill.student`` on the bank's targets; returns the experiment folder."""
    dcfg = inputs.distill
    runtime = setup_runtime(
        dcfg.device,
        key="distill.device",
        amp=dcfg.amp,
        channels_last=dcfg.channels_last,
        amp_dtype=dcfg.amp_dtype,
    )
    try:
        return _run(inputs, runtime, resume=resume, progress=progress)
    finally:
        teardown_runtime(runtime)


def _run(inputs: DistillInputs, runtime: Runtime, *, resume: bool, progress: bool) -> Path:
    """The run proper, numbered steps; :func:`run_distill` owns the process group around it."""
    from bank import Bank, make_loader

    dcfg = inputs.distill
    exp_dir = Path(dcfg.out) / dcfg.exp
    seed_everything(dcfg.seed)

    # 1. open the bank read-only and check it fits the run
    bank = Bank.open(dcfg.bank)
    levels = check_bank_fits(bank, dcfg)
    ckpt_path = exp_dir / CHECKPOINT_NAME
    if not resume and ckpt_path.exists():
        raise ValueError(
            f"{exp_dir} already holds a run; pass --resume to continue it or choose distill.exp=NEW"
        )
    # mix distillation: the soft labels' source, its class count and the teacher levels the interpreter reads
    labels, num_classes, label_levels, labels_id = (
        build_labels(bank, dcfg, runtime.device) if dcfg.loss.mix else (None, 0, [], "")
    )
    if runtime.is_main:
        exp_dir.mkdir(parents=True, exist_ok=True)
        record_bank(exp_dir, bank, resume=resume, labels=labels_id)
        save_resolved(inputs, exp_dir)
    runtime.barrier()
    if resume and runtime.distributed and not runtime.is_main:
        record_bank(exp_dir, bank, resume=True, labels=labels_id)  # every rank refuses a different bank

    # 2. data: this rank's share of every epoch; teacher targets (online / replay) read only pixels + noise info
    if dcfg.batch_size % (runtime.world_size * dcfg.accum_steps):
        raise ValueError(
            f"distill.batch_size={dcfg.batch_size} is not divisible by {runtime.world_size} ranks x "
            f"distill.accum_steps={dcfg.accum_steps}"
        )
    loader, sampler = make_loader(
        bank.path,
        dcfg.batch_size // runtime.world_size,
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=dcfg.seed,
        num_workers=dcfg.num_workers,
        draw=dcfg.draw,
        flip=dcfg.flip,
        pin_memory=runtime.device.type == "cuda",
        levels=levels if dcfg.targets == "bank" else [],
        verify_chunks=dcfg.verify_chunks,
        labels=labels is not None and dcfg.targets == "bank",
    )
    if len(sampler) == 0:
        raise ValueError(
            f"the bank has fewer usable images per rank ({sampler.images_per_rank}) than the per-rank "
            f"batch size ({dcfg.batch_size // runtime.world_size}); lower distill.batch_size"
        )
    targets = (
        BankTargets(runtime.device, levels, bank.projections)
        if dcfg.targets == "bank"
        else TeacherTargets(
            bank,
            inputs.teachers,
            levels + [name for name in label_levels if name not in levels],  # + the interpreter's inputs
            runtime.device,
            fresh=dcfg.targets == "online",
            seed=dcfg.seed,
        )
    )

    # 3. model, optimizer, schedule
    student = build_student(dcfg.student.name, dcfg.student.weights)
    teacher_channels = {lv.name: lv.channels for lv in bank.levels if lv.name in levels}
    net = DistillNet(
        student,
        teacher_channels,
        channels=dcfg.regressor.channels,
        pool_scales=dcfg.regressor.pool_scales,
        num_classes=num_classes,
    ).to(runtime.device)
    if runtime.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if runtime.sync_batchnorm:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    optimizer = build_optimizer(net, dcfg)
    scheduler, total_steps = build_schedule(optimizer, dcfg, len(sampler))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
    model = runtime.wrap(net)
    if dcfg.compile:
        model = torch.compile(model)
    settings = StepSettings(
        whiten=dcfg.loss.whiten,
        at_weight=dcfg.loss.at_weight,
        label_weight=dcfg.loss.label_weight,
        label_temperature=dcfg.loss.label_temperature,
        grad_clip=dcfg.optim.grad_clip,
        accum_steps=dcfg.accum_steps,
    )
    trainer = Trainer(
        model, net, optimizer, scheduler, targets, settings, runtime, scaler=scaler, labels=labels
    )

    # 4. resume: model, optimizer, scheduler, scaler, sampler position, RNG, the metrics window
    epoch, batches_done = 0, 0
    window = MetricsWindow()
    if resume:
        state = load_checkpoint(ckpt_path)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        epoch, batches_done, trainer.step = (
            int(state["sampler"]["epoch"]),
            int(state["sampler"]["batches_done"]),
            int(state["step"]),
        )
        own = state if runtime.is_main else load_checkpoint(exp_dir / "rng" / f"rank{runtime.rank}.pt")
        set_rng_state(own["rng"])
        window.load_state_dict(own["window"])
        log.info("resumed %s at step %d (epoch %d, batch %d)", exp_dir, trainer.step, epoch, batches_done)
    else:
        sampler.set_epoch(0)

    def checkpoint() -> None:
        sampler_state = sampler.state_dict(batches_done=batches_done)
        sampler_state["epoch"] = epoch
        if not runtime.is_main:  # each rank's own RNG and metrics window
            save_checkpoint(
                exp_dir / "rng" / f"rank{runtime.rank}.pt",
                {"rng": rng_state(), "window": window.state_dict()},
            )
            return
        save_checkpoint(
            ckpt_path,
            {
                "step": trainer.step,
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "sampler": sampler_state,
                "rng": rng_state(),
                "window": window.state_dict(),
                "bank_fingerprint": bank.fingerprint,
            },
        )

    # 5. the loop: epochs of the bank sampler until total_steps
    # drops records after the start step: written by a run that died after its checkpoint (or before its first)
    metrics = MetricsLog(exp_dir, enabled=runtime.is_main, resume_from=trainer.step)
    bar = tqdm(
        total=total_steps, initial=trainer.step, disable=not (progress and runtime.is_main), desc="distill"
    )
    # timing (data wait, throughput) covers the steps of this session only; the loss window spans sessions
    timed_steps, wait_s, window_start = 0, 0.0, time.perf_counter()
    audit = None
    if dcfg.audit_rows:
        (exp_dir / "rows").mkdir(parents=True, exist_ok=True)
        audit = (exp_dir / "rows" / f"rank{runtime.rank}.txt").open("a")
    stop_at = min(dcfg.stop_at_step or total_steps, total_steps)
    batch_iter = iter(loader)
    while trainer.step < stop_at:
        fetch_start = time.perf_counter()
        batch = next(batch_iter, None)
        if batch is None:  # the epoch ran out: next epoch
            epoch, batches_done = epoch + 1, 0
            sampler.set_epoch(epoch)
            batch_iter = iter(loader)
            continue
        wait_s += time.perf_counter() - fetch_start
        targets.set_epoch(epoch)  # fresh online noise is a function of the visit
        trainer.train_step(batch)
        batches_done += 1
        if audit is not None:
            audit.write(" ".join(str(int(r)) for r in batch["row"]) + "\n")
        bar.update(1)
        timed_steps += 1
        log_now = trainer.step % dcfg.log_every == 0 or trainer.step == total_steps
        if log_now or trainer.step % dcfg.checkpoint_every == 0 or trainer.step >= stop_at:
            for values in trainer.flush():  # the window's one host sync (raises for a non-finite step)
                window.add(values)
        # records at log boundaries and at the schedule's end, never at a session's stop_at_step: a stopped
        # session's partial window goes into the checkpoint, so a resumed run logs what an uninterrupted one does
        if log_now:
            elapsed = time.perf_counter() - window_start
            record = runtime.mean_over_ranks(window.mean())
            record.update(
                epoch=epoch,
                data_wait_frac=wait_s / elapsed,
                images_per_s=timed_steps * dcfg.batch_size / elapsed,
            )
            metrics.log(trainer.step, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", at=f"{record['at']:.4f}")
            window.reset()
            timed_steps, wait_s, window_start = 0, 0.0, time.perf_counter()
        if trainer.step % dcfg.checkpoint_every == 0 and trainer.step < stop_at:
            checkpoint()
    bar.close()
    if audit is not None:
        audit.close()

    # 6. final checkpoint; artifacts once the schedule is complete
    checkpoint()
    metrics.close()
    if runtime.is_main and trainer.step >= total_steps:
        meta = {"bank_fingerprint": bank.fingerprint, "steps": str(trainer.step), "exp": dcfg.exp}
        export_artifacts(net, exp_dir, meta)
    runtime.barrier()
    return exp_dir
