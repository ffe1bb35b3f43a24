"""Dice and the validation summary a training run reports (train/validation.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmdls_dist.metrics.segmentation import dice_per_patient, mean_dice
from mmdls_dist.train.validation import composite, summarize


def test_dice_excludes_empty_pairs():
    pred = torch.zeros(3, 2, 2, 2, dtype=torch.bool)
    target = torch.zeros(3, 2, 2, 2, dtype=torch.uint8)
    pred[0, 0, 0, :] = True
    target[0, 0, 0, 0] = 1  # patient 0: 2 predicted, 1 true, 1 overlap -> 2/3
    pred[1, 1, 1, 1] = True  # patient 1: prediction on a padded slice only -> ignored, empty
    slice_mask = torch.tensor([[True, True], [True, False], [True, True]])
    dice = dice_per_patient(pred, target, slice_mask)
    assert dice[0].item() == pytest.approx(2 / 3)
    assert torch.isnan(dice[1]) and torch.isnan(dice[2])
    assert mean_dice(dice.numpy()) == (pytest.approx(2 / 3), 1)
    assert np.isnan(mean_dice(dice[1:].numpy())[0])


def test_summarize_gathers_all_metrics():
    records = [
        {
            "histology_prob": p,
            "histology": h,
            "stage_probs": sp,
            "stage": s,
            "dfs_risk": r,
            "dfs_time": t,
            "dfs_event": e,
            "dfs_known": True,
            "os_risk": r,
            "os_time": t,
            "os_event": e,
            "os_known": k,
            "dice_lung": 0.9,
            "dice_lesion": float("nan") if i == 0 else 0.5,
        }
        for i, (p, h, sp, s, r, t, e, k) in enumerate(
            [
                (0.9, 1, [0.7, 0.2, 0.1], 0, 2.0, 3.0, True, True),
                (0.2, 0, [0.1, 0.8, 0.1], 1, 1.0, 5.0, True, True),
                (0.6, 1, [0.2, 0.2, 0.6], 2, 0.5, 9.0, False, False),
                (0.4, 0, [0.3, 0.3, 0.4], 2, -1.0, 12.0, True, True),
            ]
        )
    ]
    out = summarize(records, prefix="val/")
    assert out["val/auc_histology"] == 1.0 and out["val/n_patients"] == 4
    assert out["val/cindex_dfs"] == 1.0 and out["val/cindex_os"] == 1.0
    assert out["val/dice_lesion"] == pytest.approx(0.5) and out["val/dice_lung"] == 0.9
    assert 0.0 <= out["val/auc_stage"] <= 1.0


def test_composite_is_the_mean_of_the_defined_task_metrics():
    m = {"auc_histology": 0.9, "auc_stage": 0.7, "cindex_dfs": 0.6, "cindex_os": 0.8}
    assert composite(m) == pytest.approx(0.75)
    assert composite(m | {"cindex_dfs": float("nan")}) == pytest.approx(0.8)
    assert np.isnan(composite({}))


def test_validation_cox_loss_is_the_partial_likelihood_per_event():
    rng = np.random.default_rng(3)
    n = 30
    risk, time = rng.normal(size=n), rng.permutation(np.arange(1, n + 1)).astype(float)
    event, known = rng.random(n) < 0.6, rng.random(n) < 0.9
    records = [
        {
            "histology_prob": 0.5,
            "histology": i % 2,
            "stage_probs": [0.3, 0.3, 0.4],
            "stage": i % 3,
            **{
                f"{e}_{k}": v
                for e in ("dfs", "os")
                for k, v in zip(
                    ("risk", "time", "event", "known"),
                    (risk[i], time[i], bool(event[i]), bool(known[i])),
                    strict=True,
                )
            },
        }
        for i in range(n)
    ]
    r, t, d = risk[known], time[known], event[known]  # no ties: Efron = Breslow = this
    terms = [r[i] - np.log(np.exp(r[t >= t[i]]).sum()) for i in np.flatnonzero(d)]
    expected = -np.sum(terms) / d.sum()
    out = summarize(records, prefix="val/")
    assert out["val/cox_nll_dfs"] == pytest.approx(expected, rel=1e-6)
    assert out["val/cox_nll"] == pytest.approx(2 * expected, rel=1e-6)
    no_events = [rec | {"dfs_event": False} for rec in records]
    assert np.isnan(summarize(no_events)["cox_nll_dfs"])
