"""Patient-level splits: disjoint, stratified, deterministic; external centers held out."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mmdls_dist.config import PrepConfig
from mmdls_dist.data.schema import PatientRecord
from mmdls_dist.data.splits import assign_splits


def _records(n: int, seed: int = 0) -> list[PatientRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append(
            PatientRecord(
                patient_id=f"P{i:04d}",
                center=f"C{rng.integers(4)}",
                row=i + 2,
                labels={
                    "histology": float(rng.integers(2)),
                    "tnm_stage": float(rng.integers(3)),
                    "dfs_time": 1.0,
                    "dfs_event": 1.0,
                    "os_time": 1.0,
                    "os_event": 0.0,
                },
                clinical={},
                pet={},
                radiomics=np.zeros(128),
                slice_files=["a.png"],
                lesion_annotated=True,
            )
        )
    return out


def test_every_patient_in_exactly_one_split():
    records = _records(500)
    split = assign_splits(records, PrepConfig(seed=1, val_fraction=0.15, test_fraction=0.15))
    assert set(split) == {r.patient_id for r in records}
    counts = Counter(split.values())
    assert counts["train"] == 350 and counts["val"] == 75 and counts["test"] == 75


def test_strata_are_proportional():
    records = _records(1200, seed=2)
    split = assign_splits(records, PrepConfig(seed=0, val_fraction=0.2, test_fraction=0.2))
    by_stratum: dict = {}
    for r in records:
        key = (r.center, r.labels["histology"], r.labels["tnm_stage"])
        by_stratum.setdefault(key, Counter())[split[r.patient_id]] += 1
    for counts in by_stratum.values():
        n = sum(counts.values())
        assert abs(counts["val"] - 0.2 * n) <= 1.0 and abs(counts["test"] - 0.2 * n) <= 1.0


def test_leave_center_out():
    records = _records(300)
    split = assign_splits(
        records, PrepConfig(external_centers=("C1", "C3"), val_fraction=0.15, test_fraction=0.15)
    )
    for r in records:
        assert (split[r.patient_id] == "external") == (r.center in {"C1", "C3"})


def test_deterministic_and_seed_dependent():
    records = _records(200)
    a = assign_splits(records, PrepConfig(seed=5))
    assert a == assign_splits(list(reversed(records)), PrepConfig(seed=5))
    assert a != assign_splits(records, PrepConfig(seed=6))


def test_bad_recipes_are_refused():
    records = _records(20)
    with pytest.raises(ValueError, match="'C9'.*not in the cohort"):
        assign_splits(records, PrepConfig(external_centers=("C9",)))
    with pytest.raises(ValueError, match="holds out every center"):
        assign_splits(records, PrepConfig(external_centers=("C0", "C1", "C2", "C3")))
    with pytest.raises(ValueError, match="val_fraction"):
        PrepConfig(val_fraction=1.2)
    with pytest.raises(ValueError, match="must be < 1"):
        PrepConfig(val_fraction=0.5, test_fraction=0.5)
