"""Survival metrics, for training-time validation, the synthetic oracle and the evaluation
report alike: pure functions of (risk, time, event) arrays.

Conventions: risk [n] float (higher = earlier event, e.g. the Cox log hazard), time [n] float
months > 0, event [n] bool. Censoring weights always come from the *training* split
(`CensoringKM.fit` on it), as scikit-survival's IPCW metrics do, so a validation or
external cohort is scored against the censoring pattern the model was fitted under.

Written by hand (and cross-checked against scikit-survival to 1e-6 in the tests) because
the library versions do not scale to a registry cohort: torchsurv's ConcordanceIndex keeps
one n-long boolean mask per event (O(n^2) memory, 10 GB at 100,000 patients) and
scikit-survival loops in Python per event. Here every metric is O(n log n) or
O(n log^2 n) in vectorised numpy. Breslow's baseline comes from torchsurv, the Kaplan-Meier
curves, log-rank test and hazard ratios from lifelines.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torchsurv.loss.cox import baseline_survival_function


def _arrays(risk, time, event) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    risk = np.asarray(risk, dtype=np.float64).ravel()
    time = np.asarray(time, dtype=np.float64).ravel()
    event = np.asarray(event).astype(bool).ravel()
    if not len(risk) == len(time) == len(event):
        raise ValueError(f"lengths differ: risk {len(risk)}, time {len(time)}, event {len(event)}")
    return risk, time, event


# --- censoring distribution -----------------------------------------------------------------


@dataclass(frozen=True)
class CensoringKM:
    """Kaplan-Meier estimate G(t) = P(C > t) of the censoring distribution.

    At tied times events are removed from the risk set before censorings (they happened
    "first"), the convention of scikit-survival's CensoringDistributionEstimator. G is
    right-continuous; beyond the last fitted time it keeps its last value (scikit-survival
    refuses those times; a later external cohort may have longer follow-up).

    Its support ends where G reaches 0 (the training split's last time, when that is a
    censoring): an IPCW metric that needs a weight 1/G there is undefined and comes out
    NaN; one at an earlier horizon only needs G up to that horizon and is computed.
    """

    times: np.ndarray  # [m] unique fitted times, ascending
    survival: np.ndarray  # [m] G at those times

    @classmethod
    def fit(cls, time, event) -> CensoringKM:
        time = np.asarray(time, dtype=np.float64)
        event = np.asarray(event).astype(bool)
        uniq, inverse = np.unique(time, return_inverse=True)
        n_event = np.bincount(inverse, weights=event, minlength=len(uniq))
        n_total = np.bincount(inverse, minlength=len(uniq)).astype(float)
        n_censored = n_total - n_event
        at_risk = len(time) - np.concatenate(([0.0], np.cumsum(n_total)[:-1]))
        at_risk_for_censoring = at_risk - n_event
        ratio = np.divide(
            n_censored,
            at_risk_for_censoring,
            out=np.zeros_like(n_censored),
            where=n_censored > 0,
        )
        return cls(uniq, np.cumprod(1.0 - ratio))

    def __call__(self, t) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        idx = np.searchsorted(self.times, t, side="right") - 1
        return np.where(idx < 0, 1.0, self.survival[np.clip(idx, 0, None)])

    @property
    def support_end(self) -> float:
        """The first time with G = 0 (inf when G never reaches 0): IPCW metrics are defined
        for horizons before it."""
        zero = np.flatnonzero(self.survival <= 0)
        return float(self.times[zero[0]]) if len(zero) else float("inf")

    def ipcw(self, time, event) -> np.ndarray:
        """delta_i / G(t_i): the weight of each observed event (0 for the censored); NaN for
        an event where G = 0 (beyond the censoring support), so a metric using it is NaN."""
        g = self(time)
        event = np.asarray(event).astype(bool)
        return np.where(event, 1.0 / np.where(g > 0, g, np.nan), 0.0)

    def to_dict(self) -> dict:
        return {"times": self.times.tolist(), "survival": self.survival.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> CensoringKM:
        return cls(np.asarray(d["times"], dtype=np.float64), np.asarray(d["survival"]))


# --- concordance ----------------------------------------------------------------------------


def _count_dominated(group: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each i: (#{j: group_j > group_i, value_j < value_i}, the same with <=).

    group: int [n] in 0..G-1; value: int ranks [n] in 0..m-1. Binary decomposition of the
    group axis: at level s, a pair (i, j) with group_j > group_i is counted exactly once, in
    the block of size 2s where i falls in the left half and j in the right half. Each level
    is one sort and two searchsorted calls over the whole array: O(n log n log G).
    """
    n = len(group)
    less = np.zeros(n, dtype=np.int64)
    less_eq = np.zeros(n, dtype=np.int64)
    m = int(value.max()) + 2 if n else 1
    span = int(group.max()) + 1 if n else 1
    s = 1
    while s < span:
        block = group // (2 * s)
        right = (group % (2 * s)) >= s
        keys = np.sort(block[right] * m + value[right])
        left = ~right
        base = block[left] * m
        start = np.searchsorted(keys, base, side="left")
        less[left] += np.searchsorted(keys, base + value[left], side="left") - start
        less_eq[left] += np.searchsorted(keys, base + value[left], side="right") - start
        s *= 2
    return less, less_eq


