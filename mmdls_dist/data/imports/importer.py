"""`mmdls import-dicom` / `mmdls import-nifti`: an export folder + clinical table + mapping
-> the raw layout (docs/RAW_LAYOUT.md), so `ingest`, `shard` and everything after are
unchanged.

Flow: clinical table -> rows (clinical.py); the export scanned (DICOM headers, or one NIfTI
folder per patient); one task per patient (a Ray task under the CLI's mapper): volume ->
masks -> chosen slices -> resampled, windowed PNGs in OUT/images/<id>/{ct,lung,lesion}/,
a sidecar OUT/import/<id>.json (spacing, window, slices, where each mask came from), the
PET columns; then clinical.csv of the patients that imported cleanly. A patient with any
defect is not written, and the report lists every defect at once (the ingest contract).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mmdls_dist.data.defects import Defect
from mmdls_dist.data.imports import dicom
from mmdls_dist.data.imports.clinical import (
    USABLE_ID,
    clinical_rows,
    header_value,
    outside,
    pseudonym,
    write_clinical,
    write_pseudonym_map,
)
from mmdls_dist.data.imports.mapping import ImportMapping
from mmdls_dist.data.imports.nifti import nifti_volume, same_grid
from mmdls_dist.data.imports.volume import (
    Volume,
    axial_defect,
    canonical,
    chosen_slices,
    resample_slice,
    threshold_lungs,
    window,
)
from mmdls_dist.options import from_dict, to_dict

Mapper = Callable[[Callable, Sequence], list]
SIDECARS = "import"  # OUT/import/<id>.json


@dataclass
class PatientResult:
    out_id: str
    defects: list[Defect] = field(default_factory=list)
    cells: dict[str, str] = field(default_factory=dict)  # PET and header-derived cells
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportReport:
    source: str
    n_read: int = 0
    kept: list[str] = field(default_factory=list)
    defects: list[Defect] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.defects

    def summary(self, max_defects: int = 200) -> str:
        rejected = {d.patient_id for d in self.defects if d.patient_id is not None}
        lines = [
            f"import of {self.source}: {self.n_read} patients found, {len(self.kept)} written, "
            f"{len(rejected)} rejected, {len(self.defects)} defects"
        ]
        lines += [f"DEFECT: {d}" for d in self.defects[:max_defects]]
        if len(self.defects) > max_defects:
            lines.append(f"... and {len(self.defects) - max_defects} more")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --- one patient ------------------------------------------------------------------------


def write_patient(
    out: Path,
    out_id: str,
    ct: Volume,
    masks: dict[str, np.ndarray | None],
    m: ImportMapping,
    sources: dict[str, str],
) -> None:
    """The chosen slices, resampled and windowed, as the raw layout's PNGs + the sidecar."""
    keep = chosen_slices(len(ct.voxels), masks.get("lesion"), masks.get("lung"), m)
    spacing = ct.spacing
    folder = out / "images" / out_id
    for kind in ("ct", "lung", "lesion"):
        stack = ct.voxels if kind == "ct" else masks.get(kind)
        if stack is None:
            continue
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i, k in enumerate(keep):
            if kind == "ct":
                pixels = window(resample_slice(stack[k], spacing, m, nearest=False), m)
            else:
                pixels = resample_slice(stack[k].astype(np.uint8), spacing, m, nearest=True) * 255
            Image.fromarray(pixels.astype(np.uint8)).save(folder / kind / f"slice_{i:03d}.png")
    sidecar = {
        "spacing_mm": m.spacing_mm,
        "size": m.size,
        "window": {"level": m.window_level, "width": m.window_width},
        "source_spacing_mm": list(spacing),
        "slice_step_mm": round(abs(ct.slice_step), 4),
        "slices": {"chosen": m.slices, "kept": len(keep), "of": len(ct.voxels)},
        "slice_positions_mm": [round(float(p), 3) for p in ct.positions[keep]],
        "masks": sources,
    }
    (out / SIDECARS).mkdir(exist_ok=True)
    (out / SIDECARS / f"{out_id}.json").write_text(json.dumps(sidecar, indent=1))


def _lung_fallback(ct: Volume, masks: dict, sources: dict, m: ImportMapping) -> None:
    if masks.get("lung") is None and m.lung_fallback == "threshold":
        masks["lung"] = threshold_lungs(ct.voxels)
        sources["lung"] = "threshold (HU < -400 inside the body; no lung ROI)"


