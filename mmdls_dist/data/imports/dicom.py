"""DICOM -> volumes and masks (pydicom 3; DICOM SEG through highdicom).

- CT: a series' slices ordered by ImagePositionPatient along the slice normal (never by
  InstanceNumber), HU = stored value x RescaleSlope + RescaleIntercept.
- RTSTRUCT: ROI contours (patient millimetres) rasterised onto the CT grid. No library
  here does this for pydicom 3 without more than it is worth (rt-utils needs OpenCV and
  assumes its own geometry), so it is a small polygon fill: each contour onto the slice
  its points lie on, the pixels whose centres lie inside (matplotlib's point-in-polygon
  test); the contours of one ROI on one slice combine by the even-odd rule (an inner
  contour is a hole, as DICOM draws cavities); the ROIs a mapping pattern matches are
  united.
- SEG: read with highdicom, frames matched to the CT slices by SOP instance UID.
- PET: SUVbw from the PET series (activity in Bq/ml x body weight / injected dose decayed
  from injection to the series time) and the lesion's SUVmax, SUVmean, SUVpeak (the
  highest mean over a 1 cm^3 sphere centred in the lesion), MTV (the lesion ROI's volume on
  the PET grid, ml; no SUV threshold) and TLG (SUVmean x MTV).

Each problem is a Defect naming the file (relative to the DICOM root), the patient and the
DICOM attribute; header values (names, dates, ids) never appear in a message.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from mmdls_dist.data.defects import Defect
from mmdls_dist.data.imports.mapping import ImportMapping
from mmdls_dist.data.imports.volume import Volume, gap_message, sample_mask

SUV_PEAK_ML = 1.0  # SUVpeak: the mean over a sphere of 1 cm^3 (radius 6.2 mm)


@dataclass(frozen=True)
class Header:
    """What the scan keeps of one file's header: routing, never identity values."""

    path: str  # relative to the DICOM root
    patient: str  # PatientID (only to group files; the output id may be a pseudonym)
    modality: str
    series: str  # SeriesInstanceUID


def scan_files(root: str, paths: list[str]) -> tuple[list[Header], list[Defect], int]:
    """Read the headers of these files (relative to root; pixel data skipped). -> (headers,
    defects of files that are DICOM but cannot be placed, count of non-DICOM files)."""
    base = Path(root)
    headers, defects, skipped = [], [], 0
    for rel in paths:
        try:
            ds = pydicom.dcmread(
                base / rel,
                stop_before_pixels=True,
                specific_tags=["PatientID", "Modality", "SeriesInstanceUID"],
            )
        except (InvalidDicomError, OSError, ValueError):
            skipped += 1
            continue
        missing = [k for k in ("PatientID", "Modality", "SeriesInstanceUID") if k not in ds]
        if missing:
            defects.append(Defect(rel, None, missing[0], "missing: the file cannot be placed"))
            continue
        headers.append(Header(rel, str(ds.PatientID), str(ds.Modality), str(ds.SeriesInstanceUID)))
    return headers, defects, skipped


def list_files(root: Path) -> list[str]:
    """Every file under root (any depth, hidden ones left out), relative, sorted."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


@dataclass
class PatientFiles:
    """One patient's files by role (paths relative to the DICOM root)."""

    ct: dict[str, list[str]] = field(default_factory=dict)  # series UID -> files
    pet: dict[str, list[str]] = field(default_factory=dict)
    rtstruct: list[str] = field(default_factory=list)
    seg: list[str] = field(default_factory=list)


def group(headers: list[Header]) -> dict[str, PatientFiles]:
    """PatientID -> its files by role (other modalities are not used)."""
    out: dict[str, PatientFiles] = defaultdict(PatientFiles)
    for h in headers:
        files = out[h.patient]
        if h.modality == "CT":
            files.ct.setdefault(h.series, []).append(h.path)
        elif h.modality == "PT":
            files.pet.setdefault(h.series, []).append(h.path)
        elif h.modality == "RTSTRUCT":
            files.rtstruct.append(h.path)
        elif h.modality == "SEG":
            files.seg.append(h.path)
    return dict(out)


class PatientDefectsError(Exception):
    """Defects that stop one patient's import."""

    def __init__(self, defects: list[Defect]):
        super().__init__("; ".join(map(str, defects)))
        self.defects = defects


def read(root: Path, rel: str, pid: str) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(root / rel)
    except (InvalidDicomError, OSError, ValueError) as exn:
        raise PatientDefectsError(
            [Defect(rel, pid, "(file)", f"unreadable ({type(exn).__name__})")]
        ) from None


