"""A linear projection (PCA) per level: rows store ``k`` coefficients per position instead of ``C`` channels.

The basis of a level is fitted once per bank, deterministically, on a fixed sample of the dataset before the first
shard is written (``encode.projection_fit``), stored in the bank's group (``projection/<level>/mean`` (C,) and
``projection/<level>/basis`` (k, C), float32 little-endian) and covered by the bank's fingerprint through the
sha256 of those bytes (``LevelSpec.basis_sha256``). Rows store ``codec(coefficients)`` with::

    coefficients_SKHW = einsum("kc,schw->skhw", basis_KC, feats_SCHW - mean_C)
    feats_SCHW ~= einsum("kc,skhw->schw", basis_KC, coefficients_SKHW) + mean_C     # decode: one 1x1 conv

The basis rows are orthonormal eigenvectors of the channel covariance (over every position of every sample view),
largest eigenvalue first; each eigenvector's largest-magnitude entry is positive (the sign convention that makes
the fit reproducible). ``energy`` = the fraction of the sample's channel variance the k components keep.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bank.spec import BankError, LevelSpec

FIT_RULE = "pca-v1"
"""How the basis is fitted, recorded in the spec (part of the fingerprint): evenly spaced images of the key-sorted
dataset (``round((i + 0.5) * N / n)``), draw 0, every stored flip view, float64 channel covariance over every
position, ``torch.linalg.eigh`` on the CPU, top-k eigenvectors, sign: largest-|entry| positive."""

GROUP = "projection"
"""Folder of the bases inside the bank's group: ``projection/<level>/{mean,basis}``."""


def sample_indices(num_images: int, sample: int) -> list[int]:
    """``min(sample, N)`` evenly spaced image indices of ``0..N-1`` (midpoints of equal bins), ascending."""
    n = min(sample, num_images)
    return [int((i + 0.5) * num_images / n) for i in range(n)]


