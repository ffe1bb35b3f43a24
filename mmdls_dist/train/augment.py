"""Training-time augmentation of a Batch on its device, batched over patients.

The loader ships uint8 CT and bit-packed masks (schema.Batch); here they are unpacked on the
accelerator, transformed, and packed back, so the model reads an augmented batch through
the same contract as any other and evaluation / prediction never see this module.

Per patient (drawn independently, each with its own probability):
- geometry: one random affine (rotation, isotropic scale, translation) for the whole stack,
  a left-right mirror, and a small extra translation per slice (slice jitter: breathing and
  table motion between slices). CT, lung and lesion masks go through the same sampling
  grid; masks are resampled bilinearly as soft maps and re-thresholded at 0.5.
  Mirroring is left-right only: a mirrored chest is still a plausible chest for every
  lesion and lung-space finding, while an anterior-posterior or cranio-caudal flip puts the
  spine in front or the apex at the base, which no scanner produces.
- intensity (what differs between scanners, kernels and centers): gamma, gain and offset of
  the windowed intensities, Gaussian blur (a softer reconstruction kernel) and Gaussian
  noise (dose).
- slice dropout: a share of the real slices is removed and the rest moved up, as if the
  stack had been sampled more coarsely.

Every draw comes from one generator seeded by (run seed, epoch, rank, batch index), so a
run, and its resumption at an epoch boundary, is reproducible.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F  # noqa: N812

from mmdls_dist.config import AugmentConfig
from mmdls_dist.data.schema import Batch, unpack_masks


def pack_masks(bits: torch.Tensor) -> torch.Tensor:
    """uint8/bool [..., H, W] of 0/1 -> uint8 [..., ceil(H*W/8)], numpy packbits' layout
    (big-endian bit order), on the tensor's device; the inverse of schema.unpack_masks."""
    flat = bits.flatten(-2).to(torch.uint8)
    pad = (-flat.shape[-1]) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    groups = flat.reshape(*flat.shape[:-1], -1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (groups * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def seed_of(seed: int, epoch: int, rank: int, index: int) -> int:
    """A 63-bit seed for one batch from its coordinates (a splitmix-style mix, so nearby
    coordinates give unrelated streams)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = (x ^ (rank * 0x94D049BB133111EB + index * 0x2545F4914F6CDD1D)) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 32)) & (2**63 - 1)


class Augment:
    """Batch (on its device) -> augmented Batch, same shapes and dtypes."""

    def __init__(self, cfg: AugmentConfig, seed: int, rank: int):
        self.cfg, self.seed, self.rank = cfg, seed, rank

    def __call__(self, batch: Batch, epoch: int, index: int) -> Batch:
        if not self.cfg.enabled:
            return batch
        device = batch.ct.device
        gen = torch.Generator(device=device)
        gen.manual_seed(seed_of(self.seed, epoch, self.rank, index))
        draw = _Draws(gen, device, len(batch))
        ct = batch.ct.float() / 255.0  # [B,S,H,W]
        masks = unpack_masks(batch.masks, batch.ct.shape[-2:]).float()  # [B,2,S,H,W]
        ct, masks = self._geometry(ct, masks, batch.slice_mask, draw)
        ct = self._intensity(ct, draw)
        ct, masks, slice_mask = self._slice_dropout(ct, masks, batch.slice_mask, draw)
        ct = ct * slice_mask[..., None, None]  # padding stays exactly 0
        return dataclasses.replace(
            batch,
            ct=(ct.clamp(0, 1) * 255).round().to(torch.uint8),
            masks=pack_masks(masks > 0.5),
            slice_mask=slice_mask,
        )

    def _geometry(self, ct, masks, slice_mask, draw: _Draws):
        c = self.cfg
        b, s, h, w = ct.shape
        affine = draw.chance(c.p_affine)
        flip = draw.chance(c.p_flip)
        jitter = draw.chance(c.p_slice_jitter)
        if not (affine.any() or flip.any() or jitter.any()):
            return ct, masks
        angle = affine * draw.uniform(-1, 1) * math.radians(c.rotate_deg)
        scale = torch.exp(affine * draw.uniform(-1, 1) * math.log1p(c.scale))
        shift = affine[:, None] * draw.uniform(-1, 1, 2) * 2 * c.translate  # grid units
        mirror = 1.0 - 2.0 * flip.float()
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [
                torch.stack([cos * mirror, -sin, shift[:, 0]], -1),
                torch.stack([sin * mirror, cos, shift[:, 1]], -1),
            ],
            1,
        )  # [B,2,3]: output grid -> input grid, mirror applied first
        theta = theta[:, None].expand(b, s, 2, 3).clone()
        per_slice = torch.randn(b, s, 2, generator=draw.gen, device=ct.device)
        theta[..., 2] += jitter[:, None, None] * per_slice * (2 * c.slice_jitter / w)
        moved = (affine | flip | jitter)[:, None].expand(b, s) & slice_mask
        stack = torch.cat([ct[:, None], masks], 1).permute(0, 2, 1, 3, 4)  # [B,S,3,H,W]
        images = stack[moved]  # [M,3,H,W]
        if images.shape[0]:
            grid = F.affine_grid(theta[moved], list(images.shape), align_corners=False)
            ct_part = F.grid_sample(
                images[:, :1], grid, mode="bilinear", padding_mode="border", align_corners=False
            )
            mask_part = F.grid_sample(
                images[:, 1:], grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
            stack = stack.index_put((moved,), torch.cat([ct_part, mask_part], 1))
        stack = stack.permute(0, 2, 1, 3, 4)
        return stack[:, 0], stack[:, 1:]

    def _intensity(self, ct, draw: _Draws):
        c = self.cfg
        b = ct.shape[0]
        shape = (b, 1, 1, 1)
        levels = draw.chance(c.p_intensity)
        if levels.any():
            gamma = torch.exp(levels * draw.uniform(-1, 1) * math.log1p(c.gamma)).view(shape)
            gain = (1 + levels * draw.uniform(-1, 1) * c.gain).view(shape)
            offset = (levels * draw.uniform(-1, 1) * c.offset).view(shape)
            ct = ct.clamp(0, 1) ** gamma * gain + offset
        blur = draw.chance(c.p_blur)
        if blur.any():
            sigma = draw.uniform(0.25, 1) * c.blur_sigma
            ct = torch.where(blur.view(shape), _gaussian_blur(ct, sigma), ct)
        noise = draw.chance(c.p_noise)
        if noise.any():
            std = (noise * draw.uniform(0, 1) * c.noise_std).view(shape)
            ct = ct + std * torch.randn(ct.shape, generator=draw.gen, device=ct.device)
        return ct

    def _slice_dropout(self, ct, masks, slice_mask, draw: _Draws):
        drop = draw.chance(self.cfg.p_slice_dropout)
        if not drop.any():
            return ct, masks, slice_mask
        b, s = slice_mask.shape
        u = torch.rand(b, s, generator=draw.gen, device=ct.device)
        keep = slice_mask & ~(drop[:, None] & (u < self.cfg.slice_dropout))
        # A patient keeps at least its first real slice.
        first = slice_mask & (slice_mask.cumsum(1) == 1)
        keep |= first & (keep.sum(1, keepdim=True) == 0)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept slices first
        ct = torch.take_along_dim(ct, order[..., None, None], 1)
        masks = torch.take_along_dim(masks, order[:, None, :, None, None], 2)
        kept = torch.arange(s, device=ct.device)[None] < keep.sum(1, keepdim=True)
        masks = masks * kept[:, None, :, None, None]
        return ct, masks, kept


class _Draws:
    """Per-patient random draws from one generator."""

    def __init__(self, gen: torch.Generator, device: torch.device, n: int):
        self.gen, self.device, self.n = gen, device, n

    def chance(self, p: float) -> torch.Tensor:
        return torch.rand(self.n, generator=self.gen, device=self.device) < p

    def uniform(self, low: float, high: float, *extra: int) -> torch.Tensor:
        u = torch.rand(self.n, *extra, generator=self.gen, device=self.device)
        return low + (high - low) * u


def _gaussian_blur(ct: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """[B,S,H,W] blurred in-plane with a per-patient sigma [B] (pixels), separably."""
    b, s, h, w = ct.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=ct.device, dtype=ct.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None].clamp(min=1e-3)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(s, 0)  # [B*S,K]
    x = F.pad(ct.reshape(1, b * s, h, w), (radius,) * 4, mode="replicate")
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * s)
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * s)
    return x.reshape(b, s, h, w)