def _pixels(ds: pydicom.Dataset, rel: str, pid: str) -> np.ndarray:
    """Stored pixel values; a transfer syntax without an installed decoder is a defect."""
    try:
        return ds.pixel_array
    except Exception as exn:  # pydicom raises several types when it has no decoder
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise PatientDefectsError(
            [
                Defect(
                    rel,
                    pid,
                    "TransferSyntaxUID",
                    f"pixel data in {name} cannot be decoded here ({type(exn).__name__}); "
                    "install its decoder (pylibjpeg, gdcm) or export uncompressed",
                )
            ]
        ) from None


def choose_ct_series(files: PatientFiles, structures: dict[str, pydicom.Dataset], pid: str) -> str:
    """The CT series to import: the only one, or the one an RTSTRUCT (rel -> dataset)
    refers to."""
    if not files.ct:
        raise PatientDefectsError([Defect(".", pid, "Modality", "no CT series for this patient")])
    folders = defaultdict(set)
    for uid, paths in files.ct.items():
        for rel in paths:
            folders[str(Path(rel).parent)].add(uid)
    mixed = [f for f, uids in folders.items() if len(uids) > 1]
    if mixed:
        raise PatientDefectsError(
            [
                Defect(
                    folder,
                    pid,
                    "SeriesInstanceUID",
                    f"{len(folders[folder])} CT series mixed in one folder",
                )
                for folder in mixed
            ]
        )
    if len(files.ct) == 1:
        return next(iter(files.ct))
    referenced = {uid for ds in structures.values() for uid in referenced_series(ds)}
    chosen = [uid for uid in files.ct if uid in referenced]
    if len(chosen) == 1:
        return chosen[0]
    raise PatientDefectsError(
        [
            Defect(
                ".",
                pid,
                "SeriesInstanceUID",
                f"{len(files.ct)} CT series and no RTSTRUCT naming exactly one of them",
            )
        ]
    )


def _unit(vector) -> np.ndarray:
    v = np.asarray(vector, dtype=float)
    return v / np.linalg.norm(v)


def _axis_aligned(v: np.ndarray) -> bool:
    return bool(np.max(np.abs(v)) > 1 - 1e-3)


def series_volume(
    root: Path, paths: list[str], pid: str, rescale
) -> tuple[Volume, list[pydicom.Dataset], list[str]]:
    """One series' files -> (Volume of rescale(stored values, dataset), datasets and paths in
    slice order). Checks: one orientation, axis-aligned (not oblique), one pixel spacing
    and size, regular slice positions."""
    datasets = [read(root, rel, pid) for rel in paths]
    first = datasets[0]
    for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        lacking = [rel for rel, ds in zip(paths, datasets, strict=True) if key not in ds]
        if lacking:
            raise PatientDefectsError([Defect(lacking[0], pid, key, "missing")])
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    for rel, ds in zip(paths, datasets, strict=True):
        if not np.allclose(
            np.asarray(ds.ImageOrientationPatient, dtype=float), orientation, atol=1e-4
        ):
            raise PatientDefectsError(
                [Defect(rel, pid, "ImageOrientationPatient", "mixed orientations in one series")]
            )
        same_grid = (ds.Rows, ds.Columns) == (first.Rows, first.Columns) and np.allclose(
            np.asarray(ds.PixelSpacing, dtype=float), np.asarray(first.PixelSpacing, dtype=float)
        )
        if not same_grid:
            raise PatientDefectsError(
                [
                    Defect(
                        rel, pid, "PixelSpacing", "pixel size or spacing differs within the series"
                    )
                ]
            )
    row_dir, col_dir = _unit(orientation[:3]), _unit(orientation[3:])
    if not (_axis_aligned(row_dir) and _axis_aligned(col_dir)):
        raise PatientDefectsError(
            [
                Defect(
                    paths[0],
                    pid,
                    "ImageOrientationPatient",
                    "oblique orientation (not axial, coronal or sagittal)",
                )
            ]
        )
    normal = np.cross(row_dir, col_dir)
    origins = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets])
    order = np.argsort(origins @ normal, kind="stable")
    datasets = [datasets[i] for i in order]
    paths = [paths[i] for i in order]
    origins = origins[order]
    gap = gap_message(origins @ normal)
    if gap:
        raise PatientDefectsError(
            [Defect(str(Path(paths[0]).parent), pid, "ImagePositionPatient", gap)]
        )
    voxels = np.stack(
        [
            rescale(_pixels(ds, rel, pid).astype(np.float32), ds, rel)
            for ds, rel in zip(datasets, paths, strict=True)
        ]
    )
    spacing = tuple(float(v) for v in first.PixelSpacing)
    return Volume(voxels, origins, row_dir, col_dir, spacing), datasets, paths


