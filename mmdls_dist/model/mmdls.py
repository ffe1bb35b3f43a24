"""MM-DLS as one network: segmentor -> slice views -> slice fusion, patient-level lesion
views -> patient fusion with radiomics, PET and clinical data -> task heads. Trained end to
end.

The imaging branch is built from declared parts: every slice view (views.py) states its
`out_dim`, so the slice token's width follows from the list; every patient-level lesion
view is one more [B,E] fusion token, so the number of imaging tokens follows too. Adding a
view is one module and one line below.

Shapes: B patients, S slice slots, N = real slices in the batch, H x W pixels, E embed_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from mmdls_dist.config import ModelConfig
from mmdls_dist.data.schema import CLINICAL_FEATURES, N_RADIOMICS, PET_FEATURES, Batch
from mmdls_dist.model.descriptors import LesionDescriptors
from mmdls_dist.model.fusion import PatientFusion, SliceFusion
from mmdls_dist.model.heads import TaskHeads
from mmdls_dist.model.layers import normalise_ct
from mmdls_dist.model.output import PAD_LOGIT, ModelOutput
from mmdls_dist.model.reader import LesionReader
from mmdls_dist.model.segmentor import LungLesionSegmentor
from mmdls_dist.model.views import (
    LesionContext,
    LesionEncoder,
    MaskPolicy,
    SliceContext,
    SpaceEncoder,
    slots,
    unslot,
)


def slice_views(cfg: ModelConfig) -> dict[str, nn.Module]:
    """Per-slice views: SliceContext -> [N, out_dim] each, concatenated into the slice token."""
    e, d, c = cfg.embed_dim, cfg.decoder_width, cfg.widths[2]
    return {
        "lesion": LesionEncoder(d, c, e, cfg.dropout),
        "space": SpaceEncoder(d, c, e, cfg.dropout),
    }


def lesion_views(cfg: ModelConfig) -> dict[str, nn.Module]:
    """Patient-level views of the full-resolution lesion: LesionContext (CT [B,S,H,W] in
    [0,1], soft lesion mask [B,S,H,W], slice_mask [B,S], the measured descriptors) -> one
    [B,E] patient-fusion token each."""
    views: dict[str, nn.Module] = {}
    if cfg.lesion_reader:
        views["reader"] = LesionReader(
            cfg.lesion_reader,
            cfg.reader_width,
            cfg.embed_dim,
            cfg.dropout,
            cfg.lesion_reader_mask,
            cfg.reader_field,
        )
    if cfg.lesion_descriptors:
        views["descriptors"] = LesionDescriptors(cfg.embed_dim, cfg.tabular_hidden, cfg.dropout)
    return views


def tabular_inputs(cfg: ModelConfig) -> dict[str, int]:
    """The table modalities switched on -> their feature counts."""
    widths = {
        "clinical": (cfg.use_clinical, len(CLINICAL_FEATURES)),
        "pet": (cfg.use_pet, len(PET_FEATURES)),
        "radiomics": (cfg.use_radiomics, N_RADIOMICS),
    }
    return {name: width for name, (on, width) in widths.items() if on}


def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
    """[N,1,h,w] quarter-resolution logits -> [N,H,W] at the input size."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[:, 0]


class MMDLS(nn.Module):
    def __init__(self, cfg: ModelConfig, static_slices: bool = False):
        """static_slices: run the imaging branch on every slice slot, padded ones included
        (their outputs are masked, so results are the same): shapes then stay fixed from
        batch to batch, as torch.compile wants (run.compile)."""
        super().__init__()
        self.cfg = cfg
        self.static_slices = static_slices
        e = cfg.embed_dim
        n_imaging = 0
        if cfg.use_imaging:
            self.segmentor = LungLesionSegmentor(
                cfg.widths, cfg.blocks_per_stage, cfg.decoder_width, cfg.cross_attention_heads
            )
            self.slice_views = nn.ModuleDict(slice_views(cfg))
            width = sum(view.out_dim for view in self.slice_views.values())
            self.slice_token = nn.Linear(width, e)
            self.slice_fusion = SliceFusion(e, cfg.fusion_heads, cfg.fusion_layers, cfg.dropout)
            self.lesion_views = nn.ModuleDict(lesion_views(cfg))
            n_imaging = 1 + len(self.lesion_views)
        self.patient_fusion = PatientFusion(
            e,
            tabular_inputs(cfg),
            n_imaging,
            cfg.tabular_hidden,
            cfg.patient_fusion,
            cfg.fusion_heads,
            cfg.dropout,
            ranks={"radiomics": cfg.radiomics_rank},
        )
        self.heads = TaskHeads(e, cfg.dropout, cfg.survival_sees_classification)

    def _imaging(self, batch: Batch, policy: MaskPolicy):
        """-> (imaging tokens [B,E] each, segmentation fields of ModelOutput)."""
        valid, static = batch.slice_mask, self.static_slices
        ct = batch.ct.float() / 255.0  # [B,S,H,W]: uint8 -> float on the device, once
        image = normalise_ct(slots(ct, valid, static)).unsqueeze(1)  # [N,1,H,W]
        seg = self.segmentor(image)
        lung, lesion = policy.slice_masks(
            torch.sigmoid(seg.lung_logits), torch.sigmoid(seg.lesion_logits), static
        )
        context = SliceContext(image, seg, lung, lesion)
        views = torch.cat([view(context) for view in self.slice_views.values()], dim=1)
        tokens = unslot(self.slice_token(views), valid, static)
        imaging, weights = self.slice_fusion(tokens, valid)
        lung_logits = unslot(
            _upsample(seg.lung_logits, batch.ct.shape[-2:]), valid, static, PAD_LOGIT
        )
        lesion_logits = unslot(seg.lesion_full[:, 0], valid, static, PAD_LOGIT)
        tokens = [imaging]
        fields = {
            "lung_logits": lung_logits,
            "lesion_logits": lesion_logits,
            "slice_weights": weights,
        }
        if self.lesion_views:
            context = LesionContext(ct, policy.full_lesion(lesion_logits), valid)
            tokens += [view(context) for view in self.lesion_views.values()]
            if "descriptors" in self.lesion_views:  # also handed on: the survival stack's
                fields["lesion_descriptors"] = context.descriptors
        return tokens, fields

    def forward(self, batch: Batch, gt_mask_weight: float = 0.0) -> ModelOutput:
        """batch on the model's device -> ModelOutput. gt_mask_weight in [0,1] blends ground
        truth masks into the views (training warm-up); 0 at inference, where only CT and
        tables are read, and the lesion contours that come with the batch (flagged by
        lesion_annotated) when model.given_lesion_mask is on (views.MaskPolicy)."""
        if not 0.0 <= gt_mask_weight <= 1.0:
            raise ValueError(f"gt_mask_weight must be in [0, 1], got {gt_mask_weight}")
        tokens, segmentation = [], {}
        if self.cfg.use_imaging:
            policy = MaskPolicy(batch, gt_mask_weight, self.cfg.given_lesion_mask)
            tokens, segmentation = self._imaging(batch, policy)
        tables = {
            "clinical": (batch.clinical, batch.clinical_missing),
            "pet": (batch.pet, batch.pet_missing),
            "radiomics": (batch.radiomics, batch.radiomics_missing),
        }
        h = self.patient_fusion(tokens, tables)
        return ModelOutput(**self.heads(h), **segmentation)
