"""What a bank's targets are a function of, as one typed record, and the one way to rebuild their encoder.

``encode`` writes :meth:`Provenance.to_dict` into the bank's attributes; ``distill`` (fresh or replayed online
targets) reads it back with :meth:`Provenance.from_dict` and builds the same read-out with
:func:`build_encoder`, so the two stages cannot disagree about a key or a default. The bank itself stores the
dict opaquely: it never learns about teacher families.

The dict layout (``teacher``, ``encoding``, ``taps``, ``preprocessing``, ``dataset``) is the one encode has always
written, so the bank fingerprint (which covers it) is unchanged and older banks read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from configlib import from_mapping, to_dict
from teachers.config import KIND_ONLY_FIELDS, RUNTIME_FIELDS, TapConfig, TeacherConfig

if TYPE_CHECKING:
    import torch

    from teachers.base import TapInfo
    from teachers.encoding import TeacherEncoder
    from teachers.synthesis import GANSynthesizer

PREPROCESSING = (
    "guided-diffusion center_crop_arr: box-halve while the shorter side >= 2x resolution, bicubic resize of the "
    "shorter side to resolution, center crop; RGB; x0 = uint8 / 127.5 - 1"
)
SEED_RULE = (
    "eps of row (image, draw, flip) = teachers.encoding.make_noise(row_seed(seed, key, draw)); "
    "flip=1 rows use the flip=0 noise mirrored along W"
)
_LOCATION_KEYS = frozenset({"path", "checkpoint", "_name_or_path"})


def without_locations(data: Any) -> Any:
    """Drop file locations (recursively): where weights live is not content (their sha256 is), so a moved
    checkpoint must not change a fingerprint or block a resume."""
    if isinstance(data, dict):
        return {k: without_locations(v) for k, v in data.items() if k not in _LOCATION_KEYS}
    if isinstance(data, list):
        return [without_locations(v) for v in data]
    return data


def kind_fields_only(config: dict[str, Any]) -> dict[str, Any]:
    """A teacher config dict without the fields of other kinds (``KIND_ONLY_FIELDS``) and without the execution
    choices (``RUNTIME_FIELDS``): a diffusers or adm entry records exactly the keys it always did."""
    others = {f for kind, fields in KIND_ONLY_FIELDS.items() if kind != config.get("kind") for f in fields}
    others |= set(RUNTIME_FIELDS)
    return {k: v for k, v in config.items() if k not in others}


@dataclass(frozen=True, kw_only=True)
class Encoding:
    """How clean images become the teacher's input: the read-out settings shared by encode and online targets."""

    mode: Literal["noise", "ddim", "synthesize"]
    """``synthesize``: a GAN bank, rows generated from seeds (``SynthesisRecord``); t and ddim_steps are 0."""
    t: int
    ddim_steps: int
    """DDIM inversion steps (``mode="ddim"``); recorded as 0 for ``noise``."""
    seed: int
    """Global seed of the per-row noise (``SEED_RULE``)."""
    resolution: int
    """Input size in pixels (0 before the teacher is loaded = its native resolution)."""


@dataclass(frozen=True, kw_only=True)
class DatasetRecord:
    name: str
    layout: str
    count: int
    keys_sha256: str
    """sha256 of the image keys in bank order (``sources.images.keys_sha256``)."""


