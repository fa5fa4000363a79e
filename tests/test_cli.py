"""The CLI surface is frozen here: adding or removing a command is a deliberate change to this test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dreamteacher.cli import COMMANDS, main

EXPECTED_COMMANDS = ["teacher", "encode", "bank", "interpret", "distill", "finetune", "demo"]


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


# ---- expected errors: one `Error:` line, the traceback only under --debug -------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "DREAMTEACHER_DEBUG"} | env
    cmd = [sys.executable, "-m", "dreamteacher", *args]
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _config(*overrides: str) -> list[str]:
    return ["--config", str(REPO / "pipeline.yaml"), *overrides]


@pytest.mark.slow
def test_missing_bank_for_distill_is_one_error_line(tmp_path: Path) -> None:
    args = ["distill", *_config("distill.bank=/nonexistent")]
    proc = _run(args, tmp_path)
    assert proc.returncode == 1
    assert "/nonexistent" in _one_error_line(proc)
    # --debug after the subcommand (as `make distill ARGS=--debug` puts it) shows the traceback
    debug = _run([*args, "--debug"], tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "BankError" in debug.stderr


@pytest.mark.slow
def test_missing_checkpoint_for_finetune_names_the_key_and_make_variable(tmp_path: Path) -> None:
    args = ["finetune", *_config("finetune.data=demo-seg", "finetune.backbone=resnet18",
                                 "finetune.ckpt=/nonexistent.safetensors")]  # fmt: skip
    proc = _run(args, tmp_path)
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "/nonexistent.safetensors" in line and "finetune.ckpt" in line
    assert "`make finetune CKPT=...`" in proc.stderr
    debug = _run(args, tmp_path, DREAMTEACHER_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


@pytest.mark.slow
def test_mix_distill_on_a_bank_without_soft_labels_is_one_error_line(tmp_path: Path) -> None:
    from tests.bank_helpers import write_bank

    write_bank(tmp_path / "b.zarr", image_size=32)
    args = ["distill", *_config("distill.bank=b.zarr", "distill.loss.mix=true", "distill.student.name=resnet18",
                                "distill.out=runs")]  # fmt: skip
    proc = _run(args, tmp_path)
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "no soft labels" in line and "dreamteacher interpret" in line and "distill.loss.mix=false" in line
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_bad_t_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    args = ["encode", *_config("--no-dask", "encode.t=-1")]
    proc = _run(args, tmp_path)
    assert proc.returncode == 2
    assert "encode.t must be >= 0" in proc.stderr and "`make encode T=...`" in proc.stderr
    assert _one_error_line(proc).startswith("Error: Configuration error")
    debug = _run(["--debug", *args], tmp_path)
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def _group_with(command: click.Command) -> click.Group:
    """The real top-level group class and its --debug option around one extra command."""
    group = type(main)(name="dreamteacher", params=list(main.params), callback=main.callback)
    group.get_command = lambda ctx, name: command if name == command.name else None  # type: ignore[method-assign]
    return group


def test_disk_full_names_the_file_and_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DREAMTEACHER_DEBUG", raising=False)

    @click.command("write")
    def write() -> None:
        with open("/dev/full", "wb", buffering=0) as f:  # the OS says ENOSPC on write, with no filename
            f.write(b"x")

    result = CliRunner().invoke(_group_with(write), ["write"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[0] == (
        "Error: no space left on device: /dev/full (while writing it); free space there or point the output elsewhere"
    )

    @click.command("bug")
    def bug() -> None:
        {}["missing"]  # noqa: B018 - a KeyError is a bug: not turned into a one-liner

    result = CliRunner().invoke(_group_with(bug), ["bug"])
    assert isinstance(result.exception, KeyError)


def test_only_the_projects_own_value_errors_are_expected() -> None:
    import numpy as np

    from dreamteacher.cli import expected_error_message
    from training.metrics import plot_losses

    try:
        np.zeros(-1)  # a ValueError from a library (called from here, not the project): a bug
    except ValueError as exc:
        assert expected_error_message(exc) is None
    try:
        plot_losses(REPO / "tests")  # the project's own check: no metrics.jsonl
    except (ValueError, FileNotFoundError) as exc:
        assert expected_error_message(exc) is not None
    assert expected_error_message(TypeError("bug")) is None
    assert expected_error_message(FloatingPointError("loss is nan at step 3")) == "loss is nan at step 3"
