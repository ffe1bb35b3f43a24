"""Calibration: temperature scaling against a brute-force NLL minimum and scikit-learn's
log loss, and survival calibration against lifelines' Kaplan-Meier."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from scipy.special import expit, softmax
from sklearn.metrics import log_loss

from mmdls_dist.metrics.calibration import (
    binary_logits,
    class_logits,
    fit_temperature,
    scaled_binary,
    scaled_multiclass,
    survival_calibration,
)
from mmdls_dist.metrics.classification import reliability


def _overconfident(n: int = 2000, seed: int = 0, true_t: float = 2.5):
    """Labels drawn from sigmoid(z), the model reporting sigmoid(true_t * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < expit(z)).astype(int)
    return expit(true_t * z), y


def test_binary_temperature_is_the_nll_minimum_and_recovers_the_overconfidence():
    prob, y = _overconfident()
    t = fit_temperature(binary_logits(prob), y)
    assert t == pytest.approx(2.5, rel=0.1)
    grid = np.exp(np.linspace(-1, 2, 3001))
    losses = [log_loss(y, expit(binary_logits(prob) / g)) for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(losses))], rel=2e-3)
    before = reliability(prob, y)["ece"]
    after = reliability(scaled_binary(prob, t), y)["ece"]
    assert after < before / 2


def test_multiclass_temperature_and_scaling():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.2, (3000, 3))
    y = np.array([rng.choice(3, p=p) for p in softmax(z, axis=1)])
    probs = softmax(0.5 * z, axis=1)  # under-confident: T < 1
    t = fit_temperature(class_logits(probs), y)
    assert t == pytest.approx(0.5, rel=0.1)
    scaled = scaled_multiclass(probs, t)
    np.testing.assert_allclose(scaled.sum(1), 1.0, atol=1e-9)
    assert (scaled.argmax(1) == probs.argmax(1)).all()
    assert log_loss(y, scaled) < log_loss(y, probs)


def test_unknown_labels_are_left_out_and_one_class_means_no_change():
    prob, y = _overconfident(500)
    y_unknown = y.copy()
    y_unknown[:100] = -1
    assert fit_temperature(binary_logits(prob), y_unknown) == pytest.approx(
        fit_temperature(binary_logits(prob[100:]), y[100:]), rel=1e-6
    )
    assert fit_temperature(binary_logits(prob), np.ones_like(y)) == 1.0


def test_survival_calibration_is_kaplan_meier_per_decile():
    rng = np.random.default_rng(2)
    n = 3000
    risk = rng.normal(0, 1, n)
    t_event = rng.exponential(30 * np.exp(-risk))
    censor = rng.uniform(5, 60, n)
    time, event = np.minimum(t_event, censor), t_event <= censor
    horizons = (12.0, 24.0)
    true_surv = np.exp(-np.array(horizons)[None] / (30 * np.exp(-risk))[:, None])
    out = survival_calibration(true_surv, time, event, horizons)
    for k, h in enumerate(horizons):
        block = out[f"{h:g}"]
        assert len(block["groups"]) == 10 and sum(g["n"] for g in block["groups"]) == n
        order = np.argsort(true_surv[:, k], kind="stable")
        first = np.array_split(order, 10)[0]
        km = KaplanMeierFitter().fit(time[first], event[first]).predict(h)
        assert block["groups"][0]["observed"] == pytest.approx(float(km), abs=1e-12)
        assert block["ici"] < 0.04  # the true model is calibrated (KM noise only)
    # A model that predicts everyone survives is not.
    assert (
        survival_calibration(np.full_like(true_surv, 0.99), time, event, horizons)["24"]["ici"]
        > 0.3
    )


def test_reference_calibrates_a_frame_and_keeps_the_networks_probabilities():
    from mmdls_dist.evaluation.reference import Reference

    prob, y = _overconfident(50)
    stages = softmax(np.random.default_rng(3).normal(0, 2, (50, 3)), axis=1)
    frame = pd.DataFrame(
        {
            "histology_prob": prob,
            **{f"stage_prob_{s}": stages[:, k] for k, s in enumerate(("I-II", "III", "IV"))},
            "dfs_risk": np.linspace(-1, 1, 50),
            "os_risk": np.linspace(2, -2, 50),
        }
    )
    slope = {"dfs": 0.5, "os": 1.5}
    ref = Reference(0.5, {}, {}, {}, (12.0,), [], {"histology": 2.0, "stage": 0.5}, "", slope)
    out = ref.calibrate(frame)
    np.testing.assert_allclose(out["dfs_risk"], 0.5 * frame["dfs_risk"])
    np.testing.assert_allclose(out["os_risk"], 1.5 * frame["os_risk"])
    np.testing.assert_allclose(out["os_risk_uncalibrated"], frame["os_risk"])
    np.testing.assert_allclose(out["histology_prob"], scaled_binary(prob, 2.0))
    np.testing.assert_allclose(out["histology_prob_uncalibrated"], prob)
    np.testing.assert_allclose(out["stage_prob_III"], scaled_multiclass(stages, 0.5)[:, 1])
    assert ref.calibrate(out)["histology_prob"].equals(out["histology_prob"])  # idempotent
    again = Reference.from_dict(ref.to_dict())
    assert again.temperature == {"histology": 2.0, "stage": 0.5}
    assert again.slope == slope
