"""Ray Train runs on a local Ray (2 CPU workers): metrics, checkpoints, failure recovery,
resumption by run name and refusal of incompatible resumption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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


@pytest.fixture(scope="module")
def uninterrupted(ray_session, shard_dir, tmp_path_factory):
    """A 2-epoch run with no fault: checked on its own, and the reference of the fault
    tests below."""
    storage = tmp_path_factory.mktemp("reference")
    result = fit(config(shard_dir, storage, "ref", "optim.epochs=2", "run.checkpoints_to_keep=2"))
    return storage / "ref", result


def test_two_epochs_report_metrics_and_checkpoints(uninterrupted, shard_dir):
    run, result = uninterrupted
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

    best = json.loads((run / BEST).read_text())
    state, identity = checkpoint.load(run / best["checkpoint"])  # weights_only=True inside
    assert identity["config"]["model"]["embed_dim"] == 16
    assert state["progress"]["epoch"] == 2  # run.metric=epoch: the last epoch is deployed
    assert (run / RUN_IDENTITY).exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def final_weights(run: Path) -> dict:
    state, _ = checkpoint.load(checkpoint.newest_complete(str(run)))
    return state["model"]


# (where, which rank, how, at which step: the last of epoch 0, or one into epoch 1) ->
# how often each epoch runs: the interrupted epoch twice, every other once. A process
# death with the other rank inside a collective (the step's all-reduce), the death of
# rank 0 right after writing its checkpoint, and an exception (not a death) in validation.
FAULTS = [
    ("step", 1, "sigkill", "mid-epoch-1", [1, 2]),
    ("after_report", 0, "sigkill", "end-of-epoch-0", [1, 1]),  # the checkpoint just written
    ("validation", 1, "raise", "end-of-epoch-0", [2, 1]),
]


@pytest.mark.parametrize(("point", "rank", "mode", "when", "runs"), FAULTS)
def test_a_killed_worker_resumes_exactly(
    uninterrupted, shard_dir, tmp_path, point, rank, mode, when, runs
):
    """A worker killed mid-step, during validation or right after its checkpoint: the run
    resumes from the newest complete checkpoint on storage (registered by Ray or not), every
    epoch runs once but the interrupted one, and the optimizer steps and the final weights
    are those of the run without the fault. No orphan checkpoint stays behind."""
    steps = steps_per_epoch(shard_dir)
    name = f"chaos-{point}-{rank}"
    cfg = config(
        shard_dir,
        tmp_path,
        name,
        "optim.epochs=2",
        "run.checkpoints_to_keep=2",
        f"chaos.fail_at_step={steps + 1 if when == 'mid-epoch-1' else steps}",
        f"chaos.fail_rank={rank}",
        f"chaos.fail_mode={mode}",
        f"chaos.fail_point={point}",
    )
    result = fit(cfg)
    run = tmp_path / name
    assert result.error is None
    assert (run / ".chaos_fired").exists()  # it did fail once
    epochs = [e["epoch"] for e in checkpoint.executions(str(run))]
    assert [epochs.count(e) for e in (0, 1)] == runs
    reference_run, reference = uninterrupted
    assert result.metrics["global_step"] == reference.metrics["global_step"] == 2 * steps
    ours, theirs = final_weights(run), final_weights(reference_run)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "weights differ from the reference"
    folders = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    assert folders == sorted(Path(c.path).name for c, _ in result.best_checkpoints)
    assert all(checkpoint.is_complete(str(run / f)) for f in folders)


def test_restarting_a_run_name_resumes_it_and_refuses_another_config(
    ray_session, shard_dir, tmp_path
):
    """The same run name again: an incompatible config is refused on the driver, naming
    each difference, and leaves the run as it was; the same config with more epochs
    resumes it."""
    first = fit(config(shard_dir, tmp_path, "again", "optim.epochs=1"))
    assert reported_epochs(first) == [0]
    other = config(shard_dir, tmp_path, "again", "optim.epochs=1", "model.embed_dim=32",
                   "optim.lr=0.01")  # fmt: skip
    with pytest.raises(checkpoint.IncompatibleCheckpointError) as info:
        fit(other)
    message = str(info.value)
    assert "model.embed_dim: 16 in the run, 32 now" in message
    assert "optim.lr: 0.003 in the run, 0.01 now" in message
    assert "new run.name" in message
    second = fit(config(shard_dir, tmp_path, "again", "optim.epochs=2"))
    assert reported_epochs(second) == [0, 1]  # epoch 0 was not trained again
    assert second.metrics["global_step"] == 2 * steps_per_epoch(shard_dir)


def test_bad_data_fails_on_the_driver_in_one_line(ray_session, shard_dir, tmp_path, caplog):
    """A corrupted shard set is found before any worker starts: exit 2, one clear line."""
    import shutil

    from mmdls_dist.cli import main

    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    victim = sorted(copy.glob("train-*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    storage = tmp_path / "runs"
    argv = ["train", "--shards", str(copy), "--set", f"run.storage_path={storage}"]
    assert main(argv) == 2
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert victim.name in error.getMessage() and "corrupted" in error.getMessage()
    assert not storage.exists()  # no worker ever started, no run folder


def test_a_data_error_in_a_worker_is_not_retried(ray_session, shard_dir, tmp_path):
    """Bad data that only a worker can see (a sample naming another patient, under
    data.verify=size): the restarted worker group stops at once instead of failing again
    max_failures times, and fit() raises the data error itself."""
    from helpers import crafted_shards

    from mmdls_dist.data.shards import ShardError

    crafted, _, _ = crafted_shards(shard_dir, tmp_path, "SOMEONE-ELSE")
    cfg = config(crafted, tmp_path, "bad", "optim.epochs=1", "data.verify=size")
    assert cfg.run.max_failures == 2
    with pytest.raises(ShardError, match="names another patient in meta.json"):
        fit(cfg)
    assert [e["epoch"] for e in checkpoint.executions(str(tmp_path / "bad"))] == [0]
