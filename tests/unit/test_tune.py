"""Sweep files, trial configs, concurrency and the best-config pick (no Ray session)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from mmdls_dist.config import load_config
from mmdls_dist.train.tune import (
    SWEEPS_DIR,
    Sweep,
    best_config,
    concurrent_trials,
    load_sweep,
    search_space,
    sweep_path,
    trial_config,
    trial_count,
    trial_progress,
)


@pytest.mark.parametrize("preset", sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
@pytest.mark.parametrize("config", ["debug", "default", "paper"])
def test_every_shipped_sweep_validates_against_every_preset(preset, config):
    sweep = load_sweep(sweep_path(preset), load_config(config))
    space = search_space(sweep)
    assert set(space) == set(sweep.space) and sweep.metric == "val/composite"


def test_the_sweep_presets_are_shipped():
    assert {"debug", "default"} <= {p.stem for p in SWEEPS_DIR.glob("*.yaml")}


def test_sweep_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"space": {"optim.lrr": {"type": "uniform", "low": 0, "high": 1}}})
    )
    with pytest.raises(ValueError, match="optim.lrr"):
        load_sweep(bad, load_config("debug"))
    bad.write_text(
        yaml.safe_dump({"space": {"model.dropout": {"type": "choice", "values": ["a lot"]}}})
    )
    with pytest.raises(ValueError, match="model.dropout"):
        load_sweep(bad, load_config("debug"))
    with pytest.raises(ValueError, match="type in"):
        Sweep(space={"optim.lr": {"type": "normal"}})
    with pytest.raises(ValueError, match="unknown config key"):
        bad.write_text(yaml.safe_dump({"num_sample": 3}))
        load_sweep(bad, load_config("debug"))


def test_concurrency_follows_the_limiting_resource():
    sweep = Sweep()
    gpu = load_config("paper", ["run.num_workers=4", "run.use_gpu=true"])
    assert concurrent_trials(gpu, {"CPU": 128, "GPU": 8}, sweep) == 2
    assert concurrent_trials(gpu, {"CPU": 128, "GPU": 3}, sweep) == 1  # never 0
    cpu = load_config("debug", ["run.num_workers=2", "run.cpus_per_worker=1"])
    assert concurrent_trials(cpu, {"CPU": 2}, sweep) == 1
    assert concurrent_trials(cpu, {"CPU": 16}, sweep) == 8
    assert concurrent_trials(cpu, {"CPU": 16}, Sweep(max_concurrent_trials=3)) == 3


def test_trial_config_applies_the_sample_and_names_the_run_after_the_trial():
    base = load_config("debug", ["run.storage_path=/runs"])
    from mmdls_dist.config import to_dict

    cfg = trial_config(
        to_dict(base), {"optim.lr": 0.002, "model.widths": [4, 8, 8, 16]}, "sw", "trial_00003"
    )
    assert cfg.optim.lr == 0.002 and cfg.model.widths == (4, 8, 8, 16)
    assert cfg.run.name == "trial_00003" and cfg.run.storage_path == "/runs/sw/train-runs"
    with pytest.raises(ValueError, match="fusion_heads"):
        trial_config(to_dict(base), {"model.fusion_heads": 3}, "sw", "t")  # 32 % 3 != 0


def test_best_config_is_the_best_finished_trial():
    base = load_config("debug")
    sweep = Sweep(mode="max")
    table = pd.DataFrame(
        {
            "trial": ["a", "b", "c"],
            "status": ["ok", "error", "ok"],
            "config/optim.lr": [0.001, 0.01, 0.002],
            "best val/composite": [0.61, 0.99, 0.66],
        }
    )
    best = best_config(base, table, sweep, "sw")
    assert best.optim.lr == 0.002 and best.run.name == "sw-best"  # the error row is ignored
    assert best_config(base, table.assign(status="error"), sweep, "sw") is None


def test_the_progress_bar_counts_trials_and_keeps_the_best():
    from ray import cloudpickle  # what Tune pickles its callbacks with

    space = {
        "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "model.dropout": {"type": "grid", "values": [0.0, 0.1, 0.2]},
        "model.patient_fusion": {"type": "grid", "values": ["attention", "concat"]},
    }
    assert trial_count(Sweep(space=space, num_samples=2)) == 12  # 2 x 3 x 2
    assert trial_count(Sweep(space={"optim.lr": space["optim.lr"]}, num_samples=4)) == 4
    bar = trial_progress(3, "val/composite", "max")
    bar = cloudpickle.loads(
        cloudpickle.dumps(bar)
    )  # Tune pickles its callbacks with the sweep state
    for trial, value in (("a", 0.61), ("b", float("nan")), ("c", 0.58)):
        bar.on_trial_start(0, [], trial)
        bar.on_trial_result(0, [], trial, {"val/composite": value})
    assert bar.best == 0.61 and len(bar.running) == 3
    bar.on_trial_complete(0, [], "a")
    bar.on_trial_error(0, [], "b")
    assert bar.bar.n == 2 and bar.running == {"c"}
    again = cloudpickle.loads(
        cloudpickle.dumps(bar)
    )  # e.g. a resumed sweep: the count carries over
    assert again.bar.n == 2 and again.best == 0.61
    bar.on_experiment_end([])
    again.on_experiment_end([])
