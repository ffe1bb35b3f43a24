"""Raw hospital export (docs/RAW_LAYOUT.md) -> validated PatientRecords + a defect report.

Every defect names the file (relative to DATA_ROOT), the patient and the field, and the
whole cohort is checked before anything is reported, so a data manager fixes an export in
one round instead of one error at a time. Cell contents are never echoed into messages
(they are patient data); the CSV line number locates the cell instead.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mmdls_dist.data.schema import (
    CLINICAL_COLUMNS,
    CLINICAL_CSV_COLUMNS,
    LABEL_COLUMNS,
    N_RADIOMICS,
    PET_COLUMNS,
    VALUE_COLUMNS,
    Column,
    PatientRecord,
    valid_patient_id,
)

Mapper = Callable[[Callable, Sequence], list]

CLINICAL_CSV = "clinical.csv"
RADIOMICS_CSV = "radiomics.csv"
IMAGES = "images"
MASK_VALUES = (0, 255)


@dataclass(frozen=True)
class Defect:
    """One violation of the raw-layout contract."""

    file: str  # relative to DATA_ROOT
    patient_id: str | None  # None for defects of the whole file (e.g. a missing column)
    field: str
    message: str

    def __str__(self) -> str:
        who = f"patient {self.patient_id}" if self.patient_id is not None else "(file)"
        return f"{self.file}: {who}: {self.field}: {self.message}"


@dataclass
class IngestReport:
    """What an import found: the kept records, every defect, and notes that are not errors."""

    root: str
    n_read: int = 0
    records: list[PatientRecord] = field(default_factory=list)
    defects: list[Defect] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    radiomics_names: list[str] = field(default_factory=list)  # radiomics.csv order, kept

    @property
    def ok(self) -> bool:
        return not self.defects

    @property
    def rejected(self) -> dict[str, list[Defect]]:
        """patient_id -> its defects, for every patient that is not kept."""
        out: dict[str, list[Defect]] = defaultdict(list)
        for d in self.defects:
            if d.patient_id is not None:
                out[d.patient_id].append(d)
        return dict(out)

    def summary(self, max_defects: int = 200) -> str:
        lines = [
            f"import of {self.root}: {self.n_read} patients read, {len(self.records)} kept, "
            f"{len(self.rejected)} rejected, {len(self.defects)} defects"
        ]
        reasons = Counter(d.field for d in self.defects)
        if reasons:
            lines.append(
                "defects by field: " + ", ".join(f"{k} x{n}" for k, n in reasons.most_common())
            )
        for d in self.defects[:max_defects]:
            lines.append(f"  {d}")
        if len(self.defects) > max_defects:
            lines.append(f"  ... and {len(self.defects) - max_defects} more (see the JSON report)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "n_read": self.n_read,
            "n_kept": len(self.records),
            "n_rejected": len(self.rejected),
            "kept": [r.patient_id for r in self.records],
            "rejected": {pid: [str(d) for d in ds] for pid, ds in self.rejected.items()},
            "defects": [vars(d) for d in self.defects],
            "notes": self.notes,
        }


class CohortError(ValueError):
    """Raised when a cohort has defects and the caller asked for a clean import."""

    def __init__(self, report: IngestReport):
        super().__init__(report.summary())
        self.report = report


def serial_map(fn: Callable, items: Sequence) -> list:
    return [fn(item) for item in items]


def parse_cell(text: str, column: Column) -> tuple[float | None, str | None]:
    """Parse one clinical.csv cell -> (value or None if empty, error message or None)."""
    text = text.strip()
    if text == "":
        return None, None
    try:
        value = float(text)
    except ValueError:
        return None, "is not a number"
    if not math.isfinite(value):
        return None, "is not a finite number"
    if column.codes is not None:
        if value != int(value) or int(value) not in column.codes:
            allowed = ", ".join(str(c) for c in column.codes)
            return None, f"code outside the table (allowed: {allowed})"
        return float(int(value)), None
    if column.minimum is not None:
        if column.min_inclusive and value < column.minimum:
            return None, f"must be >= {column.minimum:g}"
        if not column.min_inclusive and value <= column.minimum:
            return None, f"must be > {column.minimum:g}"
    return value, None


def _read_csv(path: Path, rel: str, defects: list[Defect]) -> pd.DataFrame | None:
    # Everything as text, with pandas' NA guessing off: "NA" or "nan" in an export is a
    # defect to report, not a missing value to accept silently. Only "" means missing.
    # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would
    # otherwise become part of the first column's name.
    try:
        table = pd.read_csv(
            path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig"
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exn:
        reason = str(exn).splitlines()[0] if str(exn) else type(exn).__name__
        defects.append(Defect(rel, None, "(csv)", f"cannot be parsed as CSV: {reason}"))
        return None
    if len(table.columns) == 1 and ";" in table.columns[0]:
        defects.append(
            Defect(rel, None, "(csv)", "columns are separated by ';'; the contract is ','")
        )
        return None
    table.columns = [c.strip() for c in table.columns]
    return table


def _clinical_rows(
    root: Path, report: IngestReport, for_prediction: bool = False
) -> dict[str, PatientRecord]:
    """Parse clinical.csv into records (image fields empty); defects go into the report.
    for_prediction: label columns may be absent (new patients have no outcomes yet)."""
    defects = report.defects
    path = root / CLINICAL_CSV
    if not path.is_file():
        defects.append(Defect(CLINICAL_CSV, None, "(file)", "clinical.csv is missing"))
        return {}
    table = _read_csv(path, CLINICAL_CSV, defects)
    if table is None:
        return {}
    optional = {c.name for c in LABEL_COLUMNS} if for_prediction else set()
    for name in sorted(optional - set(table.columns)):
        table[name] = ""  # absent label column = every label unknown
    missing = [c for c in CLINICAL_CSV_COLUMNS if c not in table.columns]
    for name in missing:
        defects.append(Defect(CLINICAL_CSV, None, name, "required column is missing"))
    if missing:
        return {}
    extra = [c for c in table.columns if c not in CLINICAL_CSV_COLUMNS]
    if extra:
        report.notes.append(f"clinical.csv: ignored extra columns: {', '.join(extra)}")

    records: dict[str, PatientRecord] = {}
    first_line: dict[str, int] = {}
    report.n_read = len(table)
    for i, row in enumerate(table.itertuples(index=False)):
        line = i + 2
        cells = dict(zip(table.columns, row, strict=True))
        pid = cells["patient_id"].strip()
        if not pid or not valid_patient_id(pid):
            # Without a usable id the row cannot be named, so the line number stands in.
            label = f"<line {line}>"
            defects.append(
                Defect(CLINICAL_CSV, label, "patient_id", "empty or not letters/digits/-/_")
            )
            continue
        if pid in first_line:
            defects.append(
                Defect(
                    CLINICAL_CSV,
                    pid,
                    "patient_id",
                    f"duplicate patient_id (lines {first_line[pid]} and {line})",
                )
            )
            records.pop(pid, None)
            continue
        first_line[pid] = line
        center = cells["center"].strip()
        if not center:
            defects.append(Defect(CLINICAL_CSV, pid, "center", f"empty (line {line})"))
        values: dict[str, float | None] = {}
        for column in VALUE_COLUMNS:
            value, error = parse_cell(cells[column.name], column)
            if error:
                defects.append(Defect(CLINICAL_CSV, pid, column.name, f"{error} (line {line})"))
            values[column.name] = value
        for endpoint in ("dfs", "os"):
            t, e = values[f"{endpoint}_time"], values[f"{endpoint}_event"]
            if (t is None) != (e is None):
                report.notes.append(
                    f"clinical.csv: patient {pid}: only one of {endpoint}_time/{endpoint}_event "
                    f"is given (line {line}); the {endpoint.upper()} label is treated as unknown"
                )
                values[f"{endpoint}_time"] = values[f"{endpoint}_event"] = None
        records[pid] = PatientRecord(
            patient_id=pid,
            center=center,
            row=line,
            labels={c.name: values[c.name] for c in LABEL_COLUMNS},
            clinical={c.name: _nan(values[c.name]) for c in CLINICAL_COLUMNS},
            pet={c.name: _nan(values[c.name]) for c in PET_COLUMNS},
            radiomics=np.full(N_RADIOMICS, np.nan),
            slice_files=[],
            lesion_annotated=False,
        )
    return records


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _radiomics(root: Path, records: dict[str, PatientRecord], report: IngestReport) -> list[str]:
    """Fill record.radiomics from radiomics.csv; returns the feature names (order kept)."""
    path = root / RADIOMICS_CSV
    if not path.is_file():
        report.notes.append("radiomics.csv absent: radiomics are missing for every patient")
        return []
    defects = report.defects
    table = _read_csv(path, RADIOMICS_CSV, defects)
    if table is None:
        return []
    if "patient_id" not in table.columns:
        defects.append(Defect(RADIOMICS_CSV, None, "patient_id", "required column is missing"))
        return []
    names = [c for c in table.columns if c != "patient_id"]
    if len(names) != N_RADIOMICS:
        defects.append(
            Defect(
                RADIOMICS_CSV,
                None,
                "(columns)",
                f"expected patient_id + {N_RADIOMICS} feature columns, found {len(names)}",
            )
        )
        return []
    seen: dict[str, int] = {}
    for i, row in enumerate(table.itertuples(index=False)):
        line = i + 2
        cells = dict(zip(table.columns, row, strict=True))
        pid = cells["patient_id"].strip()
        if pid in seen:
            defects.append(
                Defect(
                    RADIOMICS_CSV,
                    pid,
                    "patient_id",
                    f"duplicate radiomics row (lines {seen[pid]} and {line})",
                )
            )
            continue
        seen[pid] = line
        if pid not in records:
            defects.append(
                Defect(
                    RADIOMICS_CSV,
                    pid or f"<line {line}>",
                    "patient_id",
                    f"radiomics row has no clinical.csv row (line {line})",
                )
            )
            continue
        vector = np.full(N_RADIOMICS, np.nan)
        for j, name in enumerate(names):
            text = cells[name].strip()
            if text == "":
                continue
            try:
                vector[j] = float(text)
            except ValueError:
                defects.append(Defect(RADIOMICS_CSV, pid, name, f"is not a number (line {line})"))
                continue
            if not math.isfinite(vector[j]):
                vector[j] = np.nan
                defects.append(
                    Defect(RADIOMICS_CSV, pid, name, f"is not a finite number (line {line})")
                )
        records[pid].radiomics = vector
    return names


def _png_names(folder: Path, rel: str, pid: str, field_name: str, defects: list[Defect]):
    """Sorted slice file names of one folder; non-PNG files are defects, dotfiles ignored."""
    names = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # .DS_Store and friends from the export machine, never slices
        if not entry.is_file() or entry.suffix.lower() != ".png":
            defects.append(Defect(f"{rel}/{entry.name}", pid, field_name, "not a .png slice file"))
            continue
        names.append(entry.name)
    return names


def _compare_names(
    ct: list[str], other: list[str], rel: str, pid: str, field_name: str
) -> list[Defect]:
    out = []
    missing = sorted(set(ct) - set(other))
    extra = sorted(set(other) - set(ct))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        out.append(
            Defect(rel, pid, field_name, f"{len(missing)} slice file(s) of ct/ missing: {shown}")
        )
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        out.append(Defect(rel, pid, field_name, f"{len(extra)} file(s) with no ct/ slice: {shown}"))
    return out


def _list_images(
    root: Path, records: dict[str, PatientRecord], report: IngestReport, for_prediction: bool
) -> None:
    """Fill slice_files / lesion_annotated from the folder layout (no pixels read).
    for_prediction: the lung/ folder may be absent (CT alone is enough to predict)."""
    defects = report.defects
    images = root / IMAGES
    folders = {p.name for p in images.iterdir() if p.is_dir()} if images.is_dir() else set()
    for orphan in sorted(folders - set(records)):
        defects.append(
            Defect(
                f"{IMAGES}/{orphan}", orphan, "patient_id", "image folder has no clinical.csv row"
            )
        )
    for pid, record in records.items():
        base = f"{IMAGES}/{pid}"
        ct_dir = images / pid / "ct"
        if not ct_dir.is_dir():
            defects.append(Defect(f"{base}/ct", pid, "ct", "CT folder is missing"))
            continue
        ct = _png_names(ct_dir, f"{base}/ct", pid, "ct", defects)
        if not ct:
            defects.append(Defect(f"{base}/ct", pid, "ct", "no CT slices"))
            continue
        record.slice_files = ct
        lung_dir = images / pid / "lung"
        if not lung_dir.is_dir() and for_prediction:
            record.lung_annotated = False
        elif not lung_dir.is_dir():
            defects.append(Defect(f"{base}/lung", pid, "lung", "lung mask folder is missing"))
        else:
            lung = _png_names(lung_dir, f"{base}/lung", pid, "lung", defects)
            defects.extend(_compare_names(ct, lung, f"{base}/lung", pid, "lung"))
        lesion_dir = images / pid / "lesion"
        if lesion_dir.is_dir():
            record.lesion_annotated = True
            lesion = _png_names(lesion_dir, f"{base}/lesion", pid, "lesion", defects)
            defects.extend(_compare_names(ct, lesion, f"{base}/lesion", pid, "lesion"))


def open_slice(path: Path) -> Image.Image:
    """Open and fully decode one PNG (PIL is lazy; load() surfaces truncation errors)."""
    image = Image.open(path)
    image.load()
    return image


def check_patient_images(
    root: str, pid: str, slice_files: list[str], annotated: bool, lung: bool = True
) -> tuple[list[Defect], tuple[int, int] | None]:
    """Decode every slice of one patient -> (defects, (H, W) of its slices or None)."""
    defects: list[Defect] = []
    size: tuple[int, int] | None = None
    folders = ("ct",) + (("lung",) if lung else ()) + (("lesion",) if annotated else ())
    base = Path(root) / IMAGES / pid
    for name in slice_files:
        ct_size = None
        for kind in folders:
            rel = f"{IMAGES}/{pid}/{kind}/{name}"
            path = base / kind / name
            if not path.is_file():
                continue  # reported by the listing step
            try:
                image = open_slice(path)
            except Exception as exn:  # PIL raises many types for broken files
                defects.append(Defect(rel, pid, kind, f"unreadable PNG ({type(exn).__name__})"))
                continue
            hw = (image.height, image.width)
            if kind == "ct":
                if image.mode != "L":
                    defects.append(
                        Defect(rel, pid, kind, f"expected 8-bit grayscale, got mode {image.mode}")
                    )
                ct_size = hw
                if size is None:
                    size = hw
                elif hw != size:
                    defects.append(
                        Defect(rel, pid, kind, f"slice size {hw} differs from the first {size}")
                    )
                continue
            if ct_size is not None and hw != ct_size:
                defects.append(
                    Defect(rel, pid, kind, f"mask size {hw} differs from its CT slice {ct_size}")
                )
            if image.mode not in ("L", "1"):
                defects.append(
                    Defect(rel, pid, kind, f"expected a grayscale mask, got mode {image.mode}")
                )
                continue
            pixels = np.asarray(image.convert("L"))
            if np.any((pixels != MASK_VALUES[0]) & (pixels != MASK_VALUES[1])):
                hint = "; it looks 0/1-coded" if pixels.max() == 1 else ""
                defects.append(
                    Defect(rel, pid, kind, f"mask is not binary (values other than 0/255{hint})")
                )
    return defects, size


def _check_chunk(args: tuple[str, list[tuple[str, list[str], bool, bool]]]):
    root, patients = args
    return [
        check_patient_images(root, pid, files, lesion, lung)
        for pid, files, lesion, lung in patients
    ]


def read_cohort(
    root: str | Path,
    *,
    check_pixels: bool = True,
    mapper: Mapper = serial_map,
    chunk_size: int = 16,
    for_prediction: bool = False,
) -> IngestReport:
    """Read and validate a raw export. Patients with any defect are rejected (not kept).

    for_prediction: new patients: label columns and lung/ folders may be absent (their
    values are unknown / not stored); everything else is checked as for training.

    `mapper(fn, items)` runs the per-chunk pixel checks; the CLI passes a Ray-task mapper so
    a large cohort is checked in parallel, tests pass the serial default.
    """
    root = Path(root)
    report = IngestReport(root=str(root))
    if not root.is_dir():
        report.defects.append(Defect(".", None, "(folder)", f"DATA_ROOT {root} is not a folder"))
        return report
    records = _clinical_rows(root, report, for_prediction)
    report.radiomics_names = _radiomics(root, records, report)
    _list_images(root, records, report, for_prediction)
    if check_pixels:
        todo = [
            (r.patient_id, r.slice_files, r.lesion_annotated, r.lung_annotated)
            for r in records.values()
            if r.slice_files
        ]
        chunks = [(str(root), todo[i : i + chunk_size]) for i in range(0, len(todo), chunk_size)]
        for chunk, results in zip(chunks, mapper(_check_chunk, chunks), strict=True):
            for (pid, *_), (defects, size) in zip(chunk[1], results, strict=True):
                report.defects.extend(defects)
                records[pid].image_size = size
    bad = {d.patient_id for d in report.defects if d.patient_id is not None}
    report.records = [r for pid, r in records.items() if pid not in bad]
    return report
