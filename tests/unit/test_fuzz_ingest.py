"""A seeded mutation fuzz test of the raw-layout import.

Over a small valid cohort, each case applies one to three random mutations (cell edits,
row drops, duplications and truncations, radiomics edits and column drops, file deletions
and truncations, image mode and size changes, re-encodings, stray files, links out of
DATA_ROOT) and imports the result. Invariants:

1. the import never crashes;
2. every patient is kept, or rejected with defects that each name a file, the patient and
   a field; or clinical.csv itself is unusable (a file-level defect names it);
3. a kept patient whose inputs no mutation touched gets the record of the clean import.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import good_patient, row, write_clinical, write_radiomics
from PIL import Image

from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.schema import N_RADIOMICS

PATIENTS = [f"P{i}" for i in range(6)]
CASES = 500
TOKENS = ["", "NA", "nan", "-1", "1e999", "abc", "0", "3", " 5 ", "1.5", "inf", '"7"', "é"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "clean"
    write_clinical(root, [row(p, center=f"C{i % 2}") for i, p in enumerate(PATIENTS)])
    rng = np.random.default_rng(0)
    write_radiomics(root, {p: [f"{v:.4f}" for v in rng.normal(size=N_RADIOMICS)] for p in PATIENTS})
    for i, pid in enumerate(PATIENTS):
        good_patient(root, pid, seed=100 + i, n_slices=3, size=16, annotated=i % 3 != 0)
    report = read_cohort(root)
    assert report.ok, report.summary()
    return root, {r.patient_id: r for r in report.records}


def _csv_lines(path: Path) -> list[list[str]]:
    """Byte-preserving (surrogateescape): an earlier mutation may have re-encoded the file."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    return [line.split(",") for line in text.splitlines()]


def _write_lines(path: Path, lines: list[list[str]]) -> None:
    text = "\n".join(",".join(cells) for cells in lines) + "\n"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


# Each mutation edits the cohort at `root` and returns the patients it touched ("*" = all).


def edit_clinical_cell(root, rng):
    lines = _csv_lines(root / "clinical.csv")
    if len(lines) < 2:
        return set()
    i = rng.integers(1, len(lines))
    j = rng.integers(0, len(lines[i]))
    lines[i][j] = str(rng.choice(TOKENS))
    _write_lines(root / "clinical.csv", lines)
    return "*" if j == 0 else {lines[i][0]}  # an edited id may name another patient


def drop_clinical_row(root, rng):
    lines = _csv_lines(root / "clinical.csv")
    if len(lines) < 2:
        return set()
    gone = lines.pop(rng.integers(1, len(lines)))
    _write_lines(root / "clinical.csv", lines)
    return {gone[0]}


def duplicate_clinical_row(root, rng):
    lines = _csv_lines(root / "clinical.csv")
    if len(lines) < 2:
        return set()
    copy = lines[rng.integers(1, len(lines))]
    lines.insert(rng.integers(1, len(lines) + 1), list(copy))
    _write_lines(root / "clinical.csv", lines)
    return {copy[0]}


def truncate_clinical_row(root, rng):
    lines = _csv_lines(root / "clinical.csv")
    if len(lines) < 2:
        return set()
    i = rng.integers(1, len(lines))
    lines[i] = lines[i][: rng.integers(1, max(2, len(lines[i])))]
    _write_lines(root / "clinical.csv", lines)
    return {lines[i][0]}


def edit_radiomics_cell(root, rng):
    path = root / "radiomics.csv"
    if not path.exists():
        return set()
    lines = _csv_lines(path)
    i = rng.integers(1, len(lines))
    if len(lines[i]) < 2:
        return set()
    j = rng.integers(1, len(lines[i]))
    lines[i][j] = str(rng.choice(TOKENS))
    _write_lines(path, lines)
    return {lines[i][0]}


def drop_radiomics_column(root, rng):
    path = root / "radiomics.csv"
    if not path.exists():
        return set()
    lines = _csv_lines(path)
    j = rng.integers(1, len(lines[0]))
    _write_lines(path, [cells[:j] + cells[j + 1 :] for cells in lines])
    return "*"


def delete_a_file(root, rng):
    files = sorted(p for p in (root / "images").rglob("*") if p.is_file())
    files.append(root / "radiomics.csv")
    victim = files[rng.integers(len(files))]
    if not victim.exists():
        return set()
    victim.unlink()
    return "*" if victim.name == "radiomics.csv" else {victim.parts[-3]}


def delete_a_folder(root, rng):
    pid = str(rng.choice(PATIENTS))
    kind = str(rng.choice(["ct", "lung", "lesion", ""]))
    shutil.rmtree(root / "images" / pid / kind, ignore_errors=True)
    return {pid}


