"""Radiological lesion descriptors measured on the model's own lesion mask.

Radiologists read a lesion's margin (smooth vs spiculated) and its internal heterogeneity;
radiomics measures them as shape and texture features. Learned end to end from a Cox loss
on a few hundred patients, the CNN views did not pick these up (docs/experiments/); the
same quantities measured directly on the mask do (Spearman 0.84 with the synthetic margin,
0.79 with texture, on ground-truth masks). So this module measures them on the largest
lesion slice of the mask the views read (model/views.py MaskPolicy: the given contour
where there is one, else the prediction) and hands them to the patient fusion as a token.
They are measurements, not learned: no gradient flows back into the mask through them.
The model also hands them on (ModelOutput.lesion_descriptors), and the survival stack
(evaluation/stacking.py) reads them as covariates next to the tables.

Features per patient [B, 8]:
  present      a lesion of >= MIN_AREA pixels was found (all others are 0 when not)
  log_area     log(1 + area) of the largest lesion slice / log(1 + H*W)
  texture      intensity std inside the 1-pixel-eroded lesion (heterogeneity; the erosion
               keeps the lesion / lung boundary blur out), x4
  irregularity radial coefficient of variation of the boundary pixels' distance to the
               centroid (0 for a disc, grows with spiculation), x4
  density      mean intensity inside the lesion (ground glass vs solid)
  z_extent     fraction of the patient's slices that show the lesion
  lateral      |centroid x - centre| / half width (central vs peripheral)
  height       index of the largest slice / (slices - 1) (upper vs lower)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from mmdls_dist.model.layers import token_net

NAMES = (
    "present",
    "log_area",
    "texture",
    "irregularity",
    "density",
    "z_extent",
    "lateral",
    "height",
)
N_DESCRIPTORS = len(NAMES)
MIN_AREA = 5  # pixels: below this the mask is noise, not a lesion


@torch.no_grad()
def measure(ct: torch.Tensor, lesion_prob: torch.Tensor, slice_mask: torch.Tensor):
    """ct [B,S,H,W] in [0,1], lesion_prob [B,S,H,W], slice_mask [B,S] bool -> [B, 8]."""
    b, s, h, w = ct.shape
    masks = (lesion_prob > 0.5) & slice_mask[:, :, None, None]
    areas = masks.sum((2, 3))
    k = areas.argmax(1)
    rows = torch.arange(b, device=ct.device)
    m = masks[rows, k].float()  # [B,H,W] the largest lesion slice
    c = ct[rows, k].float()
    area = m.sum((1, 2))
    present = area >= MIN_AREA
    eroded = -F.max_pool2d(-m[:, None], 3, 1, 1)[:, 0]
    inner = torch.where((eroded.sum((1, 2)) >= 4)[:, None, None], eroded, m)
    texture = _masked_std(c, inner)
    density = (c * m).sum((1, 2)) / area.clamp(min=1)
    yy, xx = torch.meshgrid(
        torch.arange(h, device=ct.device, dtype=c.dtype),
        torch.arange(w, device=ct.device, dtype=c.dtype),
        indexing="ij",
    )
    cy = (yy * m).sum((1, 2)) / area.clamp(min=1)
    cx = (xx * m).sum((1, 2)) / area.clamp(min=1)
    boundary = m - eroded
    radius = torch.sqrt((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2)
    irregularity = _masked_std(radius, boundary) / _masked_mean(radius, boundary).clamp(min=0.5)
    n_slices = slice_mask.sum(1).clamp(min=1)
    features = torch.stack(
        [
            present.float(),
            torch.log1p(area) / math.log1p(h * w),
            4 * texture,
            4 * irregularity,
            density,
            (areas >= MIN_AREA).sum(1) / n_slices,
            (cx / max(1, w - 1) - 0.5).abs() * 2,
            k / (n_slices - 1).clamp(min=1),
        ],
        dim=1,
    )
    return torch.where(present[:, None], features, torch.zeros_like(features))


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1)


def _masked_std(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    mean = _masked_mean(x, m)
    return torch.sqrt(_masked_mean((x - mean[:, None, None]) ** 2, m) + 1e-8)


class LesionDescriptors(nn.Module):
    """views.LesionContext (its measured descriptors, [B,8]) -> [B,E]: the
    measured descriptors as one patient-fusion token, built like a table row (values and
    missing flags through a small MLP: the path that demonstrably learns from a handful of
    informative columns). Standardised with running batch statistics (no learned affine):
    the raw scales differ by an order of magnitude and depend on the image size. A patient
    without a found lesion has every value missing."""

    def __init__(self, embed_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.BatchNorm1d(N_DESCRIPTORS, affine=False, momentum=0.01)
        self.token = token_net(2 * N_DESCRIPTORS, hidden, embed_dim, dropout)

    def standardised(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,8] measurements -> (values [B,8] standardised, 0 where missing; missing [B,8])."""
        missing = (raw[:, :1] == 0).expand_as(raw)
        if self.training and raw.shape[0] == 1:
            # Batch statistics of one patient are undefined: use the running ones, so the
            # values keep the scale the fusion sees everywhere else.
            values = F.batch_norm(
                raw, self.norm.running_mean, self.norm.running_var, eps=self.norm.eps
            )
        else:
            values = self.norm(raw)
        return torch.where(missing, torch.zeros_like(values), values), missing

    def forward(self, context) -> torch.Tensor:
        """context: views.LesionContext, whose `descriptors` are measure() of its mask."""
        values, missing = self.standardised(context.descriptors)
        return self.token(torch.cat([values, missing.to(values.dtype)], dim=1))
