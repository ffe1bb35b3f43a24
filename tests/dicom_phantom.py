"""A small chest phantom written as DICOM (CT series, RTSTRUCT, PET) and NIfTI, with its
ground truth in patient millimetres, for the import tests.

Geometry (DICOM's LPS patient system): pixel (k, r, c) of the CT lies at
(X0 + c * DC, Y0 + r * DR, Z0 + k * STEP). Body: an ellipse of soft tissue; two lung
ellipses; a spherical lesion in the patient's right lung (low x: LPS x grows to the
patient's left).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
IDENTITY = {
    "PatientName": "DOE^JOHN",
    "PatientBirthDate": "19500101",
    "AccessionNumber": "ACC998877",
}


@dataclass
class Phantom:
    rows: int = 48
    cols: int = 48
    slices: int = 14
    dr: float = 0.9
    dc: float = 0.9
    step: float = 2.5
    x0: float = -21.15
    y0: float = -21.15
    z0: float = -16.25
    lesion_center: tuple[float, float, float] = (-9.0, -1.0, 1.0)  # mm (patient's right)
    lesion_radii: tuple[float, float, float] = (6.0, 4.5, 5.0)  # an ellipsoid, mm
    scale: float = 1.0  # body and lungs scaled by this (a full-size chest: 8.5 at 0.7 mm)

    def points(self) -> np.ndarray:
        """[S,R,C,3] patient positions of the pixel centres."""
        k, r, c = np.mgrid[0 : self.slices, 0 : self.rows, 0 : self.cols]
        return np.stack([self.x0 + c * self.dc, self.y0 + r * self.dr, self.z0 + k * self.step], -1)

    def masks(self):
        p = self.points()
        x, y = p[..., 0], p[..., 1]
        x, y = x / self.scale, y / self.scale
        body = (x / 20) ** 2 + (y / 16) ** 2 <= 1
        lungs = (((x + 9) / 7) ** 2 + (y / 11) ** 2 <= 1) | (
            ((x - 9) / 7) ** 2 + (y / 11) ** 2 <= 1
        )
        return body, lungs, self.lesion_distance(p) <= 1

    def lesion_distance(self, points: np.ndarray) -> np.ndarray:
        """The ellipsoid's normalised radius at points [...,3] (<= 1 inside)."""
        scaled = (points - np.array(self.lesion_center)) / np.array(self.lesion_radii)
        return np.linalg.norm(scaled, axis=-1)

    def hu(self) -> np.ndarray:
        body, lungs, lesion = self.masks()
        out = np.full(body.shape, -1000.0)
        k = np.arange(self.slices)[:, None, None] * np.ones(body.shape)
        out[body] = (20.0 + 2.0 * k)[body]  # a gradient along z: a flipped stack shows
        out[lungs] = -850.0
        out[lesion] = 40.0
        return out

    def z(self, k: int) -> float:
        return self.z0 + k * self.step


