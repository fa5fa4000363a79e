"""The ``dreamteacher`` command: a Click group whose subcommands are the stages.

Subcommands are imported lazily so that ``dreamteacher --help`` (and any one stage) does not pay for importing
every other stage's dependencies.

Errors. A mistake the user can fix (a wrong path, a missing bank, a bad value, a full disk) is printed as one
``Error: <message>`` line on stderr, exit code 1 (2 for usage and config-loading errors, as Click does), with a
``hint:`` line naming the Make variable when the message names a config key the Makefile sets (``BANK=``,
``CKPT=``, ...). ``--debug`` (anywhere on the command line) or ``DREAMTEACHER_DEBUG=1`` shows the traceback
instead. The exceptions that count as such expected errors (:func:`expected_error_message`):

* ``configlib.ConfigError`` and ``bank.BankError``: raised only with a message for the user;
* ``ValueError`` raised by this project's own code (the innermost traceback frame is in one of its packages): a
  deliberate check with a message. A ValueError from inside torch or numpy is not: it is a bug here;
* ``FloatingPointError``: the training loops' non-finite-loss guard (its message names the step and the fix);
* ``FileNotFoundError``, ``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError``: a path the user gave;
* ``OSError`` with errno ENOSPC / EDQUOT (disk full, quota) or EROFS (read-only file system), naming the path.

Everything else (``KeyError``, ``TypeError``, ``AttributeError``, a ``RuntimeError`` from torch, ...) keeps its
traceback: those are bugs, and the traceback is what a bug report needs.
"""

from __future__ import annotations

import errno
import importlib
import io
import linecache
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import click

# command name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "teacher": "dreamteacher.commands.teacher:teacher",
    "encode": "dreamteacher.commands.encode:encode",
    "bank": "dreamteacher.commands.bank:bank",
    "interpret": "dreamteacher.commands.interpret:interpret",
    "distill": "dreamteacher.commands.distill:distill",
    "finetune": "dreamteacher.commands.finetune:finetune",
    "demo": "dreamteacher.commands.demo:demo",
}

DEBUG_ENV = "DREAMTEACHER_DEBUG"

# Config key -> the Makefile variable that sets it (Makefile: `$(call opt,KEY,$(VAR))`); an error message that
# names the key gets a hint with the variable, e.g. `make distill BANK=...`.
MAKE_VARIABLES: dict[str, str] = {
    "encode.data": "DATA",
    "encode.teacher": "TEACHER",
    "encode.t": "T",
    "encode.mode": "MODE",
    "encode.bank": "BANK",
    "distill.bank": "BANK",
    "distill.student.name": "STUDENT",
    "distill.exp": "EXP",
    "finetune.task": "TASK",
    "finetune.ckpt": "CKPT",
    "finetune.exp": "EXP",
    "teacher_train.data": "DATA",
    "interpret.data": "LABELS",
    "interpret.bank": "BANK",
}