def _slice(root, rng) -> Path:
    files = sorted((root / "images").rglob("*.png")) or sorted((root / "images").rglob("*"))
    return files[rng.integers(len(files))]


def truncate_a_slice(root, rng):
    path = _slice(root, rng)
    data = path.read_bytes()
    path.write_bytes(data[: rng.integers(0, len(data))])
    return {path.parts[-3]}


def _rewrite(path: Path, change) -> set[str]:
    try:
        image = Image.open(path)
        image.load()
    except Exception:  # already broken by an earlier mutation: nothing more to do here
        return set()
    change(image).save(path)
    return {path.parts[-3]}


def change_a_slice_mode(root, rng):
    mode = str(rng.choice(["RGB", "I;16", "1", "P", "LA"]))
    return _rewrite(_slice(root, rng), lambda image: image.convert(mode))


def change_a_slice_size(root, rng):
    grow = int(rng.integers(1, 5))
    return _rewrite(_slice(root, rng), lambda im: im.resize((im.width + grow, im.height)))


def reencode_clinical(root, rng):
    lines = [",".join(cells) for cells in _csv_lines(root / "clinical.csv")]
    i = rng.integers(1, len(lines))
    lines[i] = lines[i].replace("C", "Ç", 1)
    encoding = str(rng.choice(["latin-1", "utf-16", "utf-8"]))
    text = "\n".join(lines).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    (root / "clinical.csv").write_bytes(text.encode(encoding, "replace"))
    return "*"


def add_a_stray_file(root, rng):
    pid = str(rng.choice(PATIENTS))
    folder = root / "images" / pid / str(rng.choice(["ct", "lung"]))
    if folder.is_dir():
        (folder / str(rng.choice(["notes.txt", "scan.dcm", "x.PNG.bak"]))).write_text("x")
    return {pid}


def link_outside(root, rng):
    path = _slice(root, rng)
    if path.is_symlink():
        return set()
    outside = root.parent / f"outside-{rng.integers(1 << 30)}.png"
    shutil.copy(path, outside)
    path.unlink()
    path.symlink_to(outside)
    return {path.parts[-3]}


MUTATIONS = [
    edit_clinical_cell, drop_clinical_row, duplicate_clinical_row, truncate_clinical_row,
    edit_radiomics_cell, drop_radiomics_column, delete_a_file, delete_a_folder,
    truncate_a_slice, change_a_slice_mode, change_a_slice_size, reencode_clinical,
    add_a_stray_file, link_outside,
]  # fmt: skip


def present(root: Path, pid: str) -> bool:
    """Whether the mutated export still mentions the patient (a row or an image folder)."""
    rows = (root / "clinical.csv").read_bytes() if (root / "clinical.csv").exists() else b""
    return (root / "images" / pid).exists() or f"\n{pid},".encode() in rows


def same_record(a, b) -> bool:
    def values(d):
        return {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                for k, v in d.items()}  # fmt: skip

    return (
        a.center == b.center
        and values(a.labels) == values(b.labels)
        and values(a.clinical) == values(b.clinical)
        and values(a.pet) == values(b.pet)
        and np.array_equal(a.radiomics, b.radiomics, equal_nan=True)
        and a.slice_files == b.slice_files
        and a.lesion_annotated == b.lesion_annotated
        and a.image_size == b.image_size
    )


def test_mutated_cohorts_never_crash_and_every_patient_is_accounted_for(clean, tmp_path):
    root0, records0 = clean
    rng = np.random.default_rng(12345)
    kinds = Counter()
    for case in range(CASES):
        root = tmp_path / f"case{case}"
        shutil.copytree(root0, root, symlinks=True)
        touched: set[str] = set()
        for _ in range(int(rng.integers(1, 4))):
            mutation = MUTATIONS[rng.integers(len(MUTATIONS))]
            kinds[mutation.__name__] += 1
            hit = mutation(root, rng)
            touched = set(PATIENTS) if hit == "*" else touched | hit
        report = read_cohort(root)  # invariant 1: no exception
        kept = {r.patient_id: r for r in report.records}
        rejected = report.rejected
        clinical_unusable = any(d.file == "clinical.csv" for d in report.file_defects)
        for pid in filter(lambda p: present(root, p), PATIENTS):
            assert pid in kept or pid in rejected or clinical_unusable, (case, pid)
            for d in rejected.get(pid, []):  # invariant 2: each reason names all three
                assert d.file and d.patient_id == pid and d.field, (case, d)
            if pid in kept and pid not in touched:  # invariant 3
                assert same_record(kept[pid], records0[pid]), (case, pid, report.summary())
        shutil.rmtree(root)
    assert set(kinds) == {m.__name__ for m in MUTATIONS}  # every kind was exercised
