"""LesionEncoder and SpaceEncoder: per-slice vectors for the lesion and the lung space around it.

Both views are formed from soft masks (the segmentor's predictions, optionally mixed with
ground truth during warm-up), so gradients flow back into the segmentor and inference needs
CT only. Two implementations:

* "features" (MaskPoolEncoder): mask-weighted average pooling of the segmentor's own
  feature maps (decoder map at stride 4 and encoder map at stride 16) plus the soft area.
  Nothing is convolved twice.
* "pixels" (PixelEncoder): the original MM-DLS design, a small conv encoder over the masked
  full-resolution CT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from mmdls_dist.model.segmentor import conv_norm_act

EPS = 1e-4


def masked_mean(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """features [N,C,h,w], weight [N,1,H,W] in [0,1] -> [N,C] weighted spatial mean."""
    if weight.shape[-2:] != features.shape[-2:]:
        weight = F.adaptive_avg_pool2d(weight, features.shape[-2:])
    return (features * weight).sum((2, 3)) / (weight.sum((2, 3)) + EPS)


def soft_centroid(mask: torch.Tensor) -> torch.Tensor:
    """mask [N,h,w] soft weights -> [N,2] weighted centroid (x, y) in affine_grid's
    align_corners=False coordinates (pixel centres), so it means the same place on a
    low-resolution mask and on the full-resolution CT. An empty mask gives (0, 0)."""
    h, w = mask.shape[-2:]
    total = mask.sum((1, 2)) + EPS
    ys = (torch.arange(h, device=mask.device, dtype=mask.dtype) + 0.5) * 2 / h - 1
    xs = (torch.arange(w, device=mask.device, dtype=mask.dtype) + 0.5) * 2 / w - 1
    return torch.stack([(mask.sum(1) * xs).sum(1), (mask.sum(2) * ys).sum(1)], 1) / total[:, None]


def log_area(weight: torch.Tensor) -> torch.Tensor:
    """weight [N,1,H,W] -> [N,1] log of the soft area fraction: pooling is blind to size."""
    return torch.log(weight.mean((2, 3)) + EPS)


def mlp(c_in: int, c_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(c_in, c_out), nn.GELU(), nn.Dropout(dropout), nn.Linear(c_out, c_out)
    )


class MaskPoolEncoder(nn.Module):
    """(decoder map [N,D,h,w], encoder map [N,C,h',w'], soft mask [N,1,h,w]) -> [N,E]."""

    def __init__(self, decoder_width: int, encoder_width: int, embed_dim: int, dropout: float):
        super().__init__()
        self.proj = mlp(decoder_width + encoder_width + 1, embed_dim, dropout)

    def forward(
        self, decoder_map: torch.Tensor, encoder_map: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        pooled = [masked_mean(decoder_map, mask), masked_mean(encoder_map, mask), log_area(mask)]
        return self.proj(torch.cat(pooled, dim=1))


class PixelEncoder(nn.Module):
    """(CT [N,1,H,W], soft mask [N,1,H,W]) -> [N,E] by convolving the masked image."""

    def __init__(self, width: int, embed_dim: int, dropout: float):
        super().__init__()
        self.convs = nn.Sequential(
            conv_norm_act(2, width, stride=2),
            conv_norm_act(width, 2 * width, stride=2),
            conv_norm_act(2 * width, 4 * width, stride=2),
            conv_norm_act(4 * width, 4 * width, stride=2),
        )
        self.proj = mlp(4 * width + 1, embed_dim, dropout)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.convs(torch.cat([image * mask, mask], dim=1))
        return self.proj(torch.cat([x.mean((2, 3)), log_area(mask)], dim=1))


class LesionPatchEncoder(nn.Module):
    """A full-resolution patch around each slice's soft lesion centroid -> [N,E].

    Margin (spiculation) and texture live at the scale of a few pixels; the segmentor's
    maps are at 1/4 resolution and the "pixels" encoders downsample the whole slice, so both
    blur them. Like the original LesionEncoder this looks at a lesion patch, but the crop
    is differentiable (affine_grid + grid_sample at the soft centroid), so no ground-truth
    box is needed and inference stays CT-only.
    """

    def __init__(self, patch: int, extent: float, width: int, embed_dim: int, dropout: float):
        super().__init__()
        self.patch, self.extent = patch, extent
        self.convs = nn.Sequential(
            conv_norm_act(2, width),
            conv_norm_act(width, 2 * width, stride=2),
            conv_norm_act(2 * width, 4 * width, stride=2),
        )
        self.proj = mlp(8 * width, embed_dim, dropout)

    def crop(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """image [N,1,H,W], mask [N,1,h,w] -> [N,2,P,P]: CT and full-res mask patches."""
        n = image.shape[0]
        theta = torch.zeros(n, 2, 3, device=image.device, dtype=image.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = self.extent
        theta[:, :, 2] = soft_centroid(mask[:, 0]).to(image.dtype)
        grid = F.affine_grid(theta, [n, 1, self.patch, self.patch], align_corners=False)
        full = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return F.grid_sample(torch.cat([image, full], 1), grid, align_corners=False)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """image [N,1,H,W] normalised CT, mask [N,1,h,w] soft lesion mask -> [N,E]."""
        crops = self.crop(image, mask)
        x = self.convs(torch.cat([crops[:, :1], crops[:, :1] * crops[:, 1:]], 1))
        pooled = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # std: heterogeneity
        return self.proj(pooled)
