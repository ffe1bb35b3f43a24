"""Ray Tune sweeps over Ray Train runs on the shared local Ray (2 CPUs, 1 worker per trial):
ASHA on, results table, best config accepted by a training run, a failing trial reported
without stopping the sweep, no placement group left behind, resume of a finished sweep."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from helpers import TINY_TRAIN, train_config

from mmdls_dist import storage
from mmdls_dist.config import load_config
from mmdls_dist.train.launch import fit
from mmdls_dist.train.tune import load_sweep, run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def base(shard_dir, storage):
    return train_config(
        shard_dir, storage, "unused", "run.num_workers=1", "optim.epochs=2", "run.max_failures=0"
    )


def write_sweep(path, **fields):
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.fixture(scope="module")
def sweep_result(ray_session, shard_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("sweeps")
    cfg = base(shard_dir, storage)
    spec = write_sweep(
        storage / "sweep.yaml",
        num_samples=1,
        scheduler="asha",
        grace_period=1,
        reduction_factor=2,
        space={
            "loss.w_os": {"type": "grid", "values": [0.5, 2.0]},
            # The second grid point fails at its first optimizer step (Train gives up:
            # run.max_failures=0): the sweep must report it and go on.
            "chaos.fail_at_step": {"type": "grid", "values": [-1, 1]},
        },
    )
    sweep = load_sweep(spec, cfg)
    return cfg, sweep, run_sweep(cfg, sweep, "s1")


def test_sweep_writes_table_and_reports_the_failing_trial(sweep_result):
    cfg, _, summary = sweep_result
    table = pd.read_csv(f"{summary['root']}/results.csv")
    assert len(table) == 4 == summary["trials"]
    failed = table[table["config/chaos.fail_at_step"] == 1]
    assert (failed.status == "error").all() and failed.error.str.contains("chaos").all()
    ok = table[table["config/chaos.fail_at_step"] == -1]
    assert (ok.status == "ok").all() and ok["best val/composite"].between(0, 1).all()
    assert set(ok["config/loss.w_os"]) == {0.5, 2.0}
    # Each trial's Train run is named after the trial, with TensorBoard logs of its own.
    runs = sorted(p.name for p in (cfg_storage(cfg) / "s1" / "train-runs").iterdir())
    assert len(runs) == 4
    assert list((cfg_storage(cfg) / "s1" / "train-runs").glob("*/tensorboard/events.*"))


def cfg_storage(cfg):
    from pathlib import Path

    return Path(cfg.run.storage_path)


def test_best_config_is_accepted_by_a_training_run(sweep_result):
    cfg, _, summary = sweep_result
    best = load_config(summary["best"])  # what `jobs/train.py --config best.yaml` does
    assert best.chaos.fail_at_step == -1 and best.loss.w_os in (0.5, 2.0)
    result = fit(load_config(summary["best"], ["optim.epochs=1", "run.name=from-best"]))
    assert result.error is None and result.metrics["epoch"] == 0


def live_placement_groups() -> list:
    from ray.util import placement_group_table

    return [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]


def test_no_placement_group_is_left_behind(sweep_result):
    assert no_placement_group_within(30), live_placement_groups()


def no_placement_group_within(seconds: float) -> bool:
    """Ray Train's cleaner removes a stopped run's placement group asynchronously (about a
    second here); a leak would stay."""
    import time

    deadline = time.monotonic() + seconds
    while live_placement_groups():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_restarting_a_finished_sweep_resumes_instead_of_rerunning(sweep_result):
    cfg, sweep, first = sweep_result
    runs = cfg_storage(cfg) / "s1" / "train-runs"
    before = sorted(runs.rglob("*"))
    again = run_sweep(cfg, sweep, "s1")
    assert again["trials"] == first["trials"]
    assert again["table"]["trial"].tolist() == first["table"]["trial"].tolist()
    assert again["table"]["status"].tolist() == first["table"]["status"].tolist()
    # No trial ran again, the failed ones included: a rerun would add checkpoints.
    assert sorted(runs.rglob("*")) == before


@pytest.mark.s3
def test_an_interrupted_sweep_resumes_where_it_stopped(ray_session, shard_dir, tmp_path, s3_bucket):
    """The sweep's driver is killed (SIGKILL) after its first trial has finished; running
    the same sweep name again restores it: the finished trial is not run again, the others
    complete. On the S3 API (the sweep, its trials and their Train runs all in the bucket;
    a local folder goes through the same storage layer, and a finished sweep resumes from
    one above)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    store = f"{s3_bucket}/sweeps/{tmp_path.name}"
    cfg = base(shard_dir, store)
    spec = write_sweep(
        tmp_path / "two.yaml",
        num_samples=1,
        scheduler="fifo",
        max_concurrent_trials=1,
        space={"loss.w_os": {"type": "grid", "values": [0.5, 2.0]}},
    )
    overrides = [
        f"--set={s}"
        for s in (
            *TINY_TRAIN,
            "run.num_workers=1",
            "optim.epochs=2",
            "run.max_failures=0",
            f"run.storage_path={store}",
        )
    ]
    # The driver joins the shared local Ray, as `ray job submit` would join a cluster.
    env = dict(
        os.environ,
        RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
        RAY_AUTH_MODE="token",
    )
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmdls_dist.cli",
            "tune",
            "--sweep",
            str(spec),
            "--name",
            "cut",
            "--shards",
            str(shard_dir),
            *overrides,
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    root = storage.join(store, "cut")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not finished_trials(root):
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done_before = finished_trials(root)
    assert len(done_before) == 1

    sweep = load_sweep(spec, cfg)
    summary = run_sweep(cfg, sweep, "cut")
    table = summary["table"]
    assert len(table) == 2 and (table.status == "ok").all() and (table.epochs == 2).all()
    # The trial finished before the interruption kept its single run of 2 epochs.
    progress = storage.read_text(storage.join(root, done_before[0], "progress.csv"))
    assert len(progress.strip().splitlines()) == 3  # header + its 2 epochs


