"""``dreamteacher encode``: a thin command over :func:`encode.pipeline.run_encode`."""

from __future__ import annotations

import contextlib

import click

from configlib import ConfigError
from dreamteacher.options import config_options
from dreamteacher.schema import PipelineConfig


@click.command("encode", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--overwrite", is_flag=True, help="Replace an existing bank made with different settings.")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT", help="Use an existing dask cluster.")
@click.option("--no-dask", "no_dask", is_flag=True, help="Run the shard tasks in this process (debugging).")
@click.option(
    "--slurm",
    "slurm_jobs",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Submit N SLURM jobs (one dask worker each, encode.slurm.*) and encode on them; needs dask-jobqueue.",
)
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@click.option(
    "--spectrum",
    is_flag=True,
    help="Fit the projection sample only and print what each PCA rule would keep and cost; writes no bank.",
)
@config_options
def encode(
    cfg: PipelineConfig,
    overwrite: bool,
    scheduler: str | None,
    no_dask: bool,
    slurm_jobs: int | None,
    quiet: bool,
    spectrum: bool,
) -> None:
    """Encode images with the diffusion teacher into a feature bank (resumable: re-run to finish).

    Example: `dreamteacher encode encode.data=imagenet encode.t=150 bank.codec=int8`.
    """
    from bank import BankError
    from dreamteacher.resolve import resolve
    from encode.pipeline import run_encode, run_spectrum

    if spectrum:
        try:
            click.echo(run_spectrum(resolve(cfg, "encode")))
        except (ConfigError, BankError) as exc:
            raise click.ClickException(str(exc)) from exc
        return
    if sum(bool(x) for x in (no_dask, scheduler, slurm_jobs)) > 1:
        raise click.UsageError("--no-dask, --scheduler and --slurm exclude each other")
    try:
        inputs = resolve(cfg, "encode")
        with contextlib.ExitStack() as stack:
            if slurm_jobs:
                from encode.distributed import slurm_cluster

                try:
                    scheduler = stack.enter_context(slurm_cluster(inputs.encode, slurm_jobs))
                except ImportError as exc:
                    raise click.ClickException(str(exc)) from exc
            run_encode(
                inputs, overwrite=overwrite, scheduler=scheduler, use_dask=not no_dask, progress=not quiet
            )
    except (ConfigError, BankError) as exc:
        raise click.ClickException(str(exc)) from exc
