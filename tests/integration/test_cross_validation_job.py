"""`mmdls train --folds 2` end to end: one Ray Train run per fold, the ensemble folder,
and evaluate / predict taking the ensemble as one model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import TINY_PREP, TINY_TRAIN

from mmdls_dist.cli import main
from mmdls_dist.config import EvalConfig, PrepConfig, to_dict
from mmdls_dist.data.shards import build_shards
from mmdls_dist.evaluation.evaluate import run_evaluation
from mmdls_dist.evaluation.predict import run_prediction
from mmdls_dist.parallel import serial_mapper

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cross_validated(ray_session, synth_report, tmp_path_factory):
    base = tmp_path_factory.mktemp("cv")
    shards = base / "shards"
    prep = PrepConfig(**{**to_dict(TINY_PREP), "folds": 2, "external_centers": ("HOSP-C",)})
    build_shards(synth_report, shards, prep)
    argv = ["train", "--shards", str(shards), "--folds", "2"]
    # One worker per run: the 2-CPU test cluster holds both folds at once, so they train
    # as concurrent Tune trials (train/folds.py).
    settings = ("optim.epochs=1", "run.num_workers=1", f"run.storage_path={base / 'runs'}")
    for item in (*TINY_TRAIN, *settings, "run.name=cv"):
        argv += ["--set", item]
    assert main(argv) == 0
    return shards, base / "runs"


def test_each_fold_is_a_run_and_the_ensemble_names_them(cross_validated):
    _, runs = cross_validated
    assert (runs / "cv-trials").is_dir()  # the folds ran as Tune trials
    for k in range(2):
        assert (runs / f"cv-fold{k}" / "best.json").is_file()
        identity = json.loads(
            next((runs / f"cv-fold{k}").glob("checkpoint_*/config.json")).read_text()
        )
        assert identity["config"]["data"]["fold"] == k
    assert json.loads((runs / "cv" / "ensemble.json").read_text()) == {
        "members": ["cv-fold0", "cv-fold1"]
    }


def test_evaluate_scores_the_ensemble_beside_each_fold(cross_validated, tmp_path):
    shards, runs = cross_validated
    cfg = EvalConfig(bootstrap=10, min_center_patients=2, parts=1, batch_size=4)
    metrics = run_evaluation(
        {"cv": str(runs / "cv")}, str(shards), tmp_path, cfg, serial_mapper("e")
    )
    assert set(metrics["models"]) == {"cv", "cv fold0", "cv fold1"}
    assert set(metrics["models"]["cv"]["splits"]) <= {"test", "external"}
    assert "external" in metrics["models"]["cv"]["splits"]
    assert "val" in metrics["models"]["cv fold0"]["splits"]  # fold-wise: its own fold
    ens = pd.read_csv(tmp_path / "predictions-cv.csv").set_index("patient_id")
    members = [
        pd.read_csv(tmp_path / f"predictions-cv-fold{k}.csv").set_index("patient_id")
        for k in range(2)
    ]
    ext = ens.index[ens["split"] == "external"]
    for column in ("os_risk", "histology_prob"):
        mean = (members[0].loc[ext, column] + members[1].loc[ext, column]) / 2
        np.testing.assert_allclose(ens.loc[ext, column], mean, rtol=1e-6)
    assert "ci95" in metrics["models"]["cv"]["splits"]["external"]["all"]


def predict_external(ensemble: Path, shards: Path, out_csv: Path) -> pd.DataFrame:
    """`mmdls predict` of the ensemble folder on the shards' external split."""
    cfg = EvalConfig(parts=1, batch_size=4)
    mapper = lambda d: serial_mapper(d)  # noqa: E731
    return run_prediction(str(ensemble), out_csv, cfg, mapper, shards=str(shards), split="external")


def test_predict_takes_the_ensemble(cross_validated, tmp_path):
    shards, runs = cross_validated
    table = predict_external(runs / "cv", shards, tmp_path / "p.csv")
    assert (table["status"] == "ok").all() and len(table) > 0
    assert Path(tmp_path / "p.csv").is_file()
    assert table["os_log_relative_hazard"].notna().all()
    assert (table["model"] == "cv (ensemble of 2)").all()


def test_the_ensemble_reference_is_stored_and_a_moved_ensemble_predicts(
    cross_validated, tmp_path, monkeypatch
):
    """Training the folds stores each member's reference and the ensemble's; predict on a
    moved copy of the runs uses them and scores no training cohort again, with the same
    numbers as the refitted path."""
    from mmdls_dist.evaluation import ensemble as ensemble_module
    from mmdls_dist.evaluation import reference as reference_module

    shards, runs = cross_validated
    stored = json.loads((runs / "cv" / "reference.json").read_text())
    assert len(stored["checkpoints"]) == 2
    assert all((runs / f"cv-fold{k}" / "reference.json").is_file() for k in range(2))
    plain = tmp_path / "without"  # the same runs without stored references: refitted
    shutil.copytree(runs, plain, ignore=shutil.ignore_patterns("cv-trials", "reference.json"))
    refit = predict_external(plain / "cv", shards, tmp_path / "a.csv")
    moved = tmp_path / "moved"
    shutil.copytree(runs, moved, ignore=shutil.ignore_patterns("cv-trials"))

    def no_refit(*args, **kwargs):
        raise AssertionError("a member's training cohort was scored again")

    monkeypatch.setattr(ensemble_module, "training_frame", no_refit)
    monkeypatch.setattr(reference_module, "training_frame", no_refit)
    table = predict_external(moved / "cv", shards, tmp_path / "b.csv")
    pd.testing.assert_frame_equal(table, refit, check_exact=False, atol=1.5e-3)
