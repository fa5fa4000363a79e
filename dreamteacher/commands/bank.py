"""``dreamteacher bank``: info, verify, show, export-wds. Each command calls one function of the package.

Expected failures (no bank at PATH, a damaged bank, a row out of range) raise :class:`bank.BankError` with one
line naming the file and the fix; the top-level handler of ``dreamteacher`` prints it as ``Error: ...``."""

from __future__ import annotations

import json
from pathlib import Path

import click

ATTR_WIDTH = 160
"""Characters of a provenance record ``bank info`` prints on its line (a teacher's identity runs to thousands)."""


@click.group()
def bank() -> None:
    """Inspect, check, picture and export a feature bank."""


@bank.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the bank's attributes as JSON.")
def info(path: str, as_json: bool) -> None:
    """Provenance, levels, sizes, rows and rejects of the bank at PATH."""
    import warnings

    from bank.reader import NO_CHUNK_CHECKSUMS, Bank, BankFormatWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BankFormatWarning)  # said below, in words
        b = Bank.open(path, require_complete=False)
    if as_json:
        click.echo(json.dumps(b.attrs, indent=1, sort_keys=True))
        return
    spec = b.spec
    click.echo(f"bank        {path}  (format v{b.attrs['format_version']}, fingerprint {b.fingerprint[:16]})")
    click.echo(f"side files  {b.side}")
    if b.chunk_checksums:
        click.echo(
            "checksums   crc32c per chunk, checked when read (tools: every read; training: a chunk's first read "
            "in each worker, distill.verify_chunks); per-row arrays checked at open"
        )
    else:
        click.echo(f"checksums   NONE per chunk: {NO_CHUNK_CHECKSUMS}")
    click.echo(f"created     {b.attrs['created']}  libraries {b.attrs['library_versions']}")
    for key in sorted(spec.attributes):  # provenance: a long record is cut (all of it: bank info --json)
        value = json.dumps(spec.attributes[key], sort_keys=True)
        click.echo(
            f"{key:<11} {value if len(value) <= ATTR_WIDTH else value[:ATTR_WIDTH] + ' ... (--json: all)'}"
        )
    click.echo(
        f"rows        {spec.num_rows} = {spec.num_images} images x {spec.draws} draws x {spec.flips} flips; "
        f"{len(b.markers)}/{spec.num_shards} shards written ({spec.shard_rows} rows each), {int(b.ok.sum())} rows OK"
    )
    if spec.mean_of > 1 or spec.mirror:
        views = [f"each row the mean of {spec.mean_of} draws"] if spec.mean_of > 1 else []
        views += ["flipped view read as the mirror of the stored row"] if spec.mirror else []
        click.echo(f"views       {'; '.join(views)}")
    pixels = "once per image" if spec.pixels == "image" else "in every row"
    pixel_compressor = f", pixels {spec.pixel_compressor}" if spec.pixels == "image" else ""
    click.echo(
        f"input       uint8 3x{spec.image_size}x{spec.image_size} {pixels}; compressor {spec.compressor}"
        f"{pixel_compressor}"
    )
    total = 0
    for level in spec.levels:
        nbytes = sum(d.row_nbytes for d in b.array_defs([level.name]) if d.level == level.name)
        total += nbytes
        click.echo(
            f"level {level.name:<5} stride {level.stride:>2}  {level.channels}x{level.height}x{level.width}  "
            f"codec {level.codec:<8} {nbytes / 1e6:.3f} MB/view (fp16 {2 * level.channels * level.height * level.width / 1e6:.3f})"
        )
        if level.components:
            click.echo(
                f"  projection k={level.components} of {level.channels} channels, energy kept "
                f"{b.projections[level.name].energy:.4f} on the fit sample "
                f"({spec.projection_fit.get('images')} images, {spec.projection_fit.get('rule')})"
            )
    if "budget" in spec.projection_fit:
        click.echo(
            f"projection  k per level chosen by the fit for a budget of {spec.projection_fit['budget']} of the values"
        )
    click.echo(
        f"features    {total / 1e6:.3f} MB/view, {total * spec.num_rows / 1e9:.3f} GB in all (uncompressed)"
    )
    if b.labels_spec is not None:
        labels, who = b.labels_spec, b.labels_spec.interpreter
        state = (
            "complete" if b.labels is not None else f"{len(b.label_markers)}/{spec.num_shards} shards written"
        )
        click.echo(
            f"soft labels {labels.num_classes} classes x {labels.height}x{labels.width} (stride {labels.stride}) "
            f"codec {labels.codec}, {state}; interpreter {str(who.get('sha256', '?'))[:12]} "
            f"(test mIoU {who.get('test_mIoU', '?')}, data {who.get('data', '?')})"
        )
    click.echo(f"rejects     {len(b.rejects)}")
    for key, reason in list(b.rejects.items())[:20]:
        click.echo(f"  {key}: {reason}")


@bank.command()
@click.argument("path", type=click.Path())
@click.option(
    "--unmark",
    is_flag=True,
    help="Withdraw the done markers of the damaged shards, so that re-running encode rewrites them.",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
def verify(path: str, unmark: bool, progress: bool) -> None:
    """Check every shard (present, checksums, finite and in-range values); exit 1 listing bad rows."""
    from bank.verify import unmark_shards, verify_bank

    report = verify_bank(path, progress=progress)
    for notice in report.notices:
        click.echo(f"note: {notice}", err=True)
    if report.ok:
        click.echo(f"OK: {report.checked_shards} shards verified")
        return
    for problem in report.problems:
        click.echo(problem, err=True)
    click.echo(f"bad rows ({len(report.bad_rows)}): {sorted(report.bad_rows)}", err=True)
    if unmark and report.bad_shards:
        removed = unmark_shards(path, report.bad_shards)
        click.echo(
            f"withdrew {len(removed)} done marker(s) (shards {sorted(report.bad_shards)}); re-run the same "
            f"`dreamteacher encode` command (make encode BANK={path}) to rewrite them",
            err=True,
        )
    raise SystemExit(1)


@bank.command()
@click.argument("path", type=click.Path())
@click.option("--row", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG path (default: row-N.png).")
def show(path: str, row: int, out: str | None) -> None:
    """A PNG of row N: the input image beside the PCA-to-RGB picture of each level."""
    from bank.show import render_row

    target = Path(out or f"row-{row}.png")
    shown = render_row(path, row, target)
    if not shown["ok"]:
        click.echo(
            f"row {row} ({shown['key']}) is a REJECTED image: {shown['reason']}. Its pixels and features are "
            "zeros, not an encoding; distill skips it"
        )
    click.echo(f"wrote {target}")


@bank.command("export-wds")
@click.argument("path", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--rows-per-tar", type=int, default=1024, show_default=True)
def export_wds_command(path: str, out: str, rows_per_tar: int) -> None:
    """Export the bank at PATH as WebDataset tars of .npy entries into OUT."""
    from bank.wds import export_wds

    tars = export_wds(path, out, rows_per_tar=rows_per_tar)
    click.echo(f"wrote {len(tars)} tar(s) to {out}")