@dataclass
class Projection:
    """One level's basis: ``mean_C`` and orthonormal rows ``basis_KC`` (float32, any device)."""

    mean_C: torch.Tensor
    basis_KC: torch.Tensor
    energy: float = 1.0
    """Fraction of the fit sample's channel variance kept by the k components."""

    @property
    def components(self) -> int:
        return int(self.basis_KC.shape[0])

    @property
    def channels(self) -> int:
        return int(self.basis_KC.shape[1])

    def to(self, device: torch.device | str) -> Projection:
        return Projection(self.mean_C.to(device), self.basis_KC.to(device), self.energy)

    def project(self, feats_SCHW: torch.Tensor) -> torch.Tensor:
        """(S, C, H, W) -> (S, k, H, W) float32 coefficients, on the features' device."""
        basis_KC = self.basis_KC.to(feats_SCHW.device)
        centred = feats_SCHW.float() - self.mean_C.to(feats_SCHW.device)[None, :, None, None]
        return torch.einsum("kc,schw->skhw", basis_KC, centred)

    def unproject(self, coeffs_SKHW: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(S, k, H, W) -> (S, C, H, W): one matmul (a 1x1 convolution) and the mean, on the coefficients' device."""
        basis_KC = self.basis_KC.to(coeffs_SKHW.device)
        feats = torch.einsum("kc,skhw->schw", basis_KC, coeffs_SKHW.float())
        return (feats + self.mean_C.to(coeffs_SKHW.device)[None, :, None, None]).to(dtype)

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored arrays (float32, little-endian, C order)."""
        return {
            "mean": np.ascontiguousarray(self.mean_C.detach().cpu().numpy(), dtype="<f4"),
            "basis": np.ascontiguousarray(self.basis_KC.detach().cpu().numpy(), dtype="<f4"),
        }

    def sha256(self) -> str:
        """sha256 of the stored bytes: mean then basis (float32 little-endian), the fingerprint's view of it."""
        return arrays_sha256(self.arrays())


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in ("mean", "basis"):
        digest.update(np.ascontiguousarray(arrays[name], dtype="<f4").tobytes())
    return digest.hexdigest()


class CovarianceAccumulator:
    """Sum of x and of x x^T over every position of every view, float64, on the features' device."""

    def __init__(self) -> None:
        self.count = 0
        self.sum_C: torch.Tensor | None = None
        self.outer_CC: torch.Tensor | None = None

    def add(self, feats_SCHW: torch.Tensor) -> None:
        x_NC = feats_SCHW.detach().to(torch.float64).permute(0, 2, 3, 1).reshape(-1, feats_SCHW.shape[1])
        if self.sum_C is None:
            self.sum_C = x_NC.sum(0)
            self.outer_CC = x_NC.T @ x_NC
        else:
            self.sum_C += x_NC.sum(0)
            self.outer_CC += x_NC.T @ x_NC
        self.count += x_NC.shape[0]

    def covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean_C, cov_CC) of the sample, float64 on the CPU (cov symmetrised)."""
        if self.sum_C is None or self.outer_CC is None or self.count < 2:
            raise BankError("projection fit: no sample features (every sample image was rejected?)")
        mean_C = (self.sum_C / self.count).cpu()
        cov_CC = (self.outer_CC.cpu() / self.count) - torch.outer(mean_C, mean_C)
        return mean_C, (cov_CC + cov_CC.T) / 2

    def fit(self, components: int = 0, *, energy: float = 0.0) -> Projection:
        """The top-``components`` principal directions, or the fewest that keep ``energy`` of the variance (see
        :data:`FIT_RULE`)."""
        return fit_from_covariance(*self.covariance(), components, energy=energy)


def components_for_energy(evals_desc: torch.Tensor, energy: float) -> int:
    """The fewest leading components whose eigenvalues (descending) sum to at least ``energy`` of the total (all of
    them for a zero covariance). A relative 1e-12 slack keeps ``energy=1`` from asking for the numerically zero
    tail."""
    total = float(evals_desc.sum())
    if total <= 0:
        return int(evals_desc.numel())
    kept = torch.cumsum(evals_desc, 0) / total
    return int(torch.searchsorted(kept, torch.tensor([energy - 1e-12], dtype=kept.dtype)).item()) + 1


def fit_from_covariance(
    mean_C: torch.Tensor, cov_CC: torch.Tensor, components: int = 0, *, energy: float = 0.0
) -> Projection:
    """Top-k eigenvectors of a symmetric covariance (float64, CPU), largest eigenvalue first, sign-normalised;
    k = ``components``, or with ``energy`` > 0 the fewest that keep that fraction of the variance."""
    channels = cov_CC.shape[0]
    evals, evecs = torch.linalg.eigh(cov_CC.to(torch.float64).cpu())  # ascending
    order = torch.argsort(evals, descending=True, stable=True)
    evals = evals[order].clamp_min(0.0)
    if energy > 0:
        components = min(components_for_energy(evals, energy), channels)
    if not 1 <= components <= channels:
        raise BankError(f"projection: k={components} components for {channels} channels (need 1..{channels})")
    basis_KC = evecs[:, order].T[:components].clone()
    peak = basis_KC.abs().argmax(dim=1)
    signs = torch.sign(basis_KC[torch.arange(components), peak])
    basis_KC *= torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    return Projection(mean_C.to(torch.float32), basis_KC.to(torch.float32), energy_kept(evals, components))


def energy_kept(evals_desc: torch.Tensor, k: int) -> float:
    """Fraction of the variance the top ``k`` of these eigenvalues (descending) keep; 1 for a zero covariance."""
    total = float(evals_desc.sum())
    return float(evals_desc[:k].sum()) / total if total > 0 else 1.0


def values_kept(levels: list[LevelSpec], ks: dict[str, int]) -> float:
    """Share of a row's feature values that k components per level (``ks``, a level's k <= C) take."""
    return sum(ks[lv.name] * lv.height * lv.width for lv in levels) / sum(
        lv.channels * lv.height * lv.width for lv in levels
    )


def even_split(channels: dict[str, int], budget: float) -> dict[str, int]:
    """k = floor(``budget`` x C) at every level: one split of a budget. The benchmarks let it stand for the fit's
    (bytes differ only in the codec's per-group scales, < 0.2 % of an ADM-256 view)."""
    return {name: int(budget * c) for name, c in channels.items()}


def eigenvalues(cov_CC: torch.Tensor) -> torch.Tensor:
    """(C,) eigenvalues of a symmetric covariance, float64, descending, negatives (round-off) clamped to 0."""
    return torch.linalg.eigvalsh(cov_CC.to(torch.float64).cpu()).flip(0).clamp_min(0.0)


def energy_curve(mean_C: torch.Tensor, cov_CC: torch.Tensor) -> np.ndarray:
    """(C,) fraction of variance kept by the top 1..C components (benchmarks, ``bank info``)."""
    evals = eigenvalues(cov_CC)
    return (torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-300)).numpy()


