"""Attention fusion over slices (LesionAttentionFusion) and over modalities (patient level)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmdls_dist.model.encoders import mlp


def slice_positions(slice_mask: torch.Tensor, n_freq: int = 4) -> torch.Tensor:
    """slice_mask bool [B,S] -> [B,S,2*n_freq] Fourier features of each real slice's relative
    position in its stack (0 = first, 1 = last): upper vs lower lung is informative."""
    count = slice_mask.sum(1, keepdim=True).clamp(min=2) - 1
    index = torch.arange(slice_mask.shape[1], device=slice_mask.device)[None, :]
    pos = (index / count).clamp(max=1.0)[..., None]
    freq = (2.0 ** torch.arange(n_freq, device=slice_mask.device)) * math.pi
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=-1)


class SliceFusion(nn.Module):
    """Slice tokens [B,S,E] -> patient imaging vector [B,E] and slice weights [B,S].

    Transformer layers over the slices, then attention pooling with a learned query; padded
    slices are excluded through key-padding masks, so padding changes nothing.
    """

    def __init__(self, dim: int, heads: int, layers: int, dropout: float, n_freq: int = 4):
        super().__init__()
        self.n_freq = n_freq
        self.pos = nn.Linear(2 * n_freq, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, 2 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.pool = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, tokens: torch.Tensor, slice_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pad = ~slice_mask
        x = tokens + self.pos(slice_positions(slice_mask, self.n_freq))
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        x = self.norm(x)
        query = self.query.expand(x.shape[0], -1, -1)
        pooled, weights = self.pool(query, x, x, key_padding_mask=pad)
        return pooled[:, 0], weights[:, 0]


class PatientFusion(nn.Module):
    """Imaging vector + tabular modalities (each with its missing-indicators) -> [B,E].

    "attention": one token per modality (plus a type embedding), a transformer layer, mean;
    "concat": concatenation and an MLP. Switched-off modalities are simply absent.
    Imaging brings n_imaging tokens (the slice-fused vector, and the lesion reader's).
    A tabular input listed in `ranks` first goes through input dropout 0.5 and a linear
    bottleneck of that many dimensions (for wide, noisy inputs such as 128 radiomics).
    """

    def __init__(
        self,
        dim: int,
        tabular_inputs: dict[str, int],
        n_imaging: int,
        hidden: int,
        variant: str,
        heads: int,
        dropout: float,
        tabular_dropout: float = 0.0,
        keep_always: tuple[str, ...] = (),
        ranks: dict[str, int] | None = None,
    ):
        super().__init__()
        self.variant = variant
        self.tabular_dropout = tabular_dropout
        self.keep_always = keep_always  # tokens tabular dropout never blanks (imaging ones)
        ranks = ranks or {}
        self.tabular = nn.ModuleDict(
            {
                name: _token_net(2 * width, hidden, dim, dropout, ranks.get(name, 0))
                for name, width in tabular_inputs.items()
            }
        )
        n_tokens = len(tabular_inputs) + n_imaging
        if variant == "attention":
            self.type_embed = nn.Parameter(torch.zeros(n_tokens, dim))
            self.mix = nn.TransformerEncoderLayer(
                dim, heads, 2 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            self.out = nn.LayerNorm(dim)
        else:
            self.out = mlp(n_tokens * dim, dim, dropout)

    def forward(
        self, imaging: list[torch.Tensor], tabular: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """imaging: n_imaging tokens [B,E]; tabular: name -> (values [B,F], missing [B,F])."""
        tokens = list(imaging)
        for name, net in self.tabular.items():
            values, missing = tabular[name]
            token = net(torch.cat([values, missing.to(values.dtype)], dim=1))
            if self.training and self.tabular_dropout > 0 and name not in self.keep_always:
                keep = torch.rand(token.shape[0], 1, device=token.device) >= self.tabular_dropout
                token = token * keep.to(token.dtype)
            tokens.append(token)
        if self.variant == "attention":
            x = torch.stack(tokens, dim=1) + self.type_embed
            return self.out(self.mix(x).mean(1))
        return self.out(torch.cat(tokens, dim=1))


def _token_net(width: int, hidden: int, dim: int, dropout: float, rank: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    if rank:
        layers = [nn.Dropout(0.5), nn.Linear(width, rank)]
        width = rank
    layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)]
    return nn.Sequential(*layers)


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
