"""PCA-to-RGB: the standard picture of dense features (first three principal components as colours)."""

from __future__ import annotations

import numpy as np


def pca_rgb(feats_CHW: np.ndarray, *, lo_pct: float = 1.0, hi_pct: float = 99.0) -> np.ndarray:
    """``(C, H, W)`` features -> ``(H, W, 3)`` uint8 image of the top-3 principal components of the pixels.

    Components are found by an eigen-decomposition of the C x C covariance (C is at most ~1k, pixels up to 64^2:
    cheaper than an SVD of the pixel matrix); each component's sign is fixed so its largest loading is positive
    (deterministic colours), and it is stretched between its ``lo_pct`` and ``hi_pct`` percentiles.
    """
    feats_CHW = np.asarray(feats_CHW, dtype=np.float64)
    c, h, w = feats_CHW.shape
    pixels_NC = feats_CHW.reshape(c, h * w).T
    pixels_NC = pixels_NC - pixels_NC.mean(axis=0, keepdims=True)
    cov_CC = pixels_NC.T @ pixels_NC / max(1, h * w - 1)
    _, vectors = np.linalg.eigh(cov_CC)  # ascending eigenvalues
    top = vectors[:, ::-1][:, : min(3, c)]  # (C, k)
    top = top * np.sign(top[np.abs(top).argmax(axis=0), np.arange(top.shape[1])])
    comps_Nk = pixels_NC @ top
    if comps_Nk.shape[1] < 3:
        comps_Nk = np.pad(comps_Nk, ((0, 0), (0, 3 - comps_Nk.shape[1])))
    lo = np.percentile(comps_Nk, lo_pct, axis=0)
    hi = np.percentile(comps_Nk, hi_pct, axis=0)
    scaled = (comps_Nk - lo) / np.maximum(hi - lo, 1e-12)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8).reshape(h, w, 3)
