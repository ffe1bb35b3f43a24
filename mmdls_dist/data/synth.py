"""Synthetic multi-center NSCLC cohort in the raw export layout, with a known ground truth.

A real learning problem rather than noise. Each patient has latent tumour factors:

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
case mix (stage and histology shifts) and in radiomics availability. A few cells are left
empty and some patients are unannotated (no lesion/ folder), as in real exports.

The ground truth (linear predictors, factors, oracle C-index per endpoint) is written to a
JSON file outside DATA_ROOT so that benchmarks can report "fraction of oracle".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmdls_dist.config import SynthConfig, to_dict
from mmdls_dist.data.defects import Mapper, serial_map
from mmdls_dist.data.schema import (
    CLINICAL_COLUMNS,
    CLINICAL_CSV_COLUMNS,
    ENDPOINTS,
    N_RADIOMICS,
    PET_COLUMNS,
)
from mmdls_dist.metrics.survival import harrell_c


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


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-9)


def _patients(spec: SynthConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw every per-patient latent factor, label and tabular value (vectorised)."""
    n = spec.patients
    centers = np.arange(n) % spec.centers
    rng.shuffle(centers)
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
        + 0.8 * _z(f["smoking_years"])
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
        + 0.4 * _z(np.log(suv_max))
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
        + 0.2 * _z(np.log(suv_max))
        + 0.15 * _z(f["age"])
    )
    f["eta_os"] = (
        0.5 * f["tnm_stage"]
        + 0.55 * f["texture"]
        + 0.3 * f["margin"]
        + 0.3 * f["size"]
        + 0.3 * f["histology"]
        + 0.35 * _z(f["age"])
        + 0.2 * (f["smoking_status"] == 2)
    )
    for endpoint, (lam, nu) in WEIBULL.items():
        # Centred, so lambda is the hazard scale of a typical patient; a constant shift of
        # eta is absorbed by the baseline and changes neither the model nor the C-index.
        f[f"eta_{endpoint}"] -= f[f"eta_{endpoint}"].mean()
        u = rng.random(n)
        t = (-np.log(u) / (lam * np.exp(f[f"eta_{endpoint}"]))) ** (1 / nu)
        follow_up = rng.uniform(*FOLLOW_UP_MONTHS, n)
        dropout = rng.exponential(DROPOUT_MONTHS, n)
        censor = np.minimum(follow_up, dropout)
        f[f"{endpoint}_time"] = np.maximum(np.minimum(t, censor), 0.1).round(2)
        f[f"{endpoint}_event"] = (t <= censor).astype(float)

    # Radiomics see size and density through noise and a per-center batch effect; they never
    # see margin, texture or position, so those stay visible only to the imaging branch.
    w = rng.normal(0, 1, (N_RADIOMICS, 2))
    batch_effect = rng.normal(0, 0.3, (spec.centers, N_RADIOMICS))
    signal = np.stack([f["size"], f["density"]], axis=1) @ w.T * 0.5
    f["radiomics"] = signal + batch_effect[centers] + rng.normal(0, 1.0, (n, N_RADIOMICS))
    f["annotated"] = rng.random(n) >= np.array([x.unannotated_rate for x in c])
    return f


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], k: int = 4) -> np.ndarray:
    """Blob-like noise in [-1, 1]: white noise upsampled from a coarse grid."""
    coarse = rng.normal(0, 1, tuple(max(2, s // k) for s in shape))
    out = coarse
    for axis, s in enumerate(shape):
        idx = np.minimum((np.arange(s) * coarse.shape[axis]) // s, coarse.shape[axis] - 1)
        out = np.take(out, idx, axis=axis)
    return np.tanh(out)


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
    lung_tex = _smooth_noise(rng, (n_slices, size, size), k=6)
    lesion_tex = _smooth_noise(rng, (n_slices, size, size), k=3)

    img = np.where(body, 150.0, 8.0).astype(np.float32)
    img = np.where(lungs, 32.0 + 8.0 * lung_tex, img)
    img = np.where(lesion, density + heterogeneity * lesion_tex, img)
    img = center.gain * img + center.offset + rng.normal(0, center.noise, img.shape)
    ct = np.clip(img, 0, 255).astype(np.uint8)
    lung_mask = np.where(lungs | (lesion & body), 255, 0).astype(np.uint8)
    lesion_mask = np.where(lesion, 255, 0).astype(np.uint8)
    return ct, lung_mask, lesion_mask


def _write_images(args: tuple) -> int:
    root, pid, factors, center, n_slices, size, seed, annotated = args
    ct, lung, lesion = render_patient(factors, center, n_slices, size, seed)
    folders = {"ct": ct, "lung": lung}
    if annotated:
        folders["lesion"] = lesion
    for kind, stack in folders.items():
        out = Path(root) / "images" / pid / kind
        out.mkdir(parents=True, exist_ok=True)
        for i in range(n_slices):
            Image.fromarray(stack[i]).save(out / center.slice_pattern.format(i), compress_level=3)
    return n_slices


def _cell(value: float, missing: bool, integer: bool = False) -> str:
    if missing or np.isnan(value):
        return ""
    return str(int(value)) if integer else repr(float(value))


TABULAR_NAMES = tuple(c.name for c in CLINICAL_COLUMNS + PET_COLUMNS)
INTEGER_COLUMNS = {"histology", "tnm_stage", "dfs_event", "os_event", "sex", "smoking_status"}
LABEL_GROUPS = (("histology",), ("tnm_stage",), ("dfs_time", "dfs_event"), ("os_time", "os_event"))


def generate(
    spec: SynthConfig, root: str | Path, truth_path: str | Path, *, mapper: Mapper = serial_map
) -> dict:
    """Write a synthetic cohort to `root` (raw layout) and its ground truth to `truth_path`.

    Deterministic for a spec: the same seed gives byte-identical files. Returns the truth.
    """
    root, truth_path = Path(root), Path(truth_path)
    if truth_path.resolve().is_relative_to(root.resolve()):
        raise ValueError("the ground-truth file must lie outside DATA_ROOT")
    if (root / "clinical.csv").exists():
        raise FileExistsError(f"{root} already holds a cohort; choose an empty folder")
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    f = _patients(spec, rng)
    n = spec.patients
    counters = [0] * spec.centers
    ids = []
    for i in range(n):
        k = int(f["center"][i])
        counters[k] += 1
        ids.append(f"{CENTERS[k].name}-{counters[k]:04d}")

    value_missing = rng.random((n, len(TABULAR_NAMES))) < spec.missing_rate
    label_missing = rng.random((n, len(LABEL_GROUPS))) < spec.label_missing_rate
    rows = []
    for i, pid in enumerate(ids):
        row = {"patient_id": pid, "center": CENTERS[int(f["center"][i])].name}
        for g, group in enumerate(LABEL_GROUPS):
            for name in group:
                row[name] = _cell(f[name][i], label_missing[i, g], name in INTEGER_COLUMNS)
        for j, name in enumerate(TABULAR_NAMES):
            row[name] = _cell(f[name][i], value_missing[i, j], name in INTEGER_COLUMNS)
        rows.append(row)
    _write_csv(root / "clinical.csv", list(CLINICAL_CSV_COLUMNS), rows)

    rad_missing = rng.random((n, N_RADIOMICS)) < spec.missing_rate
    names = [f"rad_{j:03d}" for j in range(N_RADIOMICS)]
    rad_rows = []
    for i, pid in enumerate(ids):
        if not CENTERS[int(f["center"][i])].radiomics:
            continue
        rad = {"patient_id": pid}
        rad.update(
            {
                nm: _cell(round(f["radiomics"][i, j], 5), rad_missing[i, j])
                for j, nm in enumerate(names)
            }
        )
        rad_rows.append(rad)
    _write_csv(root / "radiomics.csv", ["patient_id", *names], rad_rows)

    n_slices = rng.integers(spec.min_slices, spec.max_slices + 1, n)
    seeds = rng.integers(0, 2**31 - 1, n)
    jobs = []
    for i, pid in enumerate(ids):
        center = CENTERS[int(f["center"][i])]
        size = max(32, int(round(spec.image_size * center.size_scale / 8)) * 8)
        factors = {k: float(f[k][i]) for k in FACTOR_KEYS}
        jobs.append(
            (
                str(root),
                pid,
                factors,
                center,
                int(n_slices[i]),
                size,
                int(seeds[i]),
                bool(f["annotated"][i]),
            )
        )
    mapper(_write_images, jobs)

    truth = _truth(spec, f, ids, label_missing)
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    truth_path.write_text(json.dumps(truth, indent=1))
    return truth


FACTOR_KEYS = ("size", "density", "texture", "margin", "central", "upper", "side", "radius_mm")


def _truth(spec: SynthConfig, f: dict, ids: list[str], label_missing: np.ndarray) -> dict:
    endpoints = {}
    for g, endpoint in ((2, "dfs"), (3, "os")):
        known = ~label_missing[:, g]
        endpoints[endpoint] = {
            "oracle_cindex": harrell_c(
                f[f"eta_{endpoint}"][known],
                f[f"{endpoint}_time"][known],
                f[f"{endpoint}_event"][known],
            ),
            "event_rate": float(f[f"{endpoint}_event"][known].mean()),
            "weibull_rate_per_month": WEIBULL[endpoint][0],
            "weibull_shape": WEIBULL[endpoint][1],
        }
    patients = {}
    for i, pid in enumerate(ids):
        patients[pid] = {
            "eta_dfs": float(f["eta_dfs"][i]),
            "eta_os": float(f["eta_os"][i]),
            "lusc_logit": float(f["lusc_logit"][i]),
            "stage_latent": float(f["stage_latent"][i]),
            **{k: float(f[k][i]) for k in FACTOR_KEYS},
        }
    return {
        "spec": to_dict(spec),
        "centers": [c.name for c in CENTERS[: spec.centers]],
        "endpoints": endpoints,
        "patients": patients,
    }


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    lines = [",".join(columns)]
    lines.extend(",".join(row[c] for c in columns) for row in rows)
    path.write_text("\n".join(lines) + "\n")


def oracle_cindex(truth: dict, patient_ids: Sequence[str], endpoint: str, labels: dict) -> float:
    """Oracle C-index of the true linear predictor on a subset (e.g. a validation split).

    `labels` maps patient_id -> (time, event) as the model sees them; patients without a
    label are skipped, as the model's own metric skips them.
    """
    keep = [p for p in patient_ids if labels.get(p) is not None]
    risk = np.array([truth["patients"][p][f"eta_{endpoint}"] for p in keep])
    time = np.array([labels[p][0] for p in keep])
    event = np.array([labels[p][1] for p in keep])
    return harrell_c(risk, time, event)


def oracle_metrics(truth: dict, records: Sequence) -> dict[str, float]:
    """C-index of the true linear predictors on these patients (PatientRecords), with the
    same label gaps as the data: the ceiling a survival model can reach on them.

    No histology "oracle": PET values are drawn after the histology label (SUV depends on
    it), so the true logit is not the best possible score and would understate the ceiling.
    """
    out = {}
    for endpoint in ENDPOINTS:
        labels = {
            r.patient_id: (r.labels[f"{endpoint}_time"], r.labels[f"{endpoint}_event"])
            for r in records
            if r.labels[f"{endpoint}_time"] is not None
        }
        out[f"cindex_{endpoint}"] = oracle_cindex(truth, list(labels), endpoint, labels)
    return out
