"""The cohort's tables: clinical.csv (one row per patient: labels, clinical and PET values)
and radiomics.csv (128 features per patient), parsed cell by cell against the schema. Every
cell is read as text: only "" means missing; "NA", "nan" or a code outside its table is a
defect naming the line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from mmdls_dist.data.defects import Defect, IngestReport
from mmdls_dist.data.schema import (
    CLINICAL_COLUMNS,
    CLINICAL_CSV_COLUMNS,
    ENDPOINTS,
    LABEL_COLUMNS,
    N_RADIOMICS,
    PET_COLUMNS,
    VALUE_COLUMNS,
    Column,
    PatientRecord,
    valid_patient_id,
)

CLINICAL_CSV = "clinical.csv"


RADIOMICS_CSV = "radiomics.csv"


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


def read_csv(path: Path, rel: str, defects: list[Defect]) -> pd.DataFrame | None:
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


def clinical_rows(
    root: Path, report: IngestReport, for_prediction: bool = False
) -> dict[str, PatientRecord]:
    """Parse clinical.csv into records (image fields empty); defects go into the report.
    for_prediction: label columns may be absent (new patients have no outcomes yet)."""
    defects = report.defects
    path = root / CLINICAL_CSV
    if not path.is_file():
        defects.append(Defect(CLINICAL_CSV, None, "(file)", "clinical.csv is missing"))
        return {}
    table = read_csv(path, CLINICAL_CSV, defects)
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
        for endpoint in ENDPOINTS:
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


def radiomics_rows(
    root: Path, records: dict[str, PatientRecord], report: IngestReport
) -> list[str]:
    """Fill record.radiomics from radiomics.csv; returns the feature names (order kept)."""
    path = root / RADIOMICS_CSV
    if not path.is_file():
        report.notes.append("radiomics.csv absent: radiomics are missing for every patient")
        return []
    defects = report.defects
    table = read_csv(path, RADIOMICS_CSV, defects)
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
