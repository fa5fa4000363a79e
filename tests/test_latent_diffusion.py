"""Latent diffusion (Stable Diffusion style) teacher: a tiny random pipeline built and saved with diffusers itself
(UNet2DConditionModel, AutoencoderKL, scheduler, the empty prompt's embedding), loaded through the teacher.

The reference read-out is written with diffusers' own API (components loaded independently, the scheduler's
``add_noise``); the teacher must give the same taps. Then a bank encodes, verifies and distils at debug size.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from bank.verify import verify_bank
from dreamteacher.resolve import resolve
from dreamteacher.schema import load_pipeline
from encode.pipeline import run_encode
from encode.worker import clear_caches
from teachers import build_teacher, discover_taps, resolve_taps
from teachers.config import TapConfig, TeacherConfig
from teachers.encoding import TeacherEncoder, make_noise

ROOT = Path(__file__).resolve().parents[1]


def _components():  # noqa: ANN202
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,  # latent 8x8 = 64 px native; the student sees 32 px (vae_input_scale 2)
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
    )
    # SD's training schedule (scaled_linear 0.00085..0.012)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return unet, vae, scheduler


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    unet, vae, scheduler = _components()
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    torch.manual_seed(1)
    save_file({"prompt_embeds": torch.randn(1, 77, 16)}, folder / "empty_prompt.safetensors")
    return folder


def test_readout_matches_a_hand_run_with_diffusers(sd_folder: Path) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    teacher = build_teacher(TeacherConfig(kind="latent-diffusion", path=str(sd_folder)), "cpu")
    assert teacher.resolution == 32 and teacher.noise_shape(32) == (4, 8, 8)
    taps = resolve_taps(teacher, TeacherConfig(kind="latent-diffusion"))
    assert [t.stride for t in taps] == [32, 16, 8, 4]
    infos = discover_taps(teacher, taps, 32)
    assert [(i.name, i.height) for i in infos] == [("s32", 1), ("s16", 2), ("s8", 4), ("s4", 8)]
    encoder = TeacherEncoder(
        teacher, taps, mode="noise", t=300, ddim_steps=1, resolution=32, device="cpu", dtype_name="fp32",
        channels_last=False,
    )  # fmt: skip
    torch.manual_seed(2)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    eps = make_noise([11, 12], [False, False], encoder.noise_shape)
    got = encoder(x0, eps)

    # by hand, with diffusers' components loaded on their own
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(sd_folder / "vae").eval()
    sched = DDPMScheduler.from_pretrained(sd_folder / "scheduler")
    prompt = load_file(sd_folder / "empty_prompt.safetensors")["prompt_embeds"]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        unet.up_blocks[i]
        .upsamplers[0]
        .register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"u{i}", a[0]))
        for i in range(3)
    ]
    hooks.append(unet.up_blocks[3].register_forward_hook(lambda m, a, o: seen.__setitem__("u3", o)))
    with torch.no_grad():
        big = F.interpolate(x0, scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1)
        latent = vae.encode(big).latent_dist.mean * vae.config.scaling_factor
        t = torch.tensor([300, 300])
        noisy = sched.add_noise(latent, eps, t)
        unet(noisy, t, encoder_hidden_states=prompt.expand(2, -1, -1))
    for h in hooks:
        h.remove()
    for level, name in zip(["s32", "s16", "s8", "s4"], ["u0", "u1", "u2", "u3"], strict=True):
        torch.testing.assert_close(got[level], seen[name], rtol=1e-4, atol=1e-5)
    ident = teacher.identity()
    assert ident["kind"] == "latent-diffusion" and ident["prompt"]["source"] == "empty_prompt.safetensors"
    assert len(teacher.weight_files) == 3  # unet, vae, the prompt embedding


def test_strides_that_do_not_fit_are_errors(sd_folder: Path) -> None:
    teacher = build_teacher(TeacherConfig(kind="latent-diffusion", path=str(sd_folder)), "cpu")
    with pytest.raises(
        ValueError, match=r"configured stride 16, but its feature map is 1x1 .* i\.e\. stride 32"
    ):
        discover_taps(teacher, [TapConfig(module="up_blocks.0.upsamplers.0", point="input", stride=16)], 32)
    with pytest.raises(ValueError, match="is not divisible by the VAE's factor 8"):
        teacher.noise_shape(30)
    # without the 2x input scale the decoder levels are 64..8 of the image: the stride-4 tap does not exist
    plain = build_teacher(
        TeacherConfig(kind="latent-diffusion", path=str(sd_folder), vae_input_scale=1), "cpu"
    )
    assert plain.resolution == 64 and [t.stride for t in plain.default_taps()] == [64, 32, 16, 8]
    with pytest.raises(ValueError, match=r"configured stride 4, but its feature map is 8x8 at 64x64 px"):
        discover_taps(plain, [TapConfig(module="up_blocks.3", stride=4)], 64)


def test_loading_errors(tmp_path: Path, sd_folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"lacks \['unet', 'vae', 'scheduler'\]"):
        build_teacher(TeacherConfig(kind="latent-diffusion", path=str(tmp_path)), "cpu", name="sd")
    bare = tmp_path / "no-prompt"
    for sub in ("unet", "vae", "scheduler"):
        (bare / sub).mkdir(parents=True)
        for f in (sd_folder / sub).iterdir():
            (bare / sub / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="neither empty_prompt.safetensors nor text_encoder/"):
        build_teacher(TeacherConfig(kind="latent-diffusion", path=str(bare)), "cpu", name="sd")
    (bare / "text_encoder").mkdir()
    (bare / "tokenizer").mkdir()
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(ImportError, match="needs `transformers`"):
            build_teacher(TeacherConfig(kind="latent-diffusion", path=str(bare)), "cpu", name="sd")


def test_empty_prompt_from_the_pipelines_text_encoder(tmp_path: Path, sd_folder: Path) -> None:
    """The text-encoder path: the embedding equals the CLIP text model's last hidden state for "" padded."""
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "!": 3}
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    import json

    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77
    )
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, eos_token_id=1, bos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(3)
    text_encoder = transformers.CLIPTextModel(cfg).eval()
    folder = tmp_path / "sd-text"
    for sub in ("unet", "vae", "scheduler"):
        (folder / sub).mkdir(parents=True)
        for f in (sd_folder / sub).iterdir():
            (folder / sub / f.name).write_bytes(f.read_bytes())
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    teacher = build_teacher(TeacherConfig(kind="latent-diffusion", path=str(folder)), "cpu")
    ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = text_encoder(ids).last_hidden_state
    torch.testing.assert_close(teacher.prompt_embeds, want)
    assert teacher.identity()["prompt"]["source"] == "text_encoder"


