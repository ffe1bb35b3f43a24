"""The survival stack: a Cox model (lifelines, ridge-penalised) on each survival head's
calibrated log-hazard and the clinical and PET inputs exactly as the network receives them
(z-scored with the training statistics, a missing value at the training mean), fitted on
the training and validation splits when a run ends, applied by evaluate and predict.

Why: trained on a few hundred patients, the fusion does not reliably recover the linear
tabular signal a statistician's Cox finds in the same inputs; on an unseen center the stack
keeps both (docs/BENCHMARKS.md, "Generalization to an unseen center"). Its linear
predictor is the reported log relative hazard; the network's own stays in
*_risk_uncalibrated.

lifelines fits it (it standardises the covariates before the penalty, so one penalizer
suits inputs on any scale); what is written here is only which patients and columns go in
and how the coefficients are stored and applied.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mmdls_dist.data.schema import CLINICAL_FEATURES, PET_FEATURES

# The tabular inputs as inference records carry them (evaluation/inference.py).
INPUTS = tuple(f"input_{name}" for name in (*CLINICAL_FEATURES, *PET_FEATURES))
NETWORK = "network"  # the stack's coefficient name for the head's own log-hazard
PENALIZER = 0.1  # lifelines' L2 penalty, as measured (docs/BENCHMARKS.md, post-hoc refits)
# Events per covariate below which no stack is fitted: 5 (Vittinghoff & McCulloch 2007;
# penalised, so the stricter 10 of Peduzzi et al. 1995 is not needed).
MIN_EVENTS_PER_COVARIATE = 5
MIN_EVENTS = MIN_EVENTS_PER_COVARIATE * (len(INPUTS) + 1)


def has_inputs(frame: pd.DataFrame) -> bool:
    return all(column in frame for column in INPUTS)


def fit_stack(risk, inputs: pd.DataFrame, time, event) -> dict[str, float] | None:
    """Coefficients {NETWORK: b, input column: b, ...} of a penalised Cox on the head's
    log-hazard `risk` and the tabular `inputs` (INPUTS columns); None (no stack) with fewer
    than MIN_EVENTS events or a fit that does not converge."""
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    event = np.asarray(event, dtype=bool)
    if event.sum() < MIN_EVENTS:
        return None
    data = inputs[list(INPUTS)].astype(np.float64).reset_index(drop=True)
    data = data.loc[:, data.std() > 0]  # an input constant here carries nothing
    data[NETWORK] = np.asarray(risk, dtype=np.float64)
    data["time"] = np.asarray(time, dtype=np.float64)
    data["event"] = event
    try:
        fit = CoxPHFitter(penalizer=PENALIZER).fit(data, "time", "event")
    except ConvergenceError:
        return None
    coefs = {name: float(value) for name, value in fit.params_.items()}
    return {NETWORK: coefs.pop(NETWORK), **coefs}


def apply_stack(coefs: dict[str, float], risk, frame: pd.DataFrame) -> np.ndarray:
    """The stack's linear predictor for every row of `frame` (which carries the inputs the
    coefficients name); `risk`: the head's calibrated log-hazard of those rows."""
    missing = [c for c in coefs if c != NETWORK and c not in frame]
    if missing:
        raise ValueError(
            f"the reference has a survival stack on {missing}, which these predictions lack "
            "(predictions from an older mmdls-dist: run the inference again)"
        )
    out = coefs[NETWORK] * np.asarray(risk, dtype=np.float64)
    for column, b in coefs.items():
        if column != NETWORK:
            out = out + b * frame[column].to_numpy(np.float64)
    return out
