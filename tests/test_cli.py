"""The CLI surface is frozen here: adding or removing a command is a deliberate change to this test."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from dreamteacher.cli import COMMANDS, main

EXPECTED_COMMANDS = ["teacher", "encode", "bank", "distill", "finetune", "demo"]


def test_command_list_is_frozen() -> None:
    assert list(COMMANDS) == EXPECTED_COMMANDS


def test_top_level_help_lists_every_stage() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in EXPECTED_COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", EXPECTED_COMMANDS)
def test_every_command_has_help(name: str) -> None:
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_bad_override_is_a_usage_error_naming_the_key() -> None:
    result = CliRunner().invoke(main, ["encode", "encode.tt=1"])
    assert result.exit_code == 2
    assert "unknown key 'encode.tt'" in result.output


def test_every_command_is_a_click_command() -> None:
    ctx = click.Context(main)
    for name in EXPECTED_COMMANDS:
        assert isinstance(main.get_command(ctx, name), click.Command)
