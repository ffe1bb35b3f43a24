"""Survival metrics against scikit-survival / lifelines / torchsurv on random and tied data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index as lifelines_cindex
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.metrics import (
    brier_score,
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.nonparametric import CensoringDistributionEstimator
from sksurv.util import Surv
from torchsurv.metrics.cindex import ConcordanceIndex

from mmdls_dist.metrics import survival as sm

HORIZONS = np.array([12.0, 24.0, 36.0])


def cohort(rng, n, ties: bool):
    """(risk, time, event): times in months, with tied times and risks when `ties`."""
    risk = rng.normal(size=n)
    time = rng.exponential(24.0 * np.exp(-0.7 * risk)) + 0.5
    event = rng.random(n) < 0.65
    if ties:
        time = np.round(time) + 1.0
        risk = np.round(risk, 1)
    return risk, time, event


@pytest.fixture(params=[False, True], ids=["distinct", "tied"])
def data(request):
    rng = np.random.default_rng(11 + request.param)
    train = cohort(rng, 500, request.param)
    test = cohort(rng, 300, request.param)
    # scikit-survival refuses test times beyond the training follow-up.
    keep = test[1] < train[1].max()
    return train, tuple(a[keep] for a in test)


def surv(time, event):
    return Surv.from_arrays(event.astype(bool), time)


def test_harrell_matches_sksurv_torchsurv_and_lifelines(data):
    _, (risk, time, event) = data
    ours = sm.harrell_c(risk, time, event)
    assert ours == pytest.approx(concordance_index_censored(event, time, risk)[0], abs=1e-9)
    if len(np.unique(time)) == len(time):  # definitions coincide without tied times
        assert ours == pytest.approx(lifelines_cindex(time, -risk, event), abs=1e-9)
        torchsurv = ConcordanceIndex()(
            torch.tensor(risk), torch.tensor(event), torch.tensor(time)
        ).item()
        assert ours == pytest.approx(torchsurv, abs=1e-6)


def test_harrell_on_a_hand_example():
    # Comparable pairs (event first): (0,1) (0,2) (0,3) (2,3). Concordant: (0,1);
    # discordant: (0,2) (0,3); (2,3) tied in risk = 1/2 -> (1 + 0.5) / 4.
    risk = np.array([2.0, 1.0, 3.0, 3.0])
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([True, False, True, False])
    assert sm.harrell_c(risk, time, event) == pytest.approx(1.5 / 4)


def test_censoring_km_matches_sksurv(data):
    (_, t_train, e_train), (_, t_test, _) = data
    ours = sm.CensoringKM.fit(t_train, e_train)
    ref = CensoringDistributionEstimator().fit(surv(t_train, e_train))
    np.testing.assert_allclose(ours(t_test), ref.predict_proba(t_test), atol=1e-12)


@pytest.mark.parametrize("tau", [None, 30.0])
def test_uno_matches_sksurv(data, tau):
    (_, t_train, e_train), (risk, time, event) = data
    km = sm.CensoringKM.fit(t_train, e_train)
    expected = concordance_index_ipcw(surv(t_train, e_train), surv(time, event), risk, tau=tau)[0]
    assert sm.uno_c(risk, time, event, km, tau=tau) == pytest.approx(expected, abs=1e-9)


def test_time_dependent_auc_matches_sksurv(data):
    (_, t_train, e_train), (risk, time, event) = data
    km = sm.CensoringKM.fit(t_train, e_train)
    expected, _ = cumulative_dynamic_auc(surv(t_train, e_train), surv(time, event), risk, HORIZONS)
    np.testing.assert_allclose(
        sm.cumulative_dynamic_auc(risk, time, event, HORIZONS, km), expected, atol=1e-9
    )


def test_brier_and_integrated_brier_match_sksurv(data):
    (r_train, t_train, e_train), (risk, time, event) = data
    km = sm.CensoringKM.fit(t_train, e_train)
    baseline = sm.BreslowBaseline.fit(r_train, t_train, e_train)
    prob = baseline.survival_at(risk, HORIZONS)
    y_train, y_test = surv(t_train, e_train), surv(time, event)
    _, expected = brier_score(y_train, y_test, prob, HORIZONS)
    np.testing.assert_allclose(
        sm.brier_scores(prob, time, event, HORIZONS, km), expected, atol=1e-9
    )
    grid = np.arange(np.ceil(time.min()), 37.0)  # scikit-survival: within follow-up
    dense = baseline.survival_at(risk, grid)
    assert sm.integrated_brier(dense, time, event, grid, km) == pytest.approx(
        integrated_brier_score(y_train, y_test, dense, grid), abs=1e-9
    )


def test_breslow_baseline_matches_sksurv(data):
    (risk, time, event), _ = data
    ours = sm.BreslowBaseline.fit(risk, time, event)
    ref = BreslowEstimator().fit(risk, event, time)
    # From the first event on: before it S0 = 1 (scikit-survival's step function returns its
    # first value there instead).
    grid = np.linspace(time[event].min(), time.max() - 1e-3, 50)  # float32 time resolution
    expected = np.stack([fn(grid) for fn in ref.get_survival_function(risk[:5])])
    np.testing.assert_allclose(ours.survival_at(risk[:5], grid), expected, atol=1e-6)
    # Round trip through the JSON form used by reference-<label>.json.
    again = sm.BreslowBaseline.from_dict(ours.to_dict())
    np.testing.assert_allclose(again.survival_at(risk[:5], grid), expected, atol=1e-6)


def test_large_cohort_is_fast_and_matches_a_quadratic_count():
    rng = np.random.default_rng(3)
    risk, time, event = cohort(rng, 3000, ties=True)
    expected = concordance_index_censored(event, time, risk)[0]
    assert sm.harrell_c(risk, time, event) == pytest.approx(expected, abs=1e-12)
    big = cohort(rng, 200_000, ties=False)
    assert 0.6 < sm.harrell_c(*big) < 0.8  # O(n log^2 n): runs in about a second


def test_cutpoints_come_from_training_risks():
    train = np.arange(300, dtype=float)  # tertiles at 99.67 and 199.33
    cuts = sm.risk_cutpoints(train)
    np.testing.assert_allclose(cuts, np.quantile(train, [1 / 3, 2 / 3]))
    evaluated = np.array([250.0, 260.0, 270.0, 10.0])  # a high-risk external set
    assert sm.assign_risk_groups(evaluated, cuts).tolist() == [2, 2, 2, 0]
    # Re-deriving cut-points from the evaluated set would have split it into three groups.
    assert len(set(sm.assign_risk_groups(evaluated, sm.risk_cutpoints(evaluated)))) == 3


def test_km_groups_logrank_and_dummy_coded_hazard_ratios():
    rng = np.random.default_rng(5)
    groups = np.repeat([0, 1, 2], 1500)
    hazard = np.array([1.0, 2.0, 4.0])[groups] / 20.0
    time = rng.exponential(1 / hazard)
    censor = rng.exponential(60.0, len(time))
    event = time <= censor
    time = np.minimum(time, censor)
    out = sm.kaplan_meier_groups(time, event, groups, (0.0, 12.0, 24.0))
    assert out["curves"]["low"]["at_risk"] == [
        1500,
        int(np.sum(time[:1500] >= 12.0)),
        int(np.sum(time[:1500] >= 24.0)),
    ]
    assert out["logrank_p"] == pytest.approx(multivariate_logrank_test(time, groups, event).p_value)
    hr = out["hazard_ratios"]
    assert hr["intermediate"]["hr"] == pytest.approx(2.0, rel=0.15)
    assert hr["high"]["hr"] == pytest.approx(4.0, rel=0.15)
    assert hr["high"]["ci_low"] < 4.0 < hr["high"]["ci_high"] or hr["high"]["hr"] > 3.4
    # The same numbers as lifelines' Cox model on the dummy columns.
    import pandas as pd

    frame = pd.DataFrame(
        {
            "time": time,
            "event": event.astype(int),
            "intermediate": (groups == 1) * 1.0,
            "high": (groups == 2) * 1.0,
        }
    )
    fitted = CoxPHFitter().fit(frame, "time", "event")
    assert hr["high"]["hr"] == pytest.approx(fitted.summary.loc["high", "exp(coef)"])


def test_km_curves_carry_lifelines_bands_and_censor_ticks():
    from lifelines import KaplanMeierFitter

    rng = np.random.default_rng(1)
    time = rng.exponential(20.0, 300)
    event = rng.random(300) < 0.6
    groups = np.zeros(300, dtype=int)
    curve = sm.kaplan_meier_groups(time, event, groups, (0.0, 12.0))["curves"]["low"]
    km = KaplanMeierFitter().fit(time, event)
    band = km.confidence_interval_survival_function_
    np.testing.assert_allclose(curve["lower"], band.iloc[:, 0])
    np.testing.assert_allclose(curve["upper"], band.iloc[:, 1])
    assert all(
        lo <= s <= up
        for lo, s, up in zip(curve["lower"], curve["survival"], curve["upper"], strict=True)
    )
    assert curve["censored"] == sorted(set(time[~event].tolist()))
    np.testing.assert_allclose(
        curve["censored_survival"], km.survival_function_at_times(curve["censored"])
    )


def test_a_group_without_events_gives_a_flagged_hazard_ratio_not_a_number():
    """A small center where the high-risk group has no event: lifelines reports a divergent
    HR with a (0, inf)-like CI; it is flagged as not estimable."""
    rng = np.random.default_rng(2)
    groups = np.repeat([0, 1, 2], [40, 40, 6])
    time = rng.exponential(20.0, len(groups))
    event = rng.random(len(groups)) < 0.5
    event[groups == 2] = False
    hr = sm.kaplan_meier_groups(time, event, groups, (0.0,))["hazard_ratios"]
    assert hr["intermediate"]["estimable"]
    assert not hr["high"]["estimable"]
    assert not sm.hr_estimable({"hr": 7.8e7, "ci_low": 0.0, "ci_high": float("inf")}, 3)
    assert sm.hr_estimable({"hr": 2.1, "ci_low": 1.2, "ci_high": 3.5}, 10)


def test_undefined_cases_are_nan_not_numbers():
    assert np.isnan(sm.harrell_c([1.0, 2.0], [1.0, 2.0], [False, False]))
    km = sm.CensoringKM.fit([1.0, 2.0, 3.0], [True, False, True])
    assert np.isnan(
        sm.cumulative_dynamic_auc([1.0, 2.0], [50.0, 60.0], [True, True], [12.0], km)[0]
    )
    with pytest.raises(ValueError, match="no events"):
        sm.BreslowBaseline.fit([0.0, 1.0], [1.0, 2.0], [False, False])