@dataclass(frozen=True, kw_only=True)
class SynthesisRecord:
    """What a synthesized (GAN) bank's rows are drawn from: row r = (z, class) from seed (encoding.seed, r)."""

    num_images: int
    truncation: float
    classes: list[int]
    """The classes drawn from, uniformly; empty = all of the generator's classes (its ``num_classes``)."""


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Teacher identity and config, encoding, taps, preprocessing and dataset of one bank."""

    teacher_name: str
    teacher_identity: dict[str, Any]
    """``Teacher.identity()`` without file locations (kind, config, ``weights_sha256``)."""
    teacher_config: dict[str, Any]
    """The ``TeacherConfig`` it was built from, without file locations."""
    encoding: Encoding
    taps: list[dict[str, Any]]
    """``TapInfo.as_dict()`` per level: name, module, point, stride, channels, height, width."""
    dataset: DatasetRecord | None = None
    preprocessing: str = PREPROCESSING
    seed_rule: str = SEED_RULE
    synthesis: SynthesisRecord | None = None
    """Set for synthesized banks only (written as a ``synthesis`` key), so encoded banks' dicts are unchanged."""

    @classmethod
    def of(
        cls,
        *,
        teacher_name: str,
        teacher: TeacherConfig,
        identity: dict[str, Any],
        encoding: Encoding,
        taps: list[TapInfo],
        dataset: DatasetRecord,
    ) -> Provenance:
        return cls(
            teacher_name=teacher_name,
            teacher_identity=without_locations(to_dict(identity)),
            teacher_config=without_locations(kind_fields_only(to_dict(teacher))),
            encoding=encoding,
            taps=[tap.as_dict() for tap in taps],
            dataset=dataset,
        )

    def to_dict(self) -> dict[str, Any]:
        enc = self.encoding
        data: dict[str, Any] = {
            "teacher": {
                "name": self.teacher_name,
                "identity": self.teacher_identity,
                "config": self.teacher_config,
            },
            "encoding": {
                "mode": enc.mode,
                "t": enc.t,
                "ddim_steps": enc.ddim_steps if enc.mode == "ddim" else 0,
                "seed": enc.seed,
                "seed_rule": self.seed_rule,
            },
            "taps": [dict(tap) for tap in self.taps],
            "preprocessing": {"resolution": enc.resolution, "method": self.preprocessing},
        }
        if self.dataset is not None:
            data["dataset"] = to_dict(self.dataset)
        if self.synthesis is not None:
            data["synthesis"] = to_dict(self.synthesis)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        """Read a bank's attributes back; a bank without them (hand-written, or another tool's) is a clear error."""
        try:
            teacher, encoding, prep = data["teacher"], data["encoding"], data["preprocessing"]
            dataset = data.get("dataset")
            return cls(
                teacher_name=teacher["name"],
                teacher_identity=dict(teacher["identity"]),
                teacher_config=dict(teacher["config"]),
                encoding=Encoding(
                    mode=encoding["mode"],
                    t=int(encoding["t"]),
                    ddim_steps=int(encoding.get("ddim_steps", 0)),
                    seed=int(encoding.get("seed", 0)),
                    resolution=int(prep["resolution"]),
                ),
                taps=[dict(tap) for tap in data["taps"]],
                dataset=DatasetRecord(**dataset) if dataset and "keys_sha256" in dataset else None,
                preprocessing=prep.get("method", PREPROCESSING),
                seed_rule=encoding.get("seed_rule", SEED_RULE),
                synthesis=SynthesisRecord(**data["synthesis"]) if data.get("synthesis") else None,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"the bank's attributes lack the encoder provenance ({exc!s}) needed to rebuild its teacher; "
                "re-encode the bank with `dreamteacher encode`"
            ) from exc

    def tap_configs(self, levels: list[str] | None = None) -> list[TapConfig]:
        """The recorded taps (all, or those of ``levels`` in that order) as teacher tap configs."""
        by_name = {tap["name"]: tap for tap in self.taps}
        missing = [name for name in levels or [] if name not in by_name]
        if missing:
            raise ValueError(f"the bank records no taps for levels {missing}; it has {sorted(by_name)}")
        chosen = [by_name[name] for name in levels] if levels else self.taps
        return [TapConfig(module=t["module"], point=t["point"], stride=int(t["stride"])) for t in chosen]

    def teacher_config_at(self, local: TeacherConfig) -> TeacherConfig:
        """The recorded teacher settings with the weights' location and the execution choices
        (``RUNTIME_FIELDS``) taken from this machine's config entry."""
        runtime = {name: getattr(local, name) for name in RUNTIME_FIELDS}
        return from_mapping(
            TeacherConfig,
            {**self.teacher_config, "path": local.path, "checkpoint": local.checkpoint, **runtime},
        )

    def rebuild_encoder(
        self,
        teachers: dict[str, TeacherConfig],
        device: torch.device,
        *,
        levels: list[str] | None = None,
        purpose: str = "",
    ) -> TeacherEncoder:
        """The recorded read-out, rebuilt on this machine: the ``teachers`` entry of the recorded name gives only
        the weights' location (and execution choices), and the weights must be the recorded ones (sha256).
        ``levels``: the taps to read (all when None). ``purpose`` prefixes the error messages."""
        name, where = self.teacher_name, f"{purpose}: " if purpose else ""
        if name not in teachers:
            raise ValueError(
                f"{where}the bank was encoded by teacher {name!r}, which is not in the config's teachers "
                f"({', '.join(sorted(teachers))}); add it with its path / checkpoint"
            )
        encoder = build_encoder(
            self.teacher_config_at(teachers[name]),
            self.encoding,
            device,
            taps=self.tap_configs(levels),
            name=name,
        )
        self.check_weights(encoder.teacher.identity())
        return encoder

    def check_weights(self, identity: dict[str, Any]) -> None:
        """Refuse a teacher whose weights differ from the recorded ones (sha256)."""
        want, have = self.teacher_identity.get("weights_sha256"), identity.get("weights_sha256")
        if want != have:
            raise ValueError(
                f"teacher {self.teacher_name!r} weights have sha256 {have}, the bank was encoded with {want}; "
                f"point teachers.{self.teacher_name} at the original weights"
            )


