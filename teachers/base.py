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
from collections.abc import Callable, Iterator, Sequence
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
    """Teacher feature size at the encode resolution: always ``resolution // stride`` (:func:`discover_taps`
    refuses a stride the measured size contradicts), i.e. the student's size at that stride."""
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every family's :meth:`default_taps` returns measured strides, whatever strides its code writes.

        A family knows *where* its default taps are (the last block of each of the four lowest-resolution decoder
        levels) but the stride of each depends on how many levels the model has, which its code would have to
        re-derive (and both families used to assume six: 32, 16, 8, 4). So the base class wraps each family's
        ``default_taps`` once, here: its result goes through :func:`with_measured_strides` (a meta-device dry
        run, cached per instance). A family cannot forget it, and its code need not change.
        """
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("default_taps")
        if (
            own is None
            or getattr(own, "_measures_strides", False)
            or getattr(own, "__isabstractmethod__", False)
        ):
            return

        @functools.wraps(own)
        def default_taps(self: Teacher) -> list[TapConfig]:
            cache = self.__dict__.setdefault("_measured_default_taps", {})
            if cls not in cache:  # per class: a subclass's override may pick other taps than its parent's
                cache[cls] = with_measured_strides(self, own(self))
            return [TapConfig(module=t.module, point=t.point, stride=t.stride) for t in cache[cls]]

        default_taps._measures_strides = True  # type: ignore[attr-defined]
        cls.default_taps = default_taps  # type: ignore[method-assign]

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
        """The paper's taps for this family: the four lowest-resolution decoder levels. Their strides are
        measured (:func:`with_measured_strides`), not assumed: 32, 16, 8, 4 on a six-level UNet, 8, 4, 2, 1 on a
        four-level one."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """Provenance recorded in the bank: kind, model id / path, config, weights sha256."""

    def noise_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, H, W) of the space the diffusion runs in for ``resolution`` px images: the image itself for a
        pixel-space UNet; a latent-diffusion teacher's VAE latent (its per-row noise is drawn in that shape)."""
        return (3, resolution, resolution)

    def to_diffusion_space(self, x0_BCHW: torch.Tensor) -> torch.Tensor:
        """Clean images in [-1, 1] -> the clean sample ``predict_eps`` diffuses: the images themselves here; the
        scaled VAE latent for latent diffusion."""
        return x0_BCHW

    def dry_run_inputs(self, resolution: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        """Arguments of one :meth:`forward` for a ``resolution`` px image: the tap dry run (:func:`discover_taps`).
        Diffusion teachers take a blank image at t = 0; a family whose forward takes something else (a GAN's
        latent, a latent-diffusion UNet's VAE latent) overrides this."""
        c, h, w = self.noise_shape(resolution)
        return torch.zeros(1, c, h, w, device=device), torch.zeros(1, dtype=torch.long, device=device)

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


class TapsDone(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by the hook of the last tap to fire (``FeatureTaps.stop_after``): the forward has produced every
    feature the read-out needs, so the rest of the network (the upper decoder, the output head) never runs."""


class FeatureTaps:
    """Forward hooks that capture features at the configured taps during one UNet pass.

    Usage::

        with FeatureTaps(teacher, taps) as captured:
            teacher.predict_eps(x_BCHW, t_B)
        feats = captured.features  # {level name: (B, C, h, w)}

    With ``stop_after`` set to a tap's name (the last one to fire: :func:`last_firing_tap`), that tap's hook raises
    :class:`TapsDone` once it has stored its value; :meth:`run` catches it. An ``input`` tap stops before its module
    runs, an ``output`` tap right after it: no tap's value changes, only the work after the last one is skipped.
    """

    def __init__(
        self,
        teacher: Teacher,
        taps: list[TapConfig],
        names: list[str] | None = None,
        *,
        stop_after: str | None = None,
    ) -> None:
        """``names`` key the captured features; default: the level name of each tap's stride (``s<stride>``)."""
        modules = dict(teacher.tap_root.named_modules())
        missing = [tap.module for tap in taps if tap.module not in modules]
        if missing:
            raise ValueError(
                f"tap module(s) {missing} do not exist in {type(teacher).__name__}. "
                f"Available decoder module paths:\n  " + "\n  ".join(_decoder_paths(modules))
            )
        names = names if names is not None else [level_name(tap.stride) for tap in taps]
        if len(set(names)) != len(names):
            raise ValueError(f"two taps share a stride ({[t.stride for t in taps]}); use one tap per stride")
        self._targets = [
            (name, modules[tap.module], tap.point) for name, tap in zip(names, taps, strict=True)
        ]
        if stop_after is not None and stop_after not in names:
            raise ValueError(f"stop_after {stop_after!r} is not one of the taps {names}")
        self.stop_after = stop_after
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.features: dict[str, torch.Tensor] = {}
        self.fired: list[str] = []
        """Tap names in the order their hooks ran during this pass (a module called twice appears twice)."""

    def __enter__(self) -> FeatureTaps:
        self.features = {}
        self.fired = []
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

    def run(self, forward: Callable[..., Any], *args: Any) -> dict[str, torch.Tensor]:
        """``forward(*args)`` inside the hooks; the captured features (the forward stops at ``stop_after``)."""
        with self:
            try:  # noqa: SIM105 - a plain try traces under torch.compile
                forward(*args)
            except TapsDone:
                pass
        return self.features

    def _store(self, name: str, value: torch.Tensor) -> None:
        self.features[name] = value
        self.fired.append(name)
        if name == self.stop_after:
            raise TapsDone

    def _make_input_hook(self, name: str):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._store(name, _first_tensor(args, name))

        return hook

    def _make_output_hook(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._store(name, _first_tensor(output, name))

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
    """Dry-run one image to learn each tap's channels and size, and check each configured stride against it.

    A tap's stride is a claim about the network (image size / feature size); a wrong one would label a level for
    the wrong student stride and distill would quietly resize it. So a stride that does not match the measured
    map is an error naming the tap and the measured value. The dry run uses the meta device (no memory, no
    compute) and falls back to one real image on ``device``.
    """
    problems = [
        f"tap {tap.module} ({tap.point}): stride {tap.stride} does not divide the image size {resolution}"
        for tap in taps
        if tap.stride <= 0 or resolution % tap.stride
    ]
    if problems:
        raise ValueError("\n".join(problems))
    shapes = _dry_run_shapes(teacher, taps, resolution, device)
    infos = []
    for tap, (c, h, w) in zip(taps, shapes, strict=True):
        measured = _measured_stride(tap, h, w, resolution)
        if measured != tap.stride:
            problems.append(
                f"tap {tap.module} ({tap.point}): configured stride {tap.stride}, but its feature map is {h}x{w} "
                f"at {resolution}x{resolution} px, i.e. stride {measured}; set stride: {measured} for this tap in "
                "teachers.<name>.taps, or leave taps empty (the default taps take their strides from this "
                "measurement)"
            )
        infos.append(TapInfo(level_name(tap.stride), tap.module, tap.point, tap.stride, c, h, w))
    if problems:
        raise ValueError("\n".join(problems))
    return infos


@torch.inference_mode()
def with_measured_strides(
    teacher: Teacher, taps: Sequence[TapConfig], resolution: int | None = None
) -> list[TapConfig]:
    """``taps`` with each stride replaced by the measured one: image size / feature size of a dry run.

    For a family's default taps, whose position in the decoder is known but whose stride depends on how many
    resolution levels the model has (a four-level UNet's lowest decoder level is stride 8 at any image size, a
    six-level one's stride 32). ``resolution`` defaults to the teacher's native size; the dry run runs on the
    meta device (falling back to one real image where the teacher's weights are).
    """
    resolution = resolution or teacher.resolution
    device = next(itertools.chain(teacher.parameters(), teacher.buffers()), torch.empty(0)).device
    shapes = _dry_run_shapes(teacher, list(taps), resolution, device)
    measured = [
        TapConfig(module=tap.module, point=tap.point, stride=_measured_stride(tap, h, w, resolution))
        for tap, (_, h, w) in zip(taps, shapes, strict=True)
    ]
    strides = [tap.stride for tap in measured]
    if len(set(strides)) != len(strides):
        raise ValueError(
            f"taps {[t.module for t in measured]} measure strides {strides}: two read the same resolution; "
            "choose one tap per decoder level (teachers.<name>.taps)"
        )
    return measured


def _measured_stride(tap: TapConfig, height: int, width: int, resolution: int) -> int:
    """image size / feature size, which must be one integer for both axes."""
    if height != width or height <= 0 or resolution % height:
        raise ValueError(
            f"tap {tap.module} ({tap.point}): its feature map is {height}x{width} at {resolution}x{resolution} px, "
            "which is not an integer stride; pick a tap inside a decoder level (teachers.<name>.taps)"
        )
    return resolution // height


@torch.inference_mode()
def last_firing_tap(
    teacher: Teacher, taps: list[TapConfig], resolution: int, device: torch.device | str = "cpu"
) -> int | None:
    """Index in ``taps`` of the tap whose hook fires last in a forward (the early-stop point of the read-out), or
    None when stopping early is not safe: a tapped module runs more than once per forward (its last call would be
    the one read), so the whole forward must run. Measured by a dry run, so it holds for any family's call order."""
    _, fired = _dry_run(teacher, taps, resolution, device)
    if len(set(fired)) != len(fired):
        return None
    return int(fired[-1].removeprefix("tap"))


def _dry_run_shapes(
    teacher: Teacher, taps: list[TapConfig], resolution: int, device: torch.device | str
) -> list[tuple[int, int, int]]:
    """(channels, height, width) of each tap's tensor for one blank image of ``resolution`` px."""
    return _dry_run(teacher, taps, resolution, device)[0]


def _dry_run(
    teacher: Teacher, taps: list[TapConfig], resolution: int, device: torch.device | str
) -> tuple[list[tuple[int, int, int]], list[str]]:
    """Shapes of each tap's tensor for one blank image, and the order the taps fired in (names ``tap<i>``)."""
    # Dry run on the meta device: the teacher's own code with shape-only stand-ins for its weights (no compute, no
    # memory), so discovering a 554M-parameter teacher's taps takes milliseconds instead of a full CPU forward.
    meta_state = {
        name: torch.empty_like(value, device="meta")
        for name, value in itertools.chain(teacher.named_parameters(), teacher.named_buffers())
    }
    names = [f"tap{i}" for i in range(len(taps))]  # by position: the strides are what is being checked
    with FeatureTaps(teacher, taps, names=names) as captured:
        try:
            functional_call(teacher, meta_state, teacher.dry_run_inputs(resolution, "meta"))
        except (NotImplementedError, RuntimeError):
            # An op without a meta kernel, or a value read (.item()) in the teacher's code: run one real image on
            # ``device`` instead. A genuine model error is not hidden: the real pass raises it again.
            captured.features.clear()
            captured.fired.clear()
            teacher(*teacher.dry_run_inputs(resolution, device))
    shapes = []
    for tap, name in zip(taps, names, strict=True):
        if name not in captured.features:
            raise ValueError(f"tap {tap.module} ({tap.point}) was never called during a forward pass")
        _, c, h, w = captured.features[name].shape
        shapes.append((int(c), int(h), int(w)))
    return shapes, list(captured.fired)


@contextlib.contextmanager
def autocast_for(device: torch.device, dtype_name: str) -> Iterator[None]:
    """bf16/fp16 autocast on CUDA; a no-op (float32) elsewhere."""
    if device.type == "cuda" and dtype_name != "fp32":
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
        yield
