"""Cross-validation folds: stratified fold splits at sharding time, each fold's view of the
manifest (its val fold, its training statistics), and the ensemble's mean prediction."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from helpers import TINY_PREP

from mmdls_dist.config import DataConfig, PrepConfig
from mmdls_dist.data.loader import make_loader
from mmdls_dist.data.shards import (
    ShardError,
    build_shards,
    fold_view,
    load_manifest,
    normalization_stats,
)
from mmdls_dist.data.splits import assign_splits
from mmdls_dist.evaluation.ensemble import mean_frame

FOLDS = dataclasses.replace(TINY_PREP, folds=3, test_fraction=0.1)


@pytest.fixture(scope="module")
def fold_shards(synth_report, tmp_path_factory):
    out = tmp_path_factory.mktemp("folds") / "s"
    build_shards(synth_report, out, FOLDS)
    return out


def test_folds_are_stratified_and_keep_test_and_external(synth_report):
    split = assign_splits(synth_report.records, FOLDS)
    counts = Counter(split.values())
    assert set(counts) == {"fold0", "fold1", "fold2", "test", "external"}
    internal = [r for r in synth_report.records if r.center != "HOSP-C"]
    assert all(
        split[r.patient_id] == "external" for r in synth_report.records if r.center == "HOSP-C"
    )
    sizes = [counts[f"fold{k}"] for k in range(3)]
    assert max(sizes) - min(sizes) <= 1
    assert counts["test"] == pytest.approx(0.1 * len(internal), abs=1)
    for center in ("HOSP-A", "HOSP-B"):  # each fold gets its share of each center
        per_fold = [
            sum(split[r.patient_id] == f"fold{k}" for r in internal if r.center == center)
            for k in range(3)
        ]
        assert max(per_fold) - min(per_fold) <= 2
    # The same seed deals the same folds; without folds, train / val as before.
    assert assign_splits(synth_report.records, FOLDS) == split
    plain = assign_splits(synth_report.records, TINY_PREP)
    assert set(plain.values()) <= {"train", "val", "test", "external"}


def test_a_fold_validates_on_its_fold_and_normalises_with_the_others(fold_shards, synth_report):
    base = load_manifest(str(fold_shards))
    by_id = {r.patient_id: r for r in synth_report.records}
    for k in range(3):
        view = fold_view(base, k)
        val_keys = {key for e in view["shards"] if e["split"] == "val" for key in e["keys"]}
        fold_keys = {key for e in base["shards"] if e["split"] == f"fold{k}" for key in e["keys"]}
        assert val_keys == fold_keys
        train_keys = {key for e in view["shards"] if e["split"] == "train" for key in e["keys"]}
        assert not train_keys & val_keys and len(train_keys) + len(val_keys) == sum(
            base["splits"][f"fold{j}"]["n_patients"] for j in range(3)
        )
        assert view["splits"]["val"]["n_patients"] == base["splits"][f"fold{k}"]["n_patients"]
        assert view["splits"]["test"] == base["splits"]["test"]
        expected = normalization_stats([by_id[p] for p in sorted(train_keys)])
        got = view["normalization"]
        assert got["clinical"]["age"] == pytest.approx(expected["clinical"]["age"])
        assert got["pet"]["suv_max"] == pytest.approx(expected["pet"]["suv_max"])
        np.testing.assert_allclose(got["radiomics"]["mean"], expected["radiomics"]["mean"])
        assert got != base["normalization"]  # not the statistics of every fold
        loader = make_loader(
            DataConfig(shards=str(fold_shards), fold=k, batch_size=4, num_workers=0), "val", "eval"
        )
        seen = {pid for batch in loader for pid in batch.patient_id}
        assert seen == fold_keys


def test_a_fold_of_shards_without_folds_is_refused(shard_dir):
    with pytest.raises(ShardError, match="no cross-validation folds"):
        fold_view(load_manifest(str(shard_dir)), 0)
    with pytest.raises(ValueError, match="prep.folds"):
        PrepConfig(folds=1)


def test_fold_shards_refuse_an_out_of_range_fold(fold_shards):
    with pytest.raises(ShardError, match="has 3 folds|have 3 folds"):
        fold_view(load_manifest(str(fold_shards)), 3)


def test_the_ensemble_is_the_mean_of_its_members():
    ids = ["a", "b", "c"]
    rng = np.random.default_rng(0)
    frames = [
        pd.DataFrame(
            {
                "patient_id": ids[::-1] if m else ids,  # members may list patients in any order
                "split": "external",
                "histology": [0, 1, 1],
                "histology_prob": rng.random(3),
                "os_risk": rng.normal(size=3),
                "dfs_risk": rng.normal(size=3),
                **{f"stage_prob_{s}": rng.random(3) for s in ("I-II", "III", "IV")},
            }
        )
        for m in range(2)
    ]
    out = mean_frame(frames).set_index("patient_id")
    for column in ("histology_prob", "os_risk", "stage_prob_III"):
        a = frames[0].set_index("patient_id")[column]
        b = frames[1].set_index("patient_id")[column]
        np.testing.assert_allclose(out.loc[ids, column], ((a + b) / 2).loc[ids])
    assert list(out.loc[ids, "histology"]) == [0, 1, 1]
    with pytest.raises(ValueError, match="different patients"):
        mean_frame([frames[0], frames[1].iloc[:2]])


def test_folds_run_at_once_as_far_as_the_cluster_holds_them():
    from mmdls_dist.config import load_config
    from mmdls_dist.train.folds import at_once, fold_config

    cfg = load_config("debug", ["run.num_workers=2", "run.cpus_per_worker=1"])
    assert at_once(cfg, 3, {"CPU": 2.0}) == 1  # one run fills it: in sequence
    assert at_once(cfg, 3, {"CPU": 4.0}) == 2
    assert at_once(cfg, 3, {"CPU": 64.0}) == 3  # never more than there are folds
    gpu = load_config("debug", ["run.num_workers=2", "run.use_gpu=true"])
    assert at_once(gpu, 5, {"CPU": 64.0, "GPU": 8.0}) == 4
    fold = fold_config(cfg, 2, driver_cpus=0.01)
    assert (fold.data.fold, fold.run.name) == (2, f"{cfg.run.name}-fold2")
    assert fold.run.cpus_per_worker == pytest.approx(1 - 0.005)
