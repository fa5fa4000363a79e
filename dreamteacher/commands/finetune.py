"""``dreamteacher finetune``: thin command over :func:`finetune.run.run_finetune`."""

from __future__ import annotations

import json

import click

from dreamteacher.options import config_options


@click.command()
@click.option("--resume", is_flag=True, help="Continue from <out>/<exp>/checkpoint.pt.")
@click.option("--eval-only", is_flag=True, help="Evaluate <out>/<exp>/checkpoint.pt without training.")
@config_options
def finetune(cfg, resume: bool, eval_only: bool) -> None:
    """Fine-tune a backbone on ADE20K (UperNet), COCO (Mask R-CNN) or a label-efficient set and evaluate it.

    Example: `dreamteacher finetune finetune.task=ade20k finetune.ckpt=runs/distill/default/backbone.safetensors`.
    """
    from dreamteacher.resolve import resolve
    from finetune.run import run_finetune

    metrics = run_finetune(resolve(cfg, "finetune"), resume=resume, eval_only=eval_only)
    headline = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    click.echo(json.dumps(headline, indent=2))
