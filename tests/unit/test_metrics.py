"""Validation metrics against scikit-learn / scikit-survival / lifelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored

from mmdls_dist.metrics import (
    binary_auc,
    dice_per_patient,
    harrell_cindex,
    macro_ovr_auc,
    summarize,
)


def test_binary_auc_matches_sklearn_with_ties_and_unknowns():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(200), 1)  # many ties
    labels = rng.integers(-1, 2, 200)
    keep = labels >= 0
    assert binary_auc(scores, labels) == pytest.approx(
        roc_auc_score(labels[keep], scores[keep]), abs=1e-12
    )
    assert np.isnan(binary_auc(scores, np.zeros(200, dtype=int)))
    # Unbounded scores (risks, logits, raw intensities) keep their order exactly.
    assert binary_auc(scores * 1000 + 50, labels) == pytest.approx(
        roc_auc_score(labels[keep], scores[keep]), abs=1e-12
    )


def test_macro_auc_matches_sklearn():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), 150)
    labels = rng.integers(0, 3, 150)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert macro_ovr_auc(probs, labels) == pytest.approx(expected, abs=1e-6)
    assert np.isnan(macro_ovr_auc(probs, np.where(labels == 2, 0, labels)))  # a class absent


def test_cindex_matches_sksurv_and_lifelines_with_ties():
    rng = np.random.default_rng(2)
    time = rng.integers(1, 30, 300).astype(float)  # tied times
    event = rng.random(300) < 0.6
    risk = np.round(rng.normal(size=300), 1)  # tied risks
    expected = concordance_index_censored(event, time, risk)[0]
    assert harrell_cindex(risk, time, event) == pytest.approx(expected, abs=1e-6)
    assert harrell_cindex(risk, time, event) == pytest.approx(
        concordance_index(time, -risk, event), abs=1e-6
    )
    assert np.isnan(harrell_cindex(risk, time, np.zeros(300, dtype=bool)))


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
    from mmdls_dist.metrics import composite

    m = {"auc_histology": 0.9, "auc_stage": 0.7, "cindex_dfs": 0.6, "cindex_os": 0.8}
    assert composite(m) == pytest.approx(0.75)
    assert composite(m | {"cindex_dfs": float("nan")}) == pytest.approx(0.8)
    assert np.isnan(composite({}))