def _concordance(risk, time, event, weight) -> float:
    """Weighted concordance over the pairs (i, j) with event_i and (t_i < t_j, or t_i == t_j
    and j censored); a tie in risk counts 1/2. weight [n] applies to i. NaN without pairs."""
    # Groups ordered by (time, censored): an event at t precedes a censoring at t, and two
    # events at the same t share a group, so they are not comparable.
    order = np.lexsort((~event, time))
    t_sorted, c_sorted = time[order], ~event[order]
    new = np.r_[True, (t_sorted[1:] != t_sorted[:-1]) | (c_sorted[1:] != c_sorted[:-1])]
    group_sorted = np.cumsum(new) - 1
    group = np.empty(len(time), dtype=np.int64)
    group[order] = group_sorted
    value = np.unique(risk, return_inverse=True)[1].ravel()
    # Comparable partners of i are the j in a later group, which the counts below see as
    # "dominated" when their risk is lower: concordant for i.
    less, less_eq = _count_dominated(group, value)
    later = len(time) - np.searchsorted(group_sorted, group, side="right")
    w = np.where(event, weight, 0.0)
    denominator = float(np.sum(w * later))
    if denominator <= 0:
        return float("nan")
    return float(np.sum(w * (less + 0.5 * (less_eq - less))) / denominator)


def harrell_c(risk, time, event) -> float:
    """Harrell's C-index; scikit-survival's concordance_index_censored definition."""
    risk, time, event = _arrays(risk, time, event)
    return _concordance(risk, time, event, np.ones_like(risk))


def uno_c(risk, time, event, censoring: CensoringKM, tau: float | None = None) -> float:
    """Uno's C-index: pairs weighted by G(t_i)^-2, events at t_i >= tau left out as the
    earlier member of a pair (scikit-survival's concordance_index_ipcw definition). NaN
    when an event before tau lies beyond the censoring support."""
    risk, time, event = _arrays(risk, time, event)
    weight = censoring.ipcw(time, event & (time < tau if tau is not None else True)) ** 2
    if np.isnan(weight).any():
        return float("nan")
    return _concordance(risk, time, event, weight)


# --- time-dependent AUC and Brier ------------------------------------------------------------


def cumulative_dynamic_auc(risk, time, event, horizons, censoring: CensoringKM) -> np.ndarray:
    """AUC(t) for each horizon t: cases = events by t (weight 1/G(t_i)), controls = still
    event-free after t; ties in risk count 1/2. [len(horizons)], NaN without cases/controls
    or when a case lies beyond the censoring support (events after t need no weight)."""
    risk, time, event = _arrays(risk, time, event)
    w = censoring.ipcw(time, event)
    out = []
    for t in np.atleast_1d(horizons):
        case = event & (time <= t)
        controls = np.sort(risk[time > t])
        if not case.any() or len(controls) == 0 or np.isnan(w[case]).any():
            out.append(float("nan"))
            continue
        lo = np.searchsorted(controls, risk[case], side="left")
        hi = np.searchsorted(controls, risk[case], side="right")
        wins = lo + 0.5 * (hi - lo)
        out.append(float(np.sum(w[case] * wins) / (np.sum(w[case]) * len(controls))))
    return np.asarray(out)


