"""What the imaging branch looks at: the mask policy and the per-slice views.

The views read the lesion and the lung around it through soft masks. Which mask that is,
the segmentor's prediction or the patient's own, is decided in one place, `MaskPolicy`:

* warm-up (training, `optim.gt_mask_warmup_epochs`): the given lung and lesion masks are
  blended in with weight `warmup`, decaying to 0, where the patient has them;
* given contours (`model.given_lesion_mask`): the lesion views read a patient's own lesion
  contour whole wherever there is one, in training and at inference alike (MM-DLS takes
  CT *with* its masks); a CT-only patient is read through the segmentor.

Otherwise (and at inference without contours) the views read the predicted masks, so
gradients flow back into the segmentor and inference needs CT only.

A slice view is a module with `out_dim` and `forward(SliceContext) -> [N, out_dim]`; the
model concatenates every view into the slice token (model/mmdls.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from mmdls_dist.data.schema import Batch
from mmdls_dist.model.descriptors import measure
from mmdls_dist.model.layers import mlp
from mmdls_dist.model.segmentor import SegmentorOutput

EPS = 1e-4


def slots(x: torch.Tensor, valid: torch.Tensor, static: bool) -> torch.Tensor:
    """[B,S,...] -> the slices the imaging branch runs on: the real ones [N,...], or with
    `static` every slot [B*S,...] (a shape that does not change between batches, what a
    compiled step needs; a boolean index is data-dependent and syncs with the host)."""
    return x.flatten(0, 1) if static else x[valid]


def unslot(values: torch.Tensor, valid: torch.Tensor, static: bool, fill: float = 0.0):
    """slots()'s [N,...] or [B*S,...] -> [B,S,...], `fill` on padded slots."""
    if static:
        shaped = values.reshape(*valid.shape, *values.shape[1:])
        keep = valid.reshape(*valid.shape, *([1] * (values.dim() - 1)))
        return torch.where(keep, shaped, torch.full_like(shaped, fill))
    out = values.new_full((*valid.shape, *values.shape[1:]), fill)
    return out.index_put((valid,), values)


class MaskPolicy:
    """Which lesion / lung mask each view reads, for one forward pass of one batch."""

    def __init__(self, batch: Batch, warmup: float, given_lesion: bool):
        self.batch = batch
        self.warmup = warmup
        # [B] share of each patient's own contour in its lesion views.
        self.lesion_weight = (1.0 if given_lesion else warmup) * batch.lesion_annotated.float()
        self.reads_given = given_lesion or warmup > 0  # else the masks need not be unpacked

    @functools.cached_property
    def given_lesion(self) -> torch.Tensor:
        """uint8 [B,S,H,W]: the lesion contours, unpacked once per forward."""
        return self.batch.lesion_mask

    def slice_masks(
        self, lung_p: torch.Tensor, lesion_p: torch.Tensor, static: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted soft masks [N,1,h,w] of the slices the imaging branch runs on (the real
        ones, or every slot with `static`, as slots()) -> the masks the slice views read
        (same shapes): the lung takes ground truth during the warm-up only."""
        if not self.reads_given:
            return lung_p, lesion_p
        valid = self.batch.slice_mask
        size = lung_p.shape[-2:]
        if self.warmup > 0:
            gt_lung = F.adaptive_avg_pool2d(
                slots(self.batch.lung_mask, valid, static).unsqueeze(1).float(), size
            )
            lung_p = self.warmup * gt_lung + (1 - self.warmup) * lung_p
        gt_lesion = F.adaptive_avg_pool2d(
            slots(self.given_lesion, valid, static).unsqueeze(1).float(), size
        )
        w = slots(self.lesion_weight[:, None].expand_as(valid), valid, static).to(lesion_p.dtype)
        w = w[:, None, None, None]
        return lung_p, w * gt_lesion + (1 - w) * lesion_p

    def full_lesion(self, lesion_logits: torch.Tensor) -> torch.Tensor:
        """[B,S,H,W] lesion logits -> the full-resolution soft lesion mask the patient-level
        views read, blended with the patient's own contour as the slice views are."""
        prob = torch.sigmoid(lesion_logits.float())
        if not self.reads_given:
            return prob
        w = self.lesion_weight[:, None, None, None]
        return w * self.given_lesion.float() + (1 - w) * prob


@dataclass
class SliceContext:
    """Everything a slice view may read, per real slice (N of them, h x w = H/4 x W/4)."""

    image: torch.Tensor  # [N,1,H,W] normalised CT
    seg: SegmentorOutput
    lung: torch.Tensor  # [N,1,h,w] soft lung mask (see MaskPolicy)
    lesion: torch.Tensor  # [N,1,h,w] soft lesion mask


@dataclass
class LesionContext:
    """Everything a patient-level lesion view may read (B patients, S slice slots)."""

    ct: torch.Tensor  # [B,S,H,W] in [0,1]
    lesion: torch.Tensor  # [B,S,H,W] soft lesion mask (MaskPolicy.full_lesion)
    slice_mask: torch.Tensor  # [B,S]

    @functools.cached_property
    def descriptors(self) -> torch.Tensor:
        """[B,8] the measured lesion descriptors (descriptors.py), once per forward: the
        descriptor view's input, and handed on to the survival stack."""
        return measure(self.ct, self.lesion, self.slice_mask)


def masked_mean(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """features [N,C,h,w], weight [N,1,H,W] in [0,1] -> [N,C] weighted spatial mean."""
    if weight.shape[-2:] != features.shape[-2:]:
        weight = F.adaptive_avg_pool2d(weight, features.shape[-2:])
    return (features * weight).sum((2, 3)) / (weight.sum((2, 3)) + EPS)


def log_area(weight: torch.Tensor) -> torch.Tensor:
    """weight [N,1,H,W] -> [N,1] log of the soft area fraction: pooling is blind to size."""
    return torch.log(weight.mean((2, 3)) + EPS)


class MaskPoolEncoder(nn.Module):
    """(decoder map [N,D,h,w], encoder map [N,C,h',w'], soft mask [N,1,h,w]) -> [N,E]:
    mask-weighted average pooling of the segmentor's own feature maps (decoder map at
    stride 4, encoder map at stride 16) plus the soft area. Nothing is convolved twice."""

    def __init__(self, decoder_width: int, encoder_width: int, embed_dim: int, dropout: float):
        super().__init__()
        self.out_dim = embed_dim
        self.proj = mlp(decoder_width + encoder_width + 1, embed_dim, dropout)

    def pool(
        self, decoder_map: torch.Tensor, encoder_map: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        pooled = [masked_mean(decoder_map, mask), masked_mean(encoder_map, mask), log_area(mask)]
        return self.proj(torch.cat(pooled, dim=1))


class LesionEncoder(MaskPoolEncoder):
    """The lesion: the lesion decoder's features under the lesion mask."""

    def forward(self, ctx: SliceContext) -> torch.Tensor:
        return self.pool(ctx.seg.lesion_features, ctx.seg.features[2], ctx.lesion)


class SpaceEncoder(MaskPoolEncoder):
    """The lung space around the lesion: the lung decoder's features under lung * (1 - lesion)."""

    def forward(self, ctx: SliceContext) -> torch.Tensor:
        return self.pool(ctx.seg.lung_features, ctx.seg.features[2], ctx.lung * (1 - ctx.lesion))
