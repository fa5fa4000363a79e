"""BigGAN-deep generator (teachers/biggan.py) against the original pytorch-pretrained-biggan code's activations.

``tests/data/biggan-tiny`` (tests/data/BIGGAN_FIXTURES.md) was made with the original package: the biggan-deep-128
layout at 1/32 width, seeded random weights and statistics, three (z, class, truncation) cases. Truncation 0.4 sits
exactly on a statistics row and 0.55 between two, so both branches of the truncation-indexed batch norm are checked.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from teachers.biggan import BigGAN, BigGANConfig, truncation_stats

FIXTURE = Path(__file__).parent / "data" / "biggan-tiny"
CASES = ("a", "b", "c")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.fixture(scope="module")
def model() -> BigGAN:
    return BigGAN.from_folder(FIXTURE).eval()


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected.safetensors")


def fixture_truncation(value: torch.Tensor) -> float:
    """The Python float the original was called with: the fixture stores it as float32 (0.4 -> 0.4000000059...)
    and the original's statistics lookup, modf(truncation * 50), is discontinuous exactly at a row."""
    return float(str(value.numpy()[0]))


@pytest.mark.parametrize("case", CASES)
def test_image_and_every_stage_match_the_original(model: BigGAN, expected: dict, case: str) -> None:
    modules = dict(model.named_modules())
    names = ["generator.gen_z"] + [f"generator.layers.{i}" for i in range(len(model.generator.layers))]
    got: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o)) for n in names]
    try:
        with torch.no_grad():
            image = model(
                expected[f"{case}.z"],
                expected[f"{case}.class_vector"],
                fixture_truncation(expected[f"{case}.truncation"]),
            )
    finally:
        for hook in hooks:
            hook.remove()
    assert image.shape == expected[f"{case}.image"].shape == (2, 3, 128, 128)
    assert rel_err(image, expected[f"{case}.image"]) <= 1e-4
    stages = {f"{case}.gen_z": got["generator.gen_z"]}
    stages |= {f"{case}.{n}": got[n] for n in names[1:]}
    assert set(k for k in expected if k.startswith(f"{case}.g")) == set(stages)  # every stage of the fixture
    errors = {k: rel_err(v, expected[k]) for k, v in stages.items()}
    assert max(errors.values()) <= 1e-4, errors


def test_attention_sits_where_config_says(model: BigGAN) -> None:
    kinds = [type(m).__name__ for m in model.generator.layers]
    assert kinds.index("SelfAttn") == 8 and kinds.count("SelfAttn") == 1 and kinds.count("GenBlock") == 10


def test_truncation_statistics_rule() -> None:
    # hand computation of the original's rule: coef, i = modf(tr * 50); coef * row i + (1 - coef) * row i + 1
    means = torch.arange(51.0)[:, None].repeat(1, 2)
    var = means + 100
    m, v = truncation_stats(means, var, 0.55)  # 27.5 -> 0.5 * 27 + 0.5 * 28
    assert m.tolist() == [27.5, 27.5] and v.tolist() == [127.5, 127.5]
    m, _ = truncation_stats(means, var, 0.41)  # 20.5 (floating: modf gives ~0.5)
    assert m[0].item() == pytest.approx(0.5 * 20 + 0.5 * 21, abs=1e-6)
    m, _ = truncation_stats(means, var, 0.4)  # exactly row 20
    assert m.tolist() == [20.0, 20.0]
    m, _ = truncation_stats(means, var, 1.0)
    assert m.tolist() == [50.0, 50.0]
    with pytest.raises(ValueError, match="truncation must be in"):
        truncation_stats(means, var, 0.0)


def test_structure_follows_config_json(tmp_path: Path) -> None:
    cfg = BigGANConfig.from_json_file(FIXTURE / "config.json")
    # a 64 px layout: drop the last up-sampling block, attention moved earlier
    small = dataclasses.replace(
        cfg, output_dim=64, layers=cfg.layers[:-2] + [(False, 2, 1)], attention_layer_position=3
    )
    model = BigGAN(small).eval()
    for p in model.state_dict().values():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "running_vars" in name:
                buf.abs_().add_(0.5)
        img = model(torch.randn(1, 128), torch.eye(1000)[:1], 0.7)
    assert img.shape == (1, 3, 64, 64)
    assert [type(m).__name__ for m in model.generator.layers].index("SelfAttn") == 3
    assert small.stage_sizes[-1] == 64
    bad = {**json.loads((FIXTURE / "config.json").read_text()), "output_dim": 256}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="up-sample 4 px to 128 px, but output_dim is 256"):
        BigGANConfig.from_json_file(tmp_path / "config.json")


def test_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="lacks \\['config.json', 'pytorch_model.bin'\\]"):
        BigGAN.from_folder(tmp_path)
    (tmp_path / "config.json").write_text((FIXTURE / "config.json").read_text())
    state = torch.load(FIXTURE / "pytorch_model.bin", weights_only=True)
    state.pop("generator.layers.8.gamma")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing \\['generator.layers.8.gamma'\\]"):
        BigGAN.from_folder(tmp_path)
    # an arbitrary pickle (code on load) is refused by weights_only
    torch.save({"model": Path("not a tensor")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        BigGAN.from_folder(tmp_path)


@pytest.mark.parametrize(
    ("size", "want"),
    [
        (128, ["generator.layers.0", "generator.layers.2", "generator.layers.4", "generator.layers.6"]),
        (256, ["generator.layers.2", "generator.layers.4", "generator.layers.6", "generator.layers.9"]),
    ],
)
def test_default_taps_sit_at_strides_32_to_4_of_any_layout(size: int, want: list[str]) -> None:
    """The rule (last module at R/32 .. R/4) on the 128 px layout and a 256 px one (12 blocks, attention at 64 px,
    so index 8 is attention and the last 64 px block is 9); strides measured by the dry run."""
    from teachers.base import discover_taps
    from teachers.gan import BigGANTeacher

    cfg = BigGANConfig.from_json_file(FIXTURE / "config.json")
    if size == 256:
        ups = [False, True, False, True, False, True, False, True, False, True, False, True]
        widths = [16, 16, 16, 16, 8, 8, 4, 4, 2, 2, 1, 1, 1]
        layers = [(up, widths[i], widths[i + 1]) for i, up in enumerate(ups)]
        cfg = dataclasses.replace(cfg, output_dim=256, layers=layers, attention_layer_position=8)
    with torch.device("meta"):
        model = BigGAN(cfg)
    teacher = BigGANTeacher(model, truncation=0.5)
    taps = teacher.default_taps()
    assert [t.module for t in taps] == want and [t.stride for t in taps] == [32, 16, 8, 4]
    infos = discover_taps(teacher, taps, size, "meta")
    assert [i.height for i in infos] == [size // 32, size // 16, size // 8, size // 4]


def test_a_gan_teacher_cannot_encode_images() -> None:
    from teachers.encoding import TeacherEncoder
    from teachers.gan import BigGANTeacher

    teacher = BigGANTeacher.from_folder(FIXTURE, truncation=0.5)
    with pytest.raises(ValueError, match="synthesizes its images and cannot encode real ones"):
        TeacherEncoder(
            teacher, teacher.default_taps(), mode="noise", t=10, ddim_steps=1, resolution=128, device="cpu",
            dtype_name="fp32", channels_last=False,
        )  # fmt: skip
    with pytest.raises(TypeError, match="is a GAN: it synthesizes images"):
        teacher.predict_eps(torch.zeros(1, 3, 128, 128), torch.zeros(1, dtype=torch.long))
