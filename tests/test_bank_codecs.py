"""Contract tests every bank codec inherits: shapes/dtypes, error bounds, lossless parts exact, any device."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest
import torch

from bank.codecs import CODECS, COMPRESSORS, make_codec
from bank.spec import BankError, LevelSpec
from tests.bank_helpers import activation_like

LEVEL = LevelSpec(name="s8", stride=8, channels=6, height=5, width=7, codec="int8")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=sorted(CODECS))
def codec(request):
    return make_codec(request.param)


def test_parts_shapes_and_dtypes(codec):
    feats = activation_like((3, *LEVEL.shape), seed=0)
    payload = codec.encode(feats)
    parts = codec.parts(LEVEL)
    assert list(payload) == list(parts) == list(codec.part_names)
    for name, part in parts.items():
        assert payload[name].shape == (3, *part.row_shape)
        assert payload[name].cpu().numpy().dtype == np.dtype(part.dtype)
    decoded = codec.decode(payload)
    assert decoded.shape == feats.shape and decoded.dtype == torch.float32
    assert codec.decode(payload, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_within_error_bound(codec, device):
    feats = activation_like((4, *LEVEL.shape), seed=1).to(device)
    payload = codec.encode(feats)
    assert all(t.device.type == device for t in payload.values())
    err = (codec.decode(payload) - feats).abs()
    bound = codec.error_bound(feats, payload)
    assert bool((err <= bound).all()), float((err - bound).max())


def test_constant_and_zero_channels(codec):
    feats = torch.zeros(2, *LEVEL.shape)
    feats[0, 1] = 3.14159
    feats[1, 2] = -1e-6
    payload = codec.encode(feats)
    err = (codec.decode(payload) - feats).abs()
    assert bool((err <= codec.error_bound(feats, payload)).all())
    if codec.exact_zero_channels:
        assert float(codec.decode(payload)[0, 0].abs().max()) == 0.0


def test_non_finite_and_overflow_refused(codec):
    feats = activation_like((1, *LEVEL.shape), seed=2)
    feats[0, 0, 0, 0] = float("nan")
    with pytest.raises(BankError, match="NaN"):
        codec.encode(feats)
    feats[0, 0, 0, 0] = 1e6
    with pytest.raises(BankError, match="float16 range"):
        codec.encode(feats)


def test_int8_hand_computed():
    # one channel with values [-1, 0, 3]: offset = fp16(1.0), half range = 2, scale = fp16 rounded up of 2/127
    feats = torch.tensor([-1.0, 0.0, 3.0]).reshape(1, 1, 1, 3)
    payload = make_codec("int8").encode(feats)
    assert float(payload["offset"]) == 1.0
    scale = float(payload["scale"])
    assert scale >= 2 / 127 and scale == float(torch.tensor(2 / 127 * (1 + 2**-10)).half())
    assert payload["q"].flatten().tolist() == [-127, round(-1 / scale), 127]


def test_int8_is_about_half_of_fp16_bytes():
    level = LevelSpec(name="s32", stride=32, channels=1024, height=8, width=8, codec="int8")
    nbytes = {
        name: sum(
            np.dtype(p.dtype).itemsize * int(np.prod(p.row_shape))
            for p in make_codec(name).parts(level).values()
        )
        for name in ("int8", "fp16")
    }
    assert nbytes["int8"] / nbytes["fp16"] <= 0.55


@pytest.mark.parametrize("keepbits", [1, 4, 7, 10])
def test_bitround_matches_numcodecs_bit_for_bit(keepbits):
    feats = activation_like((2, *LEVEL.shape), seed=3)
    ours = make_codec("bitround", bitround_keepbits=keepbits).encode(feats)["values"].numpy()
    reference = numcodecs.BitRound(keepbits).encode(feats.half().numpy()).view(np.float16)
    assert np.array_equal(ours.view(np.uint16), reference.view(np.uint16))


def test_lossless_compressors_round_trip_exactly():
    data = make_codec("fp16").encode(activation_like((2, *LEVEL.shape), seed=4))["values"].numpy()
    for name, compressor in COMPRESSORS.items():
        if compressor is None:
            continue
        decoder = compressor.chunk_decoder()
        restored = np.frombuffer(decoder.decode(decoder.encode(data)), dtype=np.float16).reshape(data.shape)
        assert np.array_equal(restored.view(np.uint16), data.view(np.uint16)), name


def test_unknown_codec_lists_choices():
    with pytest.raises(ValueError, match="fp16, int8, bitround, int4, fp8"):
        make_codec("int3")


def test_int4_hand_computed_and_packed_two_per_byte():
    # one channel [-1, 0, 3] (odd width): offset fp16(1.0), half range 2, scale = fp16 rounded up of 2/7
    feats = torch.tensor([-1.0, 0.0, 3.0]).reshape(1, 1, 1, 3)
    payload = make_codec("int4").encode(feats)
    assert float(payload["offset4"]) == 1.0
    scale = float(payload["scale4"])
    assert scale >= 2 / 7 and scale == float(torch.tensor(2 / 7 * (1 + 2**-10)).half())
    q = [-7, round(-1 / scale), 7]  # -> nibbles 1, 8 + q, 15 and the padding code 0
    assert payload["q4"].flatten().tolist() == [(q[0] + 8) | ((q[1] + 8) << 4), (q[2] + 8) | (0 << 4)]
    decoded = make_codec("int4").decode(payload)
    assert decoded.shape == (1, 1, 1, 3)
    assert decoded.flatten().tolist() == pytest.approx([v * scale + 1.0 for v in q], abs=1e-6)


def test_int4_groups_share_a_range_and_a_last_short_group_is_its_own():
    feats = torch.zeros(1, 5, 1, 2)
    feats[0, 0] = 1.0  # group 0 = channels 0, 1; group 1 = channels 2, 3; group 2 = channel 4 alone
    feats[0, 4] = torch.tensor([-2.0, 2.0])
    payload = make_codec("int4", int4_group=2).encode(feats)
    assert payload["scale4"].shape == (1, 3)
    assert payload["offset4"].float().tolist() == [[0.5, 0.0, 0.0]]
    assert float(payload["scale4"][0, 2]) >= 2 / 7  # channel 4's own range


def test_fp8_hand_computed():
    # channel peak 448 * 2^-3 = 56 -> scale 2^-3 exactly; 56 -> 448, 1.0 -> 8 (exact in e4m3), 0.3 -> nearest e4m3
    feats = torch.tensor([56.0, 1.0, 0.3, -56.0]).reshape(1, 1, 1, 4)
    payload = make_codec("fp8").encode(feats)
    assert float(payload["scale8"]) == 2.0**-3
    decoded = make_codec("fp8").decode(payload).flatten().tolist()
    assert decoded[:2] == [56.0, 1.0] and decoded[3] == -56.0
    # 0.3 / 2^-3 = 2.4 lies between the e4m3 values 2.25 and 2.5 (spacing 2^-2 in [2, 4)): nearest is 2.5
    assert decoded[2] == 2.5 * 2.0**-3


def test_compact_codecs_bytes_per_view_at_adm256_shapes():
    # the paper's four ADM-256 taps (docs/teachers.md): 1024x8x8, 1024x16x16, 512x32x32, 512x64x64
    shapes = [(1024, 8), (1024, 16), (512, 32), (512, 64)]
    levels = [LevelSpec(name=f"l{i}", stride=1, channels=c, height=h, width=h, codec="fp16") for i, (c, h) in
              enumerate(shapes)]  # fmt: skip
    nbytes = {
        name: sum(
            np.dtype(p.dtype).itemsize * int(np.prod(p.row_shape))
            for lv in levels
            for p in make_codec(name).parts(lv).values()
        )
        for name in ("fp16", "int8", "fp8", "int4")
    }
    values = sum(c * h * h for c, h in shapes)
    assert values == 2_949_120  # the 2.95M values per view
    assert nbytes["fp16"] == 2 * values
    assert nbytes["fp8"] / nbytes["fp16"] == pytest.approx(0.5, abs=0.002)
    assert nbytes["int4"] / nbytes["fp16"] == pytest.approx(0.25, abs=0.002)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CODECS))
def test_codecs_are_bit_exact_between_cpu_and_cuda(name):
    feats = activation_like((3, *LEVEL.shape), seed=5)
    codec = make_codec(name)
    on_cpu, on_gpu = codec.encode(feats), codec.encode(feats.cuda())
    for part in codec.part_names:
        assert torch.equal(on_cpu[part], on_gpu[part].cpu()), part
    assert torch.equal(codec.decode(on_cpu), codec.decode({k: v.cuda() for k, v in on_cpu.items()}).cpu())