def import_dicom_patient(task: dict) -> PatientResult:
    """One patient's DICOM files -> raw layout in OUT (a plain function: a Ray task)."""
    root, out, m = Path(task["root"]), Path(task["out"]), from_dict(ImportMapping, task["mapping"])
    pid, files = task["out_id"], dicom.PatientFiles(**task["files"])
    result = PatientResult(pid)
    try:
        rtstructs = {rel: dicom.read(root, rel, pid) for rel in files.rtstruct}  # read once
        uid = dicom.choose_ct_series(files, rtstructs, pid)
        ct, datasets, paths = dicom.series_volume(
            root, sorted(files.ct[uid]), pid, dicom.hounsfield
        )
        not_axial = axial_defect(ct)
        if not_axial:
            raise dicom.PatientDefectsError(
                [Defect(paths[0], pid, "ImageOrientationPatient", not_axial)]
            )
        masks: dict[str, np.ndarray | None] = {"lesion": None, "lung": None}
        sources: dict[str, str] = {}
        structures = {
            rel: ds for rel, ds in rtstructs.items() if uid in dicom.referenced_series(ds)
        }
        if files.rtstruct and not structures:
            raise dicom.PatientDefectsError(
                [
                    Defect(
                        files.rtstruct[0],
                        pid,
                        "ReferencedFrameOfReferenceSequence/RTReferencedSeriesSequence",
                        "the RTSTRUCT refers to another series than the CT",
                    )
                ]
            )
        # The sidecar names the kind of source, never its path: an export's folder names
        # often carry the hospital's patient id, which a pseudonym must not leak.
        for ds in structures.values():
            _merge(masks, sources, dicom.roi_masks(ds, ct, m), "RTSTRUCT")
        for rel in files.seg:
            _merge(masks, sources, dicom.seg_masks(root, rel, datasets, m, pid), "SEG")
        if (files.rtstruct or files.seg) and masks["lesion"] is None:
            where = [*structures, *files.seg][0]
            raise dicom.PatientDefectsError(
                [Defect(where, pid, "ROIName", f"no ROI matching {m.lesion_roi!r}")]
            )
        _lung_fallback(ct, masks, sources, m)
        if m.pet and files.pet and masks["lesion"] is not None:
            features = dicom.lesion_pet_features(root, files, ct, masks["lesion"], pid)
            if features is None:
                result.notes.append(f"{pid}: the lesion lies outside the PET field of view")
            else:
                result.cells |= {k: f"{v:.6g}" for k, v in features.items()}
        for column, keyword in task["header"].items():
            result.cells[column] = header_value(column, keyword, datasets[0])
        ct, masks = canonical(ct, masks)
        write_patient(out, pid, ct, masks, m, sources)
    except dicom.PatientDefectsError as exn:
        result.defects = exn.defects
    return result


def _merge(masks: dict, sources: dict, found: dict, where: str) -> None:
    for kind, mask in found.items():
        if mask is None:
            continue
        masks[kind] = mask if masks[kind] is None else masks[kind] | mask
        sources[kind] = where if kind not in sources else f"{sources[kind]} + {where}"


def import_nifti_patient(task: dict) -> PatientResult:
    """One patient's NIfTI folder -> raw layout in OUT (a plain function: a Ray task)."""
    root, out, m = Path(task["root"]), Path(task["out"]), from_dict(ImportMapping, task["mapping"])
    pid, folder = task["out_id"], task["folder"]
    result = PatientResult(pid)
    try:
        names = {
            "ct": m.nifti_ct.format(id=folder),
            "lesion": m.nifti_lesion.format(id=folder),
            "lung": m.nifti_lung.format(id=folder),
        }
        rel = {k: f"{folder}/{n}" for k, n in names.items()}
        if not (root / rel["ct"]).is_file():
            raise dicom.PatientDefectsError([Defect(rel["ct"], pid, "ct", "CT volume is missing")])
        ct = nifti_volume(root / rel["ct"], rel["ct"], pid)
        masks: dict[str, np.ndarray | None] = {"lesion": None, "lung": None}
        sources: dict[str, str] = {}
        for kind in ("lesion", "lung"):
            if not (root / rel[kind]).is_file():
                continue
            mask = nifti_volume(root / rel[kind], rel[kind], pid)
            if not same_grid(mask, ct):
                raise dicom.PatientDefectsError(
                    [Defect(rel[kind], pid, kind, "the mask's grid differs from the CT's")]
                )
            masks[kind] = mask.voxels > 0.5
            sources[kind] = f"NIfTI ({kind} volume)"
        _lung_fallback(ct, masks, sources, m)
        write_patient(out, pid, ct, masks, m, sources)
    except dicom.PatientDefectsError as exn:
        result.defects = exn.defects
    return result


