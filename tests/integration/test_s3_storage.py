"""Runs and shards on an S3 API (moto's server on 127.0.0.1, reached through the standard
AWS_* variables alone): training with run.storage_path=s3://..., then evaluation and
prediction reading the run and the shards from the bucket."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import s3fs
from helpers import train_config

from mmdls_dist import storage
from mmdls_dist.config import EvalConfig
from mmdls_dist.data.shards import load_manifest
from mmdls_dist.evaluation.evaluate import run_evaluation
from mmdls_dist.evaluation.predict import run_prediction
from mmdls_dist.parallel import ray_mapper, serial_mapper
from mmdls_dist.train import checkpoint
from mmdls_dist.train.launch import fit

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.s3]


@pytest.fixture(scope="module")
def s3_run(ray_session, s3_bucket, shard_dir):
    fs = s3fs.S3FileSystem()
    shards = f"{s3_bucket}/cohort/shards"
    fs.put(str(shard_dir) + "/", shards.removeprefix("s3://"), recursive=True)
    runs = f"{s3_bucket}/runs"
    cfg = train_config(shard_dir, runs, "s3run", "optim.epochs=2", f"data.shards={shards}")
    result = fit(cfg)
    assert result.error is None
    return fs, shards, f"{runs}/s3run", result


def test_a_run_lives_in_the_bucket(s3_run):
    fs, _, run, result = s3_run
    assert result.metrics["epoch"] == 1
    best = json.loads(fs.cat(f"{run}/{checkpoint.BEST}"))
    names = fs.ls(run, detail=False)
    assert any(n.endswith(best["checkpoint"]) for n in names)
    assert fs.exists(f"{run}/{best['checkpoint']}/state.pt")
    assert fs.exists(f"{run}/{checkpoint.RUN_IDENTITY}")
    assert best["metrics"]["epoch"] == 1  # the last epoch is deployed
    board = f"{run}/tensorboard"
    events = [e for e in fs.ls(board, detail=False) if "events.out.tfevents." in e]
    assert events and fs.size(events[0]) > 0
    hparams = fs.ls(f"{board}/hparams", detail=False)  # the HParams session, copied too
    assert hparams and all("events.out.tfevents." in e for e in hparams)


def test_evaluate_and_predict_read_the_run_and_shards_from_the_bucket(
    s3_run, tmp_path, monkeypatch
):
    _, shards, run, _ = s3_run
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)  # nothing of a bucket URL may land in the working folder
    cfg = EvalConfig(bootstrap=5, min_center_patients=2, parts=1, batch_size=4)
    metrics = run_evaluation({"s3": run}, shards, tmp_path / "eval", cfg, ray_mapper("e"))
    manifest = load_manifest(shards)
    assert set(metrics["models"]["s3"]["splits"]) == set(manifest["splits"])
    ext = metrics["models"]["s3"]["splits"]["external"]["all"]
    assert ext["n_patients"] == manifest["splits"]["external"]["n_patients"]
    evaluated = pd.read_csv(tmp_path / "eval" / "predictions-s3.csv").set_index("patient_id")
    out = f"{run}-predictions/external.csv"  # prediction written to the bucket too
    table = run_prediction(
        run, out, cfg, lambda d: serial_mapper(d), shards=shards, split="external"
    ).set_index("patient_id")
    assert storage.exists(out)
    assert list(here.iterdir()) == []  # e.g. no local "s3:/..." folder made from the URL
    assert (table["status"] == "ok").all()
    ids = table.index
    pd.testing.assert_series_equal(
        table.loc[ids, "os_log_relative_hazard"],
        evaluated.loc[ids, "os_risk"],
        check_names=False,
        atol=6e-4,  # the CSV rounds to 3 decimals
    )
