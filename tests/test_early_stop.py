"""The read-out stops after its last tap: the taps' values are unchanged bit for bit, the layers after never run.

Also the execution choices around it: ADM attention through SDPA against the reference fixture, ``teacher.compile``
giving the same features, and these choices staying out of a bank's provenance.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from teachers.adm import ADMTeacher, set_attention
from teachers.base import Teacher
from teachers.config import RUNTIME_FIELDS, TeacherConfig
from teachers.diffusers_unet import DiffusersTeacher
from teachers.encoding import TeacherEncoder

DATA = Path(__file__).parent / "data"


def _adm(name: str = "adm-tiny") -> ADMTeacher:
    flags = json.loads((DATA / name / "flags.json").read_text())
    return ADMTeacher.from_checkpoint(DATA / name / "model.pt", flags).eval()


def _encoder(teacher: Teacher, *, mode: str = "noise", **kw: object) -> TeacherEncoder:
    return TeacherEncoder(
        teacher, teacher.default_taps(), mode=mode, t=20, ddim_steps=3, resolution=teacher.resolution,
        device="cpu", dtype_name="fp32", channels_last=False, **kw,
    )  # fmt: skip


class CallCounter:
    """Forward hooks counting the calls of every module of the UNet, by path."""

    def __init__(self, root: nn.Module) -> None:
        self.calls: Counter[str] = Counter()
        self._handles = [
            module.register_forward_hook(functools.partial(self._hook, name))
            for name, module in root.named_modules()
            if name
        ]

    def _hook(self, name: str, *_: object) -> None:
        self.calls[name] += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _inputs(teacher: Teacher, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = teacher.resolution
    return torch.rand(n, 3, r, r, generator=g) * 2 - 1, torch.randn(n, 3, r, r, generator=g)


# Modules that run after the last default tap (the input of ADM's output_blocks.11.1, the output of diffusers'
# up_blocks.3): the upsampler itself, every later decoder block, the output head.
ADM_AFTER_LAST_TAP = ["output_blocks.11.1", "output_blocks.12", "output_blocks.13", "output_blocks.14", "out"]
DIFFUSERS_AFTER_LAST_TAP = ["conv_norm_out", "conv_out"]


@pytest.mark.parametrize("family", ["adm", "diffusers"])
@pytest.mark.parametrize("mode", ["noise", "ddim"])
def test_early_stop_keeps_every_tap_bit_for_bit_and_skips_the_rest(family: str, mode: str) -> None:
    teacher = _adm() if family == "adm" else DiffusersTeacher.debug(32).eval()
    after = ADM_AFTER_LAST_TAP if family == "adm" else DIFFUSERS_AFTER_LAST_TAP
    x0, eps = _inputs(teacher)
    full, early = _encoder(teacher, mode=mode, early_stop=False), _encoder(teacher, mode=mode)
    assert full.stop_after is None and early.stop_after == early.taps_info[-1].name
    counter = CallCounter(teacher.tap_root)
    want = full(x0, eps)
    full_calls = dict(counter.calls)
    counter.calls.clear()
    got = early(x0, eps)
    early_calls = dict(counter.calls)
    counter.close()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name  # bit for bit, not within a tolerance
    passes = 1 + (3 if mode == "ddim" else 0)  # ddim: 3 inversion steps, each needs the whole eps
    for module in after:
        assert full_calls[module] == passes, module
        assert early_calls.get(module, 0) == passes - 1, module  # only the read-out pass stops early
    # the modules between the taps still ran in the read-out pass (the first tap's upsampler, for one)
    assert early_calls[early.taps[0].module] == passes


def test_the_hooks_stop_before_an_input_tap_module_runs_and_are_removed_after() -> None:
    teacher = _adm()
    encoder = _encoder(teacher)
    x0, eps = _inputs(teacher, 1)
    encoder(x0, eps)
    # the hooks are gone after the read-out: a plain forward runs to the end with no hook firing
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in teacher.modules())
    out = teacher.predict_eps(x0, torch.zeros(1, dtype=torch.long))
    assert out.shape == (1, 3, 64, 64)


def test_last_firing_tap_follows_call_order_not_config_order() -> None:
    teacher = DiffusersTeacher.debug(32).eval()
    taps = teacher.default_taps()[
        ::-1
    ]  # configured deepest-first: the last to fire is still the first listed
    encoder = TeacherEncoder(
        teacher, taps, mode="noise", t=20, ddim_steps=1, resolution=32, device="cpu", dtype_name="fp32",
        channels_last=False,
    )  # fmt: skip
    assert encoder.stop_after == encoder.taps_info[0].name
    x0, eps = _inputs(teacher)
    full = TeacherEncoder(
        teacher, taps, mode="noise", t=20, ddim_steps=1, resolution=32, device="cpu", dtype_name="fp32",
        channels_last=False, early_stop=False,
    )  # fmt: skip
    got, want = encoder(x0, eps), full(x0, eps)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", ["adm-tiny", "adm-tiny-heads"])
def test_sdpa_and_einsum_attention_both_match_the_reference_fixture(name: str) -> None:
    teacher = _adm(name)
    expected = load_file(DATA / name / "expected.safetensors")
    outs = {}
    for impl in ("einsum", "sdpa"):
        set_attention(teacher.unet, impl)
        with torch.no_grad():
            outs[impl] = teacher.unet(expected["x"], expected["t"])
        ref = expected["model_output"].double()
        rel = float((outs[impl].double() - ref).norm() / ref.norm())
        assert rel <= 1e-4, (impl, rel)
    torch.testing.assert_close(outs["sdpa"], outs["einsum"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="valid choices are sdpa, einsum"):
        set_attention(teacher.unet, "flash")


def test_compiled_read_out_gives_the_same_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """``teacher.compile``: dynamo traces the hooked, early-stopped pass. The test compiles with the aot_eager
    backend (the same graph capture, without inductor's C++ code generation, which takes minutes on a small CPU);
    ``make gpu-check`` measures the inductor build on CUDA."""
    teacher = _adm("adm-tiny-heads")
    x0, eps = _inputs(teacher)
    want = _encoder(teacher)(x0, eps)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = _encoder(teacher, compile=True)
    assert compiled.compiled
    for _ in range(2):  # the second call runs the cached graph
        got = compiled(x0, eps)
        assert list(got) == list(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_execution_choices_stay_out_of_provenance_and_come_from_the_local_config() -> None:
    from configlib import to_dict
    from teachers.provenance import kind_fields_only

    plain = kind_fields_only(to_dict(TeacherConfig(kind="adm")))
    chosen = kind_fields_only(
        to_dict(TeacherConfig(kind="adm", early_stop=False, attention="einsum", compile=True))
    )
    assert plain == chosen and not set(RUNTIME_FIELDS) & set(plain)
