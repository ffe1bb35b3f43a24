"""Validation of the raw layout: each contract violation is reported with file, patient, field."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import good_patient, row, volume, write_clinical, write_images, write_radiomics
from PIL import Image

from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.schema import CLINICAL_CSV_COLUMNS, N_RADIOMICS, Column
from mmdls_dist.data.tables import parse_cell


def _find(report, patient_id, field):
    hits = [d for d in report.defects if d.patient_id == patient_id and d.field == field]
    assert hits, f"no defect for {patient_id}/{field}; got:\n{report.summary()}"
    return hits


@pytest.fixture
def bad_cohort(tmp_path):
    """One cohort with every kind of defect, plus two clean patients and documented gaps."""
    root = tmp_path / "raw"
    rows = [
        row("OK1"),
        row("OK2", age="", suv_max="", histology="", dfs_time="", dfs_event=""),  # gaps
        row("MISSLUNG"),
        row("EXTRA"),
        row("SIZE"),
        row("NONBIN"),
        row("BROKEN"),
        row("DUP"),
        row("DUP"),
        row("CODES", histology="2", tnm_stage="5", sex="3", smoking_status="1.5"),
        row("TIMES", dfs_time="0", os_time="-3"),
        row("EVENT", dfs_event="2", os_event="yes"),
        row("TEXT", age="sixty", suv_max="NA", tlg="nan"),
        row("RGB"),
        row("NOIMG"),
    ]
    write_clinical(root, rows)
    for i, pid in enumerate(["OK1", "CODES", "TIMES", "EVENT", "TEXT", "DUP"]):
        good_patient(root, pid, seed=i)
    good_patient(root, "OK2", seed=21, annotated=False)  # no lesion/ folder: unannotated

    ct, lung, lesion = volume(10)
    names = write_images(root, "MISSLUNG", ct, lung, lesion)
    (root / "images/MISSLUNG/lung" / names[1]).unlink()

    ct, lung, lesion = volume(11)
    write_images(root, "EXTRA", ct, lung, lesion)
    Image.fromarray(lesion[0]).save(root / "images/EXTRA/lesion/zz_extra.png")

    ct, lung, lesion = volume(12)
    names = write_images(root, "SIZE", ct, lung, lesion)
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "images/SIZE/lung" / names[2])

    ct, lung, lesion = volume(13)
    lesion[1, 0, 0] = 128
    write_images(root, "NONBIN", ct, lung, lesion)

    ct, lung, lesion = volume(14)
    names = write_images(root, "BROKEN", ct, lung, lesion)
    (root / "images/BROKEN/ct" / names[0]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    ct, lung, lesion = volume(15)
    names = write_images(root, "RGB", ct, lung, lesion)
    Image.fromarray(np.stack([ct[0]] * 3, -1)).save(root / "images/RGB/ct" / names[0])

    good_patient(root, "ORPHAN", seed=16)  # image folder without a clinical row

    cells = [str(v) for v in np.linspace(-1, 1, N_RADIOMICS)]
    bad_cells = list(cells)
    bad_cells[5] = "n/a"
    write_radiomics(
        root,
        {"OK1": cells, "GHOST": cells, "OK2": bad_cells[:5] + [""] + cells[6:], "CODES": bad_cells},
    )
    return root


def test_every_defect_is_reported_in_one_pass(bad_cohort):
    report = read_cohort(bad_cohort)
    assert report.n_read == 15

    d = _find(report, "MISSLUNG", "lung")[0]
    assert (
        d.file == "images/MISSLUNG/lung" and "1 slice file(s) of ct/ missing: s01.png" in d.message
    )

    d = _find(report, "EXTRA", "lesion")[0]
    assert "no ct/ slice: zz_extra.png" in d.message

    d = _find(report, "SIZE", "lung")[0]
    assert d.file == "images/SIZE/lung/s02.png"
    assert "mask size (20, 24) differs from its CT slice (24, 24)" in d.message

    d = _find(report, "NONBIN", "lesion")[0]
    assert d.file == "images/NONBIN/lesion/s01.png" and "not binary" in d.message

    d = _find(report, "BROKEN", "ct")[0]
    assert d.file == "images/BROKEN/ct/s00.png" and "unreadable PNG" in d.message

    d = _find(report, "RGB", "ct")[0]
    assert "expected 8-bit grayscale, got mode RGB" in d.message

    d = _find(report, "DUP", "patient_id")[0]
    assert d.file == "clinical.csv" and "duplicate patient_id (lines 9 and 10)" in d.message

    for field in ("histology", "tnm_stage", "sex", "smoking_status"):
        assert "code outside the table" in _find(report, "CODES", field)[0].message
    assert "(allowed: 0, 1, 2)" in _find(report, "CODES", "tnm_stage")[0].message

    assert "must be > 0" in _find(report, "TIMES", "dfs_time")[0].message
    assert "must be > 0" in _find(report, "TIMES", "os_time")[0].message

    assert (
        "code outside the table (allowed: 0, 1)" in _find(report, "EVENT", "dfs_event")[0].message
    )
    assert "is not a number" in _find(report, "EVENT", "os_event")[0].message

    for field in ("age", "suv_max", "tlg"):  # "NA"/"nan" are defects, not missing values
        d = _find(report, "TEXT", field)[0]
        assert d.file == "clinical.csv" and "(line 14)" in d.message
        assert "number" in d.message

    d = _find(report, "GHOST", "patient_id")[0]
    assert d.file == "radiomics.csv" and "no clinical.csv row" in d.message
    assert "is not a number" in _find(report, "CODES", "f5")[0].message

    d = _find(report, "NOIMG", "ct")[0]
    assert d.file == "images/NOIMG/ct" and "missing" in d.message
    d = _find(report, "ORPHAN", "patient_id")[0]
    assert d.file == "images/ORPHAN" and "no clinical.csv row" in d.message


def test_kept_and_rejected_are_counted_and_named(bad_cohort):
    report = read_cohort(bad_cohort)
    assert sorted(r.patient_id for r in report.records) == ["OK1", "OK2"]
    rejected = set(report.rejected)
    assert {
        "MISSLUNG",
        "EXTRA",
        "SIZE",
        "NONBIN",
        "BROKEN",
        "DUP",
        "CODES",
        "TIMES",
        "EVENT",
        "TEXT",
        "RGB",
        "NOIMG",
        "ORPHAN",
        "GHOST",
    } == rejected
    summary = report.summary()
    assert "15 patients read, 2 kept, 14 rejected" in summary
    assert report.to_dict()["n_kept"] == 2


def test_messages_do_not_echo_cell_contents(bad_cohort):
    """Cell values are patient data; messages locate them by file, line and column instead."""
    text = read_cohort(bad_cohort).summary()
    assert "sixty" not in text and "yes" not in text and "n/a" not in text


def test_documented_gaps_are_kept_as_missing(bad_cohort):
    report = read_cohort(bad_cohort)
    ok2 = next(r for r in report.records if r.patient_id == "OK2")
    assert np.isnan(ok2.clinical["age"]) and np.isnan(ok2.pet["suv_max"])
    assert ok2.clinical["sex"] == 1.0
    assert ok2.labels["histology"] is None and ok2.labels["dfs_time"] is None
    assert ok2.labels["os_time"] == 30.0 and ok2.labels["tnm_stage"] == 2.0
    assert not ok2.lesion_annotated
    assert np.isnan(ok2.radiomics[5]) and ok2.radiomics[6] == pytest.approx(
        np.linspace(-1, 1, N_RADIOMICS)[6]
    )
    ok1 = next(r for r in report.records if r.patient_id == "OK1")
    assert ok1.lesion_annotated and ok1.image_size == (24, 24)
    assert ok1.slice_files == ["s00.png", "s01.png", "s02.png"]


def test_missing_column_and_missing_file(tmp_path):
    root = tmp_path / "raw"
    columns = [c for c in CLINICAL_CSV_COLUMNS if c != "tnm_stage"]
    write_clinical(root, [row("P1")], columns=columns)
    report = read_cohort(root)
    assert [(d.file, d.field) for d in report.defects] == [("clinical.csv", "tnm_stage")]
    assert "required column is missing" in report.defects[0].message

    empty = tmp_path / "empty"
    empty.mkdir()
    report = read_cohort(empty)
    assert report.defects[0].file == "clinical.csv" and "missing" in report.defects[0].message


def test_half_filled_survival_pair_is_unknown_and_noted(tmp_path):
    root = tmp_path / "raw"
    write_clinical(root, [row("P1", os_event="")])
    good_patient(root, "P1", seed=0)
    report = read_cohort(root)
    assert report.ok
    assert report.records[0].labels["os_time"] is None
    assert any("only one of os_time/os_event" in n for n in report.notes)


def test_wrong_radiomics_width(tmp_path):
    root = tmp_path / "raw"
    write_clinical(root, [row("P1")])
    good_patient(root, "P1", seed=0)
    (root / "radiomics.csv").write_text("patient_id,a,b\nP1,1,2\n")
    report = read_cohort(root)
    assert report.defects[0].file == "radiomics.csv"
    assert (
        f"expected patient_id + {N_RADIOMICS} feature columns, found 2" in report.defects[0].message
    )


@pytest.mark.parametrize(
    ("text", "column", "value", "error"),
    [
        ("", Column("x", "label", codes=(0, 1)), None, None),
        (" 1 ", Column("x", "label", codes=(0, 1)), 1.0, None),
        ("1.0", Column("x", "label", codes=(0, 1)), 1.0, None),
        ("0.5", Column("x", "label", codes=(0, 1)), None, "code outside the table (allowed: 0, 1)"),
        ("0", Column("t", "label", minimum=0.0, min_inclusive=False), None, "must be > 0"),
        ("0", Column("a", "clinical", minimum=0.0), 0.0, None),
        ("-0.1", Column("a", "clinical", minimum=0.0), None, "must be >= 0"),
        ("inf", Column("a", "clinical"), None, "is not a finite number"),
        ("1e3", Column("a", "clinical"), 1000.0, None),
    ],
)
def test_parse_cell(text, column, value, error):
    assert parse_cell(text, column) == (value, error)


def test_byte_order_mark_is_accepted_and_semicolons_are_named(tmp_path):
    root = tmp_path / "raw"
    write_clinical(root, [row("P1")])
    good_patient(root, "P1", seed=0)
    text = (root / "clinical.csv").read_text()
    (root / "clinical.csv").write_text("\ufeff" + text, encoding="utf-8")
    assert read_cohort(root).ok
    (root / "clinical.csv").write_text(text.replace(",", ";"))
    report = read_cohort(root)
    assert report.defects[0].file == "clinical.csv"
    assert "separated by ';'" in report.defects[0].message


def _lines(*rows: str) -> str:
    return "\n".join([",".join(CLINICAL_CSV_COLUMNS), *rows]) + "\n"


def _cells(pid: str, **overrides: str) -> str:
    return ",".join(row(pid, **overrides).get(c, "") for c in CLINICAL_CSV_COLUMNS)


def test_short_and_long_rows_are_defects_naming_line_and_patient(tmp_path):
    """A row with fewer fields than the header is not a patient with every value missing;
    line numbers are physical lines, even after a quoted cell spanning two."""
    root = tmp_path / "raw"
    root.mkdir()
    header = ",".join(CLINICAL_CSV_COLUMNS) + ",comment"
    text = "\n".join(
        [
            header,
            _cells("P1") + ',"two\nlines"',  # lines 2-3
            "P2,C1",  # line 4: short
            _cells("P3") + ",ok,extra",  # line 5: long
            _cells("P4", age="sixty") + ",",  # line 6
        ]
    )
    (root / "clinical.csv").write_text(text + "\n")
    for i, pid in enumerate(("P1", "P2", "P3", "P4")):
        good_patient(root, pid, seed=i)
    report = read_cohort(root)
    assert [r.patient_id for r in report.records] == ["P1"]
    short = _find(report, "P2", "(row)")[0]
    assert short.file == "clinical.csv" and "2 fields, fewer than the header's" in short.message
    assert "(line 4)" in short.message
    assert "(line 5)" in _find(report, "P3", "(row)")[0].message
    assert "(line 6)" in _find(report, "P4", "age")[0].message
    assert report.n_read == 4
    # A refused row's patient still has a clinical row: no "no clinical.csv row" defects.
    assert not [d for d in report.defects if "no clinical.csv row" in d.message]


def test_spaces_around_an_id_are_noted_not_silent(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    (root / "clinical.csv").write_text(_lines(_cells(" P1 "), _cells("P2")))
    good_patient(root, "P1", seed=0)
    good_patient(root, "P2", seed=1)
    report = read_cohort(root)
    assert report.ok and [r.patient_id for r in report.records] == ["P1", "P2"]
    assert any("spaces around it on 1 row(s) (lines 2)" in n for n in report.notes)


def test_a_duplicate_id_gets_one_message_not_misleading_ones(tmp_path):
    root = tmp_path / "raw"
    write_clinical(root, [row("DUP"), row("DUP"), row("OK")])
    good_patient(root, "DUP", seed=0)
    good_patient(root, "OK", seed=1)
    write_radiomics(root, {"DUP": ["0.5"] * N_RADIOMICS, "OK": ["0.5"] * N_RADIOMICS})
    report = read_cohort(root)
    assert [r.patient_id for r in report.records] == ["OK"]
    assert [(d.patient_id, d.field) for d in report.defects] == [("DUP", "patient_id")]
    assert "lines 2 and 3" in report.defects[0].message


def test_links_out_of_data_root_and_copied_patients_are_defects(tmp_path):
    root = tmp_path / "raw"
    elsewhere = tmp_path / "elsewhere"
    write_clinical(root, [row(p) for p in ("A", "B", "OUT", "SLICE", "C")])
    for i, pid in enumerate(("A", "OUT", "SLICE", "C")):
        good_patient(root if pid != "OUT" else elsewhere, pid, seed=i)
    (root / "images" / "OUT").symlink_to(elsewhere / "images" / "OUT")  # a folder outside
    outside = elsewhere / "stray.png"
    (root / "images/SLICE/ct/s01.png").rename(outside)
    (root / "images/SLICE/ct/s01.png").symlink_to(outside)  # one slice outside
    (root / "images" / "B").symlink_to(root / "images" / "A")  # A's images as patient B
    report = read_cohort(root)
    assert [r.patient_id for r in report.records] == ["C"]
    assert "outside DATA_ROOT" in _find(report, "OUT", "patient_id")[0].message
    d = _find(report, "SLICE", "ct")[0]
    assert d.file == "images/SLICE/ct/s01.png" and "outside DATA_ROOT" in d.message
    assert "the same CT images as patient B" in _find(report, "A", "ct")[0].message
    assert "the same CT images as patient A" in _find(report, "B", "ct")[0].message
