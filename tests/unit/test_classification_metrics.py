"""Histology and stage metrics against scikit-learn and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from mmdls_dist.metrics import classification as cm
from mmdls_dist.metrics.classification import binary_auc, macro_ovr_auc


def test_ece_and_reliability_by_hand():
    prob = np.array([0.05, 0.15, 0.12, 0.55, 0.58, 0.95, 1.0])
    label = np.array([0, 1, 0, 1, 0, 1, 1])
    out = cm.reliability(prob, label, n_bins=10)
    # bins: [0,.1): {.05} -> 0; [.1,.2): {.15,.12} -> 1/2; [.5,.6): {.55,.58} -> 1/2;
    # [.9,1]: {.95, 1.0} -> 1 (1.0 falls in the last, closed bin)
    assert out["count"] == [1, 2, 0, 0, 0, 2, 0, 0, 0, 2]
    assert out["mean_prob"][1] == pytest.approx(0.135) and out["frac_pos"][1] == 0.5
    assert out["mean_prob"][2] is None
    expected = (1 * 0.05 + 2 * abs(0.135 - 0.5) + 2 * abs(0.565 - 0.5) + 2 * abs(0.975 - 1)) / 7
    assert out["ece"] == pytest.approx(expected)


def test_binary_metrics_match_sklearn_and_skip_unknown_labels():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, 400)
    prob = np.clip(0.3 * label + rng.random(400) * 0.7, 0, 1)
    prob[:20] = 0.5  # ties
    label_with_unknown = label.copy()
    label_with_unknown[-30:] = -1
    out = cm.binary_metrics(prob, label_with_unknown, threshold=0.5)
    keep = slice(0, 370)
    assert out["n"] == 370
    assert out["auc"] == pytest.approx(roc_auc_score(label[keep], prob[keep]), abs=1e-12)
    assert out["auc"] == pytest.approx(binary_auc(prob, label_with_unknown), abs=1e-12)
    assert out["ap"] == pytest.approx(average_precision_score(label[keep], prob[keep]))
    assert out["brier"] == pytest.approx(brier_score_loss(label[keep], prob[keep]))
    # calibration in the large over the known labels only
    assert out["mean_prob"] == pytest.approx(prob[keep].mean())
    assert out["prevalence"] == pytest.approx(label[keep].mean())


def test_threshold_statistics_by_hand():
    prob = np.array([0.9, 0.8, 0.4, 0.7, 0.2, 0.1])
    label = np.array([1, 1, 1, 0, 0, 0])
    out = cm.threshold_stats(prob, label, 0.5)  # tp 2, fn 1, fp 1, tn 2
    assert (out["tp"], out["fn"], out["fp"], out["tn"]) == (2, 1, 1, 2)
    assert out["sensitivity"] == pytest.approx(2 / 3)
    assert out["specificity"] == pytest.approx(2 / 3)
    assert out["ppv"] == pytest.approx(2 / 3) and out["npv"] == pytest.approx(2 / 3)


def test_youden_threshold_separates_a_separable_set():
    prob = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    label = np.array([0, 0, 0, 1, 1, 1])
    t = cm.youden_threshold(prob, label)
    assert 0.3 < t <= 0.6
    stats = cm.threshold_stats(prob, label, t)
    assert stats["sensitivity"] == 1.0 and stats["specificity"] == 1.0
    assert cm.youden_threshold(prob, np.zeros(6, int)) == 0.5  # undefined -> 0.5


def test_multiclass_per_stage_and_macro_auc_match_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = cm.multiclass_metrics(probs, labels, ("I-II", "III", "IV"))
    per = [roc_auc_score(labels == k, probs[:, k]) for k in range(3)]
    assert [out["per_class"][n]["auc"] for n in ("I-II", "III", "IV")] == pytest.approx(per)
    assert out["macro_auc"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )
    confusion = np.array(out["confusion"])
    assert confusion.sum() == 300 and np.trace(confusion) == int(np.sum(probs.argmax(1) == labels))
    assert confusion[1].sum() == np.sum(labels == 1)  # rows are the truth


def test_binary_auc_skips_unknown_labels_and_is_nan_with_one_class():
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
