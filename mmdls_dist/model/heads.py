"""Task heads: histology, stage and the two Cox log-hazards from the patient vector."""

from __future__ import annotations

import torch
from torch import nn


class TaskHeads(nn.Module):
    """Patient vector [B,E] -> histology logit [B], stage logits [B,3], DFS / OS log-hazards.

    With `hierarchical`, the survival heads also see an embedding of the soft histology and
    stage predictions, as the original hierarchical model feeds them forward.
    """

    def __init__(self, dim: int, dropout: float, hierarchical: bool):
        super().__init__()
        self.hierarchical = hierarchical
        self.drop = nn.Dropout(dropout)
        self.histology = nn.Linear(dim, 1)
        self.stage = nn.Linear(dim, 3)
        extra = 16 if hierarchical else 0
        if hierarchical:
            self.soft = nn.Sequential(nn.Linear(4, extra), nn.GELU())
        self.dfs = nn.Linear(dim + extra, 1)
        self.os = nn.Linear(dim + extra, 1)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.drop(h)
        histology = self.histology(h)
        stage = self.stage(h)
        s = h
        if self.hierarchical:
            probs = torch.cat([torch.sigmoid(histology), torch.softmax(stage, dim=1)], dim=1)
            s = torch.cat([h, self.soft(probs)], dim=1)
        return {
            "histology_logit": histology[:, 0],
            "stage_logits": stage,
            "dfs_log_hazard": self.dfs(s)[:, 0],
            "os_log_hazard": self.os(s)[:, 0],
        }