# --- the cohort -------------------------------------------------------------------------


def _ids(sources: list[str], m: ImportMapping) -> tuple[dict[str, str], list[Defect]]:
    """source id -> output id (a pseudonym with a key), defects of unusable ids."""
    if m.pseudonym_key:
        key = Path(m.pseudonym_key).read_bytes()
        return {s: pseudonym(key, s) for s in sources}, []
    ids, defects = {}, []
    for s in sources:
        if USABLE_ID.match(s):
            ids[s] = s
        else:
            defects.append(
                Defect(
                    ".",
                    "(unusable id)",
                    "PatientID",
                    "not letters, digits, - or _: give a pseudonym key in the mapping",
                )
            )
    return ids, defects


def run_import(
    kind: str,
    root: str | Path,
    out: str | Path,
    clinical_csv: str | Path,
    m: ImportMapping,
    mapper: Mapper,
) -> ImportReport:
    """Import an export (kind "dicom" or "nifti") into the new folder OUT."""
    root, out = Path(root), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: import into a new folder")
    for name in ("pseudonym_key", "pseudonym_map"):
        value = getattr(m, name)
        if value and not outside(value, out):
            raise ValueError(f"mapping {name} must lie outside {out}: it re-identifies patients")
    report = ImportReport(str(root))
    rows, defects, notes = clinical_rows(Path(clinical_csv), m.clinical)
    report.defects += defects
    report.notes += notes
    if kind == "dicom":
        found, scan_defects = _scan_dicom(root, mapper, report)
        report.defects += scan_defects
    else:
        found = {
            p.name: p.name
            for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(".")
        }
    ids, id_defects = _ids(sorted(set(found) | set(rows)), m)
    report.defects += id_defects
    report.n_read = len(set(found) | set(rows))
    for source in sorted(set(rows) - set(found)):
        report.defects.append(
            Defect(
                Path(clinical_csv).name,
                ids.get(source, "?"),
                "patient",
                "no images for this clinical row",
            )
        )
    for source in sorted(set(found) - set(rows)):
        report.defects.append(
            Defect(".", ids.get(source, "?"), "patient", "images without a clinical row")
        )
    todo = sorted(s for s in set(found) & set(rows) if s in ids)
    out.mkdir(parents=True, exist_ok=True)
    common = {
        "root": str(root),
        "out": str(out),
        "mapping": to_dict(m),
        "header": dict(m.clinical.header),
    }
    if kind == "dicom":
        tasks = [common | {"out_id": ids[s], "files": asdict(found[s])} for s in todo]
        results = mapper(import_dicom_patient, tasks)
    else:
        tasks = [common | {"out_id": ids[s], "folder": found[s]} for s in todo]
        results = mapper(import_nifti_patient, tasks)
    kept = {}
    for source, result in zip(todo, results, strict=True):
        report.notes += result.notes
        if result.defects:
            report.defects += result.defects
            shutil.rmtree(out / "images" / result.out_id, ignore_errors=True)
            (out / SIDECARS / f"{result.out_id}.json").unlink(missing_ok=True)
            continue
        kept[result.out_id] = rows[source] | result.cells
    write_clinical(out, kept)
    report.kept = sorted(kept)
    if m.pseudonym_map:
        write_pseudonym_map(Path(m.pseudonym_map), {s: ids[s] for s in todo})
    return report


SCAN_CHUNK = 500  # files per header-scan task: a real export is tens of thousands of files


def _scan_dicom(root: Path, mapper: Mapper, report: ImportReport):
    """Headers of every file (tasks of SCAN_CHUNK files) -> source id -> PatientFiles."""
    files = dicom.list_files(root)
    chunks = [(str(root), files[i : i + SCAN_CHUNK]) for i in range(0, len(files), SCAN_CHUNK)]
    scanned = mapper(_scan_task, chunks)
    headers, defects, skipped = [], [], 0
    for h, d, s in scanned:
        headers += h
        defects += d
        skipped += s
    if skipped:
        report.notes.append(f"{skipped} file(s) that are not DICOM were skipped")
    return dicom.group(headers), defects


def _scan_task(item: tuple[str, list[str]]):
    return dicom.scan_files(*item)
