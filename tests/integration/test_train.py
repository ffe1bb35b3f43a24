"""Ray Train runs on a local Ray (2 CPU workers): metrics, checkpoints, failure recovery,
resumption by run name and refusal of incompatible resumption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import train_config as config

from mmdls_dist.data.shards import load_manifest
from mmdls_dist.train import checkpoint
from mmdls_dist.train.checkpoint import BEST, RUN_IDENTITY
from mmdls_dist.train.launch import fit

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def steps_per_epoch(shards: Path) -> int:
    return load_manifest(str(shards))["splits"]["train"]["n_patients"] // (2 * 3)


def reported_epochs(result) -> list[int]:
    return sorted(int(m["epoch"]) for _, m in result.best_checkpoints)


def test_two_epochs_report_metrics_and_checkpoints(ray_session, shard_dir, tmp_path):
    cfg = config(shard_dir, tmp_path, "plain", "optim.epochs=2")
    result = fit(cfg)
    assert result.error is None
    m = result.metrics
    assert m["epoch"] == 1 and m["global_step"] == 2 * steps_per_epoch(shard_dir)
    for key in (
        "train/loss",
        "train/loss_cox_os",
        "train/loss_seg_lesion",
        "train/lr",
        "train/patients_per_s",
        "val/cindex_os",
        "val/auc_histology",
        "val/dice_lung",
    ):
        assert key in m, key
    assert 0.0 <= m["val/cindex_os"] <= 1.0 and 0.0 <= m["val/dice_lung"] <= 1.0
    n_val = load_manifest(str(shard_dir))["splits"]["val"]["n_patients"]
    assert m["val/n_patients"] == n_val  # every val patient once across both ranks
    assert reported_epochs(result) == [0, 1]

    run = tmp_path / "plain"
    best = json.loads((run / BEST).read_text())
    state, identity = checkpoint.load(best["checkpoint"])  # weights_only=True inside
    assert identity["config"]["model"]["embed_dim"] == 16
    assert state["progress"]["epoch"] in (1, 2)
    assert (run / RUN_IDENTITY).exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("mode", ["raise", "sigkill"])
def test_worker_failure_resumes_without_lost_or_repeated_epochs(
    ray_session, shard_dir, tmp_path, mode
):
    steps = steps_per_epoch(shard_dir)
    fail_at = steps + 1  # inside epoch 1, after epoch 0's checkpoint
    cfg = config(
        shard_dir,
        tmp_path,
        f"chaos-{mode}",
        "optim.epochs=3",
        f"chaos.fail_at_step={fail_at}",
        "chaos.fail_rank=1",
        f"chaos.fail_mode={mode}",
    )
    result = fit(cfg)
    assert result.error is None
    assert (tmp_path / f"chaos-{mode}" / ".chaos_fired").exists()  # it did fail once
    assert reported_epochs(result) == [0, 1, 2]
    assert result.metrics["global_step"] == 3 * steps  # same as an uninterrupted run


def test_restarting_a_run_name_resumes_it(ray_session, shard_dir, tmp_path):
    first = fit(config(shard_dir, tmp_path, "again", "optim.epochs=1"))
    assert reported_epochs(first) == [0]
    second = fit(config(shard_dir, tmp_path, "again", "optim.epochs=2"))
    assert reported_epochs(second) == [0, 1]  # epoch 0 was not trained again
    assert second.metrics["global_step"] == 2 * steps_per_epoch(shard_dir)


def test_incompatible_resume_is_refused(ray_session, shard_dir, tmp_path):
    fit(config(shard_dir, tmp_path, "strict", "optim.epochs=1"))
    with pytest.raises(checkpoint.IncompatibleCheckpointError) as info:
        fit(
            config(
                shard_dir,
                tmp_path,
                "strict",
                "optim.epochs=1",
                "model.embed_dim=32",
                "optim.lr=0.01",
            )
        )
    message = str(info.value)
    assert "model.embed_dim: 16 in the run, 32 now" in message
    assert "optim.lr: 0.003 in the run, 0.01 now" in message
    assert "new run.name" in message
