"""MM-DLS as one network: segmentor -> lesion / lung-space encoders -> slice fusion ->
patient fusion with radiomics, PET and clinical data -> task heads. Trained end to end.

Shapes: B patients, S slice slots, N = real slices in the batch, H x W pixels, E embed_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from mmdls_dist.config import ModelConfig
from mmdls_dist.data.schema import CLINICAL_FEATURES, N_RADIOMICS, PET_FEATURES, Batch
from mmdls_dist.model.descriptors import N_DESCRIPTORS, LesionDescriptors
from mmdls_dist.model.encoders import LesionPatchEncoder, MaskPoolEncoder, PixelEncoder
from mmdls_dist.model.fusion import PatientFusion, SliceFusion, TaskHeads
from mmdls_dist.model.reader import LesionReader
from mmdls_dist.model.segmentor import EdgeRefiner, Segmentor

PAD_LOGIT = -20.0  # segmentation logit given to padded slices (probability ~ 2e-9)
CT_MEAN, CT_STD = 0.5, 0.25  # of ct / 255; a fixed affine map, so no data statistics needed


@dataclass
class ModelOutput:
    """What the network predicts for a Batch."""

    histology_logit: torch.Tensor  # [B] logit of LUSC
    stage_logits: torch.Tensor  # [B,3] I-II / III / IV
    dfs_log_hazard: torch.Tensor  # [B] Cox log relative hazard
    os_log_hazard: torch.Tensor  # [B]
    lung_logits: torch.Tensor | None = None  # [B,S,H,W]; PAD_LOGIT on padded slices
    lesion_logits: torch.Tensor | None = None  # [B,S,H,W]
    slice_weights: torch.Tensor | None = None  # [B,S] attention pooling weights (0 on padding)


def _scatter(values: torch.Tensor, valid: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """values [N,...] for the True entries of valid [B,S] -> [B,S,...] (fill elsewhere)."""
    out = values.new_full((*valid.shape, *values.shape[1:]), fill)
    return out.index_put((valid,), values)


DESCRIPTOR_TOKEN = "lesion"  # the measured lesion descriptors' token in the patient fusion


class MMDLS(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim
        if cfg.use_imaging:
            self.segmentor = Segmentor(
                cfg.widths, cfg.blocks_per_stage, cfg.decoder_width, cfg.cross_attention_heads
            )
            if cfg.encoder_input == "features":
                self.lesion_encoder = MaskPoolEncoder(
                    cfg.decoder_width, cfg.widths[2], e, cfg.dropout
                )
                self.space_encoder = MaskPoolEncoder(
                    cfg.decoder_width, cfg.widths[2], e, cfg.dropout
                )
            else:
                self.lesion_encoder = PixelEncoder(cfg.pixel_encoder_width, e, cfg.dropout)
                self.space_encoder = PixelEncoder(cfg.pixel_encoder_width, e, cfg.dropout)
            if cfg.lesion_patch:
                self.patch_encoder = LesionPatchEncoder(
                    cfg.lesion_patch,
                    cfg.lesion_patch_extent,
                    cfg.pixel_encoder_width,
                    e,
                    cfg.dropout,
                )
            self.slice_token = nn.Linear((3 if cfg.lesion_patch else 2) * e, e)
            self.slice_fusion = SliceFusion(e, cfg.fusion_heads, cfg.fusion_layers, cfg.dropout)
            if cfg.lesion_descriptors:
                self.descriptors = LesionDescriptors()
            if cfg.lesion_refine:
                self.lesion_refiner = EdgeRefiner()
            if cfg.lesion_reader:
                self.reader = LesionReader(
                    cfg.lesion_reader,
                    cfg.pixel_encoder_width,
                    e,
                    cfg.dropout,
                    with_mask=cfg.lesion_reader_mask,
                )
        tabular = {}
        if cfg.use_clinical:
            tabular["clinical"] = len(CLINICAL_FEATURES)
        if cfg.use_pet:
            tabular["pet"] = len(PET_FEATURES)
        if cfg.use_radiomics:
            tabular["radiomics"] = N_RADIOMICS
        if cfg.use_imaging and cfg.lesion_descriptors:
            tabular[DESCRIPTOR_TOKEN] = N_DESCRIPTORS
        n_imaging = int(cfg.use_imaging) * (1 + int(cfg.lesion_reader > 0))
        self.patient_fusion = PatientFusion(
            e,
            tabular,
            n_imaging,
            cfg.tabular_hidden,
            cfg.patient_fusion,
            cfg.fusion_heads,
            cfg.dropout,
            cfg.tabular_dropout,
            keep_always=(DESCRIPTOR_TOKEN,),
            ranks={"radiomics": cfg.radiomics_rank},
        )
        self.heads = TaskHeads(e, cfg.dropout, cfg.survival_sees_classification)

    def _reads_contours(self, gt_weight: float) -> bool:
        """Whether any given mask enters the views (else they are the predictions alone,
        and the masks need not be unpacked)."""
        return gt_weight > 0 or self.cfg.given_lesion_mask

    def _lesion_gt_weight(self, batch: Batch, gt_weight: float) -> torch.Tensor:
        """[B] weight of each patient's own lesion contour in its lesion views: gt_weight
        (the warm-up) or, with model.given_lesion_mask, 1, for patients that have one."""
        w = 1.0 if self.cfg.given_lesion_mask else gt_weight
        return w * batch.lesion_annotated.float()

    def _view_masks(
        self,
        batch: Batch,
        valid: torch.Tensor,
        lung_p: torch.Tensor,
        lesion_p: torch.Tensor,
        gt_weight: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft masks that form the encoders' views: predictions, blended with ground truth
        (weight gt_weight) where the patient has it, e.g. during a warm-up; the lesion view
        takes the given contour whole under model.given_lesion_mask."""
        size = lung_p.shape[-2:]
        if gt_weight > 0:  # the lung view takes ground truth during the warm-up only
            gt_lung = F.adaptive_avg_pool2d(batch.lung_mask[valid].unsqueeze(1).float(), size)
            lung_p = gt_weight * gt_lung + (1 - gt_weight) * lung_p
        gt_lesion = F.adaptive_avg_pool2d(batch.lesion_mask[valid].unsqueeze(1).float(), size)
        w_patient = self._lesion_gt_weight(batch, gt_weight)
        w = w_patient[:, None].expand_as(valid)[valid].to(lesion_p.dtype)[:, None, None, None]
        return lung_p, w * gt_lesion + (1 - w) * lesion_p

    def _imaging(self, batch: Batch, gt_weight: float) -> dict[str, torch.Tensor]:
        valid = batch.slice_mask
        ct = batch.ct[valid].unsqueeze(1).float()  # [N,1,H,W]: uint8 -> float on the device
        x = (ct / 255.0 - CT_MEAN) / CT_STD
        seg = self.segmentor(x)
        lung_p, lesion_p = torch.sigmoid(seg.lung_logits), torch.sigmoid(seg.lesion_logits)
        if self._reads_contours(gt_weight):
            lung_p, lesion_p = self._view_masks(batch, valid, lung_p, lesion_p, gt_weight)
        space_p = lung_p * (1 - lesion_p)  # lung parenchyma around the lesion
        if self.cfg.encoder_input == "features":
            lesion = self.lesion_encoder(seg.lesion_features, seg.features[2], lesion_p)
            space = self.space_encoder(seg.lung_features, seg.features[2], space_p)
        else:
            full = x.shape[-2:]
            lesion = self.lesion_encoder(x, F.interpolate(lesion_p, size=full, mode="bilinear"))
            space = self.space_encoder(x, F.interpolate(space_p, size=full, mode="bilinear"))
        views = [lesion, space]
        if self.cfg.lesion_patch:
            views.append(self.patch_encoder(x, lesion_p))
        tokens = _scatter(self.slice_token(torch.cat(views, dim=1)), valid)
        imaging, weights = self.slice_fusion(tokens, valid)
        full = batch.ct.shape[-2:]
        logits = {}
        for name, small in (("lung_logits", seg.lung_logits), ("lesion_logits", seg.lesion_logits)):
            up = F.interpolate(small, size=full, mode="bilinear", align_corners=False)
            if name == "lesion_logits" and self.cfg.lesion_refine:
                up = self.lesion_refiner(x, up)
            logits[name] = _scatter(up[:, 0], valid, PAD_LOGIT)
        out = {"imaging": [imaging], "slice_weights": weights, **logits}
        if self.cfg.lesion_descriptors or self.cfg.lesion_reader:
            # Both read the whole [B,S,H,W] volume: convert it once.
            ct = batch.ct.float() / 255.0
            prob = self._full_lesion_view(batch, logits["lesion_logits"], gt_weight)
        if self.cfg.lesion_reader:
            image = (ct - CT_MEAN) / CT_STD
            out["imaging"].append(self.reader(image, prob, batch.slice_mask))
        if self.cfg.lesion_descriptors:
            out[DESCRIPTOR_TOKEN] = self.descriptors(ct, prob, batch.slice_mask)
        return out

    def _full_lesion_view(self, batch: Batch, lesion_logits: torch.Tensor, gt_weight: float):
        """The full-resolution soft lesion mask the descriptors and the reader see: the
        prediction, blended with the patient's own contour as the encoders' views are."""
        prob = torch.sigmoid(lesion_logits.float())
        if not self._reads_contours(gt_weight):
            return prob
        w = self._lesion_gt_weight(batch, gt_weight)[:, None, None, None]
        return w * batch.lesion_mask.float() + (1 - w) * prob

    def forward(self, batch: Batch, gt_mask_weight: float = 0.0) -> ModelOutput:
        """batch on the model's device -> ModelOutput. gt_mask_weight in [0,1] blends ground
        truth masks into the encoders' views (training warm-up); 0 at inference, where only
        CT and tables are read (and, under model.given_lesion_mask, the lesion contours
        that come with the batch, flagged by lesion_annotated)."""
        if not 0.0 <= gt_mask_weight <= 1.0:
            raise ValueError(f"gt_mask_weight must be in [0, 1], got {gt_mask_weight}")
        imaging = self._imaging(batch, gt_mask_weight) if self.cfg.use_imaging else {}
        tabular = {
            "clinical": (batch.clinical, batch.clinical_missing),
            "pet": (batch.pet, batch.pet_missing),
            "radiomics": (batch.radiomics, batch.radiomics_missing),
        }
        if DESCRIPTOR_TOKEN in imaging:
            tabular[DESCRIPTOR_TOKEN] = imaging[DESCRIPTOR_TOKEN]
        h = self.patient_fusion(imaging.get("imaging", []), tabular)
        return ModelOutput(
            **self.heads(h),
            lung_logits=imaging.get("lung_logits"),
            lesion_logits=imaging.get("lesion_logits"),
            slice_weights=imaging.get("slice_weights"),
        )