def _base(
    modality: str, sop_class: str, patient: str, study: str, series: str, frame: str
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.PatientID, ds.Modality = patient, modality
    for key, value in IDENTITY.items():
        setattr(ds, key, value)
    ds.PatientAge, ds.PatientSex = "061Y", "M"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.StudyDate = ds.SeriesDate = "20240110"
    ds.StudyTime, ds.StudyID, ds.SeriesNumber, ds.ReferringPhysicianName = "090000", "1", 1, ""
    return ds


def _image(ds: Dataset, g: Phantom, k: int, stored: np.ndarray) -> None:
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [g.x0, g.y0, g.z(k)]
    ds.PixelSpacing = [g.dr, g.dc]
    ds.SliceThickness = g.step
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = stored.astype(np.uint16).tobytes()


def write_ct(
    folder: Path,
    g: Phantom,
    patient: str,
    hu: np.ndarray | None = None,
    seed: int = 0,
    skip: tuple[int, ...] = (),
    prefix: str = "IM",
    rotated: bool = False,
) -> dict:
    """The CT series, files in shuffled order, InstanceNumber counting down the table (so
    an import that sorted by it would flip the stack). `rotated`: stored with
    ImageOrientationPatient (-1,0,0, 0,-1,0) (columns to the patient's right, rows to
    anterior, as a rotated acquisition stores them), at the same patient positions.
    -> the series' UIDs and datasets."""
    hu = g.hu() if hu is None else hu
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(g.slices))
    random.Random(seed).shuffle(order)
    datasets = []
    for n, k in enumerate(order):
        if k in skip:
            continue
        ds = _base("CT", CT_STORAGE, patient, study, series, frame)
        ds.InstanceNumber = g.slices - k
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        _image(ds, g, k, hu[k] + 1024)
        if rotated:
            ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
            ds.ImagePositionPatient = [
                g.x0 + (g.cols - 1) * g.dc,
                g.y0 + (g.rows - 1) * g.dr,
                g.z(k),
            ]
            ds.PixelData = (hu[k][::-1, ::-1] + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{prefix}{n:04d}.dcm", enforce_file_format=True)
        datasets.append(ds)
    return {"study": study, "series": series, "frame": frame, "datasets": datasets}


def ellipse(cx: float, cy: float, ax: float, ay: float, z: float, n: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t), np.full(n, z)], 1)


def phantom_rois(g: Phantom) -> dict[str, list[np.ndarray]]:
    """GTV-1 (the lesion's ellipse on every slice it crosses, a 360-gon), Lung-Right,
    Lung-Left."""
    gtv = []
    cx, cy, cz = g.lesion_center
    rx, ry, rz = g.lesion_radii
    for k in range(g.slices):
        s = 1 - ((g.z(k) - cz) / rz) ** 2
        if s > 0:
            gtv.append(ellipse(cx, cy, rx * np.sqrt(s), ry * np.sqrt(s), g.z(k), n=360))
    a = g.scale
    right = [ellipse(-9 * a, 0, 7 * a, 11 * a, g.z(k)) for k in range(g.slices)]
    left = [ellipse(9 * a, 0, 7 * a, 11 * a, g.z(k)) for k in range(g.slices)]
    return {"GTV-1": gtv, "Lung-Right": right, "Lung-Left": left, "Heart": []}


def write_rtstruct(
    path: Path, ct: dict, patient: str, rois: dict[str, list[np.ndarray]], series: str | None = None
) -> None:
    ds = _base("RTSTRUCT", RTSTRUCT_STORAGE, patient, ct["study"], generate_uid(), ct["frame"])
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series or ct["series"]
    ref_study = Dataset()
    ref_study.RTReferencedSeriesSequence = Sequence([ref_series])
    ref_frame = Dataset()
    ref_frame.FrameOfReferenceUID = ct["frame"]
    ref_frame.RTReferencedStudySequence = Sequence([ref_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref_frame])
    ds.StructureSetROISequence = Sequence()
    ds.ROIContourSequence = Sequence()
    for number, (name, polygons) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, ct["frame"]
        ds.StructureSetROISequence.append(roi)
        contour_roi = Dataset()
        contour_roi.ReferencedROINumber = number
        contour_roi.ContourSequence = Sequence()
        for poly in polygons:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(poly)
            c.ContourData = [float(v) for v in poly.reshape(-1)]
            contour_roi.ContourSequence.append(c)
        ds.ROIContourSequence.append(contour_roi)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@dataclass
class PetPhantom(Phantom):
    """A PET on its own coarser grid over the same body (every other CT pixel centre and
    slice), activity in Bq/ml: a background, and in the lesion a peak at its centre that
    falls to half its excess at the lesion's surface."""

    rows: int = 24
    cols: int = 24
    slices: int = 7
    dr: float = 1.8
    dc: float = 1.8
    step: float = 5.0
    background: float = 2000.0
    lesion: float = 16000.0


def pet_activity(p: PetPhantom, g: Phantom) -> np.ndarray:
    d = g.lesion_distance(p.points())
    lesion = p.background + (p.lesion - p.background) * (1 - 0.5 * d**2)
    return np.where(d <= 1, lesion, p.background)


