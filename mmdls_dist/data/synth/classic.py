"""The first synthetic style ("classic"): elliptical lungs, one spiculated, textured lesion.

Each patient has latent tumour factors:

| factor   | seen in images                      | seen in tables                        |
|----------|-------------------------------------|---------------------------------------|
| size     | lesion radius                       | tumor_diameter_mm (noisy), MTV, TLG   |
| density  | lesion brightness (solid vs GGO)    | SUV (weakly), radiomics (weakly)      |
| texture  | heterogeneity inside the lesion     | no                                    |
| margin   | spiculation of the lesion boundary  | no                                    |
| position | central vs peripheral, upper/lower  | no                                    |

Histology (LUSC: central, solid, smoker, male), stage (size, margin, SUV) and survival are
driven by these factors and by clinical/PET variables. Survival times come from a Cox model
with a Weibull baseline by inverse transform (Bender, Augustin & Blettner 2005):
T = (-log U / (lambda * exp(eta))) ** (1 / nu), with independent uniform + exponential
censoring. Centers differ in scanner intensity gain/offset, noise, image size, slice naming,
case mix (stage and histology shifts) and in radiomics availability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmdls_dist.config import SynthConfig
from mmdls_dist.data.schema import N_RADIOMICS
from mmdls_dist.data.synth.common import Style, censored, smooth_noise, z


@dataclass(frozen=True)
class CenterSpec:
    """How one synthetic hospital differs from the others."""

    name: str
    gain: float  # scanner intensity scale
    offset: float  # scanner intensity offset (0..255 units)
    noise: float  # pixel noise std (0..255 units)
    size_scale: float  # image size relative to SynthConfig.image_size
    stage_shift: float  # case mix: added to the stage latent
    lusc_shift: float  # case mix: added to the LUSC logit
    radiomics: bool  # whether this center exports radiomics
    unannotated_rate: float  # fraction of patients without a lesion mask
    slice_pattern: str  # file-name pattern of its slices


CENTERS: tuple[CenterSpec, ...] = (
    CenterSpec("HOSP-A", 1.00, 0.0, 4.0, 1.00, 0.0, 0.0, True, 0.05, "slice_{:03d}.png"),
    CenterSpec("HOSP-B", 0.85, 18.0, 7.0, 1.25, 0.4, -0.3, True, 0.10, "IM{:04d}.png"),
    CenterSpec("HOSP-C", 1.10, -10.0, 5.0, 0.75, -0.3, 0.4, True, 0.15, "{:03d}.png"),
    CenterSpec("HOSP-D", 0.95, 6.0, 9.0, 1.00, 0.2, 0.2, False, 0.20, "ct-{:03d}.png"),
)


# Weibull baselines (rate lambda per month, shape nu) and censoring, per endpoint.
WEIBULL = {"dfs": (1 / 50.0, 1.2), "os": (1 / 110.0, 1.4)}
FOLLOW_UP_MONTHS = (12.0, 72.0)  # administrative censoring, uniform
DROPOUT_MONTHS = 150.0  # mean of the exponential loss-to-follow-up time


def patients(
    spec: SynthConfig, rng: np.random.Generator, centers: np.ndarray
) -> dict[str, np.ndarray]:
    """Draw every per-patient latent factor, label and tabular value (vectorised)."""
    n = spec.patients
    c = [CENTERS[i] for i in centers]
    f: dict[str, np.ndarray] = {"center": centers}
    f["age"] = np.clip(rng.normal(65, 9, n), 30, 90).round(0)
    f["sex"] = (rng.random(n) < 0.62).astype(float)
    p_smoke = 0.45 + 0.25 * f["sex"]
    smoker = rng.random(n) < p_smoke
    former = smoker & (rng.random(n) < 0.45)
    f["smoking_status"] = np.where(~smoker, 0, np.where(former, 1, 2)).astype(float)
    f["smoking_years"] = np.where(smoker, np.clip(rng.normal(30, 10, n), 1, 60), 0).round(0)
    f["years_since_cessation"] = np.where(former, np.clip(rng.exponential(8, n), 0.5, 40), 0)
    f["years_since_cessation"] = f["years_since_cessation"].round(1)

    f["size"] = rng.normal(0, 1, n)
    f["density"] = rng.normal(0, 1, n)
    f["texture"] = rng.normal(0, 1, n)
    f["margin"] = rng.normal(0, 1, n)
    f["central"] = rng.random(n)  # 0 peripheral .. 1 central (hilar)
    f["upper"] = (rng.random(n) < 0.6).astype(float)
    f["side"] = (rng.random(n) < 0.5).astype(float)

    lusc_logit = (
        -0.4
        + 0.8 * z(f["smoking_years"])
        + 0.4 * f["sex"]
        + 2.0 * (f["central"] - 0.5)
        + 1.0 * f["density"]
        + np.array([x.lusc_shift for x in c])
    )
    f["lusc_logit"] = lusc_logit
    f["histology"] = (rng.random(n) < 1 / (1 + np.exp(-lusc_logit))).astype(float)

    radius_mm = np.clip(16 * np.exp(0.35 * f["size"]), 5, 60)
    f["radius_mm"] = radius_mm
    f["tumor_diameter_mm"] = (2 * radius_mm * rng.lognormal(0, 0.15, n)).round(1)
    suv_max = np.exp(1.6 + 0.25 * f["density"] + 0.3 * f["histology"] + 0.2 * f["size"])
    suv_max *= rng.lognormal(0, 0.2, n)
    f["suv_max"] = suv_max.round(2)
    f["suv_mean"] = (suv_max * rng.uniform(0.45, 0.65, n)).round(2)
    f["suv_peak"] = (suv_max * rng.uniform(0.7, 0.9, n)).round(2)
    mtv = 4 / 3 * np.pi * (radius_mm / 10) ** 3 * rng.lognormal(0, 0.2, n)  # ml
    f["mtv"] = mtv.round(2)
    f["tlg"] = (f["suv_mean"] * mtv).round(2)

    stage_latent = (
        1.1 * f["size"]
        + 0.9 * f["margin"]
        + 0.4 * z(np.log(suv_max))
        + 0.5 * (f["central"] - 0.5)
        + np.array([x.stage_shift for x in c])
        + rng.normal(0, 0.6, n)
    )
    f["stage_latent"] = stage_latent
    f["tnm_stage"] = np.digitize(stage_latent, [-0.45, 0.65]).astype(float)

    f["eta_dfs"] = (
        0.55 * f["tnm_stage"]
        + 0.6 * f["margin"]
        + 0.45 * f["texture"]
        + 0.25 * f["size"]
        + 0.2 * z(np.log(suv_max))
        + 0.15 * z(f["age"])
    )
    f["eta_os"] = (
        0.5 * f["tnm_stage"]
        + 0.55 * f["texture"]
        + 0.3 * f["margin"]
        + 0.3 * f["size"]
        + 0.3 * f["histology"]
        + 0.35 * z(f["age"])
        + 0.2 * (f["smoking_status"] == 2)
    )
    for endpoint, (lam, nu) in WEIBULL.items():
        # Centred, so lambda is the hazard scale of a typical patient; a constant shift of
        # eta is absorbed by the baseline and changes neither the model nor the C-index.
        f[f"eta_{endpoint}"] -= f[f"eta_{endpoint}"].mean()
        u = rng.random(n)
        t = (-np.log(u) / (lam * np.exp(f[f"eta_{endpoint}"]))) ** (1 / nu)
        f[f"{endpoint}_time"], f[f"{endpoint}_event"] = censored(
            t, rng, FOLLOW_UP_MONTHS, DROPOUT_MONTHS
        )

    # Radiomics see size and density through noise and a per-center batch effect; they never
    # see margin, texture or position, so those stay visible only to the imaging branch.
    w = rng.normal(0, 1, (N_RADIOMICS, 2))
    batch_effect = rng.normal(0, 0.3, (spec.centers, N_RADIOMICS))
    signal = np.stack([f["size"], f["density"]], axis=1) @ w.T * 0.5
    f["radiomics"] = signal + batch_effect[centers] + rng.normal(0, 1.0, (n, N_RADIOMICS))
    f["annotated"] = rng.random(n) >= np.array([x.unannotated_rate for x in c])
    return f


def render_patient(
    factors: dict[str, float], center: CenterSpec, n_slices: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One patient's CT, lung mask and lesion mask: uint8 [S, H, W] each (masks 0/255)."""
    rng = np.random.default_rng(seed)
    z = np.linspace(0, 1, n_slices, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, size, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, size, dtype=np.float32)[None, None, :]

    body = (x / 0.92) ** 2 + (y / 0.72) ** 2 < 1
    taper = np.sqrt(np.clip(1 - ((z - 0.5) / 0.62) ** 2, 0.05, 1))  # lungs shrink at apex/base
    lungs = np.zeros((n_slices, size, size), dtype=bool)
    for cx in (-0.43, 0.43):
        lungs |= ((x - cx) / (0.29 * taper)) ** 2 + ((y + 0.04) / (0.52 * taper)) ** 2 < 1

    # Lesion centre: central tumours sit near the hilum (medial), peripheral ones laterally.
    side = 1.0 if factors["side"] > 0.5 else -1.0
    cx = side * (0.22 + 0.36 * (1 - factors["central"]))
    cy = rng.uniform(-0.25, 0.2)
    cz = 0.32 if factors["upper"] > 0.5 else 0.66
    cz += rng.uniform(-0.08, 0.08)
    r = float(np.clip(factors["radius_mm"] / 160.0, 0.03, 0.26))  # field of view ~ 320 mm
    rz = max(1.6 / n_slices, r * 1.3)
    theta = np.arctan2(y - cy, x - cx)
    spikes = 1 / (1 + np.exp(-1.5 * factors["margin"]))  # 0 smooth .. 1 spiculated
    phases = rng.uniform(0, 2 * np.pi, 3)
    wobble = sum(np.cos(k * theta + p) for k, p in zip((5, 7, 11), phases, strict=True)) / 3.0
    r_eff = r * (1 + 0.45 * spikes * wobble)
    dist = np.sqrt(((x - cx) / r_eff) ** 2 + ((y - cy) / r_eff) ** 2 + ((z - cz) / rz) ** 2)
    lesion = dist < 1

    density = 88 + 42 * np.tanh(factors["density"])  # ground-glass ~50 .. solid ~130
    heterogeneity = 40 / (1 + np.exp(-1.3 * factors["texture"]))
    lung_tex = smooth_noise(rng, (n_slices, size, size), k=6)
    lesion_tex = smooth_noise(rng, (n_slices, size, size), k=3)

    img = np.where(body, 150.0, 8.0).astype(np.float32)
    img = np.where(lungs, 32.0 + 8.0 * lung_tex, img)
    img = np.where(lesion, density + heterogeneity * lesion_tex, img)
    img = center.gain * img + center.offset + rng.normal(0, center.noise, img.shape)
    ct = np.clip(img, 0, 255).astype(np.uint8)
    lung_mask = np.where(lungs | (lesion & body), 255, 0).astype(np.uint8)
    lesion_mask = np.where(lesion, 255, 0).astype(np.uint8)
    return ct, lung_mask, lesion_mask


FACTOR_KEYS = ("size", "density", "texture", "margin", "central", "upper", "side", "radius_mm")

STYLE = Style(
    name="classic",
    summary="elliptical lungs; image-only risk in lesion margin (spiculation) and texture",
    centers=CENTERS,
    factor_keys=FACTOR_KEYS,
    patients=patients,
    render=render_patient,
    baseline={
        k: {"weibull_rate_per_month": v[0], "weibull_shape": v[1]} for k, v in WEIBULL.items()
    },
)
