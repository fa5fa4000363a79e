"""The ``dreamteacher`` command: a Click group whose subcommands are the stages.

Subcommands are imported lazily so that ``dreamteacher --help`` (and any one stage) does not pay for importing
every other stage's dependencies.
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "teacher": "dreamteacher.commands.teacher:teacher",
    "encode": "dreamteacher.commands.encode:encode",
    "bank": "dreamteacher.commands.bank:bank",
    "distill": "dreamteacher.commands.distill:distill",
    "finetune": "dreamteacher.commands.finetune:finetune",
    "demo": "dreamteacher.commands.demo:demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dreamteacher")
def main() -> None:
    """DreamTeacher: diffusion teacher -> feature bank -> distilled backbone -> downstream fine-tuning.

    Every command reads pipeline.yaml (--config) and accepts KEY.PATH=VALUE overrides, e.g.
    `dreamteacher encode encode.data=imagenet encode.t=150`.
    """
