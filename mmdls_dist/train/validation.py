"""The validation metrics a training run reports every epoch (and Tune's objective): the
gathered per-patient prediction records (model/output.py) -> one metric dict, through the
same metric functions the evaluation report uses (metrics/)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchsurv.loss.cox import neg_partial_log_likelihood

from mmdls_dist.data.schema import ENDPOINTS
from mmdls_dist.metrics.classification import binary_auc, macro_ovr_auc
from mmdls_dist.metrics.segmentation import mean_dice
from mmdls_dist.metrics.survival import harrell_c

COMPOSITE = ("auc_histology", "auc_stage", "cindex_dfs", "cindex_os")


def composite(metrics: dict[str, float]) -> float:
    """The sweep objective: mean of histology AUC, stage macro AUC, DFS and OS C-index
    (each 0.5 = chance, 1 = perfect); the defined ones only, NaN if none is."""
    values = [metrics[k] for k in COMPOSITE if k in metrics and not np.isnan(metrics[k])]
    return float(np.mean(values)) if values else float("nan")


def cox_nll(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """The validation Cox loss (per event, Efron ties): the training objective on held-out
    patients, smoother than the rank statistic. torchsurv's, as the whole validation set is
    at hand here (training's loss, losses.partial_likelihood, works on fixed-size batches).
    NaN without an event."""
    n_events = int(event.sum())
    if n_events == 0:
        return float("nan")
    if len(risk) < 2:  # a lone patient is its own risk set
        return 0.0
    with warnings.catch_warnings():
        # torchsurv warns on every tied time; months-rounded follow-up has many.
        warnings.filterwarnings("ignore", message="Ties in `time` detected")
        nll = neg_partial_log_likelihood(
            torch.tensor(risk, dtype=torch.float64),
            torch.tensor(event),
            torch.tensor(time, dtype=torch.float64),
            ties_method="efron",
            reduction="sum",
        )
    return float(nll) / n_events


def summarize(records: list[dict], prefix: str = "") -> dict[str, float]:
    """Per-patient prediction records (model.output.prediction_records) -> metric dict.

    Non-decomposable metrics (AUC, C-index) are computed once over all records, which is why
    callers gather every rank's records first; each patient appears once. NaN where a
    metric is undefined (one class only, no comparable pair, nothing to segment).
    """
    if not records:
        return {f"{prefix}n_patients": 0}

    def col(key: str) -> np.ndarray:
        return np.array([r[key] for r in records])

    out = {
        "auc_histology": binary_auc(col("histology_prob"), col("histology")),
        "auc_stage": macro_ovr_auc(np.stack(col("stage_probs")), col("stage")),
        "n_patients": len(records),
    }
    for endpoint in ENDPOINTS:
        known = col(f"{endpoint}_known").astype(bool)
        out[f"cindex_{endpoint}"] = harrell_c(
            col(f"{endpoint}_risk")[known],
            col(f"{endpoint}_time")[known],
            col(f"{endpoint}_event")[known],
        )
        out[f"cox_nll_{endpoint}"] = cox_nll(
            col(f"{endpoint}_risk")[known],
            col(f"{endpoint}_time")[known],
            col(f"{endpoint}_event")[known].astype(bool),
        )
    out["cox_nll"] = out["cox_nll_dfs"] + out["cox_nll_os"]
    out["composite"] = composite(out)
    for key in ("dice_lung", "dice_lesion"):
        if key in records[0]:
            out[key] = mean_dice(col(key))[0]
    return {f"{prefix}{k}": v for k, v in out.items()}
