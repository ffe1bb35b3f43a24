"""The MM-DLS network: shapes, gradients, padding invariance, CT-only inference, switches."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import TINY_MODEL

from mmdls_dist.config import DataConfig, ModelConfig
from mmdls_dist.data.loader import make_loader
from mmdls_dist.data.schema import Batch
from mmdls_dist.model.mmdls import MMDLS
from mmdls_dist.model.output import PAD_LOGIT


@pytest.fixture(scope="module")
def batch(shard_dir) -> Batch:
    cfg = DataConfig(shards=str(shard_dir), batch_size=4, max_slices=6, num_workers=0)
    return next(iter(make_loader(cfg, "train", "eval")))


@pytest.fixture(scope="module")
def batch64(shard_dir) -> Batch:
    """The same patients at 64 px: a 2 x 2 bottleneck, so the segmentor's cross-attention has
    4 keys (at the shards' 32 px it has one, softmax over it is constant, and the query path
    gets exactly no gradient)."""
    cfg = DataConfig(
        shards=str(shard_dir), batch_size=4, max_slices=6, num_workers=0, image_size=64
    )
    return next(iter(make_loader(cfg, "train", "eval")))


# The imaging branch without its patient-level lesion views (reader, descriptors).
SLICES_ONLY = {"lesion_reader": 0, "lesion_descriptors": False}


def _model(**overrides) -> MMDLS:
    torch.manual_seed(0)
    return MMDLS(ModelConfig(**{**TINY_MODEL, **overrides}))


def _repad(batch: Batch, slots: int) -> Batch:
    """The same patients with `slots` slice slots (extra slots are padding)."""
    b, s = batch.slice_mask.shape
    extra = slots - s
    pad = {
        "ct": torch.zeros(b, extra, *batch.ct.shape[2:], dtype=torch.uint8),
        "masks": torch.zeros(b, 2, extra, batch.masks.shape[-1], dtype=torch.uint8),
        "slice_mask": torch.zeros(b, extra, dtype=torch.bool),
    }
    return dataclasses.replace(
        batch,
        ct=torch.cat([batch.ct, pad["ct"]], 1),
        masks=torch.cat([batch.masks, pad["masks"]], 2),
        slice_mask=torch.cat([batch.slice_mask, pad["slice_mask"]], 1),
    )


def test_output_shapes(batch):
    out = _model().eval()(batch)
    b, s, h, w = batch.ct.shape
    assert out.histology_logit.shape == (b,) and out.stage_logits.shape == (b, 3)
    assert out.dfs_log_hazard.shape == (b,) and out.os_log_hazard.shape == (b,)
    assert out.lung_logits.shape == (b, s, h, w) == out.lesion_logits.shape
    assert out.slice_weights.shape == (b, s)
    assert torch.allclose(out.slice_weights.sum(1), torch.ones(b))
    assert torch.all(out.lung_logits[~batch.slice_mask] == PAD_LOGIT)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"patient_fusion": "concat", "survival_sees_classification": False},
        {"fusion_layers": 2, "blocks_per_stage": 2},
        {**SLICES_ONLY, "radiomics_rank": 0},
        {"given_lesion_mask": False, "lesion_reader_mask": False},
    ],
)
def test_gradient_reaches_every_parameter(batch64, overrides):
    batch = batch64
    model = _model(dropout=0.0, **overrides)
    out = model(batch, gt_mask_weight=0.5)
    loss = (
        out.histology_logit.sum()
        + out.stage_logits.sum()
        + out.dfs_log_hazard.sum()
        + out.os_log_hazard.sum()
        + out.lung_logits[batch.slice_mask].mean()
        + out.lesion_logits[batch.slice_mask].mean()
    )
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient: {missing}"


@pytest.mark.parametrize(
    "overrides",
    [{}, SLICES_ONLY, {"given_lesion_mask": False}],
)
def test_padding_slices_changes_nothing(batch, overrides):
    model = _model(**overrides).eval()
    with torch.no_grad():
        a = model(batch)
        b = model(_repad(batch, batch.slice_mask.shape[1] + 5))
    for name in ("histology_logit", "stage_logits", "dfs_log_hazard", "os_log_hazard"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
    s = batch.slice_mask.shape[1]
    assert torch.allclose(a.lung_logits, b.lung_logits[:, :s], atol=1e-5)
    assert torch.allclose(a.slice_weights, b.slice_weights[:, :s], atol=1e-6)
    assert torch.all(b.slice_weights[:, s:] == 0)


def test_ct_only_inference(batch):
    """Without given contours, zeroed masks change nothing at gt_mask_weight=0 (the lesion
    reader and descriptors too read the predicted mask then)."""
    model = _model(given_lesion_mask=False).eval()
    ct_only = dataclasses.replace(
        batch,
        masks=torch.zeros_like(batch.masks),
        lesion_annotated=torch.zeros_like(batch.lesion_annotated),
    )
    with torch.no_grad():
        a, b = model(batch), model(ct_only)
        warm = model(batch, gt_mask_weight=1.0)
    assert torch.equal(a.os_log_hazard, b.os_log_hazard)
    assert torch.equal(a.lesion_logits, b.lesion_logits)
    assert not torch.allclose(a.os_log_hazard, warm.os_log_hazard)  # warm-up does use masks
    with pytest.raises(ValueError, match="gt_mask_weight"):
        model(batch, gt_mask_weight=1.5)


def test_given_lesion_masks_are_read_where_a_patient_has_one(batch):
    """model.given_lesion_mask (the default): at inference (gt_mask_weight=0) an annotated patient's
    prediction follows its own contour; a patient without one gets the CT-only prediction,
    whatever its (empty) mask slot holds. Off, the contour is not read at inference."""
    annotated = torch.ones_like(batch.lesion_annotated)
    annotated[0] = False
    given = dataclasses.replace(batch, lesion_annotated=annotated)
    masks = batch.masks.clone()
    masks[:, 1] = 0  # every lesion contour erased
    erased = dataclasses.replace(given, masks=masks)
    ct_only = dataclasses.replace(given, lesion_annotated=torch.zeros_like(annotated))
    assert batch.lesion_mask[1:].flatten(1).sum(1).min() > 0  # the others have lesions
    for descriptors in (False, True):
        model = _model(lesion_descriptors=descriptors).eval()
        with torch.no_grad():
            a, b, c = model(given), model(erased), model(ct_only)
        assert torch.equal(a.os_log_hazard[0], b.os_log_hazard[0])
        assert torch.equal(a.os_log_hazard[0], c.os_log_hazard[0])
        assert torch.all(a.os_log_hazard[1:] != b.os_log_hazard[1:])
        assert torch.all(a.os_log_hazard[1:] != c.os_log_hazard[1:])
        assert torch.equal(a.lesion_logits, b.lesion_logits)  # the segmentor reads CT only
    off = _model(given_lesion_mask=False).eval()
    with torch.no_grad():
        assert torch.equal(off(given).os_log_hazard, off(erased).os_log_hazard)


def test_single_modality_switches(batch):
    other_ct = dataclasses.replace(batch, ct=torch.flip(batch.ct, dims=[-1]))
    no_tab = dataclasses.replace(
        batch,
        clinical=torch.zeros_like(batch.clinical),
        pet=torch.zeros_like(batch.pet),
        radiomics=torch.zeros_like(batch.radiomics),
    )
    tabular_only = _model(use_imaging=False).eval()
    assert not hasattr(tabular_only, "segmentor")
    with torch.no_grad():
        assert torch.equal(tabular_only(batch).os_log_hazard, tabular_only(other_ct).os_log_hazard)
        assert tabular_only(batch).lung_logits is None
    imaging_only = _model(use_clinical=False, use_pet=False, use_radiomics=False).eval()
    with torch.no_grad():
        assert torch.equal(imaging_only(batch).os_log_hazard, imaging_only(no_tab).os_log_hazard)
        assert not torch.equal(
            imaging_only(batch).os_log_hazard, imaging_only(other_ct).os_log_hazard
        )
    with pytest.raises(ValueError, match="at least one"):
        ModelConfig(use_imaging=False, use_clinical=False, use_pet=False, use_radiomics=False)


def test_lesion_reader_crops_the_largest_lesion_slice_and_its_neighbours():
    from mmdls_dist.model.reader import crop, field, locate

    b, s, h, w = 2, 5, 32, 32
    prob = torch.zeros(b, s, h, w)
    prob[0, 1, 4:8, 20:24] = 1.0  # patient 0: small lesion on slice 1 ...
    prob[0, 3, 2:10, 18:26] = 1.0  # ... and its largest slice 3, centred at (x 22, y 6)
    prob[1, 0, 24:28, 8:12] = 1.0  # patient 1: only slice 0, centred at (x 10, y 26)
    prob[1, 4, 0:16, 0:16] = 1.0  # a bigger blob on a padded slot: ignored
    slice_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    idx, centre, radius = locate(prob, slice_mask)
    assert idx.tolist() == [[2, 3, 4], [0, 0, 1]]  # neighbours clamped to the real slices
    assert torch.allclose(radius, torch.tensor([64 / math.pi, 16 / math.pi]).sqrt())
    # 5 radii across, between 8 pixels (no lesion: 8 too) and the image side
    assert torch.allclose(
        field(torch.tensor([radius[0], radius[1], 1.0, 0.0, 10.0]), 5.0, h, w),
        torch.tensor([5 * radius[0], 5 * radius[1], 8.0, 8.0, 32.0]),
    )
    # The area ramps from p = 0.25 to 0.75: binary masks as they are, faint background out,
    # and no jump at p = 0.5
    soft = torch.zeros(1, 1, h, w)
    soft[0, 0, :2, :] = torch.tensor([0.2, 0.5, 0.75, 0.9]).repeat(8)
    _, _, r = locate(soft, torch.ones(1, 1, dtype=torch.bool))
    assert r.item() == pytest.approx(math.sqrt(16 * (0.0 + 0.5 + 1.0 + 1.0) / math.pi))
    image = torch.arange(s, dtype=torch.float32)[None, :, None, None].expand(b, s, h, w).clone()
    image[0, 3] = 0.0
    image[0, 3, 2:10, 18:26] = 9.0  # the lesion's pixels on patient 0's largest slice
    out = crop(image, idx, centre, 8, torch.full((2,), 8.0))  # one pixel per pixel
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out[0, 1], torch.full((8, 8), 9.0), atol=1e-3)  # the 8 x 8 lesion
    assert torch.allclose(out[0, 0], torch.full((8, 8), 2.0))  # neighbour slices
    assert torch.allclose(out[1, 2], torch.full((8, 8), 1.0))
    _, none, no_radius = locate(torch.zeros(1, 2, h, w), torch.ones(1, 2, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(1, 2)) and no_radius.item() == 0  # the image centre


def test_lesion_reader_crop_spans_the_same_lesion_radii_whatever_the_lesion_size():
    """A lesion of radius 4 and one of radius 8, each with a ring at 2 radii (smooth
    profiles, so that resampling is exact enough), give the same 5-radii crop; at one pixel
    per pixel they would not."""
    from mmdls_dist.model.reader import crop, field, locate

    h = w = 64
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    prob = torch.zeros(2, 1, h, w)
    image = torch.zeros(2, 1, h, w)
    for i, (r, cx, cy) in enumerate([(4.0, 20.0, 24.0), (8.0, 36.0, 30.0)]):
        d = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
        prob[i, 0] = (d < r).float()
        ring = torch.exp(-(((d - 2 * r) / (0.4 * r)) ** 2))
        image[i, 0] = torch.exp(-((d / r) ** 2)) + 2.0 * ring
    idx, centre, radius = locate(prob, torch.ones(2, 1, dtype=torch.bool))
    assert torch.allclose(radius, torch.tensor([4.0, 8.0]), rtol=0.06)
    out = crop(image, idx, centre, 24, field(radius, 5.0, h, w))[:, 1]
    assert (out[0] - out[1]).abs().mean() < 0.1 * out.abs().mean()
    assert out[:, 12, :].max() > 1.5  # the ring is inside the field
    fixed = crop(image, idx, centre, 24, torch.full((2,), 24.0))[:, 1]
    assert (fixed[0] - fixed[1]).abs().mean() > 0.5 * fixed.abs().mean()


def test_segmentation_heads_start_at_the_foreground_prior(batch):
    """A fresh model predicts rare lesions as rare (not p = 0.5 everywhere)."""
    out = _model().eval()(batch)
    real = batch.slice_mask
    assert torch.sigmoid(out.lesion_logits[real]).mean() < 0.05
    assert 0.05 < torch.sigmoid(out.lung_logits[real]).mean() < 0.5


def test_a_patients_prediction_does_not_depend_on_its_batch_mates_in_eval(batch):
    """BatchNorm layers (lesion reader, descriptors) must use running statistics at
    inference: a patient scored alone gets the same output as inside a batch."""
    model = _model(dropout=0.0)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # move the running statistics away from their initial values
            model(batch)
    model.eval()
    first = dataclasses.replace(
        batch,
        **{
            name: getattr(batch, name)[:1]
            for name in ("ct", "masks", "slice_mask", "lesion_annotated", "clinical",
                         "clinical_missing", "pet", "pet_missing", "radiomics",
                         "radiomics_missing")
        },
    )  # fmt: skip
    with torch.no_grad():
        together, alone = model(batch), model(first)
    for name in ("histology_logit", "stage_logits", "dfs_log_hazard", "os_log_hazard"):
        assert torch.allclose(getattr(together, name)[:1], getattr(alone, name), atol=1e-5)
    model.train()
    with torch.no_grad():
        # the control: in training the batch statistics do couple the patients
        assert not torch.allclose(model(batch).os_log_hazard[:1], model(first).os_log_hazard)


def test_inference_records_carry_the_tabular_inputs_the_network_read(batch):
    """Each record holds the clinical and PET inputs by name, as the model received them
    (normalised; 0 where missing): what the survival stack is fitted and applied on."""
    from mmdls_dist.data.schema import CLINICAL_FEATURES, PET_FEATURES
    from mmdls_dist.evaluation.inference import _records
    from mmdls_dist.evaluation.stacking import INPUTS

    with torch.no_grad():
        out = _model().eval()(batch)
    records = _records(batch, out, "train", with_dice=False, reads_contours=True)
    assert len(records) == len(batch)
    for i, record in enumerate(records):
        age = batch.clinical[i, CLINICAL_FEATURES.index("age")]
        assert record["input_age"] == pytest.approx(float(age))
        assert record["input_suv_max"] == pytest.approx(
            float(batch.pet[i, PET_FEATURES.index("suv_max")])
        )
        assert [record[c] for c in INPUTS] == pytest.approx(
            torch.cat([batch.clinical[i], batch.pet[i]]).tolist()
        )
    assert batch.clinical.abs().sum() > 0  # a test on zeros would show nothing


def test_inference_records_carry_the_lesion_descriptors_of_the_mask_the_views_read(batch):
    """With given contours (the default) the lesion views of an annotated patient read its
    own contour, so its record's lesion descriptors are measure() on that contour, by name
    (what the survival stack reads); a model without descriptors carries none."""
    from mmdls_dist.evaluation.inference import _records
    from mmdls_dist.evaluation.stacking import LESION
    from mmdls_dist.model.descriptors import measure

    with torch.no_grad():
        out = _model().eval()(batch)
    expected = measure(batch.ct.float() / 255, batch.lesion_mask.float(), batch.slice_mask)
    records = _records(batch, out, "val", with_dice=False, reads_contours=True)
    annotated = batch.lesion_annotated.tolist()
    assert any(annotated)
    # The read each record got: the contour where there is one (the reference per read).
    assert [r["contour_read"] for r in records] == annotated
    none = dataclasses.replace(batch, lesion_annotated=torch.zeros_like(batch.lesion_annotated))
    assert not any(r["contour_read"] for r in _records(none, out, "val", False, True))
    unread = _records(batch, out, "val", with_dice=False, reads_contours=False)
    assert not any(r["contour_read"] for r in unread)  # a model that reads no contour
    for i, record in enumerate(records):
        if annotated[i]:
            assert [record[c] for c in LESION] == pytest.approx(expected[i].tolist(), abs=1e-5)
    assert max(r["lesion_log_area"] for r in records) > 0  # lesions were found
    with torch.no_grad():
        plain = _model(lesion_descriptors=False).eval()(batch)
    assert plain.lesion_descriptors is None
    assert not [c for c in _records(batch, plain, "val", False, True)[0] if c.startswith("lesion_")]
