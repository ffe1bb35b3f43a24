"""Lesion descriptors: each measurement moves with what it names, and nothing else."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmdls_dist.model.descriptors import measure


def lesion(size=64, radius=12.0, spikes=0.0, texture=0.0, seed=0):
    """One slice with a lesion: radius modulated by 7 lobes of relative amplitude `spikes`,
    intensity 0.5 + `texture` x noise inside. -> (ct, mask) [1,1,H,W]."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    theta = np.arctan2(yy, xx)
    mask = np.hypot(yy, xx) < radius * (1 + spikes * np.cos(7 * theta))
    rng = np.random.default_rng(seed)
    ct = np.where(mask, 0.5 + texture * rng.standard_normal(mask.shape), 0.1)
    return torch.tensor(ct, dtype=torch.float32)[None, None], torch.tensor(mask)[None, None]


def features(ct, mask, slice_mask=None):
    slice_mask = torch.ones(ct.shape[:2], dtype=torch.bool) if slice_mask is None else slice_mask
    names = ("present", "log_area", "texture", "irregularity", "density", "z", "lateral", "h")
    return dict(zip(names, measure(ct, mask.float(), slice_mask)[0].tolist(), strict=True))


def test_irregularity_grows_with_spiculation_and_ignores_texture():
    smooth = features(*lesion(spikes=0.0))
    spiky = features(*lesion(spikes=0.4))
    assert smooth["present"] == 1.0 and smooth["irregularity"] < 0.2
    assert spiky["irregularity"] > 3 * smooth["irregularity"]
    noisy = features(*lesion(spikes=0.0, texture=0.1))
    assert noisy["irregularity"] == pytest.approx(smooth["irregularity"])


def test_texture_measures_the_interior_not_the_boundary():
    flat = features(*lesion(texture=0.0))
    assert flat["texture"] < 1e-3  # the lesion / background step is eroded away
    noisy = features(*lesion(texture=0.1))
    assert noisy["texture"] == pytest.approx(4 * 0.1, rel=0.15)
    assert noisy["density"] == pytest.approx(0.5, abs=0.02)


def test_largest_slice_is_measured_and_no_lesion_gives_zeros():
    small_ct, small = lesion(radius=5.0)
    big_ct, big = lesion(radius=14.0, spikes=0.3)
    ct = torch.cat([small_ct, big_ct, small_ct], dim=1)
    mask = torch.cat([small, big, torch.zeros_like(small)], dim=1)
    f = features(ct, mask)
    assert f["log_area"] == pytest.approx(math.log1p(big.sum().item()) / math.log1p(64 * 64))
    assert f["h"] == pytest.approx(0.5) and f["z"] == pytest.approx(2 / 3)
    assert features(ct, torch.zeros_like(mask)) == dict.fromkeys(f, 0.0)
    # A padded slice never counts, however large its mask.
    padded = torch.tensor([[True, False, True]])
    assert features(ct, mask, padded)["log_area"] < f["log_area"]