def allocate_budget(
    evals_desc: dict[str, torch.Tensor], positions: dict[str, int], budget: float
) -> dict[str, int]:
    """k per level for ``bank.projection_budget``: the most variance kept, summed over levels as fractions of each
    level's own variance, with at most ``budget`` of the row's values (sum_l k_l * positions_l <= budget *
    sum_l C_l * positions_l) and at least one component per level.

    Why that objective: the feature loss is the mean over levels of the MSE against the teacher whitened per sample
    (``distill.losses``), so the variance a level's projection drops, as a fraction of that level's, is what it
    adds to that level's MSE floor, and every level weighs the same. A component of level l costs ``positions_l``
    values per row and gains ``lambda_j / sum(lambda)``; within a level the gains fall with j, so taking
    components in falling gain-per-value order (ties: level name, then j) is the greedy optimum of this knapsack,
    stopped at the first component that does not fit (within one component of the budget)."""
    total_values = sum(len(evals_desc[n]) * positions[n] for n in evals_desc)
    capacity = budget * total_values
    k = {name: 1 for name in evals_desc}
    used = sum(positions[name] for name in evals_desc)
    if used > capacity:
        raise BankError(
            f"bank.projection_budget={budget}: one component per level already takes {used / total_values:.4f} "
            "of the values; raise the budget"
        )
    candidates = []
    for name, evals in evals_desc.items():
        total = float(evals.sum())
        for j in range(1, len(evals)):
            gain = float(evals[j]) / total if total > 0 else 0.0
            candidates.append((-gain / positions[name], name, j))
    for _ratio, name, _j in sorted(candidates):
        if used + positions[name] > capacity:
            break
        k[name] += 1
        used += positions[name]
    return k


# ---- the spec ------------------------------------------------------------------------------------------------
def check_projection_config(cfg: Any, levels: list[LevelSpec]) -> None:
    """``bank.projection`` / ``bank.projection_energy`` name known levels and 0 <= k <= C for each; else one
    :class:`BankError` line."""
    names = {lv.name: lv for lv in levels}
    for key, chosen in (("projection", cfg.projection), ("projection_energy", cfg.projection_energy)):
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            raise BankError(f"bank.{key} names unknown levels {unknown}; levels: {list(names)}")
    too_many = {n: k for n, k in cfg.projection.items() if not 0 <= k <= names[n].channels}
    if too_many:
        raise BankError(
            f"bank.projection={too_many}: k must be 0..C (channels: "
            f"{ {n: names[n].channels for n in too_many} }); 0 = no projection"
        )


def projected_levels(cfg: Any) -> dict[str, int]:
    """Levels ``bank.projection`` projects, with their k (k = 0 dropped)."""
    return {name: int(k) for name, k in sorted(cfg.projection.items()) if k > 0}


def energy_levels(cfg: Any) -> dict[str, float]:
    """Levels ``bank.projection_energy`` projects, with the fraction of the variance their k must keep."""
    return {name: float(e) for name, e in sorted(cfg.projection_energy.items())}


def fits_any(cfg: Any) -> bool:
    """Whether ``cfg`` (a :class:`bank.config.BankConfig`) projects any level, so encode fits bases."""
    return bool(projected_levels(cfg) or cfg.projection_energy or cfg.projection_budget)


def fit_chooses(cfg: Any, level: str) -> bool:
    """Whether the fit, not the config, chooses ``level``'s k (``projection_energy`` or ``projection_budget``)."""
    return bool(cfg.projection_budget) or level in cfg.projection_energy


def fit_record(images: int, energy: dict[str, float] | None = None, budget: float = 0.0) -> dict[str, Any]:
    """``BankSpec.projection_fit`` (in the fingerprint): the rule, the sample size and, when the fit chooses k,
    its targets (``bank.projection_energy`` per level, or ``bank.projection_budget``)."""
    record: dict[str, Any] = {"rule": FIT_RULE, "images": int(images)}
    if energy:
        record["energy"] = {name: float(e) for name, e in sorted(energy.items())}
    if budget:
        record["budget"] = float(budget)
    return record


def config_fit_record(cfg: Any) -> dict[str, Any]:
    """The :func:`fit_record` a bank encoded with ``cfg`` records."""
    return fit_record(cfg.projection_images, energy_levels(cfg), cfg.projection_budget)


