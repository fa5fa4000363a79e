"""Teacher stage: train an unconditional DDPM (diffusers UNet2DModel + DDPMScheduler) on unlabeled images.

This is how a user with domain data and no public diffusion model gets a teacher (the paper trained its own ADM
on BDD100K). Output folder ``<out>/``::

    config.yaml       resolved pipeline config
    checkpoint.pt     model + EMA + optimiser + LR schedule + step (atomic; ``resume=True`` continues from it)
    metrics.jsonl     one line per ``log_every`` steps: step, loss, lr, images/s (``tb/``: the same in TensorBoard)
    samples.png       DDIM samples from the EMA weights (written at the end)
    pipeline/         ``DDPMPipeline.save_pretrained``: model_index.json, unet/, scheduler/ (what encode loads)

Randomness is a pure function of (seed, step): each step's batch is its slice of seeded epoch permutations
(``training.sampler.StepBatchSampler``) and its flips, timesteps and noise come from its own generator, so a
resumed run repeats exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm import tqdm

from configlib import atomic_write_text, save_resolved
from sources.images import ImageDataset, list_images, to_model_range
from teacher_training.config import TeacherTrainConfig
from teacher_training.inputs import TeacherTrainInputs
from training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from training.deferred import DeferredTerms
from training.metrics import MetricsLog, MetricsWindow
from training.runtime import resolve_device
from training.sampler import StepBatchSampler

CHECKPOINT = CHECKPOINT_NAME


# ----------------------------------------------------------------------------------------------------------
# Model and schedule
# ----------------------------------------------------------------------------------------------------------
def build_unet(tc: TeacherTrainConfig) -> UNet2DModel:
    """UNet2DModel with one resolution level per ``block_out_channels`` entry; attention at ``attention_levels``."""
    levels = len(tc.block_out_channels)
    bad = [i for i in tc.attention_levels if not 0 <= i < levels]
    if bad:
        raise ValueError(
            f"teacher_train.attention_levels {bad} outside 0..{levels - 1} (one per block_out_channels)"
        )
    if tc.resolution % 2 ** (levels - 1):
        raise ValueError(
            f"teacher_train.resolution {tc.resolution} is not divisible by 2**{levels - 1} "
            f"({levels} levels in block_out_channels)"
        )
    down = [("AttnDownBlock2D" if i in tc.attention_levels else "DownBlock2D") for i in range(levels)]
    up = [("AttnUpBlock2D" if i in tc.attention_levels else "UpBlock2D") for i in reversed(range(levels))]
    return UNet2DModel(
        sample_size=tc.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(tc.block_out_channels),
        layers_per_block=tc.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        attention_head_dim=tc.attention_head_dim,
        norm_num_groups=tc.norm_num_groups,
    )


def build_scheduler(tc: TeacherTrainConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=tc.num_train_timesteps, beta_schedule=tc.beta_schedule, prediction_type="epsilon"
    )


# ----------------------------------------------------------------------------------------------------------
# Data (image listing and preprocessing: sources.images, shared with encode)
# ----------------------------------------------------------------------------------------------------------
def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator that owns all randomness of one training step (makes resume exact)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ----------------------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------------------
def diffusion_loss(
    unet: UNet2DModel, scheduler: DDPMScheduler, images_B3HW: torch.Tensor, gen: torch.Generator, amp: bool
) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps; random horizontal flips. Images in [-1, 1]."""
    batch = images_B3HW.shape[0]
    # Draw on CPU from the step's generator, then move: identical numbers on every device.
    flip_B = torch.rand(batch, generator=gen) < 0.5
    t_B = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
    noise_B3HW = torch.randn(images_B3HW.shape, generator=gen)
    device = images_B3HW.device
    x0 = torch.where(flip_B.to(device)[:, None, None, None], images_B3HW.flip(-1), images_B3HW)
    noise_B3HW, t_B = noise_B3HW.to(device), t_B.to(device)
    x_t = scheduler.add_noise(x0, noise_B3HW, t_B)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        eps_pred = unet(x_t, t_B).sample
    return F.mse_loss(eps_pred.float(), noise_B3HW)


@dataclasses.dataclass
class TrainState:
    unet: UNet2DModel
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    step: int = 0


