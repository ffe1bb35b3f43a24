"""The data contract: raw-export columns, the per-patient record, the shard sample and the Batch.

Everything downstream (shards, loader, model, losses) speaks these names. The raw layout
itself is documented in docs/RAW_LAYOUT.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import numpy as np
import torch

SCHEMA_VERSION = 1

PATIENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
N_RADIOMICS = 128
STAGES = ("I-II", "III", "IV")  # tnm_stage codes 0, 1, 2
ENDPOINTS = ("dfs", "os")  # disease-free and overall survival
SPLITS = ("train", "val", "test", "external")  # external = held-out centers


@dataclass(frozen=True)
class Column:
    """One clinical.csv column: how it is parsed and which values the contract allows."""

    name: str
    group: str  # "label" | "clinical" | "pet"
    codes: tuple[int, ...] | None = None  # allowed integer codes; None = real number
    minimum: float | None = None
    min_inclusive: bool = True


LABEL_COLUMNS: tuple[Column, ...] = (
    Column("histology", "label", codes=(0, 1)),
    Column("tnm_stage", "label", codes=(0, 1, 2)),
    Column("dfs_time", "label", minimum=0.0, min_inclusive=False),
    Column("dfs_event", "label", codes=(0, 1)),
    Column("os_time", "label", minimum=0.0, min_inclusive=False),
    Column("os_event", "label", codes=(0, 1)),
)
CLINICAL_COLUMNS: tuple[Column, ...] = (
    Column("age", "clinical", minimum=0.0),
    Column("sex", "clinical", codes=(0, 1)),
    Column("smoking_status", "clinical", codes=(0, 1, 2)),
    Column("smoking_years", "clinical", minimum=0.0),
    Column("years_since_cessation", "clinical", minimum=0.0),
    Column("tumor_diameter_mm", "clinical", minimum=0.0, min_inclusive=False),
)
PET_COLUMNS: tuple[Column, ...] = (
    Column("suv_max", "pet", minimum=0.0),
    Column("suv_mean", "pet", minimum=0.0),
    Column("suv_peak", "pet", minimum=0.0),
    Column("tlg", "pet", minimum=0.0),
    Column("mtv", "pet", minimum=0.0),
)
VALUE_COLUMNS = LABEL_COLUMNS + CLINICAL_COLUMNS + PET_COLUMNS
CLINICAL_CSV_COLUMNS: tuple[str, ...] = ("patient_id", "center") + tuple(
    c.name for c in VALUE_COLUMNS
)

# Model-facing clinical features. smoking_status is one-hot (never/former/current): it is
# categorical, and an ordinal 0/1/2 input would impose an order the model must undo.
CLINICAL_FEATURES: tuple[str, ...] = (
    "age",
    "sex",
    "smoking_never",
    "smoking_former",
    "smoking_current",
    "smoking_years",
    "years_since_cessation",
    "tumor_diameter_mm",
)
# Features z-scored with training-split statistics; PET and size are heavy-tailed, so they
# are log1p-transformed first (TLG and MTV span orders of magnitude between patients).
ZSCORE_CLINICAL = ("age", "smoking_years", "years_since_cessation", "tumor_diameter_mm")
LOG1P_FEATURES = ("tumor_diameter_mm", "suv_max", "suv_mean", "suv_peak", "tlg", "mtv")


def before_zscore(name: str, values: np.ndarray) -> np.ndarray:
    """The transform a feature gets before z-scoring; the training-split statistics and the
    loader both go through here, so they cannot drift apart."""
    return np.log1p(values) if name in LOG1P_FEATURES else values


PET_FEATURES: tuple[str, ...] = tuple(c.name for c in PET_COLUMNS)

# Normalised values are clipped to +-ZSCORE_CLIP: a z-score beyond it comes from an outlier
# center or a unit error, and unclipped it would dominate the fusion layer.
ZSCORE_CLIP = 8.0


@dataclass
class PatientRecord:
    """One validated patient from a raw export (output of ingest, input of sharding).

    Tabular values are float64 with NaN for "not measured"; labels are None when unknown.
    """

    patient_id: str
    center: str
    row: int  # 1-based line number in clinical.csv (header = line 1)
    labels: dict[str, float | None]
    clinical: dict[str, float]  # raw clinical.csv values, NaN = missing
    pet: dict[str, float]
    radiomics: np.ndarray  # float64 [128], NaN = missing
    slice_files: list[str]  # sorted file names, shared by ct/, lung/ and lesion/
    lesion_annotated: bool
    image_size: tuple[int, int] | None = None  # (H, W), filled by image validation
    lung_annotated: bool = True  # False only for prediction inputs without lung/ masks


@dataclass
class Batch:
    """A batch of patients as the model consumes it. B = patients, S = slices, H x W = pixels.

    Images stay uint8 and masks stay bit-packed on the CPU on purpose: converting to float
    (4x the bytes) and unpacking masks (8x) were the main CPU costs of a loader, and both
    are nearly free on the accelerator. The model does `ct.float() / 255` and reads the
    mask properties after `batch.to(device)`.

    | field              | dtype   | shape      | meaning                                       |
    |--------------------|---------|------------|-----------------------------------------------|
    | ct                 | uint8   | [B,S,H,W]  | windowed CT, 0..255; padded slices are 0      |
    | masks              | uint8   | [B,2,S,P]  | lung (0) / lesion (1) masks, bit-packed per   |
    |                    |         |            | slice, P = ceil(H*W/8); read them through the |
    |                    |         |            | lung_mask / lesion_mask properties            |
    | lung_mask (prop.)  | uint8   | [B,S,H,W]  | 0/1, unpacked on the batch's device           |
    | lesion_mask (prop.)| uint8   | [B,S,H,W]  | 0/1; all 0 where lesion_annotated is False    |
    | slice_mask         | bool    | [B,S]      | True = real slice, False = padding            |
    | lesion_annotated   | bool    | [B]        | patient has a lesion mask                     |
    | clinical           | float32 | [B,8]      | CLINICAL_FEATURES, normalised; 0 if missing   |
    | clinical_missing   | bool    | [B,8]      | True = not measured (imputed)                 |
    | pet                | float32 | [B,5]      | PET_FEATURES, log1p + z-scored; 0 if missing  |
    | pet_missing        | bool    | [B,5]      |                                               |
    | radiomics          | float32 | [B,128]    | z-scored; 0 if missing                        |
    | radiomics_missing  | bool    | [B,128]    |                                               |
    | histology          | int64   | [B]        | 0 LUAD, 1 LUSC, -1 unknown                    |
    | stage              | int64   | [B]        | 0 I-II, 1 III, 2 IV, -1 unknown               |
    | dfs_time, os_time  | float32 | [B]        | months; NaN if unknown                        |
    | dfs_event, os_event| bool    | [B]        | event observed; False if unknown              |
    | dfs_known, os_known| bool    | [B]        | survival label present                        |
    | patient_id, center | list    | B strings  |                                               |
    """

    ct: torch.Tensor
    masks: torch.Tensor
    slice_mask: torch.Tensor
    lesion_annotated: torch.Tensor
    clinical: torch.Tensor
    clinical_missing: torch.Tensor
    pet: torch.Tensor
    pet_missing: torch.Tensor
    radiomics: torch.Tensor
    radiomics_missing: torch.Tensor
    histology: torch.Tensor
    stage: torch.Tensor
    dfs_time: torch.Tensor
    dfs_event: torch.Tensor
    dfs_known: torch.Tensor
    os_time: torch.Tensor
    os_event: torch.Tensor
    os_known: torch.Tensor
    patient_id: list[str] = field(default_factory=list)
    center: list[str] = field(default_factory=list)
    # Both masks unpacked, uint8 [B,2,S,H,W], once, where the batch lives (mask_pixels).
    _pixels: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.patient_id)

    @property
    def mask_pixels(self) -> torch.Tensor:
        """uint8 [B,2,S,H,W] 0/1: lung and lesion masks unpacked in one pass on the batch's
        device, on first use; the model and the losses then read the same tensor."""
        if self._pixels is None:
            self._pixels = unpack_masks(self.masks, self.ct.shape[-2:])
        return self._pixels

    @property
    def lung_mask(self) -> torch.Tensor:
        """uint8 [B,S,H,W] 0/1."""
        return self.mask_pixels[:, 0]

    @property
    def lesion_mask(self) -> torch.Tensor:
        """uint8 [B,S,H,W] 0/1."""
        return self.mask_pixels[:, 1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (not the unpacked masks)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.init and isinstance(getattr(self, f.name), torch.Tensor)
        }

    def _with(self, tensors: dict[str, torch.Tensor]) -> Batch:
        return Batch(**{f.name: getattr(self, f.name) for f in fields(self) if f.init} | tensors)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """Move every tensor to `device` (strings stay on the host)."""
        return self._with(
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()}
        )

    def pin_memory(self) -> Batch:
        """Called by torch's DataLoader when pin_memory=True."""
        return self._with({k: v.pin_memory() for k, v in self.tensors().items()})


def unpack_masks(packed: torch.Tensor, hw: tuple[int, int] | torch.Size) -> torch.Tensor:
    """uint8 [..., S, ceil(H*W/8)] bit-packed (numpy packbits, big-endian bit order) ->
    uint8 [..., S, H, W] of 0/1. Works on any device."""
    h, w = int(hw[0]), int(hw[1])
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., : h * w].reshape(*packed.shape[:-1], h, w)


def valid_patient_id(patient_id: str) -> bool:
    """True if the id is usable as a WebDataset key (no dots, no path separators)."""
    return bool(PATIENT_ID_RE.match(patient_id))
