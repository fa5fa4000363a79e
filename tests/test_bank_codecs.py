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
    with pytest.raises(ValueError, match="fp16, int8, bitround"):
        make_codec("int4")
