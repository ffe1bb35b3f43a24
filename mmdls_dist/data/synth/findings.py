"""The second synthetic style ("findings"), designed apart from the first: another chest,
another lesion shape model, and the image-only risk carried by discrete radiological
findings instead of margin and texture.

Anatomy: a boxy body with a fat layer, spine, a heart that grows towards the base, two
unequal lungs (the right one larger) with vessel cross-sections, a liver dome under the
right lung in the lowest slices. The lesion is lobulated: a union of spheres.

| finding           | drawn from             | seen in images            | in tables          |
|-------------------|------------------------|---------------------------|--------------------|
| size              | latent                 | lesion volume             | diameter, MTV, TLG |
| density           | latent                 | solid core vs halo        | SUV, radiomics     |
| lobulation        | latent                 | lobes of the lesion       | radiomics          |
| spicule count     | hidden aggressiveness  | thin rays, not contoured  | no                 |
| satellite nodules | aggressiveness         | small nodules, not in it  | no                 |
| cavitation        | LUSC, size             | air core in the lesion    | no                 |
| pleural contact   | peripheral position    | flat base on the wall     | no                 |

Survival follows a Cox model with a Gompertz baseline, h0(t) = a exp(b t), drawn by
inverse transform: T = log(1 - b log U / (a exp(eta))) / b. Centers differ in the
intensity curve (gamma, gain, offset), reconstruction blur, correlated noise, image size,
case mix and radiomics availability; HOSP-D has the strongest intensity shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmdls_dist.config import SynthConfig
from mmdls_dist.data.schema import N_RADIOMICS
from mmdls_dist.data.synth.common import Style, censored, smooth_noise, z


@dataclass(frozen=True)
class ScannerSpec:
    """A synthetic hospital of this style."""

    name: str
    gamma: float  # intensity curve: 255 * (x / 255) ** gamma before gain and offset
    gain: float
    offset: float  # 0..255 units
    blur: float  # reconstruction blur, sigma in pixels
    noise: float  # white noise std (0..255 units)
    correlated_noise: float  # std of blob-like noise (0..255 units)
    size_scale: float
    stage_shift: float
    lusc_shift: float
    radiomics: bool
    unannotated_rate: float
    slice_pattern: str


CENTERS: tuple[ScannerSpec, ...] = (
    ScannerSpec("HOSP-A", 1.00, 1.00, 0.0, 0.0, 5.0, 2.0, 1.00, 0.0, 0.0, True, 0.08, "{:04d}.png"),
    ScannerSpec(
        "HOSP-B", 0.85, 0.95, 10.0, 0.8, 3.0, 4.0, 1.33, 0.3, 0.3, True, 0.12, "s{:03d}.png"
    ),
    ScannerSpec(
        "HOSP-C", 1.20, 1.05, -12.0, 0.0, 8.0, 0.0, 0.83, -0.3, -0.2, True, 0.10, "z_{:03d}.png"
    ),
    ScannerSpec(
        "HOSP-D", 0.75, 0.90, 25.0, 1.2, 6.0, 3.0, 1.00, 0.2, 0.1, False, 0.15, "CT{:03d}.png"
    ),
)

GOMPERTZ = {"dfs": (1 / 60.0, 0.010), "os": (1 / 90.0, 0.012)}  # a per month, b per month
FOLLOW_UP_MONTHS = (18.0, 84.0)
DROPOUT_MONTHS = 120.0
INFORMATIVE_RADIOMICS = 24  # columns carrying size / density / lobulation; the rest is noise


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def patients(
    spec: SynthConfig, rng: np.random.Generator, centers: np.ndarray
) -> dict[str, np.ndarray]:
    n = spec.patients
    c = [CENTERS[i] for i in centers]
    f: dict[str, np.ndarray] = {}
    f["age"] = np.clip(rng.gamma(40, 1.6, n), 35, 92).round(0)
    f["sex"] = (rng.random(n) < 0.55).astype(float)
    status = rng.choice(3, n, p=[0.25, 0.40, 0.35])
    f["smoking_status"] = status.astype(float)
    f["smoking_years"] = np.where(status > 0, np.clip(rng.gamma(6, 5, n), 1, 65), 0).round(0)
    f["years_since_cessation"] = np.where(status == 1, rng.gamma(2, 5, n), 0).round(1)

    f["size"] = rng.normal(0, 1, n)
    f["density"] = rng.normal(0, 1, n)
    f["lobulation"] = rng.random(n)
    f["central"] = rng.beta(1.5, 2.0, n)
    f["lobe"] = rng.choice(3, n, p=[0.5, 0.15, 0.35]).astype(float)  # upper, middle, lower
    f["side"] = (rng.random(n) < 0.55).astype(float)  # 1 = right lung
    aggressive = rng.normal(0, 1, n)  # hidden: seen only through spicules and satellites

    lusc_logit = (
        -0.5
        + 0.9 * z(f["smoking_years"])
        + 0.3 * f["sex"]
        + 1.6 * (f["central"] - 0.4)
        + 0.7 * f["density"]
        + np.array([x.lusc_shift for x in c])
    )
    f["lusc_logit"] = lusc_logit
    f["histology"] = (rng.random(n) < _sigmoid(lusc_logit)).astype(float)

    f["spicules"] = np.minimum(rng.poisson(2.5 * np.exp(0.6 * aggressive)), 10).astype(float)
    satellite_drive = 0.6 * aggressive + 0.8 * rng.normal(0, 1, n)
    f["satellites"] = np.minimum(rng.poisson(0.4 * np.exp(0.8 * satellite_drive)), 4).astype(float)
    f["cavitation"] = (
        rng.random(n) < _sigmoid(-1.6 + 1.4 * f["histology"] + 0.5 * f["size"])
    ).astype(float)
    f["pleural"] = (rng.random(n) < 0.1 + 0.45 * (1 - f["central"])).astype(float)

    radius_mm = np.clip(14 * np.exp(0.4 * f["size"]), 5, 55)
    f["radius_mm"] = radius_mm
    f["tumor_diameter_mm"] = (2 * radius_mm * rng.lognormal(0, 0.12, n)).round(1)
    suv_max = np.exp(
        1.5 + 0.3 * f["density"] + 0.35 * f["histology"] + 0.25 * f["size"] + 0.1 * aggressive
    )
    suv_max *= rng.lognormal(0, 0.25, n)
    f["suv_max"] = suv_max.round(2)
    f["suv_mean"] = (suv_max * rng.uniform(0.5, 0.7, n)).round(2)
    f["suv_peak"] = (suv_max * rng.uniform(0.65, 0.92, n)).round(2)
    mtv = 4 / 3 * np.pi * (radius_mm / 10) ** 3 * (1 - 0.3 * f["cavitation"])
    mtv = mtv * rng.lognormal(0, 0.25, n)
    f["mtv"] = mtv.round(2)
    f["tlg"] = (f["suv_mean"] * mtv).round(2)

    spicules_z, satellites_z = z(f["spicules"]), z(f["satellites"])
    stage_latent = (
        1.0 * f["size"]
        + 0.35 * spicules_z
        + 0.45 * satellites_z
        + 0.5 * f["pleural"]
        + 0.35 * z(np.log(suv_max))
        + np.array([x.stage_shift for x in c])
        + rng.normal(0, 0.6, n)
    )
    f["stage_latent"] = stage_latent
    f["tnm_stage"] = np.digitize(stage_latent, np.quantile(stage_latent, [0.4, 0.72])).astype(float)

    f["eta_dfs"] = (
        0.5 * f["tnm_stage"]
        + 0.45 * spicules_z
        + 0.4 * satellites_z
        + 0.55 * f["cavitation"]
        + 0.45 * f["pleural"]
        + 0.2 * f["size"]
        + 0.25 * z(np.log(suv_max))
        + 0.1 * z(f["age"])
    )
    f["eta_os"] = (
        0.45 * f["tnm_stage"]
        + 0.3 * spicules_z
        + 0.4 * satellites_z
        + 0.6 * f["cavitation"]
        + 0.3 * f["pleural"]
        + 0.25 * f["size"]
        + 0.25 * f["histology"]
        + 0.4 * z(f["age"])
        + 0.25 * (f["smoking_status"] == 2)
    )
    for endpoint, (a, b) in GOMPERTZ.items():
        f[f"eta_{endpoint}"] -= f[f"eta_{endpoint}"].mean()
        u = rng.random(n)
        t = np.log1p(-b * np.log(u) / (a * np.exp(f[f"eta_{endpoint}"]))) / b
        f[f"{endpoint}_time"], f[f"{endpoint}_event"] = censored(
            t, rng, FOLLOW_UP_MONTHS, DROPOUT_MONTHS
        )

    # Radiomics: a block of informative columns sees size, density and lobulation (never
    # the findings above), every column a strong per-center batch effect, the rest noise.
    signal = np.stack([f["size"], f["density"], z(f["lobulation"])], axis=1)
    w = np.zeros((N_RADIOMICS, 3))
    w[:INFORMATIVE_RADIOMICS] = rng.normal(0, 1, (INFORMATIVE_RADIOMICS, 3))
    batch_effect = rng.normal(0, 0.5, (spec.centers, N_RADIOMICS))
    scale = rng.lognormal(0, 0.5, N_RADIOMICS)
    f["radiomics"] = scale * (
        signal @ w.T * 0.6 + batch_effect[centers] + rng.normal(0, 1.0, (n, N_RADIOMICS))
    )
    f["annotated"] = rng.random(n) >= np.array([x.unannotated_rate for x in c])
    return f


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """[S,H,W] blurred in-plane with a Gaussian of `sigma` pixels (separable, edge-padded)."""
    if sigma <= 0:
        return img
    radius = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode="edge")
        size = img.shape[axis]
        img = sum(w * np.take(padded, np.arange(j, j + size), axis=axis) for j, w in enumerate(k))
    return img


def render_patient(
    factors: dict[str, float], center: ScannerSpec, n_slices: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One patient's CT, lung mask and lesion mask: uint8 [S, H, W] each (masks 0/255)."""
    rng = np.random.default_rng(seed)
    z_ = np.linspace(0, 1, n_slices, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, size, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, size, dtype=np.float32)[None, None, :]

    body = np.abs(x / 0.9) ** 4 + np.abs(y / 0.72) ** 4 < 1
    inner = np.abs(x / 0.84) ** 4 + np.abs(y / 0.66) ** 4 < 1  # inside the fat layer
    spine = (x / 0.09) ** 2 + ((y - 0.55) / 0.09) ** 2 < 1
    extent = np.sqrt(np.clip(1 - ((z_ - 0.55) / 0.62) ** 2, 0.04, 1))  # apex and base
    heart_r = 0.12 + 0.16 * np.clip((z_ - 0.25) / 0.6, 0, 1)
    heart = ((x - 0.07) / (heart_r * 1.1)) ** 2 + ((y - 0.02) / heart_r) ** 2 < 1
    liver = ((x + 0.36) / 0.32) ** 2 + ((y - 0.05) / 0.4) ** 2 < np.clip(
        (z_ - 0.78) / 0.22, 0, 1
    ) ** 0.5
    # Image left = patient right (radiological convention): the right lung is the larger.
    right = np.abs((x + 0.43) / (0.31 * extent)) ** 3 + np.abs((y + 0.02) / (0.52 * extent)) ** 3
    left = np.abs((x - 0.44) / (0.27 * extent)) ** 3 + np.abs((y + 0.02) / (0.49 * extent)) ** 3
    lungs = ((right < 1) | (left < 1)) & ~heart & ~liver & inner

    side = -1.0 if factors["side"] > 0.5 else 1.0  # patient right = image left
    lung_cx, half_w = (-0.43, 0.31) if side < 0 else (0.44, 0.27)
    r = float(np.clip(factors["radius_mm"] / 170.0, 0.03, 0.24))
    pleural = factors["pleural"] > 0.5
    # Lateral offset from the lung's centre: touching the outer wall, or inside.
    lateral = (half_w - 0.9 * r) if pleural else (half_w - r) * (0.9 - factors["central"])
    cx = lung_cx + side * lateral
    cy = rng.uniform(-0.25, 0.2)
    cz = (0.25, 0.5, 0.72)[int(factors["lobe"])] + rng.uniform(-0.06, 0.06)
    rz = max(1.8 / n_slices, r * 1.2)

    def ball(bx: float, by: float, bz: float, br: float, brz: float) -> np.ndarray:
        return ((x - bx) / br) ** 2 + ((y - by) / br) ** 2 + ((z_ - bz) / brz) ** 2

    lesion = ball(cx, cy, cz, r, rz) < 1
    for _ in range(1 + int(round(3 * factors["lobulation"]))):
        angle = rng.uniform(0, 2 * np.pi)
        br = r * rng.uniform(0.45, 0.75)
        bx, by = cx + 0.7 * r * np.cos(angle), cy + 0.7 * r * np.sin(angle)
        lesion |= ball(bx, by, cz + rng.uniform(-0.3, 0.3) * rz, br, rz * 0.8) < 1
    if pleural:  # a tumour on the chest wall stays on it: nothing beyond the lung's wall
        wall = right if side < 0 else left
        lesion &= wall < 1  # a broad, flat base on the wall
    lesion &= inner

    img = np.where(body, 150.0, 6.0).astype(np.float32)
    img = np.where(body & ~inner, 105.0, img)  # subcutaneous fat
    img = np.where(heart, 140.0, img)
    img = np.where(liver & inner, 160.0, img)
    img = np.where(spine, 235.0, img)
    parenchyma = 22.0 + 5.0 * smooth_noise(rng, (n_slices, size, size), k=8)
    vessels = np.zeros((1, size, size), dtype=np.float32)  # tubes along z
    for _ in range(24):
        vx, vy = rng.uniform(-0.8, 0.8), rng.uniform(-0.5, 0.45)
        vr = max(rng.uniform(0.008, 0.016), 1.0 / size)
        vessels += 45.0 * np.exp(-((x - vx) ** 2 + (y - vy) ** 2) / vr**2)
    img = np.where(lungs, parenchyma + vessels, img)

    solid = 95 + 45 * np.tanh(factors["density"])  # part-solid ~60 .. solid ~135
    core = ball(cx, cy, cz, r, rz)
    lesion_img = solid - 25.0 * np.clip(core - 0.55, 0, 1) * (1 - np.tanh(factors["density"]))
    lesion_img = lesion_img + 6.0 * smooth_noise(rng, (n_slices, size, size), k=3)
    if factors["cavitation"] > 0.5:
        cav_r = r * rng.uniform(0.35, 0.55)
        cavity = ball(cx, cy, cz, cav_r, rz * 0.6) < 1
        lesion_img = np.where(cavity, 14.0, lesion_img)
    img = np.where(lesion, lesion_img, img)

    # Findings outside the contour: spicules (thin rays) and satellite nodules.
    near = np.clip(1 - np.abs(z_ - cz) / (0.7 * rz), 0, 1)
    for _ in range(int(factors["spicules"])):
        angle = rng.uniform(0, 2 * np.pi)
        ux, uy = np.cos(angle), np.sin(angle)
        length = r * rng.uniform(0.7, 1.3)
        along = (x - cx) * ux + (y - cy) * uy
        across = np.abs(-(x - cx) * uy + (y - cy) * ux)
        ray = (along > 0.8 * r) & (along < r + length)
        fade = np.sqrt(np.clip(1 - (along - r) / length, 0, 1))
        width = max(0.02, 3.0 / size)  # about 1.5 pixels
        img = np.where(
            lungs & ray & ~lesion,
            np.maximum(img, 22 + (solid - 22) * fade * np.exp(-((across / width) ** 2)) * near),
            img,
        )
    for _ in range(int(factors["satellites"])):
        angle = rng.uniform(0, 2 * np.pi)
        dist = r * rng.uniform(1.7, 2.6)
        sr = max(rng.uniform(0.03, 0.045), 1.6 / size)
        sx, sy = cx + dist * np.cos(angle), cy + dist * np.sin(angle)
        sz = cz + rng.uniform(-0.5, 0.5) * rz
        nodule = ball(sx, sy, sz, sr, max(1.2 / n_slices, sr * 1.2)) < 1
        img = np.where(lungs & nodule & ~lesion, solid * 0.9, img)

    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** center.gamma
    img = center.gain * img + center.offset
    img = _blur(img, center.blur * size / 96.0)
    img = img + rng.normal(0, center.noise, img.shape)
    if center.correlated_noise:
        img = img + center.correlated_noise * smooth_noise(rng, img.shape, k=2)
    ct = np.clip(img, 0, 255).astype(np.uint8)
    lung_mask = np.where(lungs | lesion, 255, 0).astype(np.uint8)
    lesion_mask = np.where(lesion, 255, 0).astype(np.uint8)
    return ct, lung_mask, lesion_mask


FACTOR_KEYS = (
    "size",
    "density",
    "lobulation",
    "central",
    "lobe",
    "side",
    "radius_mm",
    "spicules",
    "satellites",
    "cavitation",
    "pleural",
)

STYLE = Style(
    name="findings",
    summary=(
        "boxy chest with heart, spine and vessels; lobulated lesions; image-only risk in "
        "spicule count, satellite nodules, cavitation and pleural contact"
    ),
    centers=CENTERS,
    factor_keys=FACTOR_KEYS,
    patients=patients,
    render=render_patient,
    baseline={
        k: {"gompertz_a_per_month": v[0], "gompertz_b_per_month": v[1]} for k, v in GOMPERTZ.items()
    },
)
