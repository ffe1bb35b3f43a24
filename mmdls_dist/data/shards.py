"""Validated records -> WebDataset tar shards + manifest.json, and shard verification.

One sample = one patient, keyed by patient_id (the raw contract forbids dots in ids, and
WebDataset cuts keys at the first dot). Per patient the tar holds:

  <pid>.ct.npy      uint8 [S, H, W]          CT, resized to the manifest's image_size
  <pid>.masks.npy   uint8 [2, S, ceil(H*W/8)] lung (0) and lesion (1) masks, bit-packed per
                                              slice so the loader can pick slices unpacked
  <pid>.meta.json   labels, tabular values (null = missing), center, split, sizes

Images stay uint8 and uncompressed: the loader then does no decoding at all (a zero-copy
view of the tar bytes), which is what makes it an order of magnitude faster than PNGs.
The manifest is written last; a folder without one is an unfinished sharding run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from mmdls_dist import __version__, storage
from mmdls_dist.config import PrepConfig, to_dict
from mmdls_dist.data.defects import IngestReport, Mapper, serial_map
from mmdls_dist.data.images import open_slice
from mmdls_dist.data.schema import (
    CLINICAL_COLUMNS,
    LOG1P_FEATURES,
    N_RADIOMICS,
    PET_COLUMNS,
    SCHEMA_VERSION,
    SPLITS,
    ZSCORE_CLINICAL,
    PatientRecord,
    before_zscore,
)
from mmdls_dist.data.splits import assign_splits, fold_splits

MANIFEST = "manifest.json"
TAR_BLOCK = 512


class ShardError(RuntimeError):
    """A shard is missing, truncated or corrupted, or disagrees with the manifest."""


def _tar_member_bytes(size: int) -> int:
    return TAR_BLOCK + math.ceil(size / TAR_BLOCK) * TAR_BLOCK


def estimated_sample_bytes(n_slices: int, image_size: int) -> int:
    """Bytes one patient occupies in a tar (npy headers and JSON bounded generously)."""
    pixels = image_size * image_size
    ct = 128 + n_slices * pixels
    masks = 128 + 2 * n_slices * math.ceil(pixels / 8)
    meta = 8192
    return sum(_tar_member_bytes(b) for b in (ct, masks, meta))


def _square(image: Image.Image) -> Image.Image:
    """Center-pad to a square with 0 (air / background) so resizing keeps the aspect ratio."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), 0)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def load_patient_arrays(
    root: str, record: PatientRecord, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read one patient's PNGs -> CT uint8 [S,H,W], lung and lesion bool [S,H,W] at image_size."""
    base = Path(root) / "images" / record.patient_id
    n = len(record.slice_files)
    size = (image_size, image_size)
    ct = np.empty((n, image_size, image_size), dtype=np.uint8)
    lung = np.zeros((n, image_size, image_size), dtype=bool)
    lesion = np.zeros((n, image_size, image_size), dtype=bool)
    for i, name in enumerate(record.slice_files):
        ct[i] = np.asarray(_square(open_slice(base / "ct" / name)).resize(size, Image.BILINEAR))
        kinds = (("lung", lung),) if record.lung_annotated else ()
        kinds += (("lesion", lesion),) if record.lesion_annotated else ()
        for kind, out in kinds:
            mask = _square(open_slice(base / kind / name).convert("L"))
            out[i] = np.asarray(mask.resize(size, Image.NEAREST)) > 127
    return ct, lung, lesion


