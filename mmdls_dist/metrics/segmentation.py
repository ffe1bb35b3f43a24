"""Segmentation metrics: hard Dice per patient, and its mean over patients."""

from __future__ import annotations

import math

import numpy as np
import torch


def dice_per_patient(pred: torch.Tensor, target: torch.Tensor, slice_mask: torch.Tensor):
    """Hard Dice per patient over its real slices. pred, target bool [B,S,H,W], slice_mask
    [B,S] -> float [B]; NaN where both are empty (excluded, as nnU-Net does)."""
    m = slice_mask[:, :, None, None]
    p, t = pred & m, target.bool() & m
    inter = (p & t).sum((1, 2, 3)).double()
    total = (p.sum((1, 2, 3)) + t.sum((1, 2, 3))).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.nan)


def mean_dice(values) -> tuple[float, int]:
    """Per-patient Dice (NaN = excluded) -> (mean over the scored patients, their count);
    NaN when none is scored."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return (float(values.mean()) if len(values) else math.nan), int(len(values))
