"""Synthetic multi-center NSCLC cohorts in the raw export layout, with a known ground truth.

A real learning problem rather than noise: each style (classic.py, findings.py) draws
latent tumour factors that drive histology, stage and survival through clinical, PET and
imaging findings, some of them visible only in the images. This module writes any style's
cohort the same way: clinical.csv and radiomics.csv with a few empty cells and label gaps,
PNG slices per patient (some without a lesion/ folder, as in real exports), and the ground
truth (linear predictors, factors, oracle C-index per endpoint) in a JSON file outside
DATA_ROOT so that benchmarks can report "fraction of oracle".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
from mmdls_dist.data.synth import classic, findings
from mmdls_dist.data.synth.common import Style
from mmdls_dist.metrics.survival import harrell_c

STYLES: dict[str, Style] = {s.name: s for s in (classic.STYLE, findings.STYLE)}


def _write_images(args: tuple) -> int:
    root, style, pid, factors, center, n_slices, size, seed, annotated = args
    ct, lung, lesion = STYLES[style].render(factors, center, n_slices, size, seed)
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
    style = STYLES[spec.style]
    rng = np.random.default_rng(spec.seed)
    n = spec.patients
    centers = np.arange(n) % spec.centers
    rng.shuffle(centers)
    f = style.patients(spec, rng, centers)
    f["center"] = centers
    counters = [0] * spec.centers
    ids = []
    for i in range(n):
        k = int(f["center"][i])
        counters[k] += 1
        ids.append(f"{style.centers[k].name}-{counters[k]:04d}")

    value_missing = rng.random((n, len(TABULAR_NAMES))) < spec.missing_rate
    label_missing = rng.random((n, len(LABEL_GROUPS))) < spec.label_missing_rate
    rows = []
    for i, pid in enumerate(ids):
        row = {"patient_id": pid, "center": style.centers[int(f["center"][i])].name}
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
        if not style.centers[int(f["center"][i])].radiomics:
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
        center = style.centers[int(f["center"][i])]
        size = max(32, int(round(spec.image_size * center.size_scale / 8)) * 8)
        factors = {k: float(f[k][i]) for k in style.factor_keys}
        jobs.append(
            (
                str(root),
                style.name,
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

    truth = _truth(spec, style, f, ids, label_missing)
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    truth_path.write_text(json.dumps(truth, indent=1))
    return truth


def _truth(
    spec: SynthConfig, style: Style, f: dict, ids: list[str], label_missing: np.ndarray
) -> dict:
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
            **style.baseline[endpoint],
        }
    patients = {}
    for i, pid in enumerate(ids):
        patients[pid] = {
            "eta_dfs": float(f["eta_dfs"][i]),
            "eta_os": float(f["eta_os"][i]),
            "lusc_logit": float(f["lusc_logit"][i]),
            "stage_latent": float(f["stage_latent"][i]),
            **{k: float(f[k][i]) for k in style.factor_keys},
        }
    return {
        "spec": to_dict(spec),
        "style": style.name,
        "centers": [c.name for c in style.centers[: spec.centers]],
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
