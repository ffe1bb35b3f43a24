"""Calibration: temperature scaling of the classification heads (Guo et al. 2017) and the
calibration slope of the survival heads (Cox 1958; van Houwelingen 2000), each fitted once
on the validation split, and survival calibration against Kaplan-Meier per risk group.

Temperature scaling divides every logit by one scalar T > 0 fitted by minimising the
validation negative log-likelihood; it changes neither the histology ranking (AUC) nor the
stage arg-max. scikit-learn's CalibratedClassifierCV wraps an estimator it refits, not a
frozen network's logits, so the 1-D fit is here (scipy minimises it).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, logit

EPS = 1e-7
LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]
SLOPE_BOUNDS = (0.05, 20.0)  # the calibration slope, clipped as the temperatures are
MIN_SLOPE_EVENTS = 10  # fewer events on validation: no slope is fitted


def binary_logits(prob) -> np.ndarray:
    """Probabilities [n] -> logits (clipped away from 0 and 1)."""
    return logit(np.clip(np.asarray(prob, dtype=np.float64), EPS, 1 - EPS))


def class_logits(probs) -> np.ndarray:
    """Softmax probabilities [n,K] -> logits up to a per-row constant (log-probabilities)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0))


def _binary_nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    s = z / t
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def _multiclass_nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    return float(-np.mean(log_softmax(z / t, axis=1)[np.arange(len(y)), y]))


def fit_temperature(logits, labels) -> float:
    """T minimising the NLL of labels given logits / T: logits [n] (binary, labels 0/1) or
    [n,K] (labels 0..K-1); label -1 = unknown, left out. 1.0 (no change) when fewer than
    two classes are known."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    keep = y >= 0
    z, y = z[keep], y[keep].astype(int)
    if len(np.unique(y)) < 2:
        return 1.0
    nll = _binary_nll if z.ndim == 1 else _multiclass_nll
    fit = minimize_scalar(
        lambda log_t: nll(z, y, math.exp(log_t)), bounds=LOG_T_BOUNDS, method="bounded"
    )
    return float(math.exp(fit.x))


def scaled_binary(prob, temperature: float) -> np.ndarray:
    return expit(binary_logits(prob) / temperature)


def scaled_multiclass(probs, temperature: float) -> np.ndarray:
    return np.exp(log_softmax(class_logits(probs) / temperature, axis=1))


def fit_hazard_slope(risk, time, event) -> float | None:
    """The calibration slope b of Cox log-hazards: the coefficient of a one-covariate Cox
    model (lifelines, Efron ties) on `risk`, so that b * risk is the log-hazard these
    patients support. b < 1: the network's hazards are spread too far apart (its survival
    probabilities too extreme). Clipped to SLOPE_BOUNDS, so the ranking (C-index) never
    changes. None (fit nothing) with fewer than MIN_SLOPE_EVENTS events, constant risk, or
    a fit that does not converge (risk that orders every event perfectly)."""
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    risk = np.asarray(risk, dtype=np.float64)
    event = np.asarray(event, dtype=bool)
    if event.sum() < MIN_SLOPE_EVENTS or np.ptp(risk) == 0:
        return None
    data = {"risk": risk, "time": np.asarray(time, dtype=np.float64), "event": event}
    try:
        fit = CoxPHFitter().fit(pd.DataFrame(data), "time", "event")
    except ConvergenceError:
        return None
    return float(np.clip(fit.params_["risk"], *SLOPE_BOUNDS))


def survival_calibration(
    survival_prob: np.ndarray, time, event, horizons, n_groups: int = 10
) -> dict[str, dict]:
    """Predicted vs observed survival at each horizon, per group of patients ranked by their
    predicted survival there (deciles by default). observed = Kaplan-Meier of the group at
    the horizon (lifelines), None where the group's follow-up ends before it.
    -> horizon -> {groups: [{n, predicted, observed}], ici}: ici = the patient-weighted mean
    |predicted - observed| over the groups with an observation (integrated calibration
    index over risk groups)."""
    from lifelines import KaplanMeierFitter

    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event, dtype=bool)
    out = {}
    for k, h in enumerate(horizons):
        pred = np.asarray(survival_prob)[:, k]
        groups = np.array_split(np.argsort(pred, kind="stable"), min(n_groups, len(pred)))
        rows, err, weight = [], 0.0, 0
        for idx in groups:
            if not len(idx):
                continue
            observed = None
            if time[idx].max() >= h:
                km = KaplanMeierFitter().fit(time[idx], event[idx])
                observed = float(km.predict(h))
                err += len(idx) * abs(float(pred[idx].mean()) - observed)
                weight += len(idx)
            rows.append(
                {"n": int(len(idx)), "predicted": float(pred[idx].mean()), "observed": observed}
            )
        out[f"{h:g}"] = {"groups": rows, "ici": err / weight if weight else float("nan")}
    return out


def adapt_prior(probs, source_prior, max_iter: int = 1000, tol: float = 1e-8):
    """Prior-shift adaptation without labels (Saerens, Latinne & Decaestecker 2002): the
    class fractions of a new set of patients that maximise the likelihood of its inputs,
    found by EM over calibrated posteriors, and the posteriors re-weighted to them.

    probs [n,K] calibrated class probabilities of the new patients; source_prior [K] the
    class fractions the probabilities were calibrated under (the training cohort's).
    -> (estimated prior [K], adapted probabilities [n,K]). Each posterior is multiplied by
    prior / source_prior and renormalised, which moves every logit by the same offset, so
    the ranking (AUC) and the arg-max order within a class pair are unchanged. Valid when a
    center differs in case mix (p(x | y) the same); no library implements it on frozen
    posteriors, so it is written here."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0)
    source = np.asarray(source_prior, dtype=np.float64)
    prior = source.copy()
    for _ in range(max_iter):
        w = p * (prior / source)
        w /= w.sum(axis=1, keepdims=True)
        new = w.mean(axis=0)
        done = np.abs(new - prior).max() < tol
        prior = new
        if done:
            break
    w = p * (prior / source)
    return prior, w / w.sum(axis=1, keepdims=True)


def prior_shift_p(probs, source_prior, prior) -> float:
    """The likelihood-ratio test of Saerens et al. (2002, section 2.3) that a set of
    patients' class fractions differ from the source ones: 2 log L(prior) / L(source), the
    inputs' likelihood up to p(x), against chi-square with K - 1 degrees of freedom -> its
    p-value."""
    from scipy.stats import chi2

    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0)
    ratio = np.asarray(prior, dtype=np.float64) / np.asarray(source_prior, dtype=np.float64)
    statistic = 2.0 * float(np.sum(np.log(p @ ratio)))
    return float(chi2.sf(max(statistic, 0.0), df=p.shape[1] - 1))


def adapt_binary_prior(prob, source_prior: float):
    """adapt_prior for one binary head: prob [n] of the positive class -> (estimated
    positive fraction, adapted probabilities [n], the test's p-value)."""
    p = np.clip(np.asarray(prob, dtype=np.float64), EPS, 1 - EPS)
    probs, source = np.stack([1 - p, p], axis=1), [1 - source_prior, source_prior]
    prior, adapted = adapt_prior(probs, source)
    return float(prior[1]), adapted[:, 1], prior_shift_p(probs, source, prior)
