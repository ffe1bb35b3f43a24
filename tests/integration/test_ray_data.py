"""Data preparation as Ray tasks: identical to a serial run, and the main job end to end."""

from __future__ import annotations

import json

import pytest

from mmdls_dist.cli import main
from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.shards import ShardOptions, build_shards, load_manifest
from mmdls_dist.data.splits import SplitRecipe
from mmdls_dist.parallel import ray_mapper

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_sharding_equals_serial(ray_session, synth_cohort, synth_report, tmp_path):
    root, _ = synth_cohort
    recipe = SplitRecipe(seed=3, external_centers=("HOSP-B",))
    options = ShardOptions(image_size=32, max_patients_per_shard=4)
    serial = build_shards(synth_report, tmp_path / "serial", recipe, options)
    parallel_report = read_cohort(root, mapper=ray_mapper(), chunk_size=5)
    assert parallel_report.ok and len(parallel_report.records) == len(synth_report.records)
    parallel = build_shards(parallel_report, tmp_path / "ray", recipe, options, mapper=ray_mapper())
    assert len(serial["shards"]) >= 6
    assert parallel == serial  # same shards, same sha256s, same manifest
    for entry in serial["shards"]:
        a = (tmp_path / "serial" / entry["name"]).read_bytes()
        assert a == (tmp_path / "ray" / entry["name"]).read_bytes()


def test_main_job_runs_on_the_embedded_default(ray_session, tmp_path, capsys, caplog):
    work = tmp_path / "work"
    rc = main(["train", "--workdir", str(work), "--patients", "30", "--num-workers", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    manifest = load_manifest(str(work / "shards"))
    n_train = manifest["splits"]["train"]["n_patients"]
    steps = n_train // 8
    assert f"rank 0: {steps} batches" in out and f"rank 1: {steps} batches" in out
    n_val = manifest["splits"]["val"]["n_patients"]
    assert f"all ranks: {n_val} patients read, {n_val} distinct" in out
    truth = json.loads((work / "synthetic" / "truth.json").read_text())
    assert f"'dfs': {round(truth['endpoints']['dfs']['oracle_cindex'], 3)}" in out
    # A second run reuses data and shards instead of regenerating them.
    before = (work / "shards" / "manifest.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="mmdls"):
        assert main(["train", "--workdir", str(work), "--num-workers", "0"]) == 0
    assert "reusing shards" in caplog.text
    assert (work / "shards" / "manifest.json").stat().st_mtime_ns == before
