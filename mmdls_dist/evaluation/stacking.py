"""The survival stack: a Cox model (lifelines, ridge-penalised) on each survival head's
calibrated log-hazard, the clinical and PET inputs exactly as the network receives them
(z-scored with the training statistics, a missing value at the training mean) and, where
the model measures them, the lesion descriptors (model/descriptors.py, on the mask its
lesion views read: the given contour, else the segmentor's), fitted on the training and
validation splits when a run ends, applied by evaluate and predict.

Why: trained on a few hundred patients, the fusion does not reliably recover the linear
signal a statistician's Cox finds in the same tables and lesion measurements (a combined
nomogram of a deep score, clinical data and radiomics-like descriptors); on an unseen
center the stack keeps both (docs/BENCHMARKS.md, "Generalization to an unseen center").
Its linear predictor is the reported log relative hazard; the network's own stays in
*_risk_uncalibrated.

lifelines fits it (it standardises the covariates before the penalty, so one penalizer
suits inputs on any scale); what is written here is only which patients and columns go in
and how the coefficients are stored and applied.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mmdls_dist.data.schema import CLINICAL_FEATURES, PET_FEATURES
from mmdls_dist.model.descriptors import NAMES as DESCRIPTOR_NAMES

# The tabular inputs and the lesion descriptors as inference records carry them
# (evaluation/inference.py); a model without lesion descriptors (tables only, or
# model.lesion_descriptors off) has no LESION columns, and its stack reads INPUTS alone.
INPUTS = tuple(f"input_{name}" for name in (*CLINICAL_FEATURES, *PET_FEATURES))
LESION = tuple(f"lesion_{name}" for name in DESCRIPTOR_NAMES)
COLUMNS = INPUTS + LESION  # what the stack may read: kept out of every written table
NETWORK = "network"  # the stack's coefficient name for the head's own log-hazard
PENALIZER = 0.1  # lifelines' L2 penalty, as measured (docs/BENCHMARKS.md, post-hoc refits)
# Events per covariate below which no stack is fitted: 5 (Vittinghoff & McCulloch 2007;
# penalised, so the stricter 10 of Peduzzi et al. 1995 is not needed).
MIN_EVENTS_PER_COVARIATE = 5


def has_inputs(frame: pd.DataFrame) -> bool:
    return all(column in frame for column in INPUTS)


def covariates(*frames: pd.DataFrame) -> list[str]:
    """The stack's input columns for these frames: INPUTS, and LESION where every frame
    carries the descriptors for every patient."""
    lesion = all(c in f and f[c].notna().all() for f in frames for c in LESION)
    return [*INPUTS, *(LESION if lesion else ())]


def min_events(columns) -> int:
    """Events needed to fit a stack on `columns` and the network's log-hazard."""
    return MIN_EVENTS_PER_COVARIATE * (len(columns) + 1)


def fit_stack(risk, inputs: pd.DataFrame, time, event) -> dict[str, float] | None:
    """Coefficients {NETWORK: b, input column: b, ...} of a penalised Cox on the head's
    log-hazard `risk` and the covariates(inputs) columns; None (no stack) with fewer than
    min_events of them or a fit that does not converge."""
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    event = np.asarray(event, dtype=bool)
    columns = covariates(inputs)
    if event.sum() < min_events(columns):
        return None
    data = inputs[columns].astype(np.float64).reset_index(drop=True)
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
