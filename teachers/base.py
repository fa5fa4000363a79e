"""The teacher interface the encode loop (and distill's online mode) uses without knowing the model family.

A :class:`Teacher` is a frozen diffusion UNet that predicts epsilon, plus its noise schedule. Features are read
with forward hooks at named module paths (:class:`FeatureTaps`), so a new model family only has to implement
``predict_eps`` and say which module tree tap paths refer to (``tap_root``).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from teachers.config import TapConfig


@dataclass(frozen=True)
class TapInfo:
    """A tap after discovery: where it is read and what it produces at the encode resolution."""

    name: str
    """Level name used by the bank and the student (``s<stride>``)."""
    module: str
    point: str
    stride: int
    """Student stride this level is distilled into."""
    channels: int
    height: int
    """Teacher feature size at the encode resolution; may differ from ``resolution // stride`` (the student's
    size at that stride), in which case distill resizes the target and says so."""
    width: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def level_name(stride: int) -> str:
    return f"s{stride}"


class Teacher(nn.Module, metaclass=abc.ABCMeta):
    """Base class of diffusion teachers.

    Subclasses set ``resolution`` (native image size), register ``alphas_cumprod`` (float64, length
    ``num_train_timesteps``) and implement :meth:`predict_eps`, :meth:`default_taps` and :meth:`identity`.
    Inputs are images in [-1, 1], ``(B, 3, H, W)``.
    """

    resolution: int
    alphas_cumprod: torch.Tensor
    weight_files: tuple[Path, ...] = ()
    """Files the weights were loaded from (empty: built in memory, e.g. a hub download or a test model)."""

    @functools.cached_property
    def weights_sha256(self) -> str:
        """sha256 of the weight files, else of the in-memory state dict. Computed on first use: encode workers
        never record provenance, so they do not re-read a multi-GB checkpoint just to hash it."""
        return files_sha256(self.weight_files) if self.weight_files else state_dict_sha256(self)

    @property
    @abc.abstractmethod
    def tap_root(self) -> nn.Module:
        """Module whose ``named_modules()`` paths the taps refer to (the UNet itself)."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @abc.abstractmethod
    def predict_eps(self, x_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """Epsilon prediction at integer timesteps ``t_B``; shape of ``x_BCHW``."""

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`predict_eps`; lets ``torch.func.functional_call`` run the teacher (shape discovery)."""
        return self.predict_eps(x_BCHW, t_B)

    @abc.abstractmethod
    def default_taps(self) -> list[TapConfig]:
        """The paper's four decoder levels (strides 32, 16, 8, 4) for this model family."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """Provenance recorded in the bank: kind, model id / path, config, weights sha256."""

    def module_paths(self) -> list[str]:
        return [name for name, _ in self.tap_root.named_modules() if name]


def files_sha256(files: Sequence[Path]) -> str:
    """sha256 over the files' bytes in the given order (for one file: what ``sha256sum FILE`` prints)."""
    digest = hashlib.sha256()
    for file in files:
        with Path(file).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (name, dtype, shape, bytes, in key order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureTaps:
    """Forward hooks that capture features at the configured taps during one UNet pass.

    Usage::

        with FeatureTaps(teacher, taps) as captured:
            teacher.predict_eps(x_BCHW, t_B)
        feats = captured.features  # {level name: (B, C, h, w)}
    """

    def __init__(self, teacher: Teacher, taps: list[TapConfig]) -> None:
        modules = dict(teacher.tap_root.named_modules())
        missing = [tap.module for tap in taps if tap.module not in modules]
        if missing:
            raise ValueError(
                f"tap module(s) {missing} do not exist in {type(teacher).__name__}. "
                f"Available decoder module paths:\n  " + "\n  ".join(_decoder_paths(modules))
            )
        names = [level_name(tap.stride) for tap in taps]
        if len(set(names)) != len(names):
            raise ValueError(f"two taps share a stride ({[t.stride for t in taps]}); use one tap per stride")
        self._targets = [(level_name(tap.stride), modules[tap.module], tap.point) for tap in taps]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.features: dict[str, torch.Tensor] = {}

    def __enter__(self) -> FeatureTaps:
        self.features = {}
        for name, module, point in self._targets:
            if point == "input":
                hook = module.register_forward_pre_hook(self._make_input_hook(name))
            else:
                hook = module.register_forward_hook(self._make_output_hook(name))
            self._handles.append(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_input_hook(self, name: str):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.features[name] = _first_tensor(args, name)

        return hook

    def _make_output_hook(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.features[name] = _first_tensor(output, name)

        return hook


def _first_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"tap {name}: the hooked module's value is {type(value).__name__}, not a tensor")


def _decoder_paths(modules: dict[str, nn.Module]) -> list[str]:
    decoder_prefixes = ("up_blocks", "output_blocks", "decoder")
    paths = [p for p in modules if p.startswith(decoder_prefixes) and p.count(".") <= 3]
    return paths or [p for p in modules if p]


@torch.inference_mode()
def discover_taps(
    teacher: Teacher, taps: list[TapConfig], resolution: int, device: torch.device | str = "cpu"
) -> list[TapInfo]:
    """Dry-run one image to learn each tap's channels and size; strides must divide ``resolution``.

    The dry run uses the meta device (no memory, no compute) and falls back to one real image on ``device``.
    """
    problems = [
        f"tap {tap.module} ({tap.point}): stride {tap.stride} does not divide the image size {resolution}"
        for tap in taps
        if tap.stride <= 0 or resolution % tap.stride
    ]
    if problems:
        raise ValueError("\n".join(problems))
    # Dry run on the meta device: the teacher's own code with shape-only stand-ins for its weights (no compute, no
    # memory), so discovering a 554M-parameter teacher's taps takes milliseconds instead of a full CPU forward.
    meta_state = {
        name: torch.empty_like(value, device="meta")
        for name, value in itertools.chain(teacher.named_parameters(), teacher.named_buffers())
    }
    with FeatureTaps(teacher, taps) as captured:
        try:
            functional_call(teacher, meta_state, _dry_run_inputs(resolution, "meta"))
        except (NotImplementedError, RuntimeError):
            # An op without a meta kernel, or a value read (.item()) in the teacher's code: run one real image on
            # ``device`` instead. A genuine model error is not hidden: the real pass raises it again.
            captured.features.clear()
            teacher.predict_eps(*_dry_run_inputs(resolution, device))
    infos = []
    for tap in taps:
        name = level_name(tap.stride)
        if name not in captured.features:
            raise ValueError(f"tap {tap.module} ({tap.point}) was never called during a forward pass")
        _, c, h, w = captured.features[name].shape
        infos.append(TapInfo(name, tap.module, tap.point, tap.stride, c, h, w))
    return infos


def _dry_run_inputs(resolution: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """One blank image (1, 3, R, R) at timestep 0."""
    return torch.zeros(1, 3, resolution, resolution, device=device), torch.zeros(
        1, dtype=torch.long, device=device
    )


@contextlib.contextmanager
def autocast_for(device: torch.device, dtype_name: str) -> Iterator[None]:
    """bf16/fp16 autocast on CUDA; a no-op (float32) elsewhere."""
    if device.type == "cuda" and dtype_name != "fp32":
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
        yield