def finished_trials(root: str) -> list[str]:
    """Trial folders (local or in a bucket) whose progress.csv holds both epochs."""
    out = []
    for trial in storage.list_names(root, dirs=True):
        if not trial.startswith("train_trial_"):
            continue
        progress = storage.join(root, trial, "progress.csv")
        if storage.exists(progress) and len(storage.read_text(progress).strip().splitlines()) >= 3:
            out.append(trial)
    return sorted(out)


def test_a_sweep_and_an_evaluation_side_by_side_both_finish(sweep_result, shard_dir, tmp_path):
    """`mmdls tune` and, while its trials run, `mmdls evaluate` in another process: two
    local Rays on one machine (three with this test session's). Neither may break the
    other: the sweep's trials, each stopped by ASHA mid-run, still release their workers
    (one trial fits at a time, so a placement group left behind would stop the next from
    starting; the time budget turns that hang into a failure), and the evaluation
    finishes."""
    import os
    import subprocess
    import sys
    import time

    cfg, _, summary = sweep_result
    from mmdls_dist.train import checkpoint

    runs = sorted((cfg_storage(cfg) / "s1" / "train-runs").iterdir())
    trained = next(c for c in map(checkpoint.newest_complete, map(str, runs)) if c)
    # Two trials that ASHA stops after their first epoch (max_t=1) in the middle of a
    # 2-epoch Train run; the time budget turns a hang into a failure.
    spec = write_sweep(
        tmp_path / "side.yaml", num_samples=1, max_t=1, grace_period=1, time_budget_s=300,
        space={"loss.w_os": {"type": "grid", "values": [0.5, 2.0]}},
    )  # fmt: skip
    overrides = [*TINY_TRAIN, "run.num_workers=1", "optim.epochs=2", "run.max_failures=0",
                 f"run.storage_path={tmp_path / 'runs'}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API"))}
    cli = [sys.executable, "-m", "mmdls_dist.cli"]
    sweep = subprocess.Popen(
        [*cli, "tune", "--sweep", str(spec), "--name", "side", "--shards", str(shard_dir)]
        + [arg for item in overrides for arg in ("--set", item)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        trials = tmp_path / "runs" / "side" / "train-runs"
        deadline = time.monotonic() + 180
        while not (trials.exists() and any(trials.iterdir())) and sweep.poll() is None:
            assert time.monotonic() < deadline, "the sweep's first trial never started"
            time.sleep(1)
        evaluation = subprocess.run(
            [*cli, "evaluate", str(trained), "--shards", str(shard_dir), "--splits", "val",
             "--bootstrap", "0", "--parts", "1", "--out", str(tmp_path / "ev")],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert evaluation.returncode == 0, evaluation.stderr[-2000:]
        assert (tmp_path / "ev" / "report.html").exists()
        _, err = sweep.communicate(timeout=400)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, err[-3000:]
    table = pd.read_csv(tmp_path / "runs" / "side" / "results.csv")
    assert len(table) == 2 and (table.status == "ok").all() and (table.epochs == 1).all()
