"""Patient-level split assignment: stratified random split + leave-center(s)-out external set.

Splits are decided once, at sharding time, and recorded in the manifest, so every later run
(train, tune, evaluate) sees the same patients in the same split.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from mmdls_dist.config import PrepConfig
from mmdls_dist.data.schema import PatientRecord


def _stratum(record: PatientRecord, keys: tuple[str, ...]) -> tuple:
    out = []
    for key in keys:
        if key == "center":
            out.append(record.center)
        else:
            value = record.labels[key]
            out.append(-1 if value is None else int(value))  # unknown label = own stratum
    return tuple(out)


def fold_splits(folds: int) -> tuple[str, ...]:
    """The split names of a cross-validation sharding: fold0, fold1, ..."""
    return tuple(f"fold{k}" for k in range(folds))


def assign_splits(records: list[PatientRecord], prep: PrepConfig) -> dict[str, str]:
    """patient_id -> split name. Deterministic for (records, prep). With prep.folds the
    internal patients outside test are dealt to fold0..fold{K-1} the same way.

    Internal patients are ordered stratum by stratum (random order inside a stratum), then
    dealt to train/val/test by a largest-deficit rule: each next patient goes to the split
    furthest below its target share so far. Every stratum thus gets its proportional share
    to within one patient, and the totals match the fractions to within one patient, even
    for strata of one or two patients where per-stratum rounding would fail.
    """
    centers = {r.center for r in records}
    missing = [c for c in prep.external_centers if c not in centers]
    if missing:
        raise ValueError(
            f"prep.external_centers: {missing} not in the cohort (centers: {sorted(centers)})"
        )
    external = set(prep.external_centers)
    if centers and centers <= external:
        raise ValueError("prep.external_centers holds out every center; nothing left to train")

    out = {r.patient_id: "external" for r in records if r.center in external}
    strata: dict[tuple, list[str]] = defaultdict(list)
    for r in records:
        if r.center not in external:
            strata[_stratum(r, prep.stratify_by)].append(r.patient_id)

    rng = np.random.default_rng(prep.seed)
    order: list[str] = []
    for key in sorted(strata, key=repr):
        ids = sorted(strata[key])
        order.extend(ids[i] for i in rng.permutation(len(ids)))

    if prep.folds:
        names = (*fold_splits(prep.folds), "test")
        rest = (1.0 - prep.test_fraction) / prep.folds
        shares = np.array([rest] * prep.folds + [prep.test_fraction])
    else:
        names = ("train", "val", "test")
        shares = np.array(
            [
                1.0 - prep.val_fraction - prep.test_fraction,
                prep.val_fraction,
                prep.test_fraction,
            ]
        )
    counts = np.zeros(len(names))
    for i, pid in enumerate(order):
        deficit = shares * (i + 1) - counts
        k = int(np.argmax(deficit))
        counts[k] += 1
        out[pid] = names[k]
    return out
