"""Calibration: temperature scaling against a brute-force NLL minimum and scikit-learn's
log loss, survival calibration against lifelines' Kaplan-Meier, and the label-free
prior-shift adaptation against simulated case-mix shifts of known size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from scipy.special import expit, softmax
from sklearn.metrics import log_loss, roc_auc_score

from mmdls_dist.metrics.calibration import (
    adapt_binary_prior,
    adapt_prior,
    binary_logits,
    class_logits,
    fit_temperature,
    prior_shift_p,
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


def _shifted(n: int, prior: float, source: float, seed: int = 0):
    """Patients with x | y ~ N(+-1, 1) drawn at LUSC fraction `prior`, and the posteriors
    of a model calibrated where the fraction was `source`: sigmoid(2x + logit(source))."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prior).astype(int)
    x = rng.normal(2 * y - 1, 1.0)
    logit = lambda q: np.log(q / (1 - q))  # noqa: E731
    return expit(2 * x + logit(source)), expit(2 * x + logit(prior)), y


def test_prior_adaptation_recovers_a_shifted_case_mix_without_labels():
    prob, truth, y = _shifted(20000, prior=0.3, source=0.55)
    prior, adapted, p = adapt_binary_prior(prob, 0.55)
    assert p < 1e-6
    assert prior == pytest.approx(0.3, abs=0.015)  # y.mean() is 0.3 +- 0.003 here
    assert np.abs(adapted - truth).max() < 0.04  # the posteriors at the true fraction
    assert np.mean(adapted) == pytest.approx(prior, abs=1e-6)  # EM's fixed point
    assert roc_auc_score(y, adapted) == pytest.approx(roc_auc_score(y, prob), abs=1e-12)
    assert reliability(adapted, y)["ece"] < 0.3 * reliability(prob, y)["ece"]


def test_prior_adaptation_leaves_an_unshifted_case_mix_alone():
    prob, _, y = _shifted(20000, prior=0.55, source=0.55, seed=1)
    prior, adapted, _ = adapt_binary_prior(prob, 0.55)
    assert prior == pytest.approx(0.55, abs=0.015)
    assert np.abs(adapted - prob).max() < 0.05


def test_multiclass_prior_adaptation_recovers_every_class_fraction():
    rng = np.random.default_rng(2)
    means = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    source, target = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    y = rng.choice(3, size=30000, p=target)
    x = means[y] + rng.normal(size=(len(y), 2))
    loglik = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)
    probs = softmax(loglik + np.log(source), axis=1)
    prior, adapted = adapt_prior(probs, source)
    assert prior == pytest.approx(target, abs=0.02)
    assert adapted.sum(axis=1) == pytest.approx(np.ones(len(y)))
    assert np.abs(adapted - softmax(loglik + np.log(target), axis=1)).max() < 0.06


def test_the_prior_shift_test_holds_its_level_and_sees_a_real_shift():
    """Under no shift the test rejects at about its level (5 % of 400 cohorts of 300); a
    shift of 0.55 -> 0.45 on 1,000 patients is seen nearly always."""
    rejected = [
        adapt_binary_prior(_shifted(300, 0.55, 0.55, seed=s)[0], 0.55)[2] < 0.05 for s in range(400)
    ]
    assert 0.02 <= np.mean(rejected) <= 0.09
    seen = [
        adapt_binary_prior(_shifted(1000, 0.45, 0.55, seed=s)[0], 0.55)[2] < 0.05 for s in range(50)
    ]
    assert np.mean(seen) >= 0.9
    prob = _shifted(500, 0.55, 0.55)[0]
    assert prior_shift_p(np.stack([1 - prob, prob], 1), [0.45, 0.55], [0.45, 0.55]) == 1.0
