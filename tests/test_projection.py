"""PCA projection per level (bank.projection, issue 13): the fit against numpy, energy by hand, round trips within
the codec's bound, the fingerprint, and projected banks that encode, reopen, resume after kill -9 to the same bytes,
refuse a changed basis and distil."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from bank import Bank, BankError
from bank.codecs import CODECS, make_codec
from bank.config import BankConfig
from bank.layout import side_dir
from bank.projection import (
    CovarianceAccumulator,
    Projection,
    allocate_budget,
    fit_from_covariance,
    fit_record,
    sample_indices,
    with_projections,
)
from bank.spec import LevelSpec
from dreamteacher.cli import main
from dreamteacher.resolve import resolve
from dreamteacher.schema import load_pipeline
from encode.pipeline import run_encode
from encode.worker import clear_caches
from tests.bank_helpers import activation_like, make_spec

ROOT = Path(__file__).resolve().parents[1]


# ---- the fit ---------------------------------------------------------------------------------------------------
def test_fit_matches_numpy_svd_of_the_same_sample() -> None:
    feats = activation_like((6, 5, 4, 3), seed=0)
    acc = CovarianceAccumulator()
    for chunk in feats.split(2):  # accumulated in pieces, as the encode fit does
        acc.add(chunk)
    proj = acc.fit(3)
    # reference: SVD of the centred (positions, C) matrix
    x = feats.double().permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    mean = x.mean(0)
    _u, sing, vt = np.linalg.svd(x - mean, full_matrices=False)
    np.testing.assert_allclose(proj.mean_C.numpy(), mean, rtol=1e-5, atol=1e-5)
    for k in range(3):  # each component equal up to sign
        ours, ref = proj.basis_KC[k].double().numpy(), vt[k]
        assert min(np.abs(ours - ref).max(), np.abs(ours + ref).max()) < 1e-4, k
        assert abs(ours).argmax() == abs(ref).argmax() and ours[abs(ours).argmax()] > 0  # the sign convention
    assert proj.energy == pytest.approx(float((sing[:3] ** 2).sum() / (sing**2).sum()), rel=1e-9)
    np.testing.assert_allclose(proj.basis_KC.numpy() @ proj.basis_KC.numpy().T, np.eye(3), atol=1e-6)


def test_energy_kept_by_hand() -> None:
    # four positions of 2 channels: (2, 0), (-2, 0), (0, 1), (0, -1): covariance diag(2, 0.5), mean 0
    feats = torch.tensor([[2.0, -2.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]]).reshape(1, 2, 2, 2)
    acc = CovarianceAccumulator()
    acc.add(feats)
    proj = acc.fit(1)
    assert proj.energy == pytest.approx(2.0 / 2.5)
    assert proj.basis_KC.tolist() == [[1.0, 0.0]] and proj.mean_C.tolist() == [0.0, 0.0]
    assert proj.project(feats).flatten().tolist() == [2.0, -2.0, 0.0, 0.0]
    assert acc.fit(2).energy == pytest.approx(1.0)


def test_energy_target_picks_the_fewest_components_by_hand() -> None:
    # three channels with variances 6, 3, 1 (independent, mean 0): energy kept by k = 1, 2, 3 is 0.6, 0.9, 1.0
    x = torch.tensor([[6.0**0.5, -(6.0**0.5), 0, 0, 0, 0], [0, 0, 3.0**0.5, -(3.0**0.5), 0, 0],
                      [0, 0, 0, 0, 1.0, -1.0]]) * 6**0.5  # fmt: skip
    acc = CovarianceAccumulator()
    acc.add(x.reshape(1, 3, 2, 3))
    for target, k in [(0.5, 1), (0.6, 1), (0.61, 2), (0.9, 2), (0.95, 3), (1.0, 3)]:
        proj = acc.fit(energy=target)
        assert proj.components == k, (target, proj.components)
        assert proj.energy >= target - 1e-9
    assert acc.fit(energy=0.9).energy == pytest.approx(0.9)


def test_energy_config_is_checked() -> None:
    with pytest.raises(ValueError, match=r"projection_energy=\{'s4': 1.5\}: a fraction"):
        BankConfig(projection_energy={"s4": 1.5})
    with pytest.raises(ValueError, match=r"levels \['s4'\] are in both projection and projection_energy"):
        BankConfig(projection={"s4": 4}, projection_energy={"s4": 0.9})
    with pytest.raises(BankError, match=r"bank.projection_energy names unknown levels \['s3'\]"):
        make_spec(BankConfig(shard_rows=4, projection_energy={"s3": 0.9}))


def test_budget_allocation_by_hand() -> None:
    # level a: eigenvalues 4, 2, 1, 1 (gains 1/4, 1/8, 1/8 after the first), 1 position; level b: 6, 3, 1 (gains
    # 3/10, 1/10), 4 positions: per value a's gains 0.25, 0.125, 0.125 come before b's 0.075, 0.025.
    # 16 values in all; one component each uses 1 + 4 = 5.
    evals = {
        "a": torch.tensor([4.0, 2, 1, 1], dtype=torch.float64),
        "b": torch.tensor([6.0, 3, 1], dtype=torch.float64),
    }
    positions = {"a": 1, "b": 4}
    assert allocate_budget(evals, positions, 0.5) == {
        "a": 4,
        "b": 1,
    }  # 8 of 16 values: a's three, then b's does not fit
    assert allocate_budget(evals, positions, 0.45) == {
        "a": 3,
        "b": 1,
    }  # 7.2: a's third (8 values) does not fit
    assert allocate_budget(evals, positions, 0.75) == {"a": 4, "b": 2}  # 12 exactly
    with pytest.raises(
        BankError, match=r"projection_budget=0.3: one component per level already takes 0.3125"
    ):
        allocate_budget(evals, positions, 0.3)


def test_budget_allocation_keeps_the_most_energy_for_the_values_it_uses() -> None:
    # brute force over every (k_a, k_b, k_c): nothing that uses at most the greedy's values keeps more energy
    import itertools

    g = torch.Generator().manual_seed(3)
    positions = {"a": 1, "b": 3, "c": 8}
    for trial in range(20):
        evals = {n: torch.rand(c, generator=g, dtype=torch.float64).pow(3).sort(descending=True).values
                 for n, c in zip(positions, (5, 4, 6), strict=True)}  # fmt: skip
        budget = 0.3 + 0.6 * trial / 20
        ks = allocate_budget(evals, positions, budget)
        used = sum(ks[n] * positions[n] for n in ks)
        assert used <= budget * (5 * 1 + 4 * 3 + 6 * 8)

        def energy(alloc: dict[str, int], evals: dict[str, torch.Tensor] = evals) -> float:
            return sum(float(evals[n][: alloc[n]].sum() / evals[n].sum()) for n in alloc)

        best = max(
            energy(dict(zip(positions, alloc, strict=True)))
            for alloc in itertools.product(range(1, 6), range(1, 5), range(1, 7))
            if sum(k * p for k, p in zip(alloc, positions.values(), strict=True)) <= used
        )
        assert energy(ks) >= best - 1e-12, (trial, ks)


def test_budget_config_is_checked() -> None:
    with pytest.raises(
        ValueError, match=r"projection_budget=1.0: a fraction of the feature values in \[0, 1\)"
    ):
        BankConfig(projection_budget=1.0)
    with pytest.raises(
        ValueError, match=r"projection_budget=0.4 chooses every level.s k: set bank.projection_budget=0"
    ):
        BankConfig(projection_budget=0.4, projection_energy={"s4": 0.9})
    with pytest.raises(
        ValueError, match=r"projection_budget=0.4 chooses every level.s k: set bank.projection_budget=0"
    ):
        BankConfig(projection_budget=0.4, projection={"s4": 3})
    BankConfig(projection_budget=0.4, projection={"s4": 0})  # 0 = no projection: nothing to clash with


def test_sample_is_evenly_spaced_and_bounded() -> None:
    assert sample_indices(10, 4) == [1, 3, 6, 8]
    assert sample_indices(3, 256) == [0, 1, 2]


def test_bad_k_is_one_clear_line() -> None:
    with pytest.raises(BankError, match="k=6 components for 5 channels"):
        fit_from_covariance(torch.zeros(5), torch.eye(5, dtype=torch.float64), 6)


# ---- round trip through every codec ----------------------------------------------------------------------------
def _rank_k(k: int = 3, channels: int = 8) -> tuple[torch.Tensor, Projection]:
    g = torch.Generator().manual_seed(1)
    basis_KC = torch.linalg.qr(torch.randn(channels, k, generator=g, dtype=torch.float64))[0].T.float()
    mean_C = torch.randn(channels, generator=g) * 3
    coeffs = torch.randn(4, k, 5, 7, generator=g) * 10.0 ** torch.linspace(-1, 1, k)[None, :, None, None]
    feats = torch.einsum("kc,skhw->schw", basis_KC, coeffs) + mean_C[None, :, None, None]
    return feats, Projection(mean_C, basis_KC)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_rank_k_round_trip_within_the_codecs_bound(name: str) -> None:
    feats, proj = _rank_k()
    codec = make_codec(name)
    coeffs = proj.project(feats)
    payload = codec.encode(coeffs)
    decoded = proj.unproject(codec.decode(payload))
    # |dx_c| = |sum_k B_kc dc_k| <= sum_k |B_kc| bound_k, plus float32 rounding of the projection round trip
    bound_SKHW = codec.error_bound(coeffs, payload).expand_as(coeffs)
    bound = torch.einsum("kc,skhw->schw", proj.basis_KC.abs(), bound_SKHW) + 1e-5 * (1 + feats.abs())
    assert bool(((decoded - feats).abs() <= bound).all())
    # without a codec the rank-k input comes back (to float32 rounding)
    torch.testing.assert_close(proj.unproject(coeffs), feats, atol=1e-4, rtol=1e-5)


# ---- the spec --------------------------------------------------------------------------------------------------
def test_fingerprint_covers_the_basis_and_k_and_old_specs_are_unchanged() -> None:
    cfg = BankConfig(shard_rows=4, projection={"s8": 2})
    plain = make_spec(cfg)
    assert all("components" not in lv for lv in plain.to_dict()["levels"])
    assert plain.format_version() == 2
    feats, _ = _rank_k(channels=6)
    acc = CovarianceAccumulator()
    acc.add(feats)
    one = with_projections(plain, {"s8": acc.fit(2)}, record=fit_record(4))
    assert one.format_version() == 3 and one.level("s8").stored.shape == (2, 4, 4)
    other_basis = Projection(acc.fit(2).mean_C + 1, acc.fit(2).basis_KC)
    other_k = with_projections(plain, {"s8": acc.fit(3)}, record=fit_record(4))
    other_sample = with_projections(plain, {"s8": acc.fit(2)}, record=fit_record(8))
    prints = {
        plain.fingerprint(),
        one.fingerprint(),
        with_projections(plain, {"s8": other_basis}, record=fit_record(4)).fingerprint(),
        other_k.fingerprint(),
        other_sample.fingerprint(),
    }
    assert len(prints) == 5


def test_unknown_level_in_projection_is_one_clear_line() -> None:
    with pytest.raises(BankError, match=r"bank.projection names unknown levels \['s3'\]"):
        make_spec(BankConfig(shard_rows=4, projection={"s3": 2}))
    with pytest.raises(BankError, match="k must be 0..C"):
        make_spec(BankConfig(shard_rows=4, projection={"s8": 7}))


# ---- banks -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    tmp = tmp_path_factory.mktemp("projection")
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        block_out_channels=(8, 16, 16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 4,
        up_block_types=("UpBlock2D",) * 4,
        norm_num_groups=4,
    )
    unet.save_pretrained(tmp / "teacher")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp / "teacher")
    (tmp / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(
            tmp / "images" / f"img{i:02d}.png"
        )
    return tmp


def overrides(assets: Path, bank: Path, *extra: str) -> list[str]:
    return [
        f"datasets.tiny={{root: {assets / 'images'}, layout: folder, teacher: tiny, t: 50}}",
        f"teachers.tiny={{kind: diffusers, path: {assets / 'teacher'}, dtype: fp32}}",
        "encode.data=tiny",
        f"encode.bank={bank}",
        "encode.num_workers=0",
        "encode.batch_size=8",
        "encode.cpu_threads=1",
        "encode.draws=1",
        "bank.shard_rows=2",
        "encode.tasks_per_worker=1",
        "bank.projection={s8: 8, s4: 6}",
        "bank.projection_images=4",
        *extra,
    ]


def encode(assets: Path, bank: Path, *extra: str):  # noqa: ANN201
    clear_caches()
    cfg = load_pipeline(ROOT / "pipeline.yaml", overrides(assets, bank, *extra))
    return run_encode(resolve(cfg, "encode"), use_dask=False, progress=False)


def bank_files(bank: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(bank)): p.read_bytes() for p in sorted(bank.rglob("*")) if p.is_file()}
    files.pop("zarr.json")  # creation time, bank_id
    markers = {
        p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "bank_id"}
        for p in sorted((side_dir(bank) / "done").glob("*.json"))
    }
    return {**files, **markers}


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_projected_bank_encodes_reopens_and_decodes_near_the_full_bank(assets: Path, codec: str) -> None:
    bank = assets / f"p-{codec}.zarr"
    summary = encode(assets, bank, f"bank.codec={codec}")
    opened = Bank.open(bank)
    s8, s4 = opened.spec.level("s8"), opened.spec.level("s4")
    assert (s8.components, s4.components) == (8, 6) and opened.attrs["format_version"] == 3
    assert opened.spec.projection_fit == {"rule": "pca-v1", "images": 4}
    # coefficients stored: (k, H, W) parts
    assert opened.read_rows([0])["targets"]["s4"][next(iter(make_codec(codec).part_names))].shape[1] == 6
    assert set(summary.projection["levels"]) == {"s8", "s4"}
    assert 0 < summary.projection["levels"]["s4"]["energy"] <= 1
    # decoded to C channels, close to the same rows of an unprojected bank (held-out images: 4 of the 8 fitted)
    full = assets / f"full-{codec}.zarr"
    encode(assets, full, f"bank.codec={codec}", "bank.projection={}")
    ours, ref = opened.decode_rows(slice(None)), Bank.open(full).decode_rows(slice(None))
    for name in ("s8", "s4"):
        assert ours[name].shape == ref[name].shape
        flat_o, flat_r = ours[name].reshape(8, -1), ref[name].reshape(8, -1)
        cos = (flat_o * flat_r).sum(1) / np.linalg.norm(flat_o, axis=1) / np.linalg.norm(flat_r, axis=1)
        assert cos.min() > 0.5, (name, cos)
    for name in ("s2", "s1"):  # levels not projected: the same bytes' decode
        np.testing.assert_array_equal(ours[name], ref[name])
    out = CliRunner().invoke(main, ["bank", "info", str(bank)], catch_exceptions=False).output
    assert "projection k=6 of 16 channels, energy kept" in out
    assert CliRunner().invoke(main, ["bank", "verify", str(bank)]).exit_code == 0


def test_kill_minus_9_then_resume_equals_uninterrupted(assets: Path) -> None:
    reference = assets / "ref.zarr"
    encode(assets, reference)
    bank = assets / "killed.zarr"
    cmd = [sys.executable, "-m", "dreamteacher", "encode", "--config", str(ROOT / "pipeline.yaml"), "--no-dask",
           "--quiet", *overrides(assets, bank)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = side_dir(bank) / "done"
    deadline = time.monotonic() + 180
    while not (done.is_dir() and list(done.glob("*.json"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"encode ended or stalled before any shard was done: {proc.stderr.read()!r}")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(done.glob("*.json")))
    total = len(list((side_dir(reference) / "done").glob("*.json")))
    assert 1 <= done_at_kill < total, "the run finished before the kill: nothing was resumed"
    summary = encode(assets, bank)
    assert summary.projection["reused"] and summary.shards_encoded == total - done_at_kill
    assert bank_files(bank) == bank_files(reference)  # the bases too (projection/<level>/...)


def test_dask_encode_fits_in_the_driver_and_writes_the_same_bytes(assets: Path) -> None:
    reference = assets / "ref.zarr"
    if not reference.exists():
        encode(assets, reference)
    with_dask = assets / "dask.zarr"
    clear_caches()
    cfg = load_pipeline(ROOT / "pipeline.yaml", overrides(assets, with_dask))
    summary = run_encode(resolve(cfg, "encode"), use_dask=True, progress=False)
    assert summary.shards_encoded == summary.shards_total and not summary.projection.get("reused")
    assert bank_files(with_dask) == bank_files(reference)


def test_energy_chosen_k_is_the_fewest_that_keep_it_recorded_resumed_and_refused_when_changed(
    assets: Path,
) -> None:
    bank = assets / "energy.zarr"
    extra = ("bank.projection={s8: 8}", "bank.projection_energy={s4: 0.9}")
    summary = encode(assets, bank, *extra)
    opened = Bank.open(bank)
    k = opened.spec.level("s4").components
    assert 1 < k < 16 and summary.projection["levels"]["s4"]["energy"] >= 0.9
    # fewest: the same sample fitted with a fixed k - 1 (the fixed-k path) keeps less than 0.9
    fewer = encode(assets, assets / "energy-fewer.zarr", f"bank.projection={{s8: 8, s4: {k - 1}}}")
    assert fewer.projection["levels"]["s4"]["energy"] < 0.9
    assert opened.spec.projection_fit == {"rule": "pca-v1", "images": 4, "energy": {"s4": 0.9}}
    assert opened.spec.level("s8").components == 8
    # a re-run reuses the bases; another energy is another bank, refused with the difference named
    assert encode(assets, bank, *extra).projection.get("reused")
    with pytest.raises(BankError, match="projection_fit.energy"):
        encode(assets, bank, "bank.projection={s8: 8}", "bank.projection_energy={s4: 0.99}")


def test_budget_bank_is_the_fixed_k_bank_of_its_allocation_recorded_resumed_and_refused_when_changed(
    assets: Path,
) -> None:
    bank = assets / "budget.zarr"
    summary = encode(assets, bank, "bank.projection={}", "bank.projection_budget=0.3")
    opened = Bank.open(bank)
    levels = {lv.name: lv for lv in opened.spec.levels}
    k = {name: lv.components or lv.channels for name, lv in levels.items()}
    values = sum(k[n] * lv.height * lv.width for n, lv in levels.items())
    total = sum(lv.channels * lv.height * lv.width for lv in levels.values())
    assert values <= 0.3 * total and summary.projection["values_kept"] == pytest.approx(values / total)
    assert any(lv.components for lv in levels.values()), "a budget below 1 projects some level"
    assert opened.spec.projection_fit == {"rule": "pca-v1", "images": 4, "budget": 0.3}
    # the budget only chooses k: the same sample fitted with those k as fixed values gives the same bases and rows
    fixed = {n: lv.components for n, lv in levels.items() if lv.components}
    same = assets / "budget-fixed.zarr"
    encode(assets, same, f"bank.projection={json.dumps(fixed)}")
    ours, ref = bank_files(bank), bank_files(same)
    chunks = sorted(f for f in ours if "/c/" in f)
    assert chunks == sorted(f for f in ref if "/c/" in f) and any(f.startswith("projection/") for f in chunks)
    assert all(ours[f] == ref[f] for f in chunks)  # features, pixels, keys and the bases
    # the fingerprint tells them apart (a different fit record); a re-run reuses, another budget is refused
    assert opened.spec.fingerprint() != Bank.open(same).spec.fingerprint()
    assert encode(assets, bank, "bank.projection={}", "bank.projection_budget=0.3").projection.get("reused")
    with pytest.raises(BankError, match="projection_fit.budget"):
        encode(assets, bank, "bank.projection={}", "bank.projection_budget=0.4")


def test_spectrum_report_predicts_what_each_rule_encodes_and_writes_nothing(assets: Path) -> None:
    from bank.spec import KEY_BYTES
    from encode.pipeline import plan_encode
    from encode.projection_fit import spectrum_report

    bank = assets / "spectrum.zarr"
    extra = ("bank.projection={}", "bank.codec=fp16", "bank.pixels=rows", "bank.pixel_compressor=none")
    clear_caches()
    inputs = resolve(load_pipeline(ROOT / "pipeline.yaml", overrides(assets, bank, *extra)), "encode")
    report = spectrum_report(plan_encode(inputs, use_dask=False), inputs.bank)
    assert not bank.exists()
    # bytes per image by hand: 2 rows (one draw, both flips) of fp16 levels, uint8 32x32 pixels and the row's
    # key (KEY_BYTES), source index, draw, flip, seed (int64) and ok (bool)
    per_row = 3 * 32 * 32 + KEY_BYTES + 4 * 8 + 1
    values = {n: lv["channels"] * lv["positions"] for n, lv in report["levels"].items()}
    assert report["rules"]["none"]["bytes_per_image"] == 2 * (2 * sum(values.values()) + per_row)
    assert report["rules"]["k = C/2"]["bytes_per_image"] == 2 * (2 * sum(values.values()) // 2 + per_row)
    # what an encode with a rule records is what the report said: k and energy per level
    budget = report["rules"]["projection_budget=0.4"]
    encode(assets, bank, *extra, "bank.projection_budget=0.4")
    opened = Bank.open(bank)
    for lv in opened.spec.levels:
        assert (lv.components or lv.channels) == budget["k"][lv.name], lv.name
        if lv.components:
            assert opened.projections[lv.name].energy == pytest.approx(budget["energy"][lv.name], rel=1e-5)
    energy = report["rules"]["projection_energy=0.95"]
    everywhere = "{" + ", ".join(f"{n}: 0.95" for n in report["levels"]) + "}"
    summary = encode(assets, assets / "spectrum-e.zarr", *extra, f"bank.projection_energy={everywhere}")
    assert {n: lv["k"] for n, lv in summary.projection["levels"].items()} == energy["k"]
    # the command prints it, one line per rule
    out = CliRunner().invoke(
        main, ["encode", "--spectrum", "--config", str(ROOT / "pipeline.yaml"),
               *overrides(assets, assets / "none.zarr", *extra)], catch_exceptions=False,
    ).output  # fmt: skip
    assert "projection_budget=0.4" in out and "k for 95%" in out and not (assets / "none.zarr").exists()
    rule_lines = [
        line.split()[0] for line in out.splitlines() if line.startswith(("none", "k =", "projection_"))
    ]
    assert rule_lines == ["none", "k", *(r for r in report["rules"] if r.startswith("projection_"))]


def test_a_changed_basis_is_refused_on_open_and_on_resume(assets: Path) -> None:
    bank = assets / "tampered.zarr"
    encode(assets, bank)
    array = zarr.open_array(bank / "projection" / "s4" / "mean", mode="r+")
    array[0] = float(array[0]) + 1.0
    with pytest.raises(BankError, match="does not match the sha256 in the bank's spec"):
        Bank.open(bank)
    with pytest.raises(BankError, match="does not match the sha256 in the bank's spec"):
        encode(assets, bank)
    clear_caches()  # --overwrite replaces it: a fresh fit, the same basis as the reference's
    cfg = load_pipeline(ROOT / "pipeline.yaml", overrides(assets, bank))
    assert not run_encode(
        resolve(cfg, "encode"), use_dask=False, progress=False, overwrite=True
    ).projection.get("reused")
    assert Bank.open(bank).spec.level("s4").components == 6


def test_projected_bank_distils_at_debug_size(assets: Path, tmp_path: Path) -> None:
    bank = assets / "p-int8.zarr"
    if not bank.exists():
        encode(assets, bank, "bank.codec=int8")
    runs = tmp_path / "runs"
    config = ["--config", str(ROOT / "pipeline.yaml"), *overrides(assets, bank)[:3]]
    result = CliRunner().invoke(
        main,
        [
            "distill",
            "--no-progress",
            *config,
            f"distill.bank={bank}",
            f"distill.out={runs}",
            "distill.exp=e",
            "distill.levels=[s4, s8]",
            "distill.student.name=resnet10t",
            "distill.regressor.channels=32",
            "distill.batch_size=4",
            "distill.num_workers=0",
            "distill.max_steps=2",
            "distill.log_every=1",
            "distill.device=cpu",
        ],  # fmt: skip
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (runs / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(
        np.isfinite(r["loss"]) and r["loss"] > 0 for r in records
    )


def test_decode_targets_projects_back_on_the_device_before_whitening(assets: Path) -> None:
    from bank.dataset import BankTrainSet, collate_rows
    from distill.targets import BankTargets

    bank = assets / "p-int8.zarr"
    if not bank.exists():
        encode(assets, bank, "bank.codec=int8")
    opened = Bank.open(bank)
    batch = collate_rows(BankTrainSet(bank).__getitems__([0, 3]))
    targets = BankTargets(torch.device("cpu"), ["s4", "s1"], opened.projections)(batch)
    assert targets["s4"].shape == (2, 16, 8, 8)
    np.testing.assert_allclose(targets["s4"].numpy(), opened.decode_rows([0, 3])["s4"], rtol=1e-6, atol=1e-6)


def test_level_spec_stored_shape() -> None:
    level = LevelSpec(name="s4", stride=4, channels=16, height=8, width=8, codec="int8", components=4,
                      basis_sha256="x")  # fmt: skip
    assert level.stored.shape == (4, 8, 8) and level.shape == (16, 8, 8)
