"""The cohort's tables: clinical.csv (one row per patient: labels, clinical and PET values)
and radiomics.csv (128 features per patient), parsed cell by cell against the schema. Every
cell is read as text: only "" means missing; "NA", "nan" or a code outside its table is a
defect naming the line."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


@dataclass
class CsvTable:
    columns: list[str]  # header names, stripped
    rows: list[tuple[int, dict[str, str]]]  # (physical line where the record starts, cells)
    broken: set[str]  # ids of rows refused for their field count (their defects are made)


def read_csv(path: Path, rel: str, defects: list[Defect]) -> CsvTable | None:
    """Read a table as text, cell by cell, with the csv module.

    Everything stays text: "NA" or "nan" in an export is a defect to report later, not a
    missing value to accept silently; only "" means missing. Line numbers are physical
    lines (a quoted cell may span several), so a data manager finds the cell. A row with
    fewer or more fields than the header is a defect naming its line and patient (its
    first field), never padded with empty cells. utf-8-sig: spreadsheet exports often
    start with a byte-order mark, which would otherwise join the first column's name.
    """
    rows: list[tuple[int, dict[str, str]]] = []
    broken: set[str] = set()
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.reader(stream, strict=True)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                defects.append(Defect(rel, None, "(csv)", "the file is empty (no header)"))
                return None
            if len(header) == 1 and ";" in header[0]:
                defects.append(
                    Defect(rel, None, "(csv)", "columns are separated by ';'; the contract is ','")
                )
                return None
            twice = sorted({name for name in header if header.count(name) > 1})
            if twice:
                defects.append(Defect(rel, None, "(csv)", f"columns named twice: {twice}"))
                return None
            start = reader.line_num + 1
            for fields in reader:
                line, start = start, reader.line_num + 1
                if not fields:
                    continue  # a blank line
                if len(fields) != len(header):
                    pid = fields[0].strip()
                    who = pid if valid_patient_id(pid) else f"<line {line}>"
                    kind = "fewer" if len(fields) < len(header) else "more"
                    message = f"{len(fields)} fields, {kind} than the header's {len(header)}"
                    defects.append(Defect(rel, who, "(row)", f"{message} (line {line})"))
                    broken.add(who)
                    continue
                rows.append((line, dict(zip(header, fields, strict=True))))
    except (csv.Error, UnicodeDecodeError) as exn:
        reason = str(exn).splitlines()[0] if str(exn) else type(exn).__name__
        defects.append(Defect(rel, None, "(csv)", f"cannot be parsed as CSV: {reason}"))
        return None
    return CsvTable(header, rows, broken)


def _patient_id(text: str, line: int, spaced: list[int]) -> str:
    """The id of a cell; surrounding spaces are dropped and the line recorded for a note
    (an id is letters, digits, - and _, so the stripped id is the only reading)."""
    pid = text.strip()
    if pid != text:
        spaced.append(line)
    return pid


def _spaced_note(rel: str, spaced: list[int]) -> list[str]:
    if not spaced:
        return []
    lines = ", ".join(map(str, spaced[:10])) + (" ..." if len(spaced) > 10 else "")
    return [
        f"{rel}: patient_id has spaces around it on {len(spaced)} row(s) (lines {lines}); "
        "read without them"
    ]


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
    absent = sorted(optional - set(table.columns))  # an absent label column: all unknown
    table.columns += absent
    for _, cells in table.rows:
        cells.update(dict.fromkeys(absent, ""))
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
    spaced: list[int] = []
    report.n_read = len(table.rows) + len(table.broken)
    report.clinical_ids |= table.broken
    for line, cells in table.rows:
        pid = _patient_id(cells["patient_id"], line, spaced)
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
        report.clinical_ids.add(pid)
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
    report.notes += _spaced_note(CLINICAL_CSV, spaced)
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
    spaced: list[int] = []
    for line, cells in table.rows:
        pid = _patient_id(cells["patient_id"], line, spaced)
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
        if pid not in records and pid in report.clinical_ids:
            continue  # a patient already refused in clinical.csv (e.g. a duplicate id)
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
    report.notes += _spaced_note(RADIOMICS_CSV, spaced)
    return names
