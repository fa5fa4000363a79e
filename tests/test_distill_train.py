"""Distillation end to end on a real tiny bank written with BankWriter (32x32 images, resnet18, a few steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from bank import BankWriter, ShardRows, spec_from_config
from bank.config import BankConfig
from distill.train import run_distill as _run_distill
from dreamteacher.commands.distill import distill as distill_cli
from dreamteacher.resolve import resolve
from dreamteacher.schema import load_pipeline
from teachers.config import TeacherConfig
from training.checkpoint import load_checkpoint
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES, SIZE, DRAWS, FLIPS = 16, 32, 2, 2
# (name, stride, channels, height, width): s32 is stored at 2x2 (the student's stride-32 map is 1x1) to exercise
# the resize path
LEVELS = [("s4", 4, 6, 8, 8), ("s8", 8, 6, 4, 4), ("s16", 16, 8, 2, 2), ("s32", 32, 8, 2, 2)]


def run_distill(cfg, **kwargs):  # noqa: ANN001, ANN003, ANN201 - the tests build whole pipeline configs
    """``run_distill`` on ``resolve(cfg, "distill")``, the inputs the CLI gives it."""
    return _run_distill(resolve(cfg, "distill"), **kwargs)


def _features(images_u8: np.ndarray, draw: np.ndarray) -> dict[str, np.ndarray]:
    """Learnable 'teacher': a fixed random 1x1 projection of the average-pooled image, plus a per-draw offset."""
    x = torch.from_numpy(images_u8).float() / 127.5 - 1.0
    out = {}
    for i, (name, _, channels, h, _) in enumerate(LEVELS):
        proj = torch.randn(channels, 3, generator=torch.Generator().manual_seed(i))
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, h)  # (S, 3, h, h)
        feats = torch.tanh(torch.einsum("kc,schw->skhw", proj, pooled) * 2.0)
        out[name] = (feats + 0.05 * torch.from_numpy(draw).float().view(-1, 1, 1, 1)).numpy()
    return out


def write_bank(path: Path, *, seed: int = 0, channels_s4: int = 6) -> Path:
    rng = np.random.default_rng(seed)
    levels = [
        dict(name=n, stride=s, channels=channels_s4 if n == "s4" else c, height=h, width=w)
        for n, s, c, h, w in LEVELS
    ]
    cfg = BankConfig(shard_rows=16, codec="int8", level_codecs={"s32": "fp16"})
    spec = spec_from_config(
        levels,
        cfg,
        num_images=NUM_IMAGES,
        draws=DRAWS,
        flips=FLIPS,
        image_size=SIZE,
        attributes={"dataset": {"name": "distill-test", "seed": seed}},
    )
    writer = BankWriter.create(path, spec, cfg)
    images = rng.integers(0, 256, size=(NUM_IMAGES, 3, SIZE, SIZE), dtype=np.uint8)
    for shard in range(spec.num_shards):
        rows = np.arange(spec.shard_range(shard).start, spec.shard_range(shard).stop)
        image, draw, flip = rows // (DRAWS * FLIPS), (rows // FLIPS) % DRAWS, rows % FLIPS
        pixels = images[image].copy()
        pixels[flip == 1] = pixels[flip == 1][..., ::-1]
        feats = _features(pixels, draw)
        if channels_s4 != 6:
            feats["s4"] = np.repeat(feats["s4"][:, :1], channels_s4, axis=1)
        writer.write_shard(
            shard,
            ShardRows(
                images_u8=pixels,
                features=feats,
                keys=[f"img{i:03d}" for i in image],
                source_index=image,
                draw=draw,
                flip=flip,
                seed=rows * 7 + 1,
                ok=np.ones(len(rows), dtype=bool),
            ),
        )
    writer.finalize({})
    return path


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bank(tmp_path_factory.mktemp("bank") / "tiny.zarr")


def make_cfg(bank: Path, out: Path, *overrides: str):
    base = [
        f"distill.bank={bank}",
        f"distill.out={out}",
        "distill.student.name=resnet18",
        "distill.batch_size=4",
        "distill.num_workers=0",
        "distill.regressor.channels=16",
        "distill.log_every=1",
        "distill.optim.lr=0.002",
        "distill.optim.warmup_epochs=0.5",
        "distill.max_steps=6",
    ]
    return load_pipeline(REPO / "pipeline.yaml", [*base, *overrides])


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_loss_falls_when_overfitting(bank_path: Path, tmp_path: Path) -> None:
    cfg = make_cfg(
        bank_path,
        tmp_path,
        "distill.exp=fit",
        "distill.max_steps=20",
        "distill.batch_size=4",
        "distill.optim.lr=0.003",
        "distill.draw=first",
        "distill.flip=none",
    )
    exp = run_distill(cfg, progress=False)
    records = read_metrics(exp / "metrics.jsonl")
    assert len(records) == 20
    first = np.mean([r["loss"] for r in records[:4]])
    last = np.mean([r["loss"] for r in records[-4:]])
    assert last < 0.6 * first, (first, last)
    assert {"mse/s4", "at/s32", "lr", "grad_norm", "data_wait_frac"} <= set(records[-1])
    for name in (
        "config.yaml",
        "bank.json",
        "checkpoint.pt",
        "backbone.safetensors",
        "backbone_torchvision.safetensors",
        "regressor.safetensors",
    ):
        assert (exp / name).is_file(), name
    # the exported backbone loads into fresh timm / torchvision models with the trained values
    fresh = timm.create_model(
        "resnet18",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(exp / "backbone.safetensors")),
    )
    trained = load_checkpoint(exp / "checkpoint.pt")["model"]
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, trained[f"student.model.{key}"]), key
    import torchvision

    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(load_file(str(exp / "backbone_torchvision.safetensors")), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert torch.equal(tv.layer3[1].conv2.weight, fresh.layer3[1].conv2.weight)
    # the plot subcommand
    runner = CliRunner()
    outcome = runner.invoke(distill_cli, ["plot", str(exp)])
    assert outcome.exit_code == 0, outcome.output
    assert (exp / "losses.png").stat().st_size > 1000


def test_resume_is_bit_exact(bank_path: Path, tmp_path: Path) -> None:
    # 16 images / batch 4 = 4 steps per epoch: the split at step 3 and the run's end cross an epoch boundary
    full = run_distill(make_cfg(bank_path, tmp_path, "distill.exp=full"), progress=False)
    half = make_cfg(
        bank_path, tmp_path, "distill.exp=split", "distill.stop_at_step=3", "distill.checkpoint_every=2"
    )
    split = run_distill(half, progress=False)
    assert not (split / "backbone.safetensors").exists()  # not finished: no artifacts yet
    run_distill(make_cfg(bank_path, tmp_path, "distill.exp=split"), resume=True, progress=False)
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert a["step"] == b["step"] == 6 and a["sampler"] == b["sampler"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    losses_a = [r["loss"] for r in read_metrics(full / "metrics.jsonl")]
    losses_b = [r["loss"] for r in read_metrics(split / "metrics.jsonl")]
    assert losses_a == losses_b and len(losses_a) == 6


def test_refuses_a_bank_that_does_not_fit(bank_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"distill.levels asks for \['s64'\]"):
        run_distill(make_cfg(bank_path, tmp_path, "distill.levels=[s4, s64]"), progress=False)
    # resuming an experiment on a different bank is refused, naming both fingerprints
    run_distill(make_cfg(bank_path, tmp_path, "distill.exp=one", "distill.max_steps=1"), progress=False)
    other = write_bank(tmp_path / "other.zarr", seed=1)
    with pytest.raises(ValueError, match="a different bank"):
        run_distill(
            make_cfg(other, tmp_path, "distill.exp=one", "distill.max_steps=2"), resume=True, progress=False
        )
    with pytest.raises(ValueError, match="--resume"):
        run_distill(make_cfg(bank_path, tmp_path, "distill.exp=one"), progress=False)


def test_subset_of_levels(bank_path: Path, tmp_path: Path) -> None:
    exp = run_distill(
        make_cfg(bank_path, tmp_path, "distill.levels=[s8, s16]", "distill.max_steps=2"), progress=False
    )
    assert sorted(k for k in read_metrics(exp / "metrics.jsonl")[0] if k.startswith("mse/")) == [
        "mse/s16",
        "mse/s8",
    ]


def test_cli_trains_without_subcommand(bank_path: Path, tmp_path: Path) -> None:
    args = [
        "--config",
        str(REPO / "pipeline.yaml"),
        f"distill.bank={bank_path}",
        f"distill.out={tmp_path}",
        "distill.student.name=resnet18",
        "distill.batch_size=4",
        "distill.num_workers=0",
        "distill.regressor.channels=8",
        "distill.max_steps=1",
        "distill.exp=cli",
    ]
    outcome = CliRunner().invoke(distill_cli, ["--no-progress", *args])
    assert outcome.exit_code == 0, outcome.output
    assert (tmp_path / "cli" / "backbone.safetensors").is_file()


def _torchrun_distill(bank_path: Path, tmp_path: Path, *overrides: str) -> None:
    """``dreamteacher distill`` as 2 gloo ranks of one torchrun on CPU (small resnet18 recipe + ``overrides``)."""
    cmd = [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "dreamteacher",
        "distill", "--no-progress", "--config", str(REPO / "pipeline.yaml"), f"distill.bank={bank_path}",
        f"distill.out={tmp_path}", "distill.student.name=resnet18", "distill.batch_size=8", "distill.num_workers=0",
        "distill.regressor.channels=8", "distill.device=cpu", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # two fresh Python processes import torch + timm
def test_ddp_two_processes_cover_each_image_once(bank_path: Path, tmp_path: Path) -> None:
    # batch 8 over 2 ranks, 16 images: one epoch = 2 steps of 4 rows per rank
    _torchrun_distill(
        bank_path,
        tmp_path,
        "distill.max_steps=2",
        "distill.exp=ddp",
        "distill.audit_rows=true",
    )
    per_rank = [
        [
            int(r)
            for line in (tmp_path / "ddp" / "rows" / f"rank{k}.txt").read_text().splitlines()
            for r in line.split()
        ]
        for k in range(2)
    ]
    images = [{r // (DRAWS * FLIPS) for r in rows} for rows in per_rank]
    assert len(per_rank[0]) == len(per_rank[1]) == 8
    assert not images[0] & images[1] and images[0] | images[1] == set(range(NUM_IMAGES))
    assert json.loads((tmp_path / "ddp" / "bank.json").read_text())["path"] == str(bank_path)
    assert (tmp_path / "ddp" / "backbone.safetensors").is_file()


ADM_TINY = REPO / "tests" / "data" / "adm-tiny"


def write_teacher_bank(path: Path, teacher_cfg) -> Path:  # noqa: ANN001 - TeacherConfig
    """A bank encoded the way encode does it (noise mode, per-row seeds, flipped rows get mirrored noise)."""
    from configlib import to_dict
    from teachers import build_teacher, resolve_taps
    from teachers.encoding import TeacherEncoder, make_noise

    teacher = build_teacher(teacher_cfg, "cpu")
    encoder = TeacherEncoder(
        teacher,
        resolve_taps(teacher, teacher_cfg),
        mode="noise",
        t=50,
        ddim_steps=0,
        resolution=64,
        device="cpu",
        dtype_name="fp32",
        channels_last=False,
    )
    num_images, draws, flips = 2, 2, 2
    attributes = {
        "teacher": {
            "name": "tiny",
            "identity": to_dict(teacher.identity()),
            "config": {k: v for k, v in to_dict(teacher_cfg).items() if k not in ("path", "checkpoint")},
        },
        "encoding": {"mode": "noise", "t": 50, "ddim_steps": 0, "seed": 0},
        "taps": [tap.as_dict() for tap in encoder.taps_info],
        "preprocessing": {"resolution": 64},
    }
    cfg = BankConfig(shard_rows=8, codec="fp16")
    spec = spec_from_config(
        [tap.as_dict() for tap in encoder.taps_info],
        cfg,
        num_images=num_images,
        draws=draws,
        flips=flips,
        image_size=64,
        attributes=attributes,
    )
    writer = BankWriter.create(path, spec, cfg)
    rows = np.arange(spec.num_rows)
    flip, draw, image = rows % 2, (rows // 2) % 2, rows // 4
    pixels = np.random.default_rng(0).integers(0, 256, size=(num_images, 3, 64, 64), dtype=np.uint8)[image]
    pixels[flip == 1] = pixels[flip == 1][..., ::-1]
    seeds = 1000 + rows // 2
    eps = make_noise(seeds.tolist(), flip.astype(bool).tolist(), (3, 64, 64))
    feats = encoder(torch.from_numpy(pixels).float() / 127.5 - 1.0, eps)
    writer.write_shard(
        0,
        ShardRows(
            images_u8=pixels,
            features=feats,
            keys=[f"k{i}" for i in image],
            source_index=image,
            draw=draw,
            flip=flip,
            seed=seeds,
            ok=np.ones(len(rows), dtype=bool),
        ),
    )
    writer.finalize({})
    return path


def test_replayed_targets_equal_the_bank(tmp_path: Path) -> None:
    from bank import Bank, BankTrainSet, decode_targets
    from configlib import from_mapping
    from distill.targets import TeacherTargets
    from teachers.config import TeacherConfig

    flags = json.loads((ADM_TINY / "flags.json").read_text())
    teacher_cfg = from_mapping(
        TeacherConfig,
        {"kind": "adm", "checkpoint": str(ADM_TINY / "model.pt"), "flags": flags, "dtype": "fp32"},
    )
    path = write_teacher_bank(tmp_path / "adm.zarr", teacher_cfg)
    bank = Bank.open(path)
    levels = [lv.name for lv in bank.levels]
    assert levels == ["s32", "s16", "s8", "s4"]
    batch = BankTrainSet(path).__getitems__([1, 2, 5])  # rows with and without flips
    stored = decode_targets(batch["targets"], "cpu")
    replay = TeacherTargets(bank, {"tiny": teacher_cfg}, levels, torch.device("cpu"), fresh=False)(batch)
    for name in levels:
        torch.testing.assert_close(
            replay[name], stored[name], rtol=2e-3, atol=2e-3 * stored[name].abs().max()
        )
    # a wrong teacher is refused, naming the checkpoint mismatch
    wrong = from_mapping(
        TeacherConfig,
        {"kind": "adm", "checkpoint": str(REPO / "tests/data/adm-tiny-heads/model.pt"), "flags": flags},
    )
    with pytest.raises((ValueError, RuntimeError)):
        TeacherTargets(bank, {"tiny": wrong}, levels, torch.device("cpu"), fresh=False)
    # and a training run with teacher targets reads only pixels from the bank
    cfg = load_pipeline(
        REPO / "pipeline.yaml",
        [
            f"distill.bank={path}",
            f"distill.out={tmp_path}",
            "distill.student.name=resnet18",
            "distill.batch_size=2",
            "distill.num_workers=0",
            "distill.regressor.channels=8",
            "distill.max_steps=2",
            "distill.targets=replay",
            "teachers.tiny.kind=adm",
            f"teachers.tiny.checkpoint={ADM_TINY / 'model.pt'}",
        ],
    )
    cfg.teachers["tiny"].flags = flags
    exp = run_distill(cfg, progress=False)
    assert len(read_metrics(exp / "metrics.jsonl")) >= 1


def _adm_tiny_teacher() -> TeacherConfig:
    from configlib import from_mapping

    flags = json.loads((ADM_TINY / "flags.json").read_text())
    return from_mapping(
        TeacherConfig,
        {"kind": "adm", "checkpoint": str(ADM_TINY / "model.pt"), "flags": flags, "dtype": "fp32"},
    )


def test_fresh_online_targets_draw_new_noise_per_visit_reproducibly(tmp_path: Path) -> None:
    from bank import Bank, BankTrainSet, decode_targets
    from distill.targets import TeacherTargets
    from teachers.encoding import fresh_seed, make_noise

    teacher_cfg = _adm_tiny_teacher()
    path = write_teacher_bank(tmp_path / "adm.zarr", teacher_cfg)
    bank = Bank.open(path)
    levels = [lv.name for lv in bank.levels]
    batch = BankTrainSet(path).__getitems__([0, 1])  # image 0, draw 0: unflipped and flipped view
    online = TeacherTargets(bank, {"tiny": teacher_cfg}, levels, torch.device("cpu"), fresh=True, seed=3)
    again = TeacherTargets(bank, {"tiny": teacher_cfg}, levels, torch.device("cpu"), fresh=True, seed=3)
    first, repeat = online(batch), again(batch)
    online.set_epoch(1)
    second = online(batch)
    stored = decode_targets(batch["targets"], "cpu")
    for name in levels:
        assert torch.equal(first[name], repeat[name])  # two runs see the same noise
        assert not torch.allclose(first[name], second[name], atol=1e-3)  # a new visit, a new draw
        assert not torch.allclose(first[name], stored[name], atol=1e-3)  # and not the stored draw
    # by hand: the flipped view is the teacher's encoding of the mirrored pixels with the visit's own seed
    pixels = batch["image"].float() / 127.5 - 1.0
    assert torch.equal(pixels[1], pixels[0].flip(-1))
    seed = fresh_seed(3, "k0", visit=1 * bank.spec.draws + 0, flip=1)
    by_hand = online.encoder(pixels[0:1].flip(-1), make_noise([seed], [False], (3, 64, 64)))
    for name in levels:
        torch.testing.assert_close(second[name][1:2], by_hand[name], rtol=1e-3, atol=1e-4)  # batch of 2 vs 1


def test_fresh_online_run_resumes_exactly(tmp_path: Path) -> None:
    teacher_cfg = _adm_tiny_teacher()
    path = write_teacher_bank(tmp_path / "adm.zarr", teacher_cfg)

    def cfg(exp: str, *extra: str) -> object:
        c = load_pipeline(
            REPO / "pipeline.yaml",
            [f"distill.bank={path}", f"distill.out={tmp_path}", f"distill.exp={exp}", "distill.targets=online",
             "distill.student.name=resnet10t", "distill.batch_size=2", "distill.num_workers=0",
             "distill.regressor.channels=8", "distill.max_steps=4", "distill.log_every=1",
             "teachers.tiny.kind=adm", f"teachers.tiny.checkpoint={ADM_TINY / 'model.pt'}", *extra],
        )  # fmt: skip
        c.teachers["tiny"] = teacher_cfg
        return c

    # 2 images per epoch at batch 2: one step per epoch, so every step is a new visit
    full = run_distill(cfg("full"), progress=False)
    run_distill(cfg("split", "distill.stop_at_step=2", "distill.checkpoint_every=1"), progress=False)
    split = run_distill(cfg("split"), resume=True, progress=False)
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    losses = [[r["loss"] for r in read_metrics(exp / "metrics.jsonl")] for exp in (full, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_non_finite_loss_names_step_and_terms() -> None:
    from distill.model import DistillNet
    from distill.student import build_student
    from distill.train import build_optimizer, build_schedule
    from distill.trainer import NonFiniteLossError, StepSettings, Trainer
    from training.runtime import Runtime

    cfg = load_pipeline(REPO / "pipeline.yaml", ["distill.max_steps=4"]).distill
    net = DistillNet(build_student("resnet18"), {"s8": 4, "s16": 4}, channels=8)
    optimizer = build_optimizer(net, cfg)
    scheduler, _ = build_schedule(optimizer, cfg, steps_per_epoch=4)

    def targets(batch: dict) -> dict[str, torch.Tensor]:
        bad = torch.zeros(2, 4, 4, 4)
        bad[0, 0, 0, 0] = float("nan")
        return {"s8": bad, "s16": torch.zeros(2, 4, 2, 2)}

    trainer = Trainer(
        net,
        net,
        optimizer,
        scheduler,
        targets,
        StepSettings(whiten="sample", at_weight=10.0),
        Runtime(torch.device("cpu")),
        step=7,
    )
    trainer.train_step({"image": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)})  # no host sync: no raise yet
    trainer.train_step({"image": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)})
    assert trainer.step == 9 and len(trainer.terms) == 2
    # the flush (at the next log boundary or checkpoint) names the first bad step and all its terms
    with pytest.raises(NonFiniteLossError, match=r"step 7 .*'mse/s8'.*at/s16="):
        trainer.flush()


def test_convnext_export_loads_into_timm(tmp_path: Path) -> None:
    from distill.export import export_artifacts
    from distill.model import DistillNet
    from distill.student import build_student

    torch.manual_seed(3)
    net = DistillNet(build_student("convnext_atto"), {"s4": 4}, channels=8)
    written = export_artifacts(net, tmp_path, {"exp": "t"})
    assert "torchvision" not in written
    fresh = timm.create_model(
        "convnext_atto",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(written["backbone"])),
    )
    own = net.student.timm_state_dict()
    for key, value in fresh.state_dict().items():
        if not key.startswith("head."):  # the classifier head's norm is not part of a features-only student
            assert torch.equal(value, own[key]), key
    feats = timm.create_model(
        "convnext_atto",
        pretrained=True,
        features_only=True,
        pretrained_cfg_overlay=dict(file=str(written["backbone"])),
    )
    assert torch.equal(
        feats.stages_3.blocks[0].conv_dw.weight, net.student.model.stages[3].blocks[0].conv_dw.weight
    )


@pytest.mark.gpu
def test_cuda_bf16_channels_last_step(bank_path: Path, tmp_path: Path) -> None:
    for amp_dtype in ("bf16", "fp16"):
        exp = run_distill(
            make_cfg(
                bank_path,
                tmp_path,
                f"distill.exp=cuda-{amp_dtype}",
                "distill.device=cuda",
                f"distill.amp_dtype={amp_dtype}",
                "distill.max_steps=3",
            ),
            progress=False,
        )
        records = read_metrics(exp / "metrics.jsonl")
        assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
        state = load_checkpoint(exp / "checkpoint.pt")
        assert bool(state["scaler"]) == (amp_dtype == "fp16")  # a GradScaler only for fp16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_names_the_key(bank_path: Path, tmp_path: Path) -> None:
    # one device resolution for every stage (training.runtime): a clear error naming distill.device
    with pytest.raises(ValueError, match=r"distill.device='cuda' but this process sees no CUDA device"):
        run_distill(make_cfg(bank_path, tmp_path, "distill.device=cuda"), progress=False)


def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """Steps of ``tag`` as TensorBoard shows them (purged events of a resumed run are dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_resumed_metrics_equal_an_uninterrupted_run(
    bank_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # log every 3 steps, checkpoint every 2: a session ends mid-window (step 4) and a crash re-runs steps 3..6
    import shutil

    import distill.train as train_module

    every = ["distill.log_every=3", "distill.checkpoint_every=2", "distill.max_steps=6"]
    straight = run_distill(make_cfg(bank_path, tmp_path, "distill.exp=a", *every), progress=False)
    exp = tmp_path / "b"
    original_save = train_module.save_checkpoint

    def save_and_keep_step_2(path, state):  # noqa: ANN001, ANN202
        original_save(path, state)
        if state.get("step") == 2:
            shutil.copy(path, exp / "step2.pt")

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_keep_step_2)
    run_distill(
        make_cfg(bank_path, tmp_path, "distill.exp=b", "distill.stop_at_step=4", *every), progress=False
    )
    run_distill(make_cfg(bank_path, tmp_path, "distill.exp=b", *every), resume=True, progress=False)
    # a run killed after logging step 6 but before its checkpoint landed: the last checkpoint is step 2's
    shutil.copy(exp / "step2.pt", exp / "checkpoint.pt")
    run_distill(make_cfg(bank_path, tmp_path, "distill.exp=b", *every), resume=True, progress=False)

    timing = {"data_wait_frac", "images_per_s"}  # wall-clock figures of each session, not of the steps

    def records(folder: Path) -> list[dict]:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]

    assert [r["step"] for r in records(exp)] == [3, 6]
    assert records(exp) == records(straight)
    assert _tensorboard_steps(exp / "tb", "loss") == [3, 6]  # each step once, not 3, 6, 3, 6


@pytest.mark.slow  # two fresh Python processes import torch + timm
def test_ddp_trains_a_subset_of_levels(bank_path: Path, tmp_path: Path) -> None:
    # issue 18 item 8: with distill.levels a subset the regressor built the s4 output anyway; its parameters got
    # no gradient and DDP (no find_unused_parameters) failed on step 2. Only what the loss uses is built now.
    _torchrun_distill(
        bank_path,
        tmp_path,
        "distill.levels=[s8, s16, s32]",
        "distill.max_steps=3",
        "distill.log_every=1",
        "distill.exp=ddp-subset",
    )
    records = read_metrics(tmp_path / "ddp-subset" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sorted(k for k in records[-1] if k.startswith("mse/")) == ["mse/s16", "mse/s32", "mse/s8"]
