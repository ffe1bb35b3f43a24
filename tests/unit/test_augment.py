"""Training-time augmentation: CT and masks move together, draws are seeded, evaluation never
sees it, and an augmented batch keeps the Batch contract."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import train_config

from mmdls_dist.config import AugmentConfig, DataConfig
from mmdls_dist.data.loader import make_loader
from mmdls_dist.data.schema import Batch, unpack_masks
from mmdls_dist.train.augment import Augment, pack_masks

# Every transform off: tests switch on the one they look at.
NONE = {f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")}


def _augment(seed: int = 0, **fields) -> Augment:
    return Augment(AugmentConfig(**{**NONE, **fields}), seed=seed, rank=0)


@pytest.fixture(scope="module")
def batch(shard_dir) -> Batch:
    cfg = DataConfig(shards=str(shard_dir), batch_size=4, max_slices=6, num_workers=0)
    return next(iter(make_loader(cfg, "train", "eval")))


def _square_batch(size: int = 48, slices: int = 3) -> Batch:
    """One patient: a bright off-centre rectangle that is also its lung and lesion mask."""
    ct = torch.full((1, slices, size, size), 20, dtype=torch.uint8)
    mask = torch.zeros(1, slices, size, size, dtype=torch.uint8)
    mask[:, :, 10:22, 26:40] = 1
    ct[mask.bool()] = 220
    packed = torch.stack([pack_masks(mask), pack_masks(mask)], 1)
    n = 1
    zeros = {
        "clinical": torch.zeros(n, 8),
        "clinical_missing": torch.zeros(n, 8, dtype=torch.bool),
        "pet": torch.zeros(n, 5),
        "pet_missing": torch.zeros(n, 5, dtype=torch.bool),
        "radiomics": torch.zeros(n, 128),
        "radiomics_missing": torch.zeros(n, 128, dtype=torch.bool),
    }
    labels = {
        "histology": torch.zeros(n, dtype=torch.int64),
        "stage": torch.zeros(n, dtype=torch.int64),
        **{f"{e}_time": torch.ones(n) for e in ("dfs", "os")},
        **{
            f"{e}_{k}": torch.ones(n, dtype=torch.bool)
            for e in ("dfs", "os")
            for k in ("event", "known")
        },
    }
    return Batch(
        ct=ct,
        masks=packed,
        slice_mask=torch.ones(1, slices, dtype=torch.bool),
        lesion_annotated=torch.ones(1, dtype=torch.bool),
        **zeros,
        **labels,
        patient_id=["P-1"],
        center=["HOSP-A"],
    )


def test_pack_masks_is_numpys_packbits_and_the_inverse_of_unpack():
    bits = (torch.rand(2, 3, 13, 11, generator=torch.Generator().manual_seed(1)) < 0.4).to(
        torch.uint8
    )
    packed = pack_masks(bits)
    expected = np.packbits(bits.reshape(2, 3, -1).numpy(), axis=-1)
    np.testing.assert_array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_masks(packed, (13, 11)), bits)


def test_a_mirror_moves_ct_and_both_masks_exactly():
    batch = _square_batch()
    out = _augment(p_flip=1.0)(batch, epoch=0, index=0)
    assert torch.equal(out.ct, torch.flip(batch.ct, [-1]))
    assert torch.equal(out.lung_mask, torch.flip(batch.lung_mask, [-1]))
    assert torch.equal(out.lesion_mask, torch.flip(batch.lesion_mask, [-1]))


def _centroid(image: torch.Tensor) -> torch.Tensor:
    """(row, col) centre of mass of a [H,W] 0/1 image."""
    ys, xs = torch.nonzero(image, as_tuple=True)
    return torch.stack([ys.float().mean(), xs.float().mean()])


def test_an_affine_moves_ct_and_masks_through_the_same_grid():
    batch = _square_batch()
    out = _augment(p_affine=1.0, rotate_deg=20.0, scale=0.2, translate=0.15)(batch, 0, 0)
    bright = out.ct[0, 0] > 120  # the rectangle as the CT shows it after the transform
    for mask in (out.lung_mask[0, 0], out.lesion_mask[0, 0]):
        agree = (bright == mask.bool()).float().mean()
        assert agree > 0.99  # only boundary pixels may round differently
        assert torch.allclose(_centroid(mask), _centroid(bright), atol=0.5)
    moved = torch.linalg.norm(_centroid(out.lesion_mask[0, 0]) - _centroid(batch.lesion_mask[0, 0]))
    assert moved > 1.0  # it did move
    # Every slice of the stack moves the same way (one affine per patient, no jitter on).
    assert torch.equal(out.lesion_mask[0, 0], out.lesion_mask[0, 2])


def test_slice_jitter_moves_slices_differently_and_masks_with_them():
    batch = _square_batch(slices=6)
    out = _augment(p_slice_jitter=1.0, slice_jitter=3.0)(batch, 0, 0)
    centres = [_centroid(out.lesion_mask[0, k]) for k in range(6)]
    assert max(float(torch.linalg.norm(c - centres[0])) for c in centres) > 0.5
    for k in range(6):
        bright = out.ct[0, k] > 120
        assert torch.allclose(_centroid(out.lesion_mask[0, k]), _centroid(bright), atol=0.5)


def test_intensity_changes_ct_only_and_keeps_padding_zero(batch):
    out = _augment(p_intensity=1.0, p_noise=1.0, p_blur=1.0)(batch, 0, 0)
    assert torch.equal(out.masks, batch.masks)
    assert torch.equal(out.slice_mask, batch.slice_mask)
    assert not torch.equal(out.ct, batch.ct)
    assert out.ct.dtype == torch.uint8 and out.ct.shape == batch.ct.shape
    assert int(out.ct[~batch.slice_mask].sum()) == 0


def test_gain_and_offset_act_per_patient_as_drawn():
    batch = _square_batch()
    out = _augment(p_intensity=1.0, gamma=0.0, gain=0.3, offset=0.0)(batch, 0, 0)
    ratio = out.ct.float()[0, 0, 15, 30] / batch.ct.float()[0, 0, 15, 30]
    dark = out.ct.float()[0, 0, 0, 0] / batch.ct.float()[0, 0, 0, 0]
    assert abs(float(ratio) - float(dark)) < 0.03  # one gain for the whole patient
    assert 0.7 <= float(ratio) <= 1.3 and abs(float(ratio) - 1) > 1e-3


def test_slice_dropout_removes_slices_and_moves_the_rest_up(batch):
    out = _augment(p_slice_dropout=1.0, slice_dropout=0.5)(batch, 0, 0)
    before, after = batch.slice_mask.sum(1), out.slice_mask.sum(1)
    assert (after <= before).all() and (after < before).any() and (after >= 1).all()
    for i in range(len(batch)):
        n = int(after[i])
        assert out.slice_mask[i, :n].all() and not out.slice_mask[i, n:].any()
        originals = [batch.ct[i, k] for k in range(int(before[i]))]
        masks = [batch.masks[i, :, k] for k in range(int(before[i]))]
        for k in range(n):  # every kept slice is an original slice, with its own masks
            j = next(j for j, o in enumerate(originals) if torch.equal(o, out.ct[i, k]))
            assert torch.equal(masks[j], out.masks[i, :, k])
        assert int(out.ct[i, n:].sum()) == 0 and int(out.masks[i, :, n:].sum()) == 0


def test_draws_are_seeded_by_run_seed_epoch_rank_and_batch(batch):
    full = AugmentConfig()
    one = Augment(full, seed=3, rank=1)(batch, epoch=2, index=5)
    again = Augment(full, seed=3, rank=1)(batch, epoch=2, index=5)
    assert all(
        torch.equal(getattr(one, f), getattr(again, f)) for f in ("ct", "masks", "slice_mask")
    )
    for other in (
        Augment(full, seed=4, rank=1)(batch, epoch=2, index=5),
        Augment(full, seed=3, rank=0)(batch, epoch=2, index=5),
        Augment(full, seed=3, rank=1)(batch, epoch=3, index=5),
        Augment(full, seed=3, rank=1)(batch, epoch=2, index=6),
    ):
        assert not torch.equal(one.ct, other.ct)


def test_disabled_is_the_batch_as_loaded(batch):
    assert Augment(AugmentConfig(enabled=False), 0, 0)(batch, 0, 0) is batch


def test_ranges_are_validated():
    with pytest.raises(ValueError, match="augment.rotate_deg"):
        AugmentConfig(rotate_deg=90.0)
    with pytest.raises(ValueError, match="augment.p_flip"):
        AugmentConfig(p_flip=1.5)


def test_training_sees_augmented_batches_and_evaluation_does_not(shard_dir, tmp_path):
    """Same seed, augmentation on vs off: validation predictions of the initial weights are
    identical (evaluation never augments); one training epoch's losses differ."""
    from mmdls_dist.train.loop import Trainer

    results = {}
    for enabled in (True, False):
        cfg = train_config(
            shard_dir,
            tmp_path,
            "aug",
            f"augment.enabled={str(enabled).lower()}",
            "data.num_workers=0",
            "data.steps_per_epoch=2",
        )
        trainer = Trainer(cfg, torch.device("cpu"), 0, 1, lambda m: m)
        _, records, _, _ = trainer.evaluate()
        train = trainer.train_epoch(0)
        results[enabled] = (records, train["train/loss"])
    (rec_on, loss_on), (rec_off, loss_off) = results[True], results[False]
    assert rec_on == rec_off
    assert not math.isclose(loss_on, loss_off, rel_tol=1e-6)
