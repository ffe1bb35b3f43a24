"""Small building blocks shared by the model's parts."""

from __future__ import annotations

import torch
from torch import nn


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest of 8/4/2/1 groups that divides `channels`."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def conv_norm_act(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
    )


def mlp(c_in: int, c_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(c_in, c_out), nn.GELU(), nn.Dropout(dropout), nn.Linear(c_out, c_out)
    )


def token_net(width: int, hidden: int, dim: int, dropout: float, rank: int = 0) -> nn.Sequential:
    """[B, width] table row (values and missing flags) -> [B, dim] fusion token. rank > 0:
    input dropout 0.5 and a rank-dimensional linear bottleneck first (for wide, noisy inputs
    such as 128 radiomics, which over-fit a full MLP)."""
    layers: list[nn.Module] = []
    if rank:
        layers = [nn.Dropout(0.5), nn.Linear(width, rank)]
        width = rank
    layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)]
    return nn.Sequential(*layers)


CT_MEAN, CT_STD = 0.5, 0.25  # of ct / 255: a fixed affine map, no data statistics (a per-patient
# landmark standardisation was measured against it and gave no gain: docs/BENCHMARKS.md)


def normalise_ct(ct: torch.Tensor) -> torch.Tensor:
    """CT in [0, 1] -> the network's input scale."""
    return (ct - CT_MEAN) / CT_STD
