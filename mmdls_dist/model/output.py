"""What the network predicts for a Batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmdls_dist.data.schema import CLINICAL_FEATURES, ENDPOINTS, N_RADIOMICS, PET_FEATURES, Batch
from mmdls_dist.metrics.segmentation import dice_per_patient

PAD_LOGIT = -20.0  # segmentation logit given to padded slices (probability ~ 2e-9)


@dataclass
class ModelOutput:
    """B patients, S slice slots, H x W pixels."""

    histology_logit: torch.Tensor  # [B] logit of LUSC
    stage_logits: torch.Tensor  # [B,3] I-II / III / IV
    dfs_log_hazard: torch.Tensor  # [B] Cox log relative hazard
    os_log_hazard: torch.Tensor  # [B]
    lung_logits: torch.Tensor | None = None  # [B,S,H,W]; PAD_LOGIT on padded slices
    lesion_logits: torch.Tensor | None = None  # [B,S,H,W]
    slice_weights: torch.Tensor | None = None  # [B,S] attention pooling weights (0 on padding)
    # [B,8] the lesion descriptors measured on the mask the lesion views read (descriptors.py
    # NAMES; what evaluation/stacking.py reads); None without model.lesion_descriptors.
    lesion_descriptors: torch.Tensor | None = None


LABELS = ("histology", "stage") + tuple(
    f"{e}_{k}" for e in ENDPOINTS for k in ("time", "event", "known")
)


def prediction_records(batch: Batch, out: ModelOutput) -> list[dict]:
    """Per-patient predictions, labels and Dice as plain Python: what validation gathers
    across ranks and inference turns into a table, one dict per patient."""
    values = {
        "histology_prob": torch.sigmoid(out.histology_logit.float()),
        "stage_probs": torch.softmax(out.stage_logits.float(), dim=1),
        **{f"{e}_risk": getattr(out, f"{e}_log_hazard").float() for e in ENDPOINTS},
    }
    if out.lung_logits is not None:
        values["dice_lung"] = dice_per_patient(
            out.lung_logits > 0, batch.lung_mask, batch.slice_mask
        )
        lesion = dice_per_patient(out.lesion_logits > 0, batch.lesion_mask, batch.slice_mask)
        values["dice_lesion"] = torch.where(batch.lesion_annotated, lesion, torch.nan)
    values |= {k: getattr(batch, k) for k in LABELS}
    columns = {k: v.cpu().tolist() for k, v in values.items()}
    return [
        {"patient_id": pid, "center": center, **{k: v[i] for k, v in columns.items()}}
        for i, (pid, center) in enumerate(zip(batch.patient_id, batch.center, strict=True))
    ]


def _input_name(feature: str) -> str:
    """A model feature -> the raw input it comes from (the one-hot smoking columns)."""
    return (
        "smoking_status"
        if feature.startswith("smoking_") and feature != "smoking_years"
        else feature
    )


def missing_inputs(batch: Batch) -> list[str]:
    """Per patient, the inputs the model did without, as one "; "-joined text: clinical and
    PET fields by name, the radiomics as a count, and "lesion contour" where the lesion
    views read the segmentor's own mask."""
    clinical = batch.clinical_missing.cpu().tolist()
    pet = batch.pet_missing.cpu().tolist()
    radiomics = batch.radiomics_missing.sum(1).cpu().tolist()
    annotated = batch.lesion_annotated.cpu().tolist()
    out = []
    for i in range(len(batch)):
        names = dict.fromkeys(
            _input_name(f) for f, gone in zip(CLINICAL_FEATURES, clinical[i], strict=True) if gone
        )
        names |= dict.fromkeys(f for f, gone in zip(PET_FEATURES, pet[i], strict=True) if gone)
        if radiomics[i]:
            names[f"radiomics ({int(radiomics[i])} of {N_RADIOMICS})"] = None
        if not annotated[i]:
            names["lesion contour"] = None
        out.append("; ".join(names))
    return out