def pack_masks(lung: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """bool [S,H,W] x 2 -> uint8 [2, S, ceil(H*W/8)], each slice packed on its own row."""
    s = lung.shape[0]
    stacked = np.stack([lung.reshape(s, -1), lesion.reshape(s, -1)])
    return np.packbits(stacked, axis=-1)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _json_float(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def patient_meta(record: PatientRecord, split: str, image_size: int) -> dict:
    """The JSON part of a sample: everything except pixels."""
    return {
        "schema_version": SCHEMA_VERSION,
        "patient_id": record.patient_id,
        "center": record.center,
        "split": split,
        "n_slices": len(record.slice_files),
        "image_size": image_size,
        "source_size": list(record.image_size) if record.image_size else None,
        "lesion_annotated": record.lesion_annotated,
        "lung_annotated": record.lung_annotated,
        "labels": {k: _json_float(v) for k, v in record.labels.items()},
        "clinical": {k: _json_float(v) for k, v in record.clinical.items()},
        "pet": {k: _json_float(v) for k, v in record.pet.items()},
        "radiomics": [_json_float(v) for v in record.radiomics.tolist()],
    }


def encode_patient(root: str, record: PatientRecord, split: str, image_size: int) -> dict:
    """One patient -> a WebDataset sample dict (bytes values)."""
    ct, lung, lesion = load_patient_arrays(root, record, image_size)
    meta = patient_meta(record, split, image_size)
    return {
        "__key__": record.patient_id,
        "ct.npy": npy_bytes(ct),
        "masks.npy": npy_bytes(pack_masks(lung, lesion)),
        "meta.json": json.dumps(meta, sort_keys=True).encode(),
    }


@dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    records: tuple[PatientRecord, ...]


def plan_shards(by_split: dict[str, list[PatientRecord]], prep: PrepConfig) -> list[ShardPlan]:
    """Pack each split's patients (in the given order) into shards under both limits."""
    plans = []
    for split, records in by_split.items():
        current: list[PatientRecord] = []
        size = 0
        for record in records:
            need = estimated_sample_bytes(len(record.slice_files), prep.image_size)
            full = len(current) >= prep.max_patients_per_shard
            if current and (full or size + need > prep.max_shard_mb * 2**20):
                plans.append(_plan(split, sum(p.split == split for p in plans), current))
                current, size = [], 0
            current.append(record)
            size += need
        if current:
            plans.append(_plan(split, sum(p.split == split for p in plans), current))
    return plans


def _plan(split: str, index: int, records: list[PatientRecord]) -> ShardPlan:
    return ShardPlan(f"{split}-{index:05d}.tar", split, tuple(records))


def write_shard(args: tuple[str, str, ShardPlan, int]) -> dict:
    """Write one shard; returns its manifest entry. Byte-identical for the same input."""
    root, out_dir, plan, image_size = args
    path = Path(out_dir) / plan.name
    tmp = path.with_suffix(".tar.partial")
    with open(tmp, "wb") as stream:
        # mtime fixed and owner names constant: shards are reproducible byte for byte,
        # so a parallel run and a serial run produce the same sha256.
        writer = wds.TarWriter(stream, user="mmdls", group="mmdls", mtime=0.0, encoder=False)
        for record in plan.records:
            writer.write(encode_patient(root, record, plan.split, image_size))
        writer.close()
    tmp.replace(path)
    return {
        "name": plan.name,
        "split": plan.split,
        "sha256": sha256_file(str(path)),
        "bytes": path.stat().st_size,
        "n_patients": len(plan.records),
        "keys": [r.patient_id for r in plan.records],
    }


def sha256_file(url: str, chunk: int = 8 * 2**20) -> str:
    digest = hashlib.sha256()
    with storage.open_file(url) as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _stats(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size < 2:
        return 0.0, 1.0
    std = float(values.std())
    return float(values.mean()), std if std > 1e-8 else 1.0


def normalization_stats(train: Sequence[PatientRecord]) -> dict:
    """Mean/std per continuous feature, on the training split only (after log1p where used)."""

    def column(group: str, name: str) -> np.ndarray:
        values = np.array([getattr(r, group)[name] for r in train], dtype=float)
        return before_zscore(name, values)

    clinical = {}
    for name in ZSCORE_CLINICAL:
        mean, std = _stats(column("clinical", name))
        clinical[name] = {"mean": mean, "std": std}
    pet = {}
    for c in PET_COLUMNS:
        mean, std = _stats(column("pet", c.name))
        pet[c.name] = {"mean": mean, "std": std}
    rad = np.array([r.radiomics for r in train]).reshape(-1, N_RADIOMICS)
    rad_stats = [_stats(rad[:, j]) for j in range(N_RADIOMICS)]
    return {
        "clinical": clinical,
        "pet": pet,
        "radiomics": {"mean": [m for m, _ in rad_stats], "std": [s for _, s in rad_stats]},
        "log1p": list(LOG1P_FEATURES),
        "computed_on": "train",
    }


def build_shards(
    report: IngestReport,
    out_dir: str | Path,
    prep: PrepConfig,
    *,
    mapper: Mapper = serial_map,
    single_split: str | None = None,
) -> dict:
    """Split, shard and write manifest.json (last). Returns the manifest.

    single_split: put every patient in this one split instead of following the split
    (new patients to predict; their tables are z-scored with the model's training stats).

    Refuses a cohort with defects unless prep.allow_rejects, in which case the rejected patients
    and their reasons are recorded in the manifest (never dropped without a trace).
    """
    if report.defects and not prep.allow_rejects:
        raise ValueError(
            f"{len(report.defects)} defects in {report.root}; fix them or pass --allow-rejects "
            "to shard only the valid patients\n" + report.summary(max_defects=50)
        )
    if not report.records:
        raise ValueError(f"no valid patients in {report.root}")
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds shards (manifest.json); choose a new folder")
    out.mkdir(parents=True, exist_ok=True)

    if single_split:
        split_of = {r.patient_id: single_split for r in report.records}
    else:
        split_of = assign_splits(report.records, prep)
    rng = np.random.default_rng(prep.seed + 1)
    names = (single_split,) if single_split else (*SPLITS, *fold_splits(prep.folds))
    by_split: dict[str, list[PatientRecord]] = {s: [] for s in names}
    for record in sorted(report.records, key=lambda r: r.patient_id):
        by_split[split_of[record.patient_id]].append(record)
    for split, records in by_split.items():
        # Shuffled once here, so a shard (and any contiguous run of it) is a random subset.
        by_split[split] = [records[i] for i in rng.permutation(len(records))]

    plans = plan_shards(by_split, prep)
    entries = mapper(write_shard, [(report.root, str(out), p, prep.image_size) for p in plans])

    splits = {}
    for split, records in by_split.items():
        if not records:
            continue
        splits[split] = {
            "n_patients": len(records),
            "centers": dict(sorted(Counter(r.center for r in records).items())),
            "shards": [e["name"] for e in entries if e["split"] == split],
        }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"mmdls-dist {__version__}",
        "image_size": prep.image_size,
        "prep": to_dict(prep),
        "source": {
            "n_read": report.n_read,
            "n_kept": len(report.records),
            "n_rejected": len(report.rejected),
            "defects": [str(d) for d in report.file_defects],
        },
        "rejected": {pid: [str(d) for d in ds] for pid, ds in sorted(report.rejected.items())},
        "splits": splits,
        "shards": entries,
        "normalization": _normalization(by_split, prep.folds),
        "fold_normalization": [
            normalization_stats(
                [r for f in fold_splits(prep.folds) if f != fold for r in by_split[f]]
            )
            for fold in fold_splits(prep.folds)
        ],
        "clinical_columns": [c.name for c in CLINICAL_COLUMNS],
        "radiomics_names": report.radiomics_names,
    }
    tmp = out / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(out / MANIFEST)
    return manifest


def _normalization(by_split: dict, folds: int) -> dict | None:
    """Training statistics: of the train split, or of all folds (a fold's own training
    statistics are in fold_normalization)."""
    if folds:
        return normalization_stats([r for f in fold_splits(folds) for r in by_split[f]])
    return normalization_stats(by_split["train"]) if by_split.get("train") else None


def fold_view(manifest: dict, fold: int) -> dict:
    """The manifest as cross-validation fold `fold` sees it: that fold's shards are the val
    split, the other folds' the train split, its training statistics the normalisation.
    fold -1 = the manifest itself."""
    if fold < 0:
        return manifest
    folds = manifest.get("prep", {}).get("folds", 0)
    if not folds:
        raise ShardError(
            f"data.fold={fold}, but these shards have no cross-validation folds; shard with "
            "prep.folds (mmdls shard --folds K) or leave data.fold at -1"
        )
    if fold >= folds:
        raise ShardError(f"data.fold={fold}, but the shards have {folds} folds (0..{folds - 1})")

    def role(split: str) -> str:
        if split == f"fold{fold}":
            return "val"
        return "train" if split.startswith("fold") else split

    entries = [dict(e, split=role(e["split"])) for e in manifest["shards"]]
    splits: dict[str, dict] = {}
    for name, info in manifest["splits"].items():
        merged = splits.setdefault(role(name), {"n_patients": 0, "centers": {}, "shards": []})
        merged["n_patients"] += info["n_patients"]
        merged["shards"] += info["shards"]
        for center, n in info["centers"].items():
            merged["centers"][center] = merged["centers"].get(center, 0) + n
    return dict(
        manifest,
        shards=entries,
        splits=splits,
        normalization=manifest["fold_normalization"][fold],
        fold=fold,
    )


def data_manifest(data) -> dict:
    """The manifest a training run reads (data: DataConfig): its shards' manifest, seen as
    cross-validation fold data.fold where that is set."""
    return fold_view(load_manifest(data.shards), data.fold)


def load_manifest(root: str) -> dict:
    url = storage.join(root, MANIFEST)
    try:
        manifest = storage.read_json(url)
    except FileNotFoundError as exn:
        raise ShardError(
            f"{url}: no manifest.json (not a shard folder, or sharding unfinished)"
        ) from exn
    except json.JSONDecodeError as exn:
        raise ShardError(f"{url}: manifest.json is not valid JSON ({exn.msg})") from exn
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{url}: schema_version {manifest.get('schema_version')} but this mmdls-dist reads "
            f"{SCHEMA_VERSION}; re-shard with this version"
        )
    return manifest


def manifest_hash(manifest: dict) -> str:
    """Identity of a data set: sha256 of the canonical manifest (checkpoints record it)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
