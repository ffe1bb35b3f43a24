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
