"""``dreamteacher interpret``: the feature interpreter of label distillation (``interpret/``).

Trains it on the few-label split ``interpret.data`` with the bank's teacher read-out (or re-uses the one in its
run folder), reports its own test mIoU, and writes its logits for every bank row into the bank (soft labels,
resumable). ``dreamteacher distill distill.loss.mix=true`` then distils them with the features.
"""

from __future__ import annotations

import logging

import click

from dreamteacher.options import config_options


@click.command("interpret")
@click.option("--retrain", is_flag=True, help="Train a new interpreter even if the run folder holds one.")
@click.option(
    "--overwrite", is_flag=True, help="Replace soft labels the bank holds from another interpreter."
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@config_options
def interpret(cfg, retrain: bool, overwrite: bool, no_progress: bool) -> None:  # noqa: ANN001 - PipelineConfig
    """Train the interpreter, score it, write its soft labels into the bank: `dreamteacher interpret
    interpret.data=bedroom-28 encode.data=lsun-bedroom`."""
    from dreamteacher.resolve import resolve
    from interpret.run import run_interpret

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    inputs = resolve(cfg, "interpret")
    results = run_interpret(inputs, retrain=retrain, overwrite=overwrite, progress=not no_progress)
    labels = results["labels"]
    click.echo(
        f"interpreter {results['sha256'][:12]}: test mIoU {results['mIoU']:.2f} on {results['data']} "
        f"({results['train_images']} labelled images); soft labels {labels['num_classes']} x "
        f"{labels['height']} x {labels['width']} ({labels['codec']}) in {inputs.interpret.bank}"
    )
