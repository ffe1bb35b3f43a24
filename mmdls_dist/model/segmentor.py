"""LungLesionSegmentor: a shared ResNet encoder, lung and lesion decoders, and
transformer cross-attention from lesion to lung features at the bottleneck; lesion logits
refined to the input's resolution (FullResolution), lung logits at a quarter of it.

Works on single slices: N = number of real (non-padded) slices in the batch. GroupNorm, not
BatchNorm: per-GPU batches are a few patients, and a slice's output must not depend on which
other slices share its batch (padding invariance, train/eval parity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from mmdls_dist.model.layers import conv_norm_act, norm

LUNG_PRIOR = 0.2  # typical share of a slice inside the lungs
LESION_PRIOR = 0.005  # typical share inside the lesion (on slices that show it)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a (projected) identity shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = norm(c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)), inplace=True)
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


class ResNetEncoder(nn.Module):
    """[N,1,H,W] -> 4 feature maps at strides 4, 8, 16, 32 with `widths` channels.

    The stem reaches stride 4 with two strided 3x3 convs: at 224 px the first stage then
    runs at 56 x 56, which keeps 30 slices per patient affordable on a CPU.
    """

    def __init__(self, widths: tuple[int, ...], blocks: int):
        super().__init__()
        self.stem = nn.Sequential(
            conv_norm_act(1, widths[0], stride=2), conv_norm_act(widths[0], widths[0], stride=2)
        )
        stages = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            layers = [BasicBlock(c_in, width, stride=1 if i == 0 else 2)]
            layers += [BasicBlock(width, width, stride=1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class CrossAttention(nn.Module):
    """Lesion tokens attend to lung tokens (pre-norm transformer block, residual).

    Needs a few bottleneck tokens to be more than a linear map: the bottleneck is the
    stride-32 map, (H/32) x (W/32) tokens. At 32 px that is one key, softmax over one key is
    constant, and the query path (norm_q) gets exactly zero gradient; 64 px gives 4 keys,
    the 128 / 224 px presets 16 / 49."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, lesion: torch.Tensor, lung: torch.Tensor) -> torch.Tensor:
        """lesion, lung: [N,C,h,w] -> lesion [N,C,h,w] enriched with lung context."""
        n, c, h, w = lesion.shape
        q = lesion.flatten(2).transpose(1, 2)  # [N, h*w, C]
        kv = self.norm_kv(lung.flatten(2).transpose(1, 2))
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        q = q + self.ff(self.norm_ff(q))
        return q.transpose(1, 2).reshape(n, c, h, w)


class Decoder(nn.Module):
    """FPN-style top-down decoder: 4 encoder maps -> [N,D,H/4,W/4] features + 1-channel logits."""

    def __init__(self, widths: tuple[int, ...], dim: int, prior: float):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(w, dim, 1) for w in widths)
        self.smooth = nn.ModuleList(conv_norm_act(dim, dim) for _ in widths[:-1])
        self.head = nn.Conv2d(dim, 1, 1)
        # Start at the foreground's prior (RetinaNet's trick): a lesion covers well under 1 %
        # of a slice, and from p = 0.5 the first hundreds of steps only learn "background".
        nn.init.constant_(self.head.bias, math.log(prior / (1 - prior)))

    def top(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.lateral[-1](features[-1])

    def forward(
        self, features: list[torch.Tensor], top: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = top
        for i in range(len(features) - 2, -1, -1):
            up = F.interpolate(x, size=features[i].shape[-2:], mode="nearest")
            x = self.smooth[i](self.lateral[i](features[i]) + up)
        return x, self.head(x)


class FullResolution(nn.Module):
    """Lesion logits at the input's resolution. The decoder ends at a quarter of it, where
    a small lesion (a 5-10 mm nodule at 64-96 px: a few pixels across) is under one cell:
    its features, narrowed and upsampled, meet a shallow full-resolution view of the CT,
    and a residual on the upsampled quarter-resolution logits sharpens them. Starts as the
    plain upsampling (the residual's head starts near zero)."""

    def __init__(self, dim: int, width: int = 8):
        super().__init__()
        self.narrow = nn.Conv2d(dim, width, 1)
        self.image = conv_norm_act(1, width)
        self.fuse = conv_norm_act(2 * width, width)
        self.head = nn.Conv2d(width, 1, 1)
        nn.init.normal_(self.head.weight, std=1e-2)  # near 0: starts as the upsampling
        nn.init.zeros_(self.head.bias)

    def forward(
        self, image: torch.Tensor, features: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """image [N,1,H,W], features [N,D,h,w], logits [N,1,h,w] -> logits [N,1,H,W]."""
        size = image.shape[-2:]
        up = F.interpolate(self.narrow(features), size=size, mode="bilinear", align_corners=False)
        base = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return base + self.head(self.fuse(torch.cat([up, self.image(image)], 1)))


@dataclass
class SegmentorOutput:
    """Per real slice. N slices, D = decoder width, h x w = H/4 x W/4, H x W the input's."""

    features: list[torch.Tensor]  # encoder maps, strides 4..32
    lung_features: torch.Tensor  # [N,D,h,w] lung decoder's last map
    lesion_features: torch.Tensor  # [N,D,h,w]
    lung_logits: torch.Tensor  # [N,1,h,w]
    lesion_logits: torch.Tensor  # [N,1,h,w]
    lesion_full: torch.Tensor  # [N,1,H,W] lesion logits at the input's resolution


class LungLesionSegmentor(nn.Module):
    """The publication's LungLesionSegmentor: one encoder, lung and lesion decoders, and the
    lesion decoder's bottleneck enriched by cross-attention to the lung's."""

    def __init__(self, widths: tuple[int, ...], blocks: int, decoder_width: int, heads: int):
        super().__init__()
        self.encoder = ResNetEncoder(widths, blocks)
        self.lung_decoder = Decoder(widths, decoder_width, prior=LUNG_PRIOR)
        self.lesion_decoder = Decoder(widths, decoder_width, prior=LESION_PRIOR)
        self.cross = CrossAttention(decoder_width, heads)
        self.full = FullResolution(decoder_width)

    def forward(self, x: torch.Tensor) -> SegmentorOutput:
        """x: float [N,1,H,W] normalised CT -> SegmentorOutput (lesion_full at H x W, the
        other logits at H/4 x W/4)."""
        features = self.encoder(x)
        lung_top = self.lung_decoder.top(features)
        lesion_top = self.cross(self.lesion_decoder.top(features), lung_top)
        lung_f, lung_logits = self.lung_decoder(features, lung_top)
        lesion_f, lesion_logits = self.lesion_decoder(features, lesion_top)
        full = self.full(x, lesion_f, lesion_logits)
        return SegmentorOutput(features, lung_f, lesion_f, lung_logits, lesion_logits, full)
