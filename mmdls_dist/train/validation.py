"""The validation metrics a training run reports every epoch (and Tune's objective): the
gathered per-patient prediction records (model/output.py) -> one metric dict, through the
same metric functions the evaluation report uses (metrics/)."""

from __future__ import annotations

import numpy as np
import torch

from mmdls_dist.data.schema import ENDPOINTS
from mmdls_dist.metrics.classification import binary_auc, macro_ovr_auc
from mmdls_dist.metrics.segmentation import mean_dice
from mmdls_dist.metrics.survival import harrell_c
from mmdls_dist.train.losses import cox_loss

COMPOSITE = ("auc_histology", "auc_stage", "cindex_dfs", "cindex_os")


def composite(metrics: dict[str, float]) -> float:
    """The sweep objective: mean of histology AUC, stage macro AUC, DFS and OS C-index
    (each 0.5 = chance, 1 = perfect); the defined ones only, NaN if none is."""
    values = [metrics[k] for k in COMPOSITE if k in metrics and not np.isnan(metrics[k])]
    return float(np.mean(values)) if values else float("nan")


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
        # The validation Cox loss (per event, Efron ties), the training objective on
        # held-out patients: smoother than the rank statistic above.
        term = cox_loss(
            torch.tensor(col(f"{endpoint}_risk")[known], dtype=torch.float64),
            torch.tensor(col(f"{endpoint}_time")[known]),
            torch.tensor(col(f"{endpoint}_event")[known].astype(bool)),
            torch.ones(int(known.sum()), dtype=torch.bool),
        )
        out[f"cox_nll_{endpoint}"] = float(term.loss) if term.n_events else float("nan")
    out["cox_nll"] = out["cox_nll_dfs"] + out["cox_nll_os"]
    out["composite"] = composite(out)
    for key in ("dice_lung", "dice_lesion"):
        if key in records[0]:
            out[key] = mean_dice(col(key))[0]
    return {f"{prefix}{k}": v for k, v in out.items()}
