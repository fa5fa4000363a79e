"""``dreamteacher teacher``: train a DDPM teacher (default subcommand, see teacher_training.train) or ``diagnose``
any configured teacher's noise and flip behaviour."""

from __future__ import annotations

import json

import click

from dreamteacher.options import DefaultToTrain, config_options


@click.group("teacher", cls=DefaultToTrain)
def teacher() -> None:
    """Train a diffusion teacher (default subcommand: train) or measure one (diagnose)."""


@teacher.command("train")
@click.option("--resume", is_flag=True, help="Continue from <teacher_train.out>/checkpoint.pt.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--stop-at-step", type=int, default=None,
              help="End this session after this step (checkpoint + export), keeping the full schedule; --resume "
              "continues it.")  # fmt: skip
@config_options
def train(cfg, resume: bool, no_progress: bool, stop_at_step: int | None) -> None:  # noqa: ANN001 - PipelineConfig
    """Train the teacher in the `teacher_train:` section; writes <out>/pipeline/ (unet/ + scheduler/)."""
    from dreamteacher.resolve import resolve
    from teacher_training.train import run_teacher_training

    pipeline_dir = run_teacher_training(
        resolve(cfg, "teacher"), resume=resume, progress=not no_progress, stop_at_step=stop_at_step
    )
    click.echo(f"teacher saved to {pipeline_dir} (point teachers.<name>.path at it)")


@teacher.command("diagnose")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False), help="Image folder.")
@click.option("--limit", default=32, show_default=True, help="Images to measure.")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the figures as JSON.")
@config_options
def diagnose(cfg, images: str, limit: int, device: str, out: str | None) -> None:  # noqa: ANN001
    """Per tap: draw-to-draw cosine and flip equivariance (same / fresh noise) of the encode teacher at its T.

    The teacher is encode's (`encode.teacher=NAME`, else the dataset's), with its checkpoint from the config, e.g.
    `dreamteacher teacher diagnose --images DIR encode.teacher=adm-256-uncond teachers.adm-256-uncond.checkpoint=PT`.
    """
    from dreamteacher.resolve import resolve
    from teachers.diagnostics import format_diagnostics, run_teacher_diagnostics
    from teachers.provenance import Encoding

    inputs = resolve(cfg, "encode")
    enc = inputs.encode
    encoding = Encoding(
        mode=enc.mode, t=enc.t, ddim_steps=enc.ddim_steps, seed=enc.seed, resolution=enc.resolution
    )
    results = run_teacher_diagnostics(
        inputs.teacher, encoding, images, name=enc.teacher, limit=limit, seed=enc.seed, device=device
    )
    click.echo(f"teacher {enc.teacher}, T={enc.t}, {limit} image(s) at most\n{format_diagnostics(results)}")
    if out:
        from configlib import atomic_write_text

        atomic_write_text(out, json.dumps(results, indent=2))