def brier_scores(survival_prob, time, event, horizons, censoring: CensoringKM) -> np.ndarray:
    """IPCW Brier score at each horizon (Graf et al. 1999; scikit-survival's brier_score).

    survival_prob [n, T]: predicted P(T_i > horizon_k); -> [T]. NaN at a horizon at or
    beyond the censoring support (G = 0 there, or at a case's event time)."""
    _, time, event = _arrays(time, time, event)
    prob = np.asarray(survival_prob, dtype=np.float64).reshape(len(time), -1)
    g_obs = censoring(time)
    out = []
    for k, t in enumerate(np.atleast_1d(horizons)):
        g_t = float(censoring(t))
        case = event & (time <= t)
        control = time > t
        if g_t <= 0 or np.any(g_obs[case] <= 0):
            out.append(float("nan"))
            continue
        case_term = np.divide(prob[:, k] ** 2, g_obs, out=np.zeros(len(time)), where=case)
        out.append(float(np.mean(case_term + (1 - prob[:, k]) ** 2 * control / g_t)))
    return np.asarray(out)


def integrated_brier(survival_prob, time, event, grid, censoring: CensoringKM) -> float:
    """Trapezoidal integral of the Brier score over `grid`, divided by its span."""
    grid = np.asarray(grid, dtype=np.float64)
    scores = brier_scores(survival_prob, time, event, grid, censoring)
    return float(np.trapezoid(scores, grid) / (grid[-1] - grid[0]))


# --- Breslow baseline (torchsurv) ------------------------------------------------------------