def hounsfield(stored: np.ndarray, ds: pydicom.Dataset, rel: str) -> np.ndarray:
    return stored * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))


# --- RTSTRUCT ---------------------------------------------------------------------------


def referenced_series(ds: pydicom.Dataset) -> set[str]:
    """The image series an RTSTRUCT's contours were drawn on."""
    out = set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                out.add(str(series.SeriesInstanceUID))
    return out


def rasterise(polygons: list[np.ndarray], vol: Volume) -> np.ndarray:
    """Closed planar contours [n,3] (mm) -> a mask on the volume's grid (even-odd per
    slice); a contour that lies on no slice of the grid is dropped."""
    shape = vol.voxels.shape
    mask = np.zeros(shape, dtype=bool)
    for points in polygons:
        if len(points) < 3:
            continue
        pix = vol.pixel_of(points)
        k = int(round(float(np.median(pix[:, 0]))))
        if not 0 <= k < shape[0] or np.max(np.abs(pix[:, 0] - k)) > 0.5:
            continue
        mask[k] ^= polygon_fill(pix[:, 1:], shape[1:])
    return mask


def polygon_fill(rows_cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A polygon's vertices as (row, column) floats -> the pixels whose centres lie inside
    (matplotlib's point-in-polygon test over the polygon's bounding box)."""
    from matplotlib.path import Path as Polygon

    out = np.zeros(shape, dtype=bool)
    low = np.maximum(np.floor(rows_cols.min(0)).astype(int), 0)
    high = np.minimum(np.ceil(rows_cols.max(0)).astype(int) + 1, shape)
    if np.any(high <= low):
        return out
    rr, cc = np.mgrid[low[0] : high[0], low[1] : high[1]]
    centres = np.stack([rr.ravel(), cc.ravel()], axis=1)
    inside = Polygon(rows_cols).contains_points(centres)
    out[low[0] : high[0], low[1] : high[1]] = inside.reshape(rr.shape)
    return out


def roi_masks(ds: pydicom.Dataset, vol: Volume, m: ImportMapping) -> dict[str, np.ndarray | None]:
    """ "lesion" / "lung" -> the union of the ROIs the mapping's patterns match (None when
    none matches), rasterised on vol."""
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    contours = {int(c.ReferencedROINumber): c for c in ds.get("ROIContourSequence", [])}
    out: dict[str, np.ndarray | None] = {}
    for kind in ("lesion", "lung"):
        chosen = [n for n, name in names.items() if m.matches(kind, name)]
        if not chosen:
            out[kind] = None
            continue
        mask = np.zeros(vol.voxels.shape, dtype=bool)
        for number in chosen:
            polygons = [
                np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
                for c in contours.get(number, {}).get("ContourSequence", [])
                if c.get("ContourGeometricType", "CLOSED_PLANAR") == "CLOSED_PLANAR"
            ]
            mask |= rasterise(polygons, vol)
        out[kind] = mask
    return out


# --- SEG (highdicom) --------------------------------------------------------------------


def seg_masks(
    root: Path, rel: str, ct: list[pydicom.Dataset], m: ImportMapping, pid: str
) -> dict[str, np.ndarray | None]:
    """A DICOM SEG's segments the mapping's patterns match -> masks on the CT grid (frames
    matched to CT slices by SOP instance UID, through highdicom)."""
    import highdicom as hd

    seg = hd.seg.segread(root / rel)
    series = {str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])}
    if series and str(ct[0].SeriesInstanceUID) not in series:
        raise PatientDefectsError(
            [Defect(rel, pid, "ReferencedSeriesSequence", "the SEG refers to another series")]
        )
    uids = [str(ds.SOPInstanceUID) for ds in ct]
    out: dict[str, np.ndarray | None] = {}
    for kind in ("lesion", "lung"):
        numbers = [
            int(s.SegmentNumber)
            for s in seg.SegmentSequence
            if m.matches(kind, str(s.SegmentLabel))
        ]
        if not numbers:
            out[kind] = None
            continue
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=numbers,
            assert_missing_frames_are_empty=True,
        )
        out[kind] = np.asarray(pixels).reshape(len(uids), *pixels.shape[1:3], -1).any(axis=-1)
    return out


# --- PET --------------------------------------------------------------------------------


def _when(date: str | None, time: str | None) -> datetime | None:
    if not date or not time:
        return None
    text = f"{date}{time}"
    for pattern in ("%Y%m%d%H%M%S.%f", "%Y%m%d%H%M%S", "%Y%m%d%H%M"):
        try:
            return datetime.strptime(text, pattern)
        except ValueError:
            continue
    return None


def suv_factor(ds: pydicom.Dataset, rel: str, pid: str) -> float:
    """Body-weight SUV per Bq/ml: weight (g) / injected dose decayed from the injection to
    the series time (the time DecayCorrection START refers the images to)."""

    def need(owner, key: str, where: str):
        value = owner.get(key) if owner is not None else None
        if value in (None, ""):
            raise PatientDefectsError([Defect(rel, pid, where, "missing: SUV cannot be computed")])
        return value

    units = str(ds.get("Units", ""))
    if units != "BQML":
        raise PatientDefectsError([Defect(rel, pid, "Units", "PET values are not in Bq/ml (BQML)")])
    if str(ds.get("DecayCorrection", "START")) != "START":
        raise PatientDefectsError(
            [Defect(rel, pid, "DecayCorrection", "only START decay correction is supported")]
        )
    weight_kg = float(need(ds, "PatientWeight", "PatientWeight"))
    info = ds.get("RadiopharmaceuticalInformationSequence")
    drug = info[0] if info else None
    seq = "RadiopharmaceuticalInformationSequence/"
    dose = float(need(drug, "RadionuclideTotalDose", seq + "RadionuclideTotalDose"))
    half_life = float(need(drug, "RadionuclideHalfLife", seq + "RadionuclideHalfLife"))
    series_time = _when(ds.get("SeriesDate"), ds.get("SeriesTime"))
    start = drug.get("RadiopharmaceuticalStartDateTime") if drug is not None else None
    injected = (
        _when(str(start)[:8], str(start)[8:])
        if start
        else _when(
            ds.get("SeriesDate"),
            need(drug, "RadiopharmaceuticalStartTime", seq + "RadiopharmaceuticalStartTime"),
        )
    )
    if series_time is None or injected is None:
        raise PatientDefectsError(
            [Defect(rel, pid, "SeriesTime", "missing or unreadable: SUV cannot be computed")]
        )
    elapsed = (series_time - injected).total_seconds()
    if elapsed < 0:
        raise PatientDefectsError(
            [Defect(rel, pid, seq + "RadiopharmaceuticalStartTime", "injection after the series")]
        )
    decayed = dose * math.exp(-math.log(2) * elapsed / half_life)
    return weight_kg * 1000.0 / decayed


def pet_features(pet: Volume, lesion: np.ndarray) -> dict[str, float] | None:
    """SUV volume + lesion mask on its grid -> the raw layout's PET columns (None when the
    lesion lies outside the PET field of view)."""
    if not lesion.any():
        return None
    suv = pet.voxels
    dz, dr, dc = abs(pet.slice_step), pet.spacing[0], pet.spacing[1]
    radius = (3 * SUV_PEAK_ML * 1000 / (4 * math.pi)) ** (1 / 3)  # mm
    offsets = [int(math.ceil(radius / d)) for d in (dz, dr, dc)]
    zz, rr, cc = np.mgrid[
        -offsets[0] : offsets[0] + 1, -offsets[1] : offsets[1] + 1, -offsets[2] : offsets[2] + 1
    ]
    sphere = (zz * dz) ** 2 + (rr * dr) ** 2 + (cc * dc) ** 2 <= radius**2
    local_mean = ndimage.correlate(suv, sphere / sphere.sum(), mode="nearest")
    values = suv[lesion]
    mtv = float(lesion.sum() * dz * dr * dc / 1000.0)  # ml
    mean = float(values.mean())
    return {
        "suv_max": float(values.max()),
        "suv_mean": mean,
        "suv_peak": float(local_mean[lesion].max()),
        "mtv": mtv,
        "tlg": mean * mtv,
    }


def pet_volume(root: Path, paths: list[str], pid: str) -> Volume:
    """A PET series -> a Volume of SUVbw."""

    def to_suv(stored: np.ndarray, ds: pydicom.Dataset, rel: str) -> np.ndarray:
        activity = stored * float(ds.get("RescaleSlope", 1.0)) + float(
            ds.get("RescaleIntercept", 0.0)
        )
        return activity * suv_factor(ds, rel, pid)

    vol, _, _ = series_volume(root, paths, pid, to_suv)
    return vol


def lesion_pet_features(
    root: Path, files: PatientFiles, ct: Volume, lesion: np.ndarray, pid: str
) -> dict[str, float] | None:
    """The PET columns from the patient's PET series (the first, by UID, if several)."""
    if not files.pet:
        return None
    uid = sorted(files.pet)[0]
    pet = pet_volume(root, files.pet[uid], pid)
    return pet_features(pet, sample_mask(lesion, ct, pet))
