"""Checkpoint files, compatibility checks, RNG state and the schedules the loop uses."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmdls_dist.config import OptimConfig, load_config, to_dict
from mmdls_dist.train import checkpoint
from mmdls_dist.train.loop import gt_mask_weight, lr_lambda


def identity(*overrides: str, data: str = "a" * 64) -> dict:
    return {"config": to_dict(load_config("debug", list(overrides))), "manifest_hash": data}


def test_resumable_changes_are_allowed_and_others_named():
    saved = identity()
    checkpoint.check_compatible(
        saved, identity("optim.epochs=9", "run.num_workers=4", "data.num_workers=3"), "run x"
    )
    with pytest.raises(checkpoint.IncompatibleCheckpointError) as info:
        checkpoint.check_compatible(saved, identity("model.dropout=0.3", data="b" * 64), "run x")
    text = str(info.value)
    assert "cannot resume run x" in text
    assert "model.dropout: 0.1 in the run, 0.3 now" in text
    assert "manifest hash aaaaaaaaaaaa in the run, bbbbbbbbbbbb now" in text


def test_save_and_load_round_trip_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    progress = checkpoint.Progress(epoch=3, global_step=30, best=0.7, bad_epochs=1)
    checkpoint.save(
        tmp_path,
        modules={"module": model, "optimizer": optimizer, "scaler": None},
        progress=progress,
        identity=identity(),
        metrics={"val/cindex_os": 0.7},
    )
    state, ident = checkpoint.load(tmp_path)
    assert ident == identity()
    assert checkpoint.Progress(**state["progress"]) == progress
    assert torch.equal(state["module"]["weight"], model.weight.detach())
    assert "scaler" not in state
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(state["optimizer"])
    assert fresh.state_dict()["state"][0]["step"] == 1


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saved = checkpoint.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(saved, "/dev/null")  # plain tensors and Python values only
    checkpoint.set_rng_state(saved)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_warmup_then_cosine():
    cfg = OptimConfig(epochs=10, warmup_epochs=2, min_lr_ratio=0.1)
    f = lr_lambda(cfg, steps_per_epoch=5)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear over 10 steps
    assert f(10) == pytest.approx(1.0)
    assert f(30) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)))
    assert f(49) == pytest.approx(0.1, abs=2e-3) and f(200) == pytest.approx(0.1)


def test_ground_truth_mask_warmup_decays_to_zero():
    cfg = OptimConfig(gt_mask_warmup_epochs=2)
    assert [gt_mask_weight(e, cfg) for e in range(4)] == [1.0, 0.5, 0.0, 0.0]
    assert gt_mask_weight(0, OptimConfig(gt_mask_warmup_epochs=0)) == 0.0


class _Payload:
    """What a crafted checkpoint smuggles in: unpickling it would run a command."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_a_checkpoint_with_code_is_refused_in_one_line(tmp_path, capsys, caplog):
    from mmdls_dist.cli import main

    folder = tmp_path / "crafted"
    folder.mkdir()
    torch.save({"model": _Payload()}, folder / checkpoint.STATE)
    (folder / checkpoint.CONFIG).write_text("{}")
    with pytest.raises(checkpoint.RefusedCheckpointError) as info:
        checkpoint.load(folder)
    message = str(info.value)
    assert str(folder / checkpoint.STATE) in message and "pickled Python objects" in message
    assert "refused" in message and "weights_only=False" not in message
    assert main(["predict", str(folder), "--shards", str(tmp_path), "--executor", "serial"]) == 2
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.getMessage() == message and "\n" not in message
    assert "pwned" not in capsys.readouterr().out


def test_run_summary_shows_the_deployed_checkpoint_beside_the_last_epoch(tmp_path):
    import json
    from types import SimpleNamespace

    from mmdls_dist.train.launch import summary_text

    cfg = load_config(
        "debug", [f"run.storage_path={tmp_path}", "run.name=r", "run.metric=val/cindex_os"]
    )
    last = {"epoch": 5, "global_step": 60, "val/cindex_os": 0.61, "val/cindex_dfs": 0.58}
    best = {"epoch": 2, "global_step": 30, "val/cindex_os": 0.66, "val/cindex_dfs": 0.55}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / checkpoint.BEST).write_text(
        json.dumps({"checkpoint": "c", "metric": "val/cindex_os", "metrics": best})
    )
    text = summary_text(cfg, SimpleNamespace(metrics=last), {"cindex_os": 0.75})
    assert "6 epochs, 60 optimizer steps; deployed: the checkpoint of epoch 3" in text
    row = next(line.split() for line in text.splitlines() if line.strip().startswith("cindex_os"))
    assert row[1:] == ["0.660", "0.610", "0.750"]  # deployed, last, oracle
    (tmp_path / "r" / checkpoint.BEST).write_text(
        json.dumps({"checkpoint": "c", "metric": "epoch", "metrics": last})
    )
    row = next(
        line.split()
        for line in summary_text(cfg, SimpleNamespace(metrics=last), {}).splitlines()
        if line.strip().startswith("cindex_dfs")
    )
    assert row[1:] == ["0.580"]  # the last epoch is the deployed one: one column
