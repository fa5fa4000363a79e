"""ADM (guided-diffusion) teacher: the original checkpoints load without renaming and compute the same function."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from teachers.adm import ADMFlags, ADMTeacher, adm_from_flags, adm_tap_shapes
from teachers.adm_presets import ADM_PRESETS, preset_flags
from teachers.base import FeatureTaps, discover_taps
from teachers.config import TapConfig, TeacherConfig
from teachers.registry import build_teacher
from teachers.schedules import make_alphas_cumprod

DATA = Path(__file__).parent / "data"
FIXTURES = ["adm-tiny", "adm-tiny-heads"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _load(name: str) -> tuple[ADMTeacher, dict[str, torch.Tensor]]:
    flags = json.loads((DATA / name / "flags.json").read_text())
    teacher = ADMTeacher.from_checkpoint(DATA / name / "model.pt", flags)
    return teacher.eval(), load_file(DATA / name / "expected.safetensors")


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_reproduces_model_output_and_every_decoder_block(name: str) -> None:
    teacher, expected = _load(name)
    # Each expected activation becomes one hook; the tap's "stride" is only a unique key here.
    keys = sorted(k for k in expected if k.startswith("output_blocks."))
    taps = []
    for j, key in enumerate(keys):
        _, block, kind = key.split(".")
        if kind == "out":
            taps.append(TapConfig(module=f"output_blocks.{block}", point="output", stride=j + 1))
        else:  # pre_upsample: the input of the block's upsampling layer
            up = teacher.unet.upsampling_layer_index(int(block))
            assert up is not None, key
            taps.append(TapConfig(module=f"output_blocks.{block}.{up}", point="input", stride=j + 1))
    with torch.no_grad(), FeatureTaps(teacher, taps) as captured:
        out = teacher.unet(expected["x"], expected["t"])
    assert _rel_err(out, expected["model_output"]) <= 1e-4
    for j, key in enumerate(keys):
        got = captured.features[f"s{j + 1}"]
        assert got.shape == expected[key].shape, key
        assert _rel_err(got, expected[key]) <= 1e-4, key
    # predict_eps = the first 3 output channels (learn_sigma) / the whole output otherwise
    with torch.no_grad():
        eps = teacher.predict_eps(expected["x"], expected["t"])
    torch.testing.assert_close(eps, out[:, :3])


@pytest.mark.parametrize("name", FIXTURES)
def test_default_taps_are_last_block_of_lowest_four_levels_before_upsampling(name: str) -> None:
    teacher, expected = _load(name)
    taps = teacher.default_taps()
    # Measured strides: adm-tiny has six levels at 64 px (32..4), adm-tiny-heads four at 32 px (8..1).
    assert [t.stride for t in taps] == {"adm-tiny": [32, 16, 8, 4], "adm-tiny-heads": [8, 4, 2, 1]}[name]
    blocks = [int(t.module.split(".")[1]) for t in taps]
    assert blocks == [2, 5, 8, 11]
    infos = discover_taps(teacher, taps, teacher.resolution)
    for info, block in zip(infos, blocks, strict=True):
        key = f"output_blocks.{block}.pre_upsample"
        key = key if key in expected else f"output_blocks.{block}.out"  # last level: no upsampler
        assert (info.channels, info.height, info.width) == tuple(expected[key].shape[1:])


def test_adm_tiny_default_taps_read_the_expected_pre_upsample_tensors() -> None:
    teacher, expected = _load("adm-tiny")
    with torch.no_grad(), FeatureTaps(teacher, teacher.default_taps()) as captured:
        teacher.predict_eps(expected["x"], expected["t"])
    for stride, block in zip((32, 16, 8, 4), (2, 5, 8, 11), strict=True):
        assert (
            _rel_err(captured.features[f"s{stride}"], expected[f"output_blocks.{block}.pre_upsample"]) <= 1e-4
        )


def test_new_attention_order_differs_from_legacy_by_head_layout_only() -> None:
    """Legacy groups qkv per head [q_h k_h v_h]; new order groups [q_all k_all v_all]: a channel permutation."""
    torch.manual_seed(0)
    from teachers.adm import AttentionBlock

    legacy = AttentionBlock(64, num_heads=2)
    new = AttentionBlock(64, num_heads=2, use_new_attention_order=True)
    new.load_state_dict(legacy.state_dict())
    ch, heads = 32, 2
    # new-order channel index of (part, head, c) is part*64 + head*32 + c; legacy is head*96 + part*32 + c
    perm = torch.tensor([h * 3 * ch + p * ch + c for p in range(3) for h in range(heads) for c in range(ch)])
    with torch.no_grad():
        new.qkv.weight.copy_(legacy.qkv.weight[perm])
        new.qkv.bias.copy_(legacy.qkv.bias[perm])
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(new(x), legacy(x), rtol=1e-5, atol=1e-5)


def test_checkpoint_that_does_not_match_flags_is_a_clear_error() -> None:
    flags = json.loads((DATA / "adm-tiny" / "flags.json").read_text())
    flags["learn_sigma"] = False
    with pytest.raises(ValueError, match="does not match the ADM built from the flags"):
        ADMTeacher.from_checkpoint(DATA / "adm-tiny" / "model.pt", flags)


def test_unknown_flag_and_unknown_preset_list_the_valid_names() -> None:
    with pytest.raises(
        ValueError, match="unknown key 'teacher.flags.num_chanels'; valid keys here: .*num_channels"
    ):
        ADMFlags.from_mapping({"image_size": 64, "num_channels": 32, "num_res_blocks": 1, "num_chanels": 3})
    with pytest.raises(ValueError, match="valid presets: adm-256-uncond"):
        preset_flags("adm-512")


def test_class_conditional_model_needs_a_class_label() -> None:
    flags = {**json.loads((DATA / "adm-tiny-heads" / "flags.json").read_text()), "class_cond": True}
    unet = adm_from_flags(flags)
    with pytest.raises(ValueError, match="teacher.class_label"):
        ADMTeacher(unet)
    teacher = ADMTeacher(unet, class_label=3)
    x, t = torch.zeros(1, 3, 32, 32), torch.tensor([10])
    with torch.no_grad():
        expected = unet(x, t, torch.tensor([3]))[:, :3]
        torch.testing.assert_close(teacher.predict_eps(x, t), expected)
    uncond = adm_from_flags(json.loads((DATA / "adm-tiny-heads" / "flags.json").read_text()))
    with pytest.raises(ValueError, match="unconditional"):
        ADMTeacher(uncond, class_label=3)


def test_full_size_adm256_preset_builds_on_meta_with_554m_parameters() -> None:
    unet = adm_from_flags(preset_flags("adm-256-uncond"), device="meta")
    n_params = sum(p.numel() for p in unet.parameters())
    assert 550_000_000 < n_params < 556_000_000  # 552,814,086: the released 256x256_diffusion_uncond.pt
    shapes = [(i.channels, i.height, i.width) for i in adm_tap_shapes("adm-256-uncond")]
    assert shapes == [(1024, 8, 8), (1024, 16, 16), (512, 32, 32), (512, 64, 64)]


@pytest.mark.parametrize("preset", sorted(ADM_PRESETS))
def test_every_preset_builds_and_has_four_default_taps(preset: str) -> None:
    infos = adm_tap_shapes(preset)
    flags = ADMFlags.from_mapping(ADM_PRESETS[preset])
    lowest = flags.image_size // 2 ** (len(flags.channel_multipliers()) - 1)  # size at the bottom level
    assert [i.height for i in infos] == [lowest, 2 * lowest, 4 * lowest, 8 * lowest]
    # The stride labels are image size / map size: 32..4 for the six-level 256 px presets, not for the others.
    assert [i.stride for i in infos] == [
        flags.image_size // h for h in (lowest, 2 * lowest, 4 * lowest, 8 * lowest)
    ]
    if flags.image_size == 256:
        assert [i.stride for i in infos] == [32, 16, 8, 4]


def test_schedules_match_closed_forms() -> None:
    abar = make_alphas_cumprod("linear", 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert abar.dtype == torch.float64
    assert float(abar[0]) == pytest.approx(1 - 1e-4, rel=1e-12)
    assert float(abar[999]) == pytest.approx(float(torch.prod(1 - betas)), rel=1e-12)
    cos = make_alphas_cumprod("cosine", 1000)
    # abar_t of the cosine schedule = f(t+1)/f(0) with f(s) = cos((s/n + 0.008)/1.008 * pi/2)^2 (no clipping at t=10)
    f = [
        torch.cos(torch.tensor((s / 1000 + 0.008) / 1.008 * torch.pi / 2, dtype=torch.float64)) ** 2
        for s in (0, 11)
    ]
    assert float(cos[10]) == pytest.approx(float(f[1] / f[0]), rel=1e-10)


def test_build_teacher_adm_from_config_is_frozen(tmp_path: Path) -> None:
    flags = json.loads((DATA / "adm-tiny-heads" / "flags.json").read_text())
    cfg = TeacherConfig(kind="adm", checkpoint=str(DATA / "adm-tiny-heads" / "model.pt"), flags=flags)
    teacher = build_teacher(cfg, "cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    ident = teacher.identity()
    assert ident["kind"] == "adm" and len(ident["weights_sha256"]) == 64
    missing = TeacherConfig(kind="adm", preset="adm-256-uncond", checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match=r"teachers\.<name>\.checkpoint"):
        build_teacher(missing, "cpu")
    with pytest.raises(ValueError, match=r"teachers\.<name>\.checkpoint is empty"):
        build_teacher(TeacherConfig(kind="adm", preset="adm-256-uncond"), "cpu")


def test_bf16_autocast_keeps_embedding_and_head_in_float32_and_stays_close() -> None:
    """Mixed precision as the original fp16 mode: body in low precision, time embedding and output head float32."""
    teacher, expected = _load("adm-tiny")
    dtypes: dict[str, torch.dtype] = {}

    def record(name: str):  # noqa: ANN202 - torch hook
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            dtypes[name] = output.dtype

        return hook

    teacher.unet.time_embed.register_forward_hook(record("emb"))
    teacher.unet.input_blocks[1].register_forward_hook(record("body"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = teacher.unet(expected["x"], expected["t"])
    assert dtypes == {"emb": torch.float32, "body": torch.bfloat16} and out.dtype == torch.float32
    assert _rel_err(out, expected["model_output"]) <= 2e-2


@pytest.mark.gpu
def test_fixture_under_fp16_and_bf16_autocast_stays_close() -> None:
    teacher, expected = _load("adm-tiny")
    teacher = teacher.cuda()
    x, t = expected["x"].cuda(), expected["t"].cuda()
    for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 5e-2)):
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            out = teacher.unet(x, t)
        assert _rel_err(out.float().cpu(), expected["model_output"]) <= tol


def test_weights_sha256_is_the_checkpoints_sha256sum_and_computed_on_first_use() -> None:
    teacher, _ = _load("adm-tiny-heads")
    assert "weights_sha256" not in teacher.__dict__  # loading alone does not hash the file
    expected = hashlib.sha256((DATA / "adm-tiny-heads" / "model.pt").read_bytes()).hexdigest()
    assert teacher.identity()["weights_sha256"] == expected
    in_memory = ADMTeacher(adm_from_flags(json.loads((DATA / "adm-tiny-heads" / "flags.json").read_text())))
    assert len(in_memory.weights_sha256) == 64 and in_memory.weights_sha256 != expected


def _real_keys_of(message: str) -> list[str]:
    """Dotted config keys a message names (``teachers.<x>.checkpoint`` style and the old ``teacher.<x>``)."""
    import re

    return re.findall(r"\bteachers?\.[A-Za-z0-9_<>-]+(?:\.[A-Za-z0-9_]+)?", message)


def test_unset_adm_ckpt_names_the_real_config_key_and_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """pipeline.yaml has ``teachers: {adm-256-uncond: {checkpoint: ${ADM_CKPT}}}``: there is no ``teacher.checkpoint``."""
    from configlib import ConfigError
    from dreamteacher.schema import load_pipeline

    monkeypatch.delenv("ADM_CKPT", raising=False)
    cfg = load_pipeline("pipeline.yaml", [])
    name = "adm-256-uncond"
    with pytest.raises(ConfigError) as err:
        build_teacher(cfg.teacher(name), "cpu", name=name)
    message = str(err.value)
    assert "\n" not in message and "ADM_CKPT" in message and "export ADM_CKPT=" in message
    assert _real_keys_of(message) and set(_real_keys_of(message)) == {f"teachers.{name}.checkpoint"}
    # Without the entry's name the key is still the real one, with a placeholder for the name.
    with pytest.raises(ConfigError, match=r"teachers\.<name>\.checkpoint") as err:
        build_teacher(cfg.teacher(name), "cpu")
    assert "teacher.checkpoint" not in str(err.value)


def test_missing_or_empty_adm_checkpoint_names_the_real_config_key(tmp_path: Path) -> None:
    missing = TeacherConfig(kind="adm", preset="adm-256-uncond", checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError) as err:
        build_teacher(missing, "cpu", name="adm-256-uncond")
    assert set(_real_keys_of(str(err.value))) == {"teachers.adm-256-uncond.checkpoint"}
    assert "ADM_CKPT" in str(err.value)
    with pytest.raises(ValueError) as err:
        build_teacher(TeacherConfig(kind="adm", preset="adm-256-uncond"), "cpu", name="adm-256-uncond")
    assert "is empty" in str(err.value)
    assert set(_real_keys_of(str(err.value))) == {"teachers.adm-256-uncond.checkpoint"}
