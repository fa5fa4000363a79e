"""``dreamteacher teacher``: train an unconditional DDPM teacher on unlabeled images (thin; see teacher_training.train)."""

from __future__ import annotations

import click

from dreamteacher.options import config_options


@click.command("teacher")
@click.option("--resume", is_flag=True, help="Continue from <teacher_train.out>/checkpoint.pt.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--stop-at-step", type=int, default=None,
              help="End this session after this step (checkpoint + export), keeping the full schedule; --resume "
              "continues it.")  # fmt: skip
@config_options
def teacher(cfg, resume: bool, no_progress: bool, stop_at_step: int | None) -> None:  # noqa: ANN001 - PipelineConfig
    """Train the teacher in the `teacher_train:` section; writes <out>/pipeline/ (unet/ + scheduler/)."""
    from dreamteacher.resolve import resolve
    from teacher_training.train import run_teacher_training

    pipeline_dir = run_teacher_training(
        resolve(cfg, "teacher"), resume=resume, progress=not no_progress, stop_at_step=stop_at_step
    )
    click.echo(f"teacher saved to {pipeline_dir} (point teachers.<name>.path at it)")
