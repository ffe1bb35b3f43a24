"""What the network predicts for a Batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_LOGIT = -20.0  # segmentation logit given to padded slices (probability ~ 2e-9)


@dataclass
class ModelOutput:
    """B patients, S slice slots, H x W pixels."""

    histology_logit: torch.Tensor  # [B] logit of LUSC
    stage_logits: torch.Tensor  # [B,3] I-II / III / IV
    dfs_log_hazard: torch.Tensor  # [B] Cox log relative hazard
    os_log_hazard: torch.Tensor  # [B]
    lung_logits: torch.Tensor | None = None  # [B,S,H,W]; PAD_LOGIT on padded slices
    lesion_logits: torch.Tensor | None = None  # [B,S,H,W]
    slice_weights: torch.Tensor | None = None  # [B,S] attention pooling weights (0 on padding)
