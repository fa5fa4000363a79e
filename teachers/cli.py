"""``dreamteacher teacher``: train an unconditional DDPM teacher on unlabeled images (thin; see teachers.train)."""

from __future__ import annotations

import click

from dreamteacher.options import config_options


@click.command("teacher")
@click.option("--resume", is_flag=True, help="Continue from <teacher_train.out>/checkpoint.pt.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@config_options
def teacher(cfg, resume: bool, no_progress: bool) -> None:  # noqa: ANN001 - cfg is a PipelineConfig
    """Train the teacher in the `teacher_train:` section; writes <out>/pipeline/ (unet/ + scheduler/)."""
    from teachers.train import run_teacher_training

    pipeline_dir = run_teacher_training(cfg, resume=resume, progress=not no_progress)
    click.echo(f"teacher saved to {pipeline_dir} (point teachers.<name>.path at it)")