def train_step(state: TrainState, scheduler: DDPMScheduler, images_B3HW: torch.Tensor, tc: TeacherTrainConfig,
               gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """One optimiser step + EMA update; returns the loss, still on the device (no host sync: the loop checks it is
    finite when it flushes its ``DeferredTerms``, before logging and before every checkpoint)."""
    state.unet.train()
    loss = diffusion_loss(state.unet, scheduler, images_B3HW, gen, tc.amp)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.unet.parameters(), tc.grad_clip)
    state.optimizer.step()
    state.lr_schedule.step()
    state.ema.step(state.unet.parameters())
    state.step += 1
    return loss.detach()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and outputs
# ----------------------------------------------------------------------------------------------------------
def checkpoint_state(state: TrainState, window: MetricsWindow) -> dict[str, object]:
    """Model + EMA + optimiser + LR schedule + step (+ the metrics window since the last record). No RNG state:
    every step's randomness comes from its own generator (:func:`step_generator`), so the step alone places a
    resumed run."""
    return {
        "step": state.step,
        "window": window.state_dict(),
        "unet": state.unet.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "lr_schedule": state.lr_schedule.state_dict(),
    }


def restore_state(state: TrainState, window: MetricsWindow, payload: dict) -> None:
    state.unet.load_state_dict(payload["unet"])
    state.ema.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.lr_schedule.load_state_dict(payload["lr_schedule"])
    state.step = int(payload["step"])
    window.load_state_dict(payload["window"])


@torch.inference_mode()
def sample_grid(unet: UNet2DModel, scheduler: DDPMScheduler, tc: TeacherTrainConfig, path: Path,
                progress: bool) -> None:  # fmt: skip
    """DDIM samples (eta 0) from ``unet`` as a PNG grid."""
    device = next(unet.parameters()).device
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(tc.sample_steps)
    gen = torch.Generator().manual_seed(tc.seed)
    x_B3HW = torch.randn((tc.sample_count, 3, tc.resolution, tc.resolution), generator=gen).to(device)
    unet.eval()
    for t in tqdm(ddim.timesteps, desc="teacher: sampling", disable=not progress, leave=False):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=tc.amp and device.type == "cuda"):
            eps = unet(x_B3HW, t).sample.float()
        x_B3HW = ddim.step(eps, t, x_B3HW).prev_sample
    nrow = max(1, int(math.sqrt(tc.sample_count)))
    save_image((x_B3HW.clamp(-1, 1) + 1) / 2, path, nrow=nrow)


EXPORT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}