def build_encoder(
    teacher_cfg: TeacherConfig,
    encoding: Encoding,
    device: torch.device,
    *,
    taps: list[TapConfig] | None = None,
    name: str = "",
) -> TeacherEncoder:
    """Load the frozen teacher on ``device`` and wrap it in the read-out (taps dry-run and validated).

    ``taps`` default to ``teacher_cfg.taps`` or, when those are empty, the family's defaults; ``encoding.resolution``
    0 means the teacher's native size. ``name`` is the ``teachers:`` entry, for error messages.
    """
    from teachers.encoding import TeacherEncoder
    from teachers.registry import build_teacher, resolve_taps, synthesizes

    if synthesizes(teacher_cfg) or encoding.mode == "synthesize":
        raise ValueError(
            f"teacher {name or '<name>'!r} is a GAN (kind {teacher_cfg.kind}): its bank was synthesized and its "
            "targets cannot be recomputed from the images; distill from the bank's stored targets"
        )
    teacher = build_teacher(teacher_cfg, device, name=name)
    return TeacherEncoder(
        teacher,
        taps if taps is not None else resolve_taps(teacher, teacher_cfg),
        mode=encoding.mode,
        t=encoding.t,
        ddim_steps=encoding.ddim_steps,
        resolution=encoding.resolution or teacher.resolution,
        device=device,
        dtype_name=teacher_cfg.dtype,
        channels_last=teacher_cfg.channels_last,
        early_stop=teacher_cfg.early_stop,
        compile=teacher_cfg.compile,
    )


def build_readout(
    teacher_cfg: TeacherConfig, encoding: Encoding, device: torch.device, *, name: str = ""
) -> TeacherEncoder | GANSynthesizer:
    """The encode stage's read-out for this teacher: a :class:`TeacherEncoder` (encodes images) or, for a kind
    that synthesizes (``teachers.registry.synthesizes``), a :class:`teachers.synthesis.GANSynthesizer` seeded by
    ``encoding.seed``. The encode loop picks its source from which one it gets, never from the kind."""
    from teachers.registry import build_teacher, resolve_taps, synthesizes

    if not synthesizes(teacher_cfg):
        return build_encoder(teacher_cfg, encoding, device, name=name)
    from teachers.synthesis import GANSynthesizer

    teacher = build_teacher(teacher_cfg, device, name=name)
    return GANSynthesizer(
        teacher,  # type: ignore[arg-type]
        resolve_taps(teacher, teacher_cfg),
        classes=teacher_cfg.classes,
        seed=encoding.seed,
        device=device,
        dtype_name=teacher_cfg.dtype,
    )