@dataclass(frozen=True)
class BreslowBaseline:
    """Baseline survival S0(t) of a Cox model, fitted on the training split's log hazards:
    S_i(t) = S0(t) ** exp(risk_i)."""

    times: np.ndarray  # [m] unique training times
    survival: np.ndarray  # [m] S0 at those times

    @classmethod
    def fit(cls, risk, time, event) -> BreslowBaseline:
        risk, time, event = _arrays(risk, time, event)
        if not event.any():
            raise ValueError("no events in the training split: the baseline hazard is undefined")
        fitted = baseline_survival_function(
            torch.as_tensor(risk, dtype=torch.float64),
            torch.as_tensor(event),
            torch.as_tensor(time, dtype=torch.float64),
        )
        # torchsurv works in float32: its unique times are float32 values (distinct months
        # closer than float32 resolution merge). Lookups round the query the same way.
        return cls(
            fitted["time"].numpy().astype(np.float64),
            fitted["baseline_survival"].numpy().astype(np.float64),
        )

    def baseline(self, t) -> np.ndarray:
        """S0 at t (right-continuous step; 1 before the first time, last value after)."""
        t = np.asarray(t, dtype=np.float32).astype(np.float64)  # as torchsurv saw the times
        idx = np.searchsorted(self.times, t, side="right") - 1
        return np.where(idx < 0, 1.0, self.survival[np.clip(idx, 0, None)])

    def survival_at(self, risk, horizons) -> np.ndarray:
        """[n] risks, [T] horizons -> [n, T] survival probabilities."""
        s0 = self.baseline(np.atleast_1d(horizons))
        return s0[None, :] ** np.exp(np.asarray(risk, dtype=np.float64))[:, None]

    def to_dict(self) -> dict:
        return {"times": self.times.tolist(), "survival": self.survival.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> BreslowBaseline:
        return cls(np.asarray(d["times"], dtype=np.float64), np.asarray(d["survival"]))


# --- risk groups -----------------------------------------------------------------------------

RISK_GROUPS = ("low", "intermediate", "high")


def risk_cutpoints(train_risk, quantiles=(1 / 3, 2 / 3)) -> list[float]:
    """Cut-points between risk groups: tertiles of the *training* split's risk. Fixed there,
    then applied unchanged to every evaluated split (never re-derived from it)."""
    train_risk = np.asarray(train_risk, dtype=np.float64)
    if len(train_risk) == 0:
        raise ValueError("no training risks to place cut-points")
    return [float(q) for q in np.quantile(train_risk, quantiles)]


def assign_risk_groups(risk, cutpoints) -> np.ndarray:
    """[n] risk -> [n] int group index (0 low .. len(cutpoints) high); cut-point goes up."""
    return np.searchsorted(np.asarray(cutpoints), np.asarray(risk, dtype=np.float64), side="right")


def kaplan_meier_groups(time, event, groups, at_times) -> dict:
    """Per risk group: KM curve, number at risk at `at_times`; log-rank p across groups;
    hazard ratios of dummy-coded groups vs low risk (Cox, 95% CI). lifelines does the maths."""
    from lifelines import CoxPHFitter, KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    groups = np.asarray(groups)
    curves = {}
    for g, name in enumerate(RISK_GROUPS):
        sel = groups == g
        if not sel.any():
            continue
        km = KaplanMeierFitter().fit(time[sel], event[sel])
        sf = km.survival_function_.iloc[:, 0]
        band = km.confidence_interval_survival_function_  # 95 %, exponential Greenwood
        censored = np.unique(time[sel][~event[sel]])
        curves[name] = {
            "n": int(sel.sum()),
            "events": int(event[sel].sum()),
            "time": sf.index.to_numpy().tolist(),
            "survival": sf.to_numpy().tolist(),
            "lower": band.iloc[:, 0].to_numpy().tolist(),
            "upper": band.iloc[:, 1].to_numpy().tolist(),
            "censored": censored.tolist(),  # censor ticks: times, and the curve there
            "censored_survival": km.survival_function_at_times(censored).to_numpy().tolist(),
            "at_risk": [int(np.sum(time[sel] >= t)) for t in at_times],
        }
    out = {
        "curves": curves,
        "at_risk_times": list(at_times),
        "logrank_p": float("nan"),
        "hazard_ratios": {},
    }
    present = np.unique(groups)
    if len(present) < 2 or not event.any():
        return out
    out["logrank_p"] = float(multivariate_logrank_test(time, groups, event).p_value)
    out["hazard_ratios"] = _group_hazard_ratios(time, event, groups, CoxPHFitter)
    return out


def _group_hazard_ratios(time, event, groups, cox_cls) -> dict:
    """HR (95% CI) of intermediate and high vs low, from dummy-coded groups (not an ordinal
    score, which would force equal log-HR steps between groups)."""
    import pandas as pd

    frame = pd.DataFrame({"time": time, "event": event.astype(int)})
    names = [n for g, n in enumerate(RISK_GROUPS) if g > 0 and np.any(groups == g)]
    if not np.any(groups == 0) or not names:
        return {}
    for name in names:
        frame[name] = (groups == RISK_GROUPS.index(name)).astype(float)
    try:
        with warnings.catch_warnings():
            # Small centers often have a group without events; the CI then shows it.
            warnings.simplefilter("ignore")
            fitted = cox_cls().fit(frame, "time", "event")
    except Exception:  # lifelines raises several types when a fit cannot converge
        return {}
    summary = fitted.summary
    out = {}
    for name in names:
        hr = {
            "hr": float(summary.loc[name, "exp(coef)"]),
            "ci_low": float(summary.loc[name, "exp(coef) lower 95%"]),
            "ci_high": float(summary.loc[name, "exp(coef) upper 95%"]),
            "p": float(summary.loc[name, "p"]),
        }
        hr["estimable"] = hr_estimable(hr, int(event[groups == RISK_GROUPS.index(name)].sum()))
        out[name] = hr
    return out


HR_LIMIT = 1e3  # a hazard ratio or CI bound beyond [1/HR_LIMIT, HR_LIMIT] is a divergent fit


def hr_estimable(hr: dict, group_events: int) -> bool:
    """False for a degenerate Cox estimate: a group (or the reference) without events
    drives the coefficient to +-infinity, which lifelines reports as a huge HR with a
    CI of (0, inf); such a number is not a result."""
    values = (hr["hr"], hr["ci_low"], hr["ci_high"])
    finite = all(np.isfinite(v) for v in values)
    return bool(finite and group_events > 0 and all(1 / HR_LIMIT < v < HR_LIMIT for v in values))