DOSE = {
    "weight_kg": 70.0,
    "dose_bq": 3.7e8,
    "half_life_s": 6586.2,
    "injected": "093000",
    "series": "103000",
}


def write_pet(
    folder: Path, p: PetPhantom, g: Phantom, patient: str, ct: dict, drop: str = ""
) -> np.ndarray:
    """-> the activity written (Bq/ml)."""
    activity = pet_activity(p, g)
    series = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    slope = float(activity.max()) / 60000.0
    for k in range(p.slices):
        ds = _base("PT", PET_STORAGE, patient, ct["study"], series, ct["frame"])
        ds.Units, ds.DecayCorrection = "BQML", "START"
        ds.PatientWeight = DOSE["weight_kg"]
        ds.SeriesTime = DOSE["series"]
        drug = Dataset()
        drug.RadionuclideTotalDose = DOSE["dose_bq"]
        drug.RadionuclideHalfLife = DOSE["half_life_s"]
        drug.RadiopharmaceuticalStartTime = DOSE["injected"]
        ds.RadiopharmaceuticalInformationSequence = Sequence([drug])
        if drop == "dose":
            del drug.RadionuclideTotalDose
        ds.InstanceNumber = k + 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, 0
        _image(ds, p, k, np.round(activity[k] / slope))
        ds.save_as(folder / f"PT{k:04d}.dcm", enforce_file_format=True)
    return np.round(activity / slope) * slope


def expected_suv_factor() -> float:
    elapsed = 3600.0
    decayed = DOSE["dose_bq"] * np.exp(-np.log(2) * elapsed / DOSE["half_life_s"])
    return DOSE["weight_kg"] * 1000.0 / decayed


def write_nifti(path: Path, volume: np.ndarray, g: Phantom, las: bool = False) -> None:
    """volume [S,R,C] in the DICOM layout above -> a NIfTI in RAS+ voxel order (or LAS+,
    FSL's radiological order, with `las`) with the affine that puts every voxel at the same
    patient position."""
    import nibabel as nib

    data = np.ascontiguousarray(volume.transpose(2, 1, 0)[::-1, ::-1, :])  # [X,Y,Z]: i = C-1-c
    affine = np.array(
        [
            [g.dc, 0, 0, -g.x0 - (g.cols - 1) * g.dc],
            [0, g.dr, 0, -g.y0 - (g.rows - 1) * g.dr],
            [0, 0, g.step, g.z0],
            [0, 0, 0, 1],
        ]
    )
    if las:  # the x axis stored the other way round: the affine says so
        data = np.ascontiguousarray(data[::-1])
        affine[0, 3] += affine[0, 0] * (g.cols - 1)
        affine[0, 0] = -affine[0, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))


def write_cohort(root: Path, n: int, seed: int = 0) -> list[str]:
    """n phantom patients (lesion position, size and density varying) as DICOM CT +
    RTSTRUCT under root/<id>/, -> their Lung1-style clinical rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pid = f"SYN-{i:03d}"
        side = -9.0 if i % 2 else 9.0
        g = Phantom(
            lesion_center=(side + rng.uniform(-2, 2), rng.uniform(-4, 4), rng.uniform(-4, 4)),
            lesion_radii=tuple(rng.uniform(3.0, 6.0, 3)),
        )
        hu = g.hu()
        hu[g.masks()[2]] = rng.uniform(0, 80)
        ct = write_ct(root / pid / "CT", g, pid, hu=hu, seed=i)
        write_rtstruct(root / pid / "RS" / "rs.dcm", ct, pid, phantom_rois(g))
        histology = ("adenocarcinoma", "squamous cell carcinoma")[i % 2]
        stage = ("I", "II", "IIIa", "IIIb", "IV")[i % 5]
        days, event = int(rng.uniform(60, 1500)), int(rng.random() < 0.6)
        rows.append(
            f"{pid},{int(rng.uniform(40, 85))},{('male', 'female')[i % 2]},"
            f"{histology},{stage},{days},{event}"
        )
    return rows