def with_projections(spec: Any, projections: dict[str, Projection], *, record: dict[str, Any]) -> Any:
    """``spec`` with the projected levels' ``components`` and ``basis_sha256`` and the fit's settings
    (``record``, from :func:`config_fit_record`) recorded, all part of the fingerprint."""
    import dataclasses

    if not projections:
        return spec
    levels = [
        dataclasses.replace(
            lv, components=projections[lv.name].components, basis_sha256=projections[lv.name].sha256()
        )
        if lv.name in projections
        else lv
        for lv in spec.levels
    ]
    return dataclasses.replace(spec, levels=levels, projection_fit=record)


def stored_projections(path: Path, draft: Any, cfg: Any) -> dict[str, Projection] | None:
    """The bases of the bank at ``path`` when it is this encode's bank (``draft`` = the spec without projections,
    the same levels and k and fit settings): a resumed encode reuses them instead of fitting again (a refit on
    another device may differ in the last bits). None when there is no such bank. A stored basis that does not
    match the bank's own spec is a :class:`BankError`."""
    from bank.layout import read_bank_attrs
    from bank.spec import BankSpec

    if not (Path(path) / "zarr.json").exists():
        return None
    try:
        existing = BankSpec.from_dict(read_bank_attrs(Path(path))["spec"])
    except (BankError, TypeError, KeyError):
        return None  # not a bank create() can resume: it decides (refuse, or overwrite)
    chosen = {lv.name: lv.components for lv in existing.levels if lv.components}
    if (
        {name: k for name, k in chosen.items() if not fit_chooses(cfg, name)} != projected_levels(cfg)
        or not set(energy_levels(cfg)) <= set(chosen)
        or existing.projection_fit != config_fit_record(cfg)
        or without_projections(existing).fingerprint() != draft.fingerprint()
    ):
        return None
    return read_projections(Path(path), existing.levels)


def without_projections(spec: Any) -> Any:
    """``spec`` as :func:`with_projections` found it: what a resumed encode compares before reusing a basis."""
    import dataclasses

    levels = [dataclasses.replace(lv, components=0, basis_sha256="") for lv in spec.levels]
    return dataclasses.replace(spec, levels=levels, projection_fit={})


# ---- storage in the bank's group ------------------------------------------------------------------------------
def write_projections(group: Any, projections: dict[str, Projection], *, checksum: bool) -> None:
    """Create ``projection/<level>/{mean,basis}`` (one chunk each, crc32c when the format has checksums)."""
    import zarr.codecs

    for level, proj in projections.items():
        for name, values in proj.arrays().items():
            array = group.create_array(
                f"{GROUP}/{level}/{name}",
                shape=values.shape,
                chunks=values.shape,
                dtype="float32",
                compressors=[zarr.codecs.Crc32cCodec()] if checksum else None,
                filters=None,
                fill_value=0.0,
                attributes={"energy": proj.energy} if name == "basis" else {},
            )
            array[...] = values


def read_projections(path: Path, levels: list[LevelSpec]) -> dict[str, Projection]:
    """The stored bases of the projected ``levels``, each checked against its recorded sha256 and shape."""
    import zarr

    wanted = [lv for lv in levels if lv.components]
    if not wanted:
        return {}
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as exc:  # noqa: BLE001 - any failure to open is the same answer
        raise BankError(f"{path}: cannot open the bank's group to read its projection bases ({exc})") from exc
    out = {}
    for lv in wanted:
        try:
            mean = np.asarray(group[f"{GROUP}/{lv.name}/mean"][...])
            basis_array = group[f"{GROUP}/{lv.name}/basis"]
            basis = np.asarray(basis_array[...])
            energy = float(basis_array.attrs.get("energy", float("nan")))
        except Exception as exc:  # noqa: BLE001 - missing, truncated or corrupt (crc32c) arrays alike
            raise BankError(
                f"{path / GROUP / lv.name}: the projection basis of level {lv.name} is missing or unreadable "
                f"({type(exc).__name__}); re-encode the bank (dreamteacher encode --overwrite)"
            ) from exc
        if mean.shape != (lv.channels,) or basis.shape != (lv.components, lv.channels):
            raise BankError(
                f"{path / GROUP / lv.name}: basis {basis.shape} / mean {mean.shape}, the spec says "
                f"({lv.components}, {lv.channels}); re-encode the bank"
            )
        if arrays_sha256({"mean": mean, "basis": basis}) != lv.basis_sha256:
            raise BankError(
                f"{path / GROUP / lv.name}: the stored projection basis of level {lv.name} does not match the "
                "sha256 in the bank's spec (it was changed after creation); re-encode the bank"
            )
        out[lv.name] = Projection(torch.from_numpy(mean.copy()), torch.from_numpy(basis.copy()), energy)
    return out
