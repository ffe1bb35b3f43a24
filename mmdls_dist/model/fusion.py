"""Attention fusion over slices (the publication's LesionAttentionFusion) and over modalities
(the patient-level fusion of PatientLevelFusionModel)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmdls_dist.model.layers import mlp, token_net


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
    """Imaging tokens [B,E] + tabular modalities (each with its missing-indicators) -> [B,E].

    "attention": one token per modality (plus a type embedding), a transformer layer, mean;
    "concat": concatenation and an MLP. Switched-off modalities are simply absent.
    A tabular input listed in `ranks` enters through a linear bottleneck of that rank
    (layers.token_net).
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
        ranks: dict[str, int] | None = None,
    ):
        super().__init__()
        self.variant = variant
        ranks = ranks or {}
        self.tabular = nn.ModuleDict(
            {
                name: token_net(2 * width, hidden, dim, dropout, ranks.get(name, 0))
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
            tokens.append(net(torch.cat([values, missing.to(values.dtype)], dim=1)))
        if self.variant == "attention":
            x = torch.stack(tokens, dim=1) + self.type_embed
            return self.out(self.mix(x).mean(1))
        return self.out(torch.cat(tokens, dim=1))
