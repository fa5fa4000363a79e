"""Tools: verify flags corruption with the bad rows, show writes a PNG, info, WebDataset round-trip, pca_rgb."""

from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from bank import Bank, pca_rgb
from bank.wds import export_wds, iter_rows, wds_stream
from dreamteacher.commands.bank import bank as bank_cli
from tests.bank_helpers import write_bank


def test_verify_passes_then_flags_a_corrupted_shard(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    runner = CliRunner()
    result = runner.invoke(bank_cli, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    # flip bytes inside shard 1's int8 payload (same size, so open-time checks pass)
    shard_file = path / "features/s4/q/c/1/0/0/0"
    data = bytearray(shard_file.read_bytes())
    data[10:20] = bytes(10)
    shard_file.write_bytes(bytes(data))
    result = runner.invoke(bank_cli, ["verify", str(path)])
    assert result.exit_code == 1
    assert "shard 1: checksum mismatch" in result.output and "bad rows (8): [8, 9, 10" in result.output


def test_info_and_show(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    runner = CliRunner()
    result = runner.invoke(bank_cli, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "20 = 5 images x 2 draws x 2 flips" in result.output and "codec int8" in result.output
    out = tmp_path / "row.png"
    result = runner.invoke(bank_cli, ["show", str(path), "--row", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > 300


def test_wds_round_trip(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    tars = export_wds(path, tmp_path / "wds", rows_per_tar=7, progress=False)
    assert len(tars) == 3
    bank = Bank.open(path)
    urls = [str(t) for t in tars]
    rows = list(iter_rows(urls))
    assert [int(r["row"]) for r in rows] == list(range(20))
    for sample in rows[::5]:
        ref = bank.read_rows([int(sample["row"])])
        assert np.array_equal(sample["image"].numpy(), ref["image"][0])
        for level, parts in ref["targets"].items():
            for part, values in parts.items():
                assert np.array_equal(sample["targets"][level][part].numpy(), values[0])
    batches = list(wds_stream(urls, 8))
    assert [b["image"].shape[0] for b in batches] == [8, 8, 4]
    assert batches[0]["targets"]["s4"]["q"].dtype == torch.int8


def test_pca_rgb_recovers_the_dominant_direction():
    # features = a ramp along x times a fixed channel direction + tiny noise: component 1 follows the ramp
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    ramp = np.tile(np.linspace(-1, 1, 8), (8, 1))
    feats = direction[:, None, None] * ramp[None] + 1e-3 * rng.normal(size=(16, 8, 8))
    rgb = pca_rgb(feats)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    red = rgb[..., 0].astype(int)
    assert np.all(np.diff(red.mean(axis=0)) != 0) and abs(np.corrcoef(red.mean(axis=0), ramp[0])[0, 1]) > 0.99
    assert np.array_equal(rgb, pca_rgb(feats))
