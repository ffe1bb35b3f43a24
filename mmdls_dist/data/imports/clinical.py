"""The hospital's clinical table -> clinical.csv rows, through the mapping: column names,
units (times to months), codes (histology text, stage groups, events, sex), and the
pseudonyms that replace patient ids where a key is given.

A value that cannot be mapped is a defect naming the file, the patient and the column,
never the value (it is patient data); texts the mapping lists as missing become empty
cells (not recorded), and histology texts outside its codes become an unknown label.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import re
from pathlib import Path

from mmdls_dist.data.defects import Defect
from mmdls_dist.data.imports.mapping import TIME_COLUMNS, UNITS_TO_MONTHS, ClinicalMapping
from mmdls_dist.data.schema import CLINICAL_CSV_COLUMNS

USABLE_ID = re.compile(r"^[A-Za-z0-9_-]+$")  # what the raw layout takes as a folder name


def pseudonym(key: bytes, patient_id: str) -> str:
    """A keyed HMAC-SHA256 of the id: stable for one key, not reversible without the map."""
    return "P" + hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:16]


def outside(path: str | Path, out: str | Path) -> bool:
    """Whether `path` lies outside the folder `out`."""
    p, o = Path(path).resolve(), Path(out).resolve()
    return o != p and o not in p.parents


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def header_value(column: str, keyword: str, ds) -> str:
    """A DICOM header value the mapping names -> a clinical.csv cell ("" if absent)."""
    raw = str(ds.get(keyword, "") or "").strip()
    if not raw:
        return ""
    if keyword == "PatientAge":  # e.g. "061Y", "006M"
        match = re.fullmatch(r"(\d{1,3})([YMWD])", raw)
        if not match:
            return ""
        factor = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52.1775, "D": 1 / 365.25}[match.group(2)]
        return f"{int(match.group(1)) * factor:g}"
    if keyword == "PatientSex":
        return {"M": "1", "F": "0"}.get(raw.upper(), "")
    return ""


def map_row(
    row: dict[str, str], m: ClinicalMapping, file: str, pid: str
) -> tuple[dict[str, str], list[Defect]]:
    """One source row -> the clinical.csv cells it gives (without id / center), defects."""
    cells: dict[str, str] = {}
    defects: list[Defect] = []
    missing = {t.strip().lower() for t in m.missing}
    for column, source in m.columns.items():
        if source not in row:
            continue  # a missing source column is a file defect, reported once
        text = (row[source] or "").strip()
        if text.lower() in missing:
            cells[column] = ""
            continue
        codes = {k.strip().lower(): v for k, v in m.codes.get(column, {}).items()}
        if codes:
            if text.lower() in codes:
                cells[column] = str(codes[text.lower()])
            elif column in m.unknown_otherwise:
                cells[column] = ""
            else:
                defects.append(Defect(file, pid, source, f"code not in the mapping for {column}"))
            continue
        try:
            value = float(text)
        except ValueError:
            defects.append(Defect(file, pid, source, f"is not a number ({column})"))
            continue
        if column in TIME_COLUMNS:
            value *= UNITS_TO_MONTHS[m.units.get(column, "months")]
        cells[column] = f"{value:.6g}"
    return cells, defects


def clinical_rows(
    path: Path, m: ClinicalMapping
) -> tuple[dict[str, dict[str, str]], list[Defect], list[str]]:
    """The table -> (source patient id -> cells incl. center, defects, notes)."""
    name = path.name
    columns, rows = read_table(path)
    defects = [
        Defect(name, None, source, f"column named in the mapping is missing ({target})")
        for target, source in m.columns.items()
        if source not in columns
    ]
    if m.id_column not in columns:
        return {}, [Defect(name, None, m.id_column, "id column is missing")], []
    if m.center_column and m.center_column not in columns:
        return {}, [Defect(name, None, m.center_column, "center column is missing")], []
    out: dict[str, dict[str, str]] = {}
    notes = []
    unknown_histology = 0
    for line, row in enumerate(rows, start=2):
        pid = (row.get(m.id_column) or "").strip()
        where = f"{name} line {line}"
        if not pid:
            defects.append(Defect(where, None, m.id_column, "empty patient id"))
            continue
        if pid in out:
            defects.append(Defect(where, pid, m.id_column, "patient id appears twice"))
            continue
        cells, row_defects = map_row(row, m, where, pid)
        defects += row_defects
        center = m.center or (row.get(m.center_column) or "").strip()
        if not center:
            defects.append(Defect(where, pid, m.center_column, "empty center"))
        source = (row.get(m.columns.get("histology", ""), "") or "").strip().lower()
        known = {k.strip().lower() for k in m.codes.get("histology", {})}
        if (
            "histology" in m.columns
            and source
            and source not in known
            and source not in {t.strip().lower() for t in m.missing}
        ):
            unknown_histology += 1
        out[pid] = {"center": center, **cells}
    if unknown_histology:
        notes.append(
            f"{unknown_histology} patient(s) with a histology outside the mapping's codes "
            "(neither LUAD nor LUSC): their histology label is unknown"
        )
    return out, defects, notes


def write_clinical(out: Path, rows: dict[str, dict[str, str]]) -> None:
    """clinical.csv of the raw layout: every column, empty where not given."""
    with (out / "clinical.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CLINICAL_CSV_COLUMNS))
        writer.writeheader()
        for pid in sorted(rows):
            writer.writerow(
                {c: rows[pid].get(c, "") for c in CLINICAL_CSV_COLUMNS} | {"patient_id": pid}
            )


def write_pseudonym_map(path: Path, pairs: dict[str, str]) -> None:
    """source id -> pseudonym, for the site to re-identify its own patients."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source_id", "pseudonym"])
        writer.writerows(sorted(pairs.items()))
