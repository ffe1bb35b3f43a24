"""Data preparation as Ray tasks: identical to a serial run, and the main job end to end."""

from __future__ import annotations

import json

import pytest

from mmdls_dist.cli import main
from mmdls_dist.config import PrepConfig
from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.shards import build_shards, load_manifest
from mmdls_dist.parallel import ray_mapper

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_sharding_equals_serial(ray_session, synth_cohort, synth_report, tmp_path):
    root, _ = synth_cohort
    prep = PrepConfig(image_size=32, max_patients_per_shard=4, seed=3, external_centers=("HOSP-B",))
    serial = build_shards(synth_report, tmp_path / "serial", prep)
    parallel_report = read_cohort(root, mapper=ray_mapper(), chunk_size=5)
    assert parallel_report.ok and len(parallel_report.records) == len(synth_report.records)
    parallel = build_shards(parallel_report, tmp_path / "ray", prep, mapper=ray_mapper())
    assert len(serial["shards"]) >= 6
    assert parallel == serial  # same shards, same sha256s, same manifest
    for entry in serial["shards"]:
        a = (tmp_path / "serial" / entry["name"]).read_bytes()
        assert a == (tmp_path / "ray" / entry["name"]).read_bytes()


def test_main_job_runs_on_the_embedded_default(ray_session, tmp_path, capsys, caplog):
    """`mmdls train` with no data: synthetic cohort -> shards -> Ray Train -> summary."""
    from helpers import TINY_TRAIN

    work = tmp_path / "work"
    args = [
        "train",
        "--workdir",
        str(work),
        "--set",
        "synth.patients=40",
        "--set",
        "synth.image_size=32",
        "--set",
        "prep.image_size=32",
        "--set",
        "optim.epochs=1",
        "--set",
        f"run.storage_path={tmp_path / 'runs'}",
    ]
    for item in TINY_TRAIN:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    manifest = load_manifest(str(work / "shards"))
    steps = manifest["splits"]["train"]["n_patients"] // 6
    assert f"run 'debug': 1 epochs, {steps} optimizer steps" in out
    truth = json.loads((work / "synthetic" / "truth.json").read_text())
    assert truth["spec"]["patients"] == 40
    for key in ("auc_histology", "cindex_dfs", "cindex_os", "dice_lesion"):
        assert f"  {key}" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("cindex_os"))
    model, oracle = (float(x) for x in row.split()[1:3])  # model and oracle columns
    assert 0.0 <= model <= 1.0 and 0.5 < oracle <= 1.0
    assert f"tensorboard --logdir {tmp_path / 'runs' / 'debug' / 'tensorboard'}" in out
    # A second run reuses data and shards instead of regenerating them.
    before = (work / "shards" / "manifest.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="mmdls_dist"):
        assert main(args + ["--set", "optim.epochs=2"]) == 0
    assert "reusing shards" in caplog.text
    assert (work / "shards" / "manifest.json").stat().st_mtime_ns == before
