"""Teacher stage: a tiny DDPM trains, exports a loadable save_pretrained folder, and resumes bit-for-bit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from dreamteacher.commands.teacher import teacher
from dreamteacher.resolve import resolve
from dreamteacher.schema import PipelineConfig, load_pipeline
from teacher_training.config import TeacherTrainConfig
from teacher_training.train import (
    build_scheduler,
    build_unet,
    diffusion_loss,
    step_generator,
)
from teacher_training.train import run_teacher_training as _run_teacher_training
from training.sampler import StepBatchSampler


def run_teacher_training(cfg, **kwargs):  # noqa: ANN001, ANN003, ANN201 - whole pipeline configs
    """``run_teacher_training`` on ``resolve(cfg, "teacher")``, the inputs the CLI gives it."""
    return _run_teacher_training(resolve(cfg, "teacher"), **kwargs)


TINY = {
    "resolution": 32,
    "block_out_channels": [8, 8, 16, 16],
    "attention_levels": [3],
    "attention_head_dim": 8,
    "norm_num_groups": 4,
    "batch_size": 4,
    "steps": 4,
    "warmup_steps": 1,
    "checkpoint_every": 2,
    "log_every": 1,
    "sample_count": 4,
    "sample_steps": 2,
    "export_dtype": "fp32",
}


def _images(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _cfg(tmp_path: Path, out: str = "run", **changes: object) -> PipelineConfig:
    cfg = load_pipeline("pipeline.yaml")
    datasets = dict(cfg.datasets)
    datasets["demo"] = dataclasses.replace(datasets["demo"], root=str(tmp_path / "imgs"), generator="")
    tc = dataclasses.replace(TeacherTrainConfig(**{**TINY, **changes}), data="demo", out=str(tmp_path / out))
    return dataclasses.replace(cfg, datasets=datasets, teacher_train=tc)


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    return _images(tmp_path / "imgs")


def test_six_level_demo_unet_has_the_four_student_strides() -> None:
    unet = build_unet(TeacherTrainConfig())  # the shipped demo teacher's architecture
    sizes: dict[int, tuple[int, ...]] = {}
    hooks = [
        unet.up_blocks[i]
        .upsamplers[0]
        .register_forward_pre_hook(lambda m, args, i=i: sizes.__setitem__(i, tuple(args[0].shape[-2:])))
        for i in range(4)
    ]
    with torch.no_grad():
        unet(torch.zeros(1, 3, 64, 64), torch.tensor([10]))
    for hook in hooks:
        hook.remove()
    # strides 32, 16, 8, 4 at 64x64 input
    assert sizes == {0: (2, 2), 1: (4, 4), 2: (8, 8), 3: (16, 16)}


def test_bad_attention_level() -> None:
    with pytest.raises(ValueError, match="attention_levels"):
        build_unet(TeacherTrainConfig(block_out_channels=[8, 8], attention_levels=[2], norm_num_groups=4))


def test_diffusion_loss_is_epsilon_mse() -> None:
    torch.manual_seed(0)
    tc = TeacherTrainConfig(**TINY)
    unet, scheduler = build_unet(tc), build_scheduler(tc)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = diffusion_loss(unet, scheduler, x, torch.Generator().manual_seed(3), amp=False)
    # Recompute by hand with the same draws (flip, t, noise in that order).
    gen = torch.Generator().manual_seed(3)
    flip = torch.rand(2, generator=gen) < 0.5
    t = torch.randint(0, 1000, (2,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    x0 = torch.where(flip[:, None, None, None], x.flip(-1), x)
    abar = scheduler.alphas_cumprod[t].float()[:, None, None, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.no_grad():
        expected = torch.mean((unet(x_t, t).sample - noise) ** 2)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_step_sampler_is_a_function_of_the_step() -> None:
    full = list(StepBatchSampler(10, 3, total=5, start=0, seed=1, with_seeds=False))
    tail = list(StepBatchSampler(10, 3, total=5, start=3, seed=1, with_seeds=False))
    assert full[3:] == tail and len(full) == 5
    # epoch permutations: steps 0..2 hold 9 distinct items, the 10th opens step 3 before epoch 1's order
    flat = [i for batch in full for i in batch]
    assert len(set(flat[:9])) == 9 and sorted(flat[:10]) == list(range(10))
    assert torch.equal(
        torch.rand(2, generator=step_generator(1, 4)), torch.rand(2, generator=step_generator(1, 4))
    )


def test_train_export_and_load(tmp_path: Path, images: Path) -> None:
    (images / "broken.png").write_bytes(b"not a png")  # a reject: skipped and listed, not fatal
    cfg = _cfg(tmp_path, steps=4, batch_size=6)
    pipeline_dir = run_teacher_training(cfg, progress=False)
    out = tmp_path / "run"
    for name in ("config.yaml", "checkpoint.pt", "metrics.jsonl", "samples.png"):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in lines)
    rejects = json.loads((out / "rejects.json").read_text())
    assert list(rejects) == ["broken.png"]
    unet = UNet2DModel.from_pretrained(pipeline_dir / "unet")
    scheduler = DDPMScheduler.from_pretrained(pipeline_dir / "scheduler")
    assert unet.config.sample_size == 32 and scheduler.config.prediction_type == "epsilon"
    assert list(unet.config.block_out_channels) == [8, 8, 16, 16]
    with pytest.raises(FileExistsError, match="--resume"):
        run_teacher_training(cfg, progress=False)


def test_resume_is_bit_exact(tmp_path: Path, images: Path) -> None:
    straight = run_teacher_training(_cfg(tmp_path, "a"), progress=False)
    cfg_b = _cfg(tmp_path, "b")
    run_teacher_training(cfg_b, progress=False, stop_at_step=2)
    resumed = run_teacher_training(cfg_b, resume=True, progress=False)
    a = UNet2DModel.from_pretrained(straight / "unet").state_dict()
    b = UNet2DModel.from_pretrained(resumed / "unet").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_fp16_export_loads_as_float32(tmp_path: Path, images: Path) -> None:
    pipeline_dir = run_teacher_training(_cfg(tmp_path, export_dtype="fp16", steps=1), progress=False)
    unet = UNet2DModel.from_pretrained(pipeline_dir / "unet")
    assert next(unet.parameters()).dtype == torch.float32


def test_cli_resume_without_checkpoint(tmp_path: Path) -> None:
    result = CliRunner().invoke(teacher, ["--resume", f"teacher_train.out={tmp_path / 'none'}"])
    assert result.exit_code != 0
    assert "no checkpoint" in str(result.exception)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_is_resolved_like_every_stage(tmp_path: Path, images: Path) -> None:
    with pytest.raises(ValueError, match=r"teacher_train.device='cuda' but this process sees no CUDA"):
        run_teacher_training(_cfg(tmp_path, device="cuda"), progress=False)
    run_teacher_training(_cfg(tmp_path, "cpu", device="cpu", steps=1), progress=False)
    assert (tmp_path / "cpu" / "pipeline" / "unet").is_dir()


def test_resumed_metrics_equal_an_uninterrupted_run(tmp_path: Path, images: Path) -> None:
    # log every 3 steps, checkpoint every 2: the session stopped at step 2 is mid-window
    every = {"log_every": 3, "checkpoint_every": 2}
    run_teacher_training(_cfg(tmp_path, "a", **every), progress=False)
    run_teacher_training(_cfg(tmp_path, "b", **every), progress=False, stop_at_step=2)
    run_teacher_training(_cfg(tmp_path, "b", **every), resume=True, progress=False)

    def records(out: str) -> list[dict]:
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]

    assert [r["step"] for r in records("b")] == [3, 4]
    assert records("b") == records("a")
