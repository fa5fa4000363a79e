"""Click options shared by every stage command: ``--config`` and ``KEY.PATH=VALUE`` overrides."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from configlib import ConfigError


def config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config PATH`` and trailing ``OVERRIDES...`` and pass a loaded ``PipelineConfig`` as ``cfg``."""

    @click.option(
        "--config",
        "config_path",
        default="pipeline.yaml",
        show_default=True,
        type=click.Path(dir_okay=False),
        help="Pipeline config file.",
    )
    @click.argument("overrides", nargs=-1, metavar="[KEY.PATH=VALUE]...")
    def wrapper(config_path: str, overrides: tuple[str, ...], **kwargs: Any) -> Any:
        from dreamteacher.schema import load_pipeline

        try:
            cfg = load_pipeline(config_path, overrides)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from exc
        return func(cfg=cfg, **kwargs)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


class DefaultToTrain(click.Group):
    """A group whose first argument, when it is not a subcommand name, belongs to ``train``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["train", *args]
        return super().parse_args(ctx, args)
