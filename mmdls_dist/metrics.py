"""Validation metrics as pure functions of predictions and targets (CPU numpy / tensors).

Each returns NaN where it is undefined (one class only, no comparable pair, nothing to
segment) rather than a made-up number; callers average with nanmean.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata
from torchsurv.metrics.cindex import ConcordanceIndex


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC. scores [n] (higher = class 1, any scale), labels [n] in {0, 1, -1 = unknown}.

    Mann-Whitney U with average ranks for ties, exact in float64. Written out because
    torchmetrics' binary_auroc squashes scores outside [0, 1] through a float32 sigmoid,
    which turns large risk scores into ties.
    """
    keep = labels >= 0
    y = labels[keep].astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64)[keep])
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_ovr_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean one-vs-rest AUC over classes. probs [n, K], labels [n] in 0..K-1 or -1."""
    per_class = [
        binary_auc(probs[:, k], np.where(labels < 0, -1, (labels == k).astype(int)))
        for k in range(probs.shape[1])
    ]
    values = [v for v in per_class if not np.isnan(v)]
    return float(np.mean(values)) if len(values) == len(per_class) else float("nan")


def harrell_cindex(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C (higher risk = earlier event) via torchsurv, on CPU tensors.

    risk, time [n]; event [n] bool. NaN when fewer than 2 patients or no event.
    """
    event = np.asarray(event, dtype=bool)
    if len(risk) < 2 or not event.any():
        return float("nan")
    return float(
        ConcordanceIndex()(
            torch.as_tensor(np.asarray(risk), dtype=torch.float32),
            torch.as_tensor(event),
            torch.as_tensor(np.asarray(time), dtype=torch.float32),
        )
    )


def dice_per_patient(pred: torch.Tensor, target: torch.Tensor, slice_mask: torch.Tensor):
    """Hard Dice per patient over its real slices. pred, target bool [B,S,H,W], slice_mask
    [B,S] -> float [B]; NaN where both are empty (excluded, as nnU-Net does)."""
    m = slice_mask[:, :, None, None]
    p, t = pred & m, target.bool() & m
    inter = (p & t).sum((1, 2, 3)).double()
    total = (p.sum((1, 2, 3)) + t.sum((1, 2, 3))).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.nan)


COMPOSITE = ("auc_histology", "auc_stage", "cindex_dfs", "cindex_os")


def composite(metrics: dict[str, float]) -> float:
    """The sweep objective: mean of histology AUC, stage macro AUC, DFS and OS C-index
    (each 0.5 = chance, 1 = perfect); the defined ones only, NaN if none is."""
    values = [metrics[k] for k in COMPOSITE if k in metrics and not np.isnan(metrics[k])]
    return float(np.mean(values)) if values else float("nan")


def summarize(records: list[dict], prefix: str = "") -> dict[str, float]:
    """Per-patient prediction records (see train.prediction_records) -> metric dict.

    Non-decomposable metrics (AUC, C-index) are computed once over all records, which is why
    callers gather every rank's records first; each patient appears once.
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
    for endpoint in ("dfs", "os"):
        known = col(f"{endpoint}_known").astype(bool)
        out[f"cindex_{endpoint}"] = harrell_cindex(
            col(f"{endpoint}_risk")[known],
            col(f"{endpoint}_time")[known],
            col(f"{endpoint}_event")[known],
        )
    out["composite"] = composite(out)
    for key in ("dice_lung", "dice_lesion"):
        if key in records[0]:
            values = col(key).astype(float)
            out[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return {f"{prefix}{k}": v for k, v in out.items()}
