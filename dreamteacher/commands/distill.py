"""``dreamteacher distill``: train (the default) or ``plot`` an experiment's loss curves.

``dreamteacher distill [--resume] KEY=VAL...`` (e.g. ``distill.targets=online``) trains; ``dreamteacher distill train ...`` is the same;
``dreamteacher distill plot EXP_DIR`` draws ``losses.png``. Under DDP launch it with torchrun
(``torchrun --nproc_per_node=8 -m dreamteacher distill ...``).
"""

from __future__ import annotations

import logging

import click

from dreamteacher.options import DefaultToTrain, config_options


@click.group(cls=DefaultToTrain)
def distill() -> None:
    """Distill the bank's teacher features into a student backbone (default subcommand: train)."""


@distill.command("train")
@click.option("--resume", is_flag=True, help="Continue <distill.out>/<distill.exp> from its checkpoint.")
@click.option("--no-progress", is_flag=True, help="No tqdm bar (logs and metrics.jsonl only).")
@config_options
def train(cfg, resume: bool, no_progress: bool) -> None:  # noqa: ANN001 - PipelineConfig
    """Train one experiment: `dreamteacher distill distill.student.name=resnet18 distill.exp=r18`."""
    from distill.train import run_distill
    from dreamteacher.resolve import resolve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    exp_dir = run_distill(resolve(cfg, "distill"), resume=resume, progress=not no_progress)
    click.echo(f"experiment: {exp_dir}")


@distill.command("plot")
@click.argument("exp_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out", type=click.Path(dir_okay=False), default=None, help="PNG path (default EXP_DIR/losses.png)."
)
def plot(exp_dir: str, out: str | None) -> None:
    """Draw the loss curves of an experiment (from metrics.jsonl) as a PNG."""
    from training.metrics import plot_losses

    click.echo(str(plot_losses(exp_dir, out)))


@distill.command("eval")
@click.argument("exp_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
              help="Held-out images (a folder, recursive; none of them in the run's bank).")  # fmt: skip
@click.option(
    "--draws", default=16, show_default=True, help="Noise draws per image for the expected features."
)
@click.option("--limit", default=0, help="Use the first N images (0 = all).")
@click.option("--device", default="auto", show_default=True)
@config_options
def evaluate(cfg, exp_dir: str, images: str, draws: int, limit: int, device: str) -> None:  # noqa: ANN001
    """Held-out feature fidelity of a run vs the teacher's expected features; writes EXP_DIR/fidelity.json."""
    from distill.evaluate import evaluate_run

    report = evaluate_run(exp_dir, images, cfg.teachers, draws=draws, limit=limit, device=device)
    click.echo(report.format())
