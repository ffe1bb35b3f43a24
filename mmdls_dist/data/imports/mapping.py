"""The import mapping (a YAML file): how one hospital's DICOM or NIfTI export and its
clinical spreadsheet become the raw layout. Everything site-specific lives here: image
geometry and window, which ROI names are the lesion and the lungs, the clinical columns,
their units and codes, and the pseudonym key. `mmdls_dist/configs/mappings/lung1.yaml` is
a ready one for the public NSCLC-Radiomics (Lung1) collection.

Nothing from a DICOM header reaches the output unless a mapping names it
(`clinical.header`), so patient names, birth dates and accession numbers never do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mmdls_dist.data.schema import CLINICAL_CSV_COLUMNS
from mmdls_dist.options import choice, from_dict, yaml_value

MAPPINGS_DIR = Path(__file__).resolve().parents[2] / "configs" / "mappings"
UNITS_TO_MONTHS = {"days": 12 / 365.25, "weeks": 12 / 52.1775, "months": 1.0, "years": 12.0}
TIME_COLUMNS = ("dfs_time", "os_time")
# DICOM keywords a mapping may copy into a clinical column (clinical.header), and only these:
# the rest of a header (names, birth dates, accession numbers, UIDs) never reaches OUT.
HEADER_KEYWORDS = ("PatientAge", "PatientSex", "PatientWeight")


@dataclass(frozen=True)
class ClinicalMapping:
    """The hospital's clinical table -> clinical.csv."""

    id_column: str = "PatientID"  # the column holding the id that DICOM's PatientID carries
    center: str = ""  # the center name of every patient of this import (or center_column)
    center_column: str = ""  # a column naming each patient's center instead
    columns: dict[str, str] = field(default_factory=dict)  # raw-layout column -> source column
    units: dict[str, str] = field(default_factory=dict)  # time column -> days|weeks|months|years
    codes: dict[str, dict[str, int]] = field(default_factory=dict)  # column -> text -> code
    # Columns whose texts outside `codes` become an empty cell (unknown) instead of a defect:
    # e.g. histology "large cell" or "nos" is neither LUAD nor LUSC, so the label is unknown.
    unknown_otherwise: tuple[str, ...] = ("histology",)
    missing: tuple[str, ...] = ("", "NA", "N/A", "nan", "NaN")  # texts that mean "not recorded"
    header: dict[str, str] = field(default_factory=dict)  # raw column -> DICOM keyword

    def __post_init__(self) -> None:
        known = set(CLINICAL_CSV_COLUMNS) - {"patient_id", "center"}
        for name in (*self.columns, *self.codes, *self.header):
            if name not in known:
                raise ValueError(f"mapping clinical: {name!r} is not a clinical.csv column")
        for name, unit in self.units.items():
            if name not in TIME_COLUMNS:
                raise ValueError(f"mapping clinical.units: {name!r} is not a time column")
            choice(f"clinical.units.{name}", unit, tuple(UNITS_TO_MONTHS))
        for name, keyword in self.header.items():
            choice(f"clinical.header.{name}", keyword, HEADER_KEYWORDS)
        if bool(self.center) == bool(self.center_column):
            raise ValueError("mapping clinical: give exactly one of center and center_column")


@dataclass(frozen=True)
class ImportMapping:
    """One export's import settings."""

    clinical: ClinicalMapping = field(default_factory=lambda: ClinicalMapping(center="SITE"))
    spacing_mm: float = 0.8  # in-plane pixel spacing after resampling, > 0
    size: int = 512  # square slice size in pixels after resampling (centre pad / crop), >= 32
    window_level: float = -600.0  # CT window (HU) mapped to 0..255: the lung window
    window_width: float = 1500.0
    slices: str = "lesion"  # which slices: "lesion" (the lesion's extent), "lung", "all"
    slice_margin: int = 2  # slices kept beyond that extent on each side, >= 0
    lesion_roi: str = "^GTV"  # regular expression (case-insensitive) for lesion ROI names
    lung_roi: str = "^Lung"  # ... for lung ROI names; every match is united
    # No lung ROI: "threshold" (a documented HU threshold mask, volume.threshold_lungs) or
    # "none" (lung/ left absent: such a patient is for prediction only, training needs it).
    lung_fallback: str = "threshold"
    pet: bool = True  # PET series with a lesion ROI -> SUV features in the PET columns
    # NIfTI file names per patient folder ({id} = the folder name); masks optional.
    nifti_ct: str = "{id}_ct.nii.gz"
    nifti_lesion: str = "{id}_lesion.nii.gz"
    nifti_lung: str = "{id}_lung.nii.gz"
    pseudonym_key: str = ""  # a key file outside OUT: ids become keyed-HMAC pseudonyms
    pseudonym_map: str = ""  # where the id -> pseudonym table goes (outside OUT)

    def __post_init__(self) -> None:
        if self.spacing_mm <= 0 or self.size < 32 or self.window_width <= 0:
            raise ValueError("mapping: spacing_mm > 0, size >= 32 and window_width > 0")
        if self.slice_margin < 0:
            raise ValueError("mapping: slice_margin must be >= 0")
        choice("slices", self.slices, ("lesion", "lung", "all"))
        choice("lung_fallback", self.lung_fallback, ("threshold", "none"))
        for name in ("lesion_roi", "lung_roi"):
            try:
                re.compile(getattr(self, name))
            except re.error as exn:
                raise ValueError(f"mapping {name}: not a regular expression ({exn})") from None
        if bool(self.pseudonym_key) != bool(self.pseudonym_map):
            raise ValueError("mapping: pseudonym_key and pseudonym_map go together")

    def matches(self, kind: str, roi_name: str) -> bool:
        pattern = self.lesion_roi if kind == "lesion" else self.lung_roi
        return re.search(pattern, roi_name, flags=re.IGNORECASE) is not None


def mapping_path(name_or_path: str) -> Path:
    """A shipped mapping's name (lung1) or a YAML file."""
    shipped = MAPPINGS_DIR / f"{name_or_path}.yaml"
    return shipped if shipped.is_file() else Path(name_or_path)


def load_mapping(name_or_path: str | None) -> ImportMapping:
    """The mapping file (None: the defaults, center "SITE"), validated: a wrong key or value
    fails naming it."""
    if not name_or_path:
        return ImportMapping()
    path = mapping_path(name_or_path)
    data = yaml_value(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    try:
        return from_dict(ImportMapping, data)
    except (TypeError, ValueError) as exn:
        raise ValueError(f"{path}: {exn}") from None