def export_pipeline(state: TrainState, scheduler: DDPMScheduler, folder: Path, dtype: str) -> Path:
    """EMA weights -> ``DDPMPipeline.save_pretrained`` (unet/ + scheduler/, safetensors), written atomically.

    A folder, not a file: written whole into ``<folder>.tmp`` and renamed into place (configlib's atomic writers
    are for single files)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"teacher_train.export_dtype {dtype!r}; choices: {', '.join(EXPORT_DTYPES)}")
    unet = build_unet_like(state.unet)
    state.ema.copy_to(unet.parameters())
    unet = unet.to(EXPORT_DTYPES[dtype])
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def build_unet_like(unet: UNet2DModel) -> UNet2DModel:
    copy = UNet2DModel.from_config(unet.config)
    copy.load_state_dict(unet.state_dict())
    return copy.to(next(unet.parameters()).device)


# ----------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------
def run_teacher_training(
    inputs: TeacherTrainInputs,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_at_step: int | None = None,
) -> Path:
    """Train the teacher described by ``inputs.teacher_train``; returns the ``pipeline/`` folder.

    ``stop_at_step`` ends the session early (checkpoint + export of the weights so far) without changing the
    schedule, so that ``resume=True`` later continues exactly as an uninterrupted run (time-boxed sessions).
    """
    tc = inputs.teacher_train
    out = Path(tc.out)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise FileExistsError(
            f"{ckpt_path} exists: pass --resume to continue that run, or choose another teacher_train.out"
        )
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start")

    # 1. List the images (demo data is generated on first use) and write the resolved config.
    records = list_images(tc.data, inputs.dataset)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(inputs, out)
    if tc.cpu_threads > 0:
        torch.set_num_threads(tc.cpu_threads)
    device = resolve_device(tc.device, "teacher_train.device")

    # 2. Build model, schedule, optimiser, EMA.
    torch.manual_seed(tc.seed)
    unet = build_unet(tc).to(device)
    if device.type == "cuda" and tc.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    scheduler = build_scheduler(tc)
    # fused: one kernel over all tensors (torch loops over them one by one on CPU otherwise; ~4x slower)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.steps)
    ema = EMAModel(unet.parameters(), decay=tc.ema_decay, model_cls=UNet2DModel, model_config=unet.config)
    state = TrainState(unet=unet, ema=ema, optimizer=optimizer, lr_schedule=lr_schedule)
    window = MetricsWindow()  # mean loss since the last metrics record; in the checkpoint (see MetricsWindow)
    if resume:
        restore_state(state, window, load_checkpoint(ckpt_path))
        ema.to(device)

    # 3. Train: the sampler yields the batches of the remaining steps.
    end_step = tc.steps if stop_at_step is None else min(tc.steps, stop_at_step)
    sampler = StepBatchSampler(
        len(records),
        tc.batch_size,
        end_step,
        state.step,
        tc.seed,
        with_seeds=False,
        key="teacher_train.batch_size",
    )
    loader = DataLoader(
        ImageDataset(records, tc.resolution), batch_sampler=sampler, num_workers=tc.num_workers
    )
    rejects: dict[str, str] = {}
    pending = DeferredTerms(
        FloatingPointError, f"teacher training: lower teacher_train.lr (now {tc.lr}) or check the images"
    )
    metrics = MetricsLog(out, resume_from=state.step)  # drops records a dead run wrote after its checkpoint
    timed_steps, t_last = 0, time.perf_counter()
    bar = tqdm(total=tc.steps, initial=state.step, desc="teacher", disable=not progress, dynamic_ncols=True)
    for batch in loader:
        ok_B = batch["ok"]
        if not ok_B.all():  # unreadable files are skipped (listed in rejects.json), never fatal
            reasons = zip(batch["key"], batch["reason"], ok_B.tolist(), strict=True)
            rejects.update({key: reason for key, reason, ok in reasons if not ok})
            atomic_write_text(out / "rejects.json", json.dumps(rejects, indent=1, sort_keys=True))
            if not ok_B.any():
                state.step += 1  # keep the step <-> randomness mapping of an uninterrupted run
                bar.update(1)
                continue
        images_B3HW = to_model_range(batch["image_u8"][ok_B].to(device, non_blocking=True))  # (B, 3, R, R)
        if device.type == "cuda" and tc.channels_last:
            images_B3HW = images_B3HW.contiguous(memory_format=torch.channels_last)
        gen = step_generator(tc.seed, state.step + 10**9)  # disjoint from the sampler's per-step generators
        pending.add(state.step, {"loss": train_step(state, scheduler, images_B3HW, tc, gen)})
        timed_steps += 1
        bar.update(1)
        log_now = state.step % tc.log_every == 0 or state.step == tc.steps
        save_now = state.step % tc.checkpoint_every == 0 or state.step == end_step
        if log_now or save_now:
            for values in pending.flush():  # one host sync per window; raises for a non-finite loss
                window.add(values)
        # at log boundaries and the schedule's end, not at stop_at_step (the partial window is checkpointed)
        if window.steps and log_now:
            now = time.perf_counter()
            record = {
                **window.mean(),
                "lr": lr_schedule.get_last_lr()[0],
                "images_per_s": timed_steps * tc.batch_size / (now - t_last),
            }
            metrics.log(state.step, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            window.reset()
            timed_steps, t_last = 0, now
        if save_now:
            save_checkpoint(ckpt_path, checkpoint_state(state, window))
    bar.close()
    metrics.close()

    # 4. Export the EMA weights as a save_pretrained pipeline and draw a sample grid from them.
    pipeline_dir = export_pipeline(state, scheduler, out / "pipeline", tc.export_dtype)
    ema_unet = build_unet_like(state.unet)
    state.ema.copy_to(ema_unet.parameters())
    sample_grid(ema_unet, scheduler, tc, out / "samples.png", progress)
    return pipeline_dir
