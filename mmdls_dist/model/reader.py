"""LesionReader: a patient-level view of the lesion and its surroundings -> one fusion token.

Why it exists (docs/experiments/): on the synthetic cohort the lesion's margin and
internal texture drive survival, and they live at the scale of a few pixels. The per-slice
encoders pool the segmentor's 1/4-resolution maps, and a per-slice patch spends most of its
crops on slices without lesion, so neither learned them from outcomes. A small CNN on a
crop of the slices that show the lesion best (at one pixel per model pixel then), supervised
by the same task losses, does: on 2,500 training patients it reached C-index ~0.69 from the
crop alone.

The crop: the slice with the largest (soft) lesion area and its two neighbours, as three
channels, cut around that slice's lesion centroid. Its field spans a fixed number of
equivalent lesion radii (sqrt(area / pi) of that slice's lesion), resampled to
side x side: the lesion and its surroundings at one relative scale, whatever the lesion's
size or the center's field of view. Against one pixel per model pixel, 5 radii read more of
the outcome on both synthetic styles, crop alone and crop with the table (external-center
C-index, docs/experiments/probe_reader_field.py). The location and the field come from the
model's own lesion mask (ground truth blended in during the warm-up, like the other views)
and are detached: the reader looks where the segmentor points, it does not move the mask.
Inference needs CT only.

BatchNorm, unlike the segmentor's GroupNorm: the reader sees one crop per patient (never a
padded slice, so batch statistics cannot leak padding), and with per-sample normalisation
(GroupNorm) or none the same CNN learned nothing from outcomes in 14 epochs on that probe
(Spearman with the true margin 0.01, against 0.35 with BatchNorm; docs/experiments/probe_crops.py).
Under DDP each rank normalises over its own patients and rank 0's running statistics are
broadcast (DDP's default), so every rank evaluates alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from mmdls_dist.model.layers import normalise_ct

EPS = 1e-4


def soft_centroid(mask: torch.Tensor) -> torch.Tensor:
    """mask [N,h,w] soft weights -> [N,2] weighted centroid (x, y) in affine_grid's
    align_corners=False coordinates (pixel centres). An empty mask gives (0, 0)."""
    h, w = mask.shape[-2:]
    total = mask.sum((1, 2)) + EPS
    ys = (torch.arange(h, device=mask.device, dtype=mask.dtype) + 0.5) * 2 / h - 1
    xs = (torch.arange(w, device=mask.device, dtype=mask.dtype) + 0.5) * 2 / w - 1
    return torch.stack([(mask.sum(1) * xs).sum(1), (mask.sum(2) * ys).sum(1)], 1) / total[:, None]


@torch.no_grad()
def locate(lesion_prob: torch.Tensor, slice_mask: torch.Tensor):
    """lesion_prob [B,S,H,W], slice_mask [B,S] -> (slice index [B,3] of the largest lesion
    slice and its neighbours, clamped to the real slices; centroid [B,2] as (x, y) in
    affine_grid coordinates, align_corners=False; equivalent radius sqrt(area / pi) [B] in
    pixels of that slice's lesion). No lesion: the image centre and radius 0.

    The area counts p >= 0.75 whole and ramps from p = 0.25: a binary mask's area, without
    the segmentor's faint background, and continuous in p, so that float noise moves the
    crop by float noise (under a hard threshold at 0.5 an integration test once saw
    evaluation disagree with training-time validation on a stage AUC)."""
    b = lesion_prob.shape[0]
    prob = lesion_prob * slice_mask[:, :, None, None]
    area = prob.sum((2, 3))
    k = area.argmax(1)
    last = (slice_mask.sum(1) - 1).clamp(min=0)
    idx = torch.stack([(k - 1).clamp(min=0), k, torch.minimum(k + 1, last)], dim=1)
    m = prob[torch.arange(b, device=prob.device), k]  # [B,H,W]
    found = m.sum((1, 2)) > EPS
    radius = torch.sqrt(((m - 0.25) * 2).clamp(0, 1).sum((1, 2)) / torch.pi)
    return idx, soft_centroid(m) * found[:, None], radius


def field(radius: torch.Tensor, radii: float, h: int, w: int) -> torch.Tensor:
    """[B] crop field in pixels: `radii` equivalent radii across, between 8 pixels and the
    image's larger side (no lesion: 8 pixels at the image centre)."""
    return (radii * radius).clamp(min=8.0, max=float(max(h, w)))


def crop(
    image: torch.Tensor, idx: torch.Tensor, centre: torch.Tensor, side: int, view: torch.Tensor
) -> torch.Tensor:
    """image [B,S,H,W], idx [B,3], centre [B,2], view [B] pixels -> [B,3,side,side]: the
    view x view pixels around the centre resampled bilinearly to side x side (zeros beyond
    the image)."""
    b, _, h, w = image.shape
    slices = torch.gather(image, 1, idx[:, :, None, None].expand(-1, -1, h, w))
    theta = torch.zeros(b, 2, 3, device=image.device, dtype=image.dtype)
    theta[:, 0, 0] = view.to(image.dtype) / w
    theta[:, 1, 1] = view.to(image.dtype) / h
    theta[:, :, 2] = centre.to(image.dtype)
    grid = F.affine_grid(theta, [b, 3, side, side], align_corners=False)
    return F.grid_sample(slices, grid, align_corners=False)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class LesionReader(nn.Module):
    """views.LesionContext (CT [B,S,H,W] in [0,1], soft lesion mask, slice_mask) -> [B,E].

    with_mask: the crop also carries the lesion mask of its three slices (6 channels). The
    mask states the boundary the CT blurs (a CNN given the ground-truth mask crop reads the
    synthetic margin far better than one given the CT: docs/experiments/probe_crops.py
    --channels)."""

    def __init__(
        self,
        side: int,
        width: int,
        embed_dim: int,
        dropout: float,
        with_mask: bool = False,
        radii: float = 5.0,
    ):
        super().__init__()
        self.side = side
        self.radii = radii
        self.with_mask = with_mask
        self.convs = nn.Sequential(
            _conv_bn_relu(6 if with_mask else 3, 2 * width),
            _conv_bn_relu(2 * width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, 4 * width),
            nn.MaxPool2d(2),
            _conv_bn_relu(4 * width, 4 * width),
        )
        self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, embed_dim))

    def forward(self, context) -> torch.Tensor:
        """context: views.LesionContext (CT, soft lesion mask, slice_mask)."""
        prob = context.lesion.detach()
        idx, centre, radius = locate(prob, context.slice_mask)
        view = field(radius, self.radii, *prob.shape[-2:])
        x = crop(normalise_ct(context.ct), idx, centre, self.side, view)
        if self.with_mask:
            x = torch.cat([x, crop(prob, idx, centre, self.side, view)], dim=1)
        return self.proj(self.convs(x).mean((2, 3)))
