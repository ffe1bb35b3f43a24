"""Probe: where a style's image-only survival signal lies, and how much of it the lesion
descriptors (model/descriptors.py) reach when measured on the ground-truth contours. No
network is trained: lifelines Cox models on the internal centers, Harrell's C-index on the
held-out center (bench_external's), for several covariate sets.

    python docs/experiments/probe_findings.py --style findings --patients 1500 --size 96

Covariate sets: the clinical + PET table (bench_external's (a)); the table plus the
descriptors; the table plus the descriptors and a peritumoral ring measurement (mean, dense
fraction and spread of the lung pixels 1-2 and 2-3.2 lesion radii from the centroid of the
largest lesion slice, relative to the parenchyma: an option measured for issue #14); the
table plus the generator's true image-only factors, together and one at a time (the
ceiling of any image reader). Also prints which descriptors correlate with which factor.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch
from lifelines import CoxPHFitter

from mmdls_dist.config import SynthConfig
from mmdls_dist.data.synth.cohort import STYLES
from mmdls_dist.metrics.survival import harrell_c
from mmdls_dist.model.descriptors import NAMES, measure

EXTERNAL = {"classic": 1, "findings": 2}  # bench_external's held-out center, by index
IMAGE_ONLY = {  # the generator's factors that only the images show
    "classic": ("margin", "texture"),
    "findings": ("spicules", "satellites", "cavitation", "pleural"),
}
RINGS = ((1.0, 2.0), (2.0, 3.2))  # in equivalent lesion radii from the centroid


def ring_features(ct: np.ndarray, lung: np.ndarray, lesion: np.ndarray) -> list[float]:
    """[S,H,W] CT in [0,1], lung and lesion masks -> per ring: mean, dense fraction, std of
    the lung pixels outside the lesion, relative to parenchyma and lesion density."""
    k = int(lesion.sum((1, 2)).argmax())
    m, c, lg = lesion[k], ct[k], lung[k] & ~lesion[k]
    area = m.sum()
    if area < 5:
        return [0.0] * (3 * len(RINGS))
    yy, xx = np.mgrid[0 : m.shape[0], 0 : m.shape[1]]
    cy, cx = (yy * m).sum() / area, (xx * m).sum() / area
    r = np.hypot(yy - cy, xx - cx) / np.sqrt(area / np.pi)
    far = lg & (r > 3.5)
    parenchyma = np.median(c[far] if far.any() else c[lg])
    span = max(c[m].mean() - parenchyma, 0.02)
    out = []
    for lo, hi in RINGS:
        v = c[lg & (r >= lo) & (r < hi)]
        if v.size < 3:
            out += [0.0, 0.0, 0.0]
            continue
        out += [(v.mean() - parenchyma) / span, (v > parenchyma + span / 2).mean(), v.std() / span]
    return out


def draws(style: str, n: int, size: int):
    """cohort.generate's draws for 3 centers, seed 0 -> (the style, patient factors, center
    per patient, slice counts, render seeds)."""
    spec = SynthConfig(style=style, patients=n, centers=3, image_size=size, seed=0)
    st = STYLES[style]
    rng = np.random.default_rng(spec.seed)
    centers = np.arange(n) % spec.centers
    rng.shuffle(centers)
    f = st.patients(spec, rng, centers)
    n_slices = rng.integers(8, 17, n)
    seeds = rng.integers(0, 2**31 - 1, n)
    return st, f, centers, n_slices, seeds


def cohort(style: str, n: int, size: int):
    """The style's patient factors and, per patient, the descriptors and ring features
    measured on its ground-truth contour (the same draws as cohort.generate, seed 0)."""
    st, f, centers, n_slices, seeds = draws(style, n, size)
    desc, rings = [], []
    for i in range(n):
        center = st.centers[centers[i]]
        side = max(32, int(round(size * center.size_scale / 8)) * 8)
        factors = {k: float(f[k][i]) for k in st.factor_keys}
        ct, lung, lesion = st.render(factors, center, int(n_slices[i]), side, int(seeds[i]))
        ct01 = ct.astype(np.float32) / 255
        valid = torch.ones(1, ct.shape[0], dtype=torch.bool)
        lesion_t = torch.from_numpy(lesion > 0).float()[None]
        desc.append(measure(torch.from_numpy(ct01)[None], lesion_t, valid)[0].numpy())
        rings.append(ring_features(ct01, lung > 0, lesion > 0))
    return f, centers, np.array(desc), np.array(rings)


def table(f: dict) -> pd.DataFrame:
    cols = {c: f[c] for c in ("age", "sex", "smoking_years", "years_since_cessation")}
    x = pd.DataFrame({**cols, "tumor_diameter_mm": f["tumor_diameter_mm"]})
    for code in (1, 2):
        x[f"smoking_{code}"] = (f["smoking_status"] == code).astype(float)
    for c in ("suv_max", "suv_mean", "suv_peak", "tlg", "mtv"):
        x[f"log_{c}"] = np.log1p(f[c])
    return x


def external_c(x: pd.DataFrame, f: dict, internal: np.ndarray, endpoint: str) -> float:
    z = (x - x[internal].mean()) / x[internal].std().replace(0, 1)
    time, event = f[f"{endpoint}_time"], f[f"{endpoint}_event"]
    fit = CoxPHFitter(penalizer=0.01).fit(
        z[internal].assign(time=time[internal], event=event[internal]), "time", "event"
    )
    risk = fit.predict_log_partial_hazard(z[~internal]).to_numpy()
    return harrell_c(risk, time[~internal], event[~internal])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--style", choices=sorted(STYLES), default="findings")
    parser.add_argument("--patients", type=int, default=1500)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    f, centers, desc, rings = cohort(args.style, args.patients, args.size)
    internal = centers != EXTERNAL[args.style]
    x = table(f)
    d = pd.DataFrame(desc[:, 1:], columns=NAMES[1:])  # "present": always 1 on the truth
    ring = pd.DataFrame(rings, columns=[f"ring{j}_{k}" for j in (1, 2) for k in "mfs"])
    truth = pd.DataFrame({f"true_{k}": f[k] for k in IMAGE_ONLY[args.style]})
    sets = {
        "tables": x,
        "tables + descriptors": pd.concat([x, d], axis=1),
        "tables + descriptors + rings": pd.concat([x, d, ring], axis=1),
        "tables + true image-only factors": pd.concat([x, truth], axis=1),
        **{f"tables + {k}": pd.concat([x, truth[[k]]], axis=1) for k in truth},
    }
    print(f"{args.style}, {args.patients} patients at {args.size} px, external C-index")
    for endpoint in ("dfs", "os"):
        ext = ~internal
        oracle = harrell_c(
            f[f"eta_{endpoint}"][ext], f[f"{endpoint}_time"][ext], f[f"{endpoint}_event"][ext]
        )
        print(f"{endpoint.upper()}: oracle {oracle:.3f}")
        for name, covariates in sets.items():
            c = external_c(covariates, f, internal, endpoint)
            print(f"  {name:34s} {c:.3f} ({c / oracle:.2f})")
    for k in truth:
        for name in (*d, *ring):
            r = np.corrcoef(truth[k], pd.concat([d, ring], axis=1)[name])[0, 1]
            if abs(r) > 0.2:
                print(f"corr {k} ~ {name}: {r:.2f}")


if __name__ == "__main__":
    main()
