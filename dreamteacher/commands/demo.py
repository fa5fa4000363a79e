"""``dreamteacher demo``: a thin command over :func:`dreamteacher.demo.run_demo`."""

from __future__ import annotations

import click

from dreamteacher.options import config_options
from dreamteacher.schema import PipelineConfig


@click.command("demo")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@config_options
def demo(cfg: PipelineConfig, no_progress: bool) -> None:
    """The whole pipeline on built-in data: data -> encode -> distill -> fine-tune (distilled vs random init)."""
    from dreamteacher.demo import run_demo

    run_demo(cfg, cfg.demo.size, progress=not no_progress)