_PROJECT_PACKAGES = frozenset(
    {"dreamteacher", "configlib", "sources", "training", "teachers", "bank", "encode", "distill", "finetune",
     "teacher_training", "interpret"}
)  # fmt: skip
_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system"}
if hasattr(errno, "EDQUOT"):
    _DISK_ERRNOS[errno.EDQUOT] = "disk quota exceeded"
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _raised_by_project(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a ``raise`` statement in one of this project's packages (the innermost traceback
    frame is the project's and its line is a ``raise``: a ValueError from numpy's C code called by the project
    has the project's frame innermost too, but not on a ``raise`` line)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    if module.split(".")[0] not in _PROJECT_PACKAGES:
        return False
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
    return not line or line.startswith("raise")


def _is_bank_error(exc: BaseException) -> bool:
    bank = sys.modules.get("bank")  # not imported -> it cannot have raised; importing it here would cost zarr
    bank_error = getattr(bank, "BankError", None)
    return isinstance(bank_error, type) and isinstance(exc, bank_error)


def _open_file_in_traceback(exc: BaseException) -> str | None:
    """The name of the innermost open file object among the traceback's local variables: the file being written
    when a ``write()`` fails (an OSError from write/flush carries no filename, unlike one from open)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name = getattr(value, "name", None) if isinstance(value, io.IOBase) else None
            if isinstance(name, (str, bytes)):
                return os.fsdecode(name)
    return None


def _os_message(exc: OSError, what: str) -> str:
    """An OS error as `<what>: <path>` (the errno prefix dropped); a project-made message as it is."""
    if exc.errno is None or exc.strerror is None:  # raised by the project with its own message
        return str(exc)
    paths = [os.fsdecode(p) for p in (exc.filename, exc.filename2) if p is not None]
    if not paths and (found := _open_file_in_traceback(exc)):
        paths = [f"{found} (while writing it)"]
    return f"{what}: {' -> '.join(paths) if paths else '(the OS did not say which file)'}"


def expected_error_message(exc: BaseException) -> str | None:
    """The one-line message for an expected error (module docstring), or None for a bug (keep the traceback)."""
    from configlib import ConfigError

    if isinstance(exc, ConfigError) or _is_bank_error(exc) or isinstance(exc, FloatingPointError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return _os_message(exc, _DISK_ERRNOS[exc.errno]) + "; free space there or point the output elsewhere"
    if isinstance(exc, _PATH_ERRORS):
        return _os_message(exc, exc.strerror.lower() if exc.strerror else type(exc).__name__)
    if isinstance(exc, ValueError) and _raised_by_project(exc):
        return str(exc)
    return None


def make_hint(message: str, command: str | None) -> str | None:
    """``hint: ...`` naming the Make variable of each config key of the running stage that ``message`` names."""
    section = {"teacher": "teacher_train"}.get(command or "", command)
    named = [
        (key, var)
        for key, var in MAKE_VARIABLES.items()
        if key.split(".")[0] == section and re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message)
    ]
    if not named:
        return None
    return "hint: with make, " + ", ".join(f"set {key} as `make {command} {var}=...`" for key, var in named)


class _ExpectedError(click.ClickException):
    """An expected error shown as ``Error: <message>`` (+ hint lines), exit code 1."""


class PipelineGroup(click.Group):
    """The top-level group: lazy subcommands, ``--debug`` anywhere, expected errors as one ``Error:`` line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def main(self, args: Sequence[str] | None = None, *a: Any, **kw: Any) -> Any:
        # `--debug` after the subcommand (e.g. `make distill ARGS=--debug`) is moved in front of it, where the
        # group's option is parsed. Nothing else is called --debug; `--` ends the options as usual.
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:end]:
            args = ["--debug", *(x for i, x in enumerate(args) if not (i < end and x == "--debug"))]
        return super().main(args, *a, **kw)

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            # under --debug, a Click error that wraps an exception (`raise click.UsageError(...) from exc`) shows it
            if debug and exc.__cause__ is not None and not isinstance(exc.__cause__, click.ClickException):
                raise exc.__cause__ from None
            hint = make_hint(exc.message, ctx.invoked_subcommand)
            if hint and "hint:" not in exc.message:
                exc.message = f"{exc.message}\n{hint}"
            raise
        except (click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if debug:
                raise
            message = expected_error_message(exc)
            if message is None:
                raise
            hint = make_hint(message, ctx.invoked_subcommand)
            if hint and "hint:" not in message:
                message = f"{message}\n{hint}"
            raise _ExpectedError(message) from exc


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dreamteacher")
@click.option(
    "--debug",
    is_flag=True,
    help=f"Show the traceback of an error instead of one line (or set {DEBUG_ENV}=1).",
)
def main(debug: bool) -> None:
    """DreamTeacher: diffusion teacher -> feature bank -> distilled backbone -> downstream fine-tuning.

    Every command reads pipeline.yaml (--config) and accepts KEY.PATH=VALUE overrides, e.g.
    `dreamteacher encode encode.data=imagenet encode.t=150`.
    """
