"""What every synthetic style shares: the style's interface, the center contract and the
small helpers of both generators (z-scores, blob noise, censoring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Center(Protocol):
    """What the cohort writer reads of a synthetic hospital (each style adds its own)."""

    name: str
    size_scale: float  # image size relative to SynthConfig.image_size
    radiomics: bool  # whether this center exports radiomics
    unannotated_rate: float  # fraction of patients without a lesion mask
    slice_pattern: str  # file-name pattern of its slices


@dataclass(frozen=True)
class Style:
    """One synthetic generator: who the patients are and what their images look like.

    `patients(spec, rng, centers)` draws every per-patient array (labels, clinical, PET,
    radiomics [n,128], `annotated`, the true linear predictors `eta_dfs` / `eta_os`,
    `lusc_logit`, `stage_latent` and the factors named in `factor_keys`) for center indices
    `centers`; `render(factors, center, n_slices, size, seed)` -> uint8 CT, lung mask and
    lesion mask [S,H,W] (masks 0/255)."""

    name: str
    summary: str
    centers: tuple[Any, ...]
    factor_keys: tuple[str, ...]
    patients: Callable[..., dict[str, np.ndarray]]
    render: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
    baseline: dict[str, dict[str, float]]  # per endpoint: the baseline hazard's parameters


def z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-9)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], k: int = 4) -> np.ndarray:
    """Blob-like noise in [-1, 1]: white noise upsampled from a coarse grid."""
    coarse = rng.normal(0, 1, tuple(max(2, s // k) for s in shape))
    out = coarse
    for axis, s in enumerate(shape):
        idx = np.minimum((np.arange(s) * coarse.shape[axis]) // s, coarse.shape[axis] - 1)
        out = np.take(out, idx, axis=axis)
    return np.tanh(out)


def censored(
    t: np.ndarray,
    rng: np.random.Generator,
    follow_up: tuple[float, float],
    dropout_mean: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Event times -> (observed time, event): administrative censoring uniform in
    `follow_up` months, independent exponential loss to follow-up."""
    n = len(t)
    censor = np.minimum(rng.uniform(*follow_up, n), rng.exponential(dropout_mean, n))
    return np.maximum(np.minimum(t, censor), 0.1).round(2), (t <= censor).astype(float)