def test_encodes_verifies_and_distils(sd_folder: Path, tmp_path: Path) -> None:
    from distill.train import run_distill

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    bank = tmp_path / "sd.zarr"
    overrides = [
        f"datasets.tiny={{root: {images}, layout: folder, teacher: sd, t: 200}}",
        f"teachers.sd={{kind: latent-diffusion, path: {sd_folder}, dtype: fp32}}",
        "encode.data=tiny",
        f"encode.bank={bank}",
        "encode.num_workers=0",
        "encode.batch_size=8",
        "encode.cpu_threads=1",
        "bank.shard_rows=8",
        "encode.draws=2",
        "encode.store=draws",
        f"distill.bank={bank}",
        f"distill.out={tmp_path / 'distill'}",
        "distill.student.name=resnet18",
        "distill.batch_size=4",
        "distill.num_workers=0",
        "distill.regressor.channels=16",
        "distill.log_every=1",
        "distill.max_steps=3",
    ]
    cfg = load_pipeline(ROOT / "pipeline.yaml", overrides)
    clear_caches()
    summary = run_encode(resolve(cfg, "encode"), use_dask=False, progress=False)
    assert summary.rows == 16  # 4 images x 2 draws x 2 flips
    report = verify_bank(bank, progress=False)
    assert report.ok, report.problems
    from bank import Bank

    opened = Bank.open(bank)
    assert [(lv.name, lv.height) for lv in opened.levels] == [("s32", 1), ("s16", 2), ("s8", 4), ("s4", 8)]
    assert opened.spec.image_size == 32
    run_distill(resolve(cfg, "distill"), progress=False)
    assert any((tmp_path / "distill").rglob("*"))


def test_image_shaped_noise_is_refused_with_the_fix(sd_folder: Path) -> None:
    teacher = build_teacher(TeacherConfig(kind="latent-diffusion", path=str(sd_folder)), "cpu")
    encoder = TeacherEncoder(
        teacher, teacher.default_taps(), mode="noise", t=10, ddim_steps=1, resolution=32, device="cpu",
        dtype_name="fp32", channels_last=False,
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"the teacher diffuses \(1, 4, 8, 8\): draw it with .*encoder\.noise_shape"
    ):
        encoder(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize(("sample_size", "cross", "resolution"), [(64, 768, 256), (96, 1024, 384)])
def test_stable_diffusion_layouts_tap_strides_32_to_4(sample_size: int, cross: int, resolution: int) -> None:
    """SD 1.x (512 px native) and SD 2.1 (768 px) layouts, built on the meta device (no memory): the student sees
    256 / 384 px and the default taps measure 32, 16, 8, 4 with SD's decoder widths."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from teachers.latent_diffusion import LatentDiffusionTeacher

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=sample_size, cross_attention_dim=cross
        )  # diffusers' defaults = SD
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
        )
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    teacher = LatentDiffusionTeacher(unet, vae, sched, torch.zeros(1, 77, cross, device="meta"))
    assert teacher.resolution == resolution
    taps = teacher.default_taps()
    assert [t.stride for t in taps] == [32, 16, 8, 4]
    infos = discover_taps(teacher, taps, resolution, "meta")
    assert [(i.channels, i.height) for i in infos] == [
        (1280, resolution // 32), (1280, resolution // 16), (640, resolution // 8), (320, resolution // 4)
    ]  # fmt: skip
