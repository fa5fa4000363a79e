"""Teacher interface contract (every family), the diffusers teacher's loading and taps, and the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from configlib import ConfigError
from teachers import FeatureTaps, Teacher, build_teacher, discover_taps, resolve_taps
from teachers.adm import ADMTeacher
from teachers.config import TapConfig, TeacherConfig
from teachers.diffusers_unet import DiffusersTeacher

DATA = Path(__file__).parent / "data"


def _adm_tiny() -> ADMTeacher:
    flags = json.loads((DATA / "adm-tiny-heads" / "flags.json").read_text())
    return ADMTeacher.from_checkpoint(DATA / "adm-tiny-heads" / "model.pt", flags)


FAMILIES = {"diffusers": lambda: DiffusersTeacher.debug(32), "adm": _adm_tiny}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_teacher_contract(family: str) -> None:
    """Every family: float64 schedule, eps of the input's shape, four default taps whose strides are the measured
    ones (both tiny models have four levels at 32 px: 8, 4, 2, 1), and a JSON-serialisable identity."""
    teacher: Teacher = FAMILIES[family]().eval()
    assert teacher.alphas_cumprod.dtype == torch.float64
    assert teacher.num_train_timesteps == 1000
    assert bool((teacher.alphas_cumprod[1:] < teacher.alphas_cumprod[:-1]).all())
    x = torch.zeros(2, 3, teacher.resolution, teacher.resolution)
    with torch.no_grad():
        assert teacher.predict_eps(x, torch.tensor([0, 999])).shape == x.shape
    taps = resolve_taps(teacher, TeacherConfig(kind=family))  # type: ignore[arg-type]
    assert (
        [t.stride for t in taps] == _hand_measured_strides(teacher, taps, teacher.resolution) == [8, 4, 2, 1]
    )
    infos = discover_taps(teacher, taps, teacher.resolution)
    assert [i.name for i in infos] == ["s8", "s4", "s2", "s1"]
    sizes = [i.height for i in infos]
    assert sizes == [sizes[0] * 2**k for k in range(4)] and all(i.height == i.width for i in infos)
    ident = json.loads(json.dumps(teacher.identity()))
    assert ident["kind"] == family and len(ident["weights_sha256"]) == 64


def test_diffusers_default_taps_read_pre_upsample_points() -> None:
    teacher = DiffusersTeacher.debug(32)
    assert [(t.module, t.point) for t in teacher.default_taps()] == [
        ("up_blocks.0.upsamplers.0", "input"),
        ("up_blocks.1.upsamplers.0", "input"),
        ("up_blocks.2.upsamplers.0", "input"),
        ("up_blocks.3", "output"),
    ]
    # the upsampler's input is the output of the level's last resnet / attention
    seen: dict[str, torch.Tensor] = {}

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen["a"] = output

    handle = teacher.unet.up_blocks[0].attentions[-1].register_forward_hook(record)
    with torch.no_grad(), FeatureTaps(teacher, teacher.default_taps()[:1]) as captured:
        teacher.predict_eps(torch.randn(1, 3, 32, 32), torch.tensor([10]))
    handle.remove()
    torch.testing.assert_close(captured.features["s8"], seen["a"], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["pipeline", "bare"])
def test_save_pretrained_layouts_round_trip(tmp_path: Path, layout: str) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler

    teacher = DiffusersTeacher.debug(32, seed=3)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    if layout == "pipeline":
        DDPMPipeline(unet=teacher.unet, scheduler=scheduler).save_pretrained(tmp_path)
    else:
        teacher.unet.save_pretrained(tmp_path)
        scheduler.save_pretrained(tmp_path)
    cfg = TeacherConfig(kind="diffusers", path=str(tmp_path), channels_last=False)
    loaded = build_teacher(cfg, "cpu")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([100])
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_eps(x, t), teacher.eval().predict_eps(x, t))
    torch.testing.assert_close(loaded.alphas_cumprod, scheduler.alphas_cumprod.double())
    ident = loaded.identity()
    assert ident["path"] == str(tmp_path) and ident["config"]["block_out_channels"] == [8, 16, 16, 32]
    assert ident["weights_sha256"] == build_teacher(cfg, "cpu").identity()["weights_sha256"]


def test_v_prediction_is_converted_to_epsilon() -> None:
    teacher = DiffusersTeacher.debug(32, prediction_type="v_prediction").eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 700])
    with torch.no_grad():
        v = teacher.unet(x, t).sample
        abar = teacher.alphas_cumprod[t].float()[:, None, None, None]
        # x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0  =>  eps = sqrt(a) v + sqrt(1-a) x_t
        torch.testing.assert_close(teacher.predict_eps(x, t), abar.sqrt() * v + (1 - abar).sqrt() * x)


def test_registry_errors_name_the_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="valid kinds: diffusers, adm, gan, latent-diffusion"):
        build_teacher(TeacherConfig(kind="stylegan"), "cpu")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"teachers\.big\.path is empty: set it to a BigGAN checkpoint folder"
    ):
        build_teacher(TeacherConfig(kind="gan", num_images=4), "cpu", name="big")
    with pytest.raises(ValueError, match=r"teachers\.big\.num_images is 0"):
        build_teacher(TeacherConfig(kind="gan", path=str(tmp_path)), "cpu", name="big")
    with pytest.raises(ValueError, match=r"teachers\.big\.path is a pickle .* execute code"):
        build_teacher(
            TeacherConfig(kind="gan", path="/m/stylegan2-ffhq.pkl", num_images=4), "cpu", name="big"
        )
    with pytest.raises(ValueError, match=r"truncation must be in \(0, 1\]"):
        TeacherConfig(kind="gan", truncation=0.0)
    with pytest.raises(ValueError, match=r"teachers\.<name>\.path is empty"):
        build_teacher(TeacherConfig(kind="diffusers"), "cpu")
    with pytest.raises(FileNotFoundError, match="neither a pipeline folder"):
        build_teacher(TeacherConfig(kind="diffusers", path=str(tmp_path)), "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_teacher(TeacherConfig(kind="diffusers", path=str(tmp_path / "missing")), "cpu")
    (tmp_path / "assets").mkdir()
    monkeypatch.chdir(tmp_path)  # a relative path under an existing local folder is never sent to the hub
    with pytest.raises(FileNotFoundError, match="not tried as a hub id"):
        build_teacher(TeacherConfig(kind="diffusers", path="assets/demo-teacher"), "cpu")
    with pytest.raises(ConfigError, match="ADM_CKPT"):
        build_teacher(
            TeacherConfig(kind="adm", preset="adm-256-uncond", checkpoint="${ADM_CKPT_UNSET_X}"), "cpu"
        )


def test_resolve_taps_prefers_configured_taps() -> None:
    teacher = DiffusersTeacher.debug(32)
    custom = [TapConfig(module="up_blocks.1", stride=8)]
    assert resolve_taps(teacher, TeacherConfig(kind="diffusers", taps=custom)) == custom
    assert resolve_taps(teacher, TeacherConfig(kind="diffusers")) == teacher.default_taps()


def test_bad_taps_are_clear_errors() -> None:
    teacher = DiffusersTeacher.debug(32)
    with pytest.raises(ValueError, match=r"do not exist(.|\n)*up_blocks\.0\.upsamplers\.0"):
        discover_taps(teacher, [TapConfig(module="up_blocks.9", stride=8)], 32)
    with pytest.raises(ValueError, match="stride 12 does not divide the image size 32"):
        discover_taps(teacher, [TapConfig(module="up_blocks.1", stride=12)], 32)


def test_shipped_pipeline_yaml_teachers_are_valid() -> None:
    """Every teacher in pipeline.yaml names a valid kind and, for ADM, a preset whose flags build a network."""
    from dreamteacher.schema import load_pipeline
    from teachers.adm import ADMFlags, adm_from_flags
    from teachers.adm_presets import preset_flags
    from teachers.registry import TEACHER_KINDS

    cfg = load_pipeline(Path(__file__).parents[1] / "pipeline.yaml")
    assert cfg.teachers
    for name, teacher_cfg in cfg.teachers.items():
        assert teacher_cfg.kind in TEACHER_KINDS, name
        if teacher_cfg.kind == "adm":
            assert teacher_cfg.checkpoint, name
            flags = ADMFlags.from_mapping(preset_flags(teacher_cfg.preset, teacher_cfg.flags))
            assert (teacher_cfg.class_label is not None) == flags.class_cond, name
            adm_from_flags(flags, device="meta")
        else:
            assert teacher_cfg.path, name


class _RecordingTeacher(DiffusersTeacher):
    """The debug teacher, recording the device of each pass; optionally reads a value (impossible on meta)."""

    reads_value = False

    def predict_eps(self, x_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        self.devices.append(x_BCHW.device.type)
        if self.reads_value:
            float(t_B[0])
        return super().predict_eps(x_BCHW, t_B)


@pytest.mark.parametrize("reads_value", [False, True])
def test_discover_taps_runs_on_meta_and_falls_back_to_a_real_pass(reads_value: bool) -> None:
    base = DiffusersTeacher.debug(32)
    teacher = _RecordingTeacher(base.unet, _scheduler())
    teacher.devices = []
    taps = teacher.default_taps()  # measured by a dry run of its own: record only the discovery's
    teacher.devices, teacher.reads_value = [], reads_value
    infos = discover_taps(teacher, taps, 32)
    assert teacher.devices == (["meta", "cpu"] if reads_value else ["meta"])
    assert [(i.channels, i.height) for i in infos] == [(32, 4), (16, 8), (16, 16), (8, 32)]
    assert next(teacher.parameters()).device.type == "cpu"  # the real weights were never replaced


def _scheduler():  # noqa: ANN202 - diffusers type imported lazily
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


# --- tap strides are measured, not assumed (issue 18 item 11) ------------------------------------------------
def _hand_measured_strides(teacher: Teacher, taps: list[TapConfig], size: int) -> list[int]:
    """Reference: hook each tap module on a real forward pass and divide the image size by the map's size."""
    modules = dict(teacher.tap_root.named_modules())
    shapes: dict[int, tuple[int, int]] = {}
    handles = []
    for i, tap in enumerate(taps):
        if tap.point == "input":
            hook = lambda m, args, i=i: shapes.__setitem__(i, tuple(args[0].shape[-2:]))  # noqa: E731
            handles.append(modules[tap.module].register_forward_pre_hook(hook))
        else:
            hook = lambda m, args, out, i=i: shapes.__setitem__(i, tuple(out.shape[-2:]))  # noqa: E731
            handles.append(modules[tap.module].register_forward_hook(hook))
    with torch.no_grad():
        teacher.predict_eps(torch.zeros(1, 3, size, size), torch.tensor([0]))
    for handle in handles:
        handle.remove()
    assert all(h == w for h, w in shapes.values())
    return [size // shapes[i][0] for i in range(len(taps))]


def _six_level_debug_teacher(resolution: int = 64) -> DiffusersTeacher:
    """The demo teacher's shape (teacher_train defaults: six levels) with tiny widths."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=resolution,
        block_out_channels=(8, 8, 8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D",) * 6,
        up_block_types=("UpBlock2D",) * 6,
    )
    return DiffusersTeacher(unet, DDPMScheduler(num_train_timesteps=1000))


def test_four_level_diffusers_default_taps_get_the_measured_strides() -> None:
    teacher = DiffusersTeacher.debug(32).eval()  # four levels: maps 4, 8, 16, 32 px at 32 px
    taps = teacher.default_taps()
    assert [t.stride for t in taps] == _hand_measured_strides(teacher, taps, 32) == [8, 4, 2, 1]
    infos = discover_taps(teacher, taps, 32)
    assert [(i.name, i.height) for i in infos] == [("s8", 4), ("s4", 8), ("s2", 16), ("s1", 32)]
    # Strides are a property of the network, not of the encode size: at 64 px the same labels, maps twice as big.
    assert [(i.name, i.height) for i in discover_taps(teacher, taps, 64)] == [
        ("s8", 8),
        ("s4", 16),
        ("s2", 32),
        ("s1", 64),
    ]
    assert resolve_taps(teacher, TeacherConfig(kind="diffusers")) == taps


def test_six_level_diffusers_default_taps_keep_the_student_strides() -> None:
    teacher = _six_level_debug_teacher().eval()
    taps = teacher.default_taps()
    assert [t.stride for t in taps] == _hand_measured_strides(teacher, taps, 64) == [32, 16, 8, 4]


def test_adm_default_taps_get_the_measured_strides() -> None:
    teacher = _adm_tiny().eval()  # adm-tiny-heads: four levels at 32 px
    taps = teacher.default_taps()
    assert [t.module for t in taps] == [
        "output_blocks.2.1",
        "output_blocks.5.2",
        "output_blocks.8.2",
        "output_blocks.11",
    ]
    assert [t.stride for t in taps] == _hand_measured_strides(teacher, taps, 32) == [8, 4, 2, 1]
    assert resolve_taps(teacher, TeacherConfig(kind="adm")) == taps


def test_a_configured_stride_that_disagrees_with_the_measured_one_is_refused() -> None:
    teacher = DiffusersTeacher.debug(32)
    wrong = [TapConfig(module="up_blocks.0.upsamplers.0", point="input", stride=32)]  # the old default label
    with pytest.raises(ValueError) as err:
        discover_taps(teacher, wrong, 32)
    message = str(err.value)
    assert "up_blocks.0.upsamplers.0" in message and "stride 32" in message and "4x4" in message
    assert "stride: 8" in message and "taps" in message  # the fix: the measured value, or the default taps
    right = [TapConfig(module="up_blocks.0.upsamplers.0", point="input", stride=8)]
    assert discover_taps(teacher, right, 32)[0].name == "s8"


def test_recorded_teacher_config_of_existing_kinds_is_unchanged() -> None:
    """Bank fingerprints cover the recorded teacher config: a diffusers / adm entry must record exactly the keys it
    did before the gan / latent-diffusion fields existed (so existing banks still resume), and a gan entry its own."""
    from configlib import to_dict
    from teachers.provenance import kind_fields_only, without_locations

    before = [
        "kind",
        "preset",
        "flags",
        "class_label",
        "taps",
        "dtype",
        "channels_last",
    ]  # the pre-issue-15 keys
    for kind in ("diffusers", "adm"):
        recorded = without_locations(kind_fields_only(to_dict(TeacherConfig(kind=kind))))  # type: ignore[arg-type]
        assert list(recorded) == before
    gan = without_locations(kind_fields_only(to_dict(TeacherConfig(kind="gan", num_images=3))))
    assert {"truncation", "classes", "num_images"} <= set(gan) and "vae_input_scale" not in gan
