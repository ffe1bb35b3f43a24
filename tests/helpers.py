"""Builders for small hand-made raw cohorts (docs/RAW_LAYOUT.md) used across the tests."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from mmdls_dist.config import PrepConfig, SynthConfig, load_config
from mmdls_dist.data.schema import CLINICAL_CSV_COLUMNS, N_RADIOMICS

# The smallest MM-DLS that still has every part (model and loss tests).
TINY_MODEL = dict(
    widths=(4, 8, 8, 16),
    decoder_width=8,
    cross_attention_heads=2,
    embed_dim=16,
    fusion_heads=2,
    tabular_hidden=16,
    lesion_reader=16,
    reader_width=4,
)

# The shared synthetic cohort of the session fixtures (tests/conftest.py).
TINY = SynthConfig(patients=40, seed=7, centers=3, image_size=40, min_slices=4, max_slices=9)
# ... and how it is sharded: HOSP-C external, small shards so splits span several.
TINY_PREP = PrepConfig(
    image_size=32,
    max_patients_per_shard=5,
    seed=3,
    val_fraction=0.2,
    test_fraction=0.1,
    external_centers=("HOSP-C",),
)

GOOD_ROW = {
    "center": "C1",
    "histology": "1",
    "tnm_stage": "2",
    "dfs_time": "12.5",
    "dfs_event": "1",
    "os_time": "30",
    "os_event": "0",
    "age": "61",
    "sex": "1",
    "smoking_status": "2",
    "smoking_years": "35",
    "years_since_cessation": "0",
    "tumor_diameter_mm": "42.5",
    "suv_max": "9.1",
    "suv_mean": "5.2",
    "suv_peak": "7.7",
    "tlg": "120.5",
    "mtv": "23.2",
}


def row(pid: str, **overrides: str) -> dict[str, str]:
    out = {"patient_id": pid, **GOOD_ROW}
    out.update(overrides)
    return out


def write_clinical(root: Path, rows: list[dict[str, str]], columns=CLINICAL_CSV_COLUMNS) -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = [",".join(columns)] + [",".join(r.get(c, "") for c in columns) for r in rows]
    (root / "clinical.csv").write_text("\n".join(lines) + "\n")


def write_radiomics(root: Path, table: dict[str, list[str]]) -> None:
    names = [f"f{j}" for j in range(N_RADIOMICS)]
    lines = [",".join(["patient_id", *names])]
    lines += [",".join([pid, *cells]) for pid, cells in table.items()]
    (root / "radiomics.csv").write_text("\n".join(lines) + "\n")


def volume(seed: int, n_slices: int = 3, size: int = 24):
    """A reproducible (ct, lung, lesion) triple of uint8 [S,H,W] arrays, masks 0/255."""
    rng = np.random.default_rng(seed)
    ct = rng.integers(0, 256, (n_slices, size, size), dtype=np.uint8)
    lung = np.where(rng.random((n_slices, size, size)) < 0.4, 255, 0).astype(np.uint8)
    lesion = np.zeros_like(lung)
    lesion[:, size // 3 : size // 2, size // 3 : size // 2] = 255
    return ct, lung, lesion


def write_images(root: Path, pid: str, ct, lung, lesion=None, names=None) -> list[str]:
    names = names or [f"s{i:02d}.png" for i in range(len(ct))]
    kinds = {"ct": ct, "lung": lung}
    if lesion is not None:
        kinds["lesion"] = lesion
    for kind, stack in kinds.items():
        folder = root / "images" / pid / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in zip(names, stack, strict=True):
            Image.fromarray(array).save(folder / name)
    return names


def good_patient(
    root: Path, pid: str, seed: int, n_slices: int = 3, size: int = 24, annotated: bool = True
) -> tuple:
    ct, lung, lesion = volume(seed, n_slices, size)
    write_images(root, pid, ct, lung, lesion if annotated else None)
    return ct, lung, lesion


# The smallest training run (integration tests on the debug preset, local Ray).
TINY_TRAIN = [
    "data.num_workers=0",
    "data.max_slices=5",
    "data.batch_size=3",
    "model.widths=[4,8,8,16]",
    "model.decoder_width=8",
    "model.cross_attention_heads=2",
    "model.embed_dim=16",
    "model.fusion_heads=2",
    "model.tabular_hidden=16",
    "model.lesion_reader=16",
    "model.reader_width=4",
    "run.checkpoints_to_keep=0",
    "run.max_failures=2",
    "run.overlays=2",
]


def train_config(shards: Path, storage: Path, name: str, *more: str):
    return load_config(
        "debug",
        [
            *TINY_TRAIN,
            f"data.shards={shards}",
            f"run.storage_path={storage}",
            f"run.name={name}",
            *more,
        ],
    )


def crafted_shards(shard_dir, tmp_path, pid: str):
    """A copy of the shards whose first train sample's meta.json names `pid`, with the
    manifest's size and sha256 updated to match: a crafted shard, not a damaged one."""
    copy = tmp_path / "crafted"
    shutil.copytree(shard_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["split"] == "train")
    path = copy / entry["name"]
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(path, "w") as dst:
        for member, data in members:
            if member.name == f"{entry['keys'][0]}.meta.json":
                data = json.dumps(dict(json.loads(data), patient_id=pid)).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    entry["bytes"] = path.stat().st_size
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy, manifest, entry
