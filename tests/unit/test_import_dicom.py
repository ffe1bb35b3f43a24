"""`mmdls import-dicom` / `import-nifti` on a phantom whose truth is known in millimetres:
slice order, HU and window, contour rasterisation, SUV, the clinical mapping,
de-identification, every defect, DICOM SEG through highdicom, and NIfTI giving the same
raw layout as DICOM."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from pathlib import Path

import numpy as np
import pytest
from dicom_phantom import (
    IDENTITY,
    PetPhantom,
    Phantom,
    expected_suv_factor,
    phantom_rois,
    write_ct,
    write_nifti,
    write_pet,
    write_rtstruct,
)
from PIL import Image

from mmdls_dist.cli import main
from mmdls_dist.data.imports.importer import run_import
from mmdls_dist.data.imports.mapping import ImportMapping, load_mapping
from mmdls_dist.data.imports.volume import window
from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.parallel import serial_mapper

G = Phantom()
PAD = 8  # the phantom's 48 px at 0.9 mm, centred in the mapping's 64 px
LUNG1_HEADER = "PatientID,age,gender,Histology,Overall.Stage,Survival.time,deadstatus.event\n"


def mapping(**changes) -> ImportMapping:
    return dataclasses.replace(load_mapping("lung1"), **({"spacing_mm": 0.9, "size": 64} | changes))


def clinical(path: Path, rows: list[str]) -> Path:
    path.write_text(LUNG1_HEADER + "".join(r + "\n" for r in rows))
    return path


def patient(root: Path, pid: str, pet: bool = False, rois=None, **ct_options) -> dict:
    ct = write_ct(root / pid / "CT", G, pid, **ct_options)
    write_rtstruct(root / pid / "RS" / "rs.dcm", ct, pid, rois or phantom_rois(G))
    if pet:
        ct["activity"] = write_pet(root / pid / "PET", PetPhantom(), G, pid, ct)
    return ct


def stack(out: Path, pid: str, kind: str) -> np.ndarray:
    folder = out / "images" / pid / kind
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def run(kind, root, out, csv, m):
    return run_import(kind, root, out, csv, m, serial_mapper(""))


def test_ct_rtstruct_and_pet_become_the_raw_layout(tmp_path):
    root = tmp_path / "dicom"
    # Stored rotated (ImageOrientationPatient -1,0,0,0,-1,0): the import lays it out as
    # any axial series, columns to the patient's left.
    written = patient(root, "LUNG1-001", pet=True, rotated=True)
    (root / "LUNG1-001" / "README.txt").write_text("export notes")  # not DICOM: skipped
    (root / ".DS_Store").write_bytes(b"\0")  # hidden: not even counted
    csv = clinical(tmp_path / "lung1.csv", ["LUNG1-001,61,male,large cell,IIIa,730,1"])
    out = tmp_path / "raw"
    report = run("dicom", root, out, csv, mapping())
    assert report.ok and report.kept == ["LUNG1-001"], report.summary()
    assert read_cohort(out).ok  # what ingest and shard take, lung masks included
    # Slices: the lesion's extent (|z| < 5 mm: phantom slices 5-8) and 2 on each side, in
    # position order although InstanceNumber counts down and the files are shuffled.
    ct, lesion, lung = (stack(out, "LUNG1-001", k) for k in ("ct", "lesion", "lung"))
    assert ct.shape == (8, 64, 64)
    body, lungs, truth = G.masks()
    inner = (slice(None), slice(PAD, PAD + 48), slice(PAD, PAD + 48))
    np.testing.assert_array_equal(ct[inner], window(G.hu()[3:11], mapping()))  # HU exactly
    assert (ct[:, :PAD] == window(np.array(-1024.0), mapping())).all()  # padding is air
    # Contours are polygons inside the true outline: a few boundary pixels may differ.
    assert dice(lesion[inner] > 0, truth[3:11]) > 0.95
    assert dice(lung[inner] > 0, lungs[3:11]) > 0.97
    assert dice(lesion[inner][::-1] > 0, truth[3:11]) < 0.9  # the stack is not flipped
    # The lesion is in the patient's right lung: the low columns (LPS x grows to the left).
    assert np.argwhere(lesion[4] > 0)[:, 1].mean() < 32
    row = (out / "clinical.csv").read_text().splitlines()[1].split(",")
    cells = dict(
        zip((out / "clinical.csv").read_text().splitlines()[0].split(","), row, strict=True)
    )
    assert cells["histology"] == ""  # "large cell": neither LUAD nor LUSC -> unknown
    assert cells["tnm_stage"] == "1" and cells["sex"] == "1" and cells["age"] == "61"
    assert float(cells["os_time"]) == pytest.approx(730 * 12 / 365.25, rel=1e-5)
    assert cells["os_event"] == "1" and cells["dfs_time"] == ""
    assert any("histology outside the mapping" in n for n in report.notes)
    assert "1 file(s) that are not DICOM were skipped" in report.notes
    # SUVbw by hand: activity x weight / dose decayed over the hour from injection to the
    # series, over the PET voxels whose centres lie in the ellipsoid.
    pet = PetPhantom()
    inside = G.lesion_distance(pet.points()) <= 1
    suv = written["activity"][inside] * expected_suv_factor()
    mtv = inside.sum() * pet.dr * pet.dc * pet.step / 1000
    assert float(cells["suv_max"]) == pytest.approx(suv.max(), rel=0.01)
    assert float(cells["suv_mean"]) == pytest.approx(suv.mean(), rel=0.01)
    assert float(cells["mtv"]) == pytest.approx(mtv, rel=0.01)
    assert float(cells["tlg"]) == pytest.approx(suv.mean() * mtv, rel=0.01)
    background = pet.background * expected_suv_factor()
    assert background < float(cells["suv_peak"]) < suv.max()  # a 1 ml mean, lesion and rim
    sidecar = (out / "import" / "LUNG1-001.json").read_text()
    assert '"slice_step_mm": 2.5' in sidecar and '"level": -600.0' in sidecar


def test_the_command_line_imports_and_checks_the_result(tmp_path, capsys):
    root = tmp_path / "dicom"
    patient(root, "LUNG1-002")
    csv = clinical(tmp_path / "lung1.csv", ["LUNG1-002,70,female,nos,II,100,0"])
    argv = ["import-dicom", str(root), str(tmp_path / "raw"), "--clinical", str(csv)]
    assert main([*argv, "--mapping", "lung1", "--executor", "serial"]) == 0
    printed = capsys.readouterr().out
    assert "1 patients found, 1 written, 0 rejected" in printed  # the import
    assert "1 patients read, 1 kept, 0 rejected" in printed  # then ingest's check of OUT
    assert stack(tmp_path / "raw", "LUNG1-002", "ct").shape[1:] == (512, 512)  # lung1: 0.8 mm


def test_identity_never_reaches_the_output_and_pseudonyms_are_keyed(tmp_path, capsys):
    root = tmp_path / "dicom"
    patient(root, "LUNG1-001")
    csv = clinical(tmp_path / "c.csv", ["LUNG1-001,61,male,adenocarcinoma,I,400,0"])
    key = tmp_path / "secret.key"
    key.write_bytes(b"site key")
    out = tmp_path / "raw"
    m = mapping(pseudonym_key=str(key), pseudonym_map=str(tmp_path / "map.csv"))
    report = run("dicom", root, out, csv, m)
    expected = "P" + hmac.new(b"site key", b"LUNG1-001", hashlib.sha256).hexdigest()[:16]
    assert report.kept == [expected]
    assert (tmp_path / "map.csv").read_text().splitlines()[1] == f"LUNG1-001,{expected}"
    secrets = [*IDENTITY.values(), "LUNG1-001", "061Y"]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), path
    assert not any(s in report.summary() for s in secrets)
    with pytest.raises(ValueError, match="outside"):
        inside = mapping(pseudonym_key=str(key), pseudonym_map=str(tmp_path / "raw2" / "m.csv"))
        run("dicom", root, tmp_path / "raw2", csv, inside)


def _no_decoder_syntax():
    from pydicom import uid
    from pydicom.pixels import get_decoder

    for candidate in (uid.JPEGLosslessSV1, uid.JPEGLossless, uid.HTJ2KLossless):
        if not get_decoder(candidate).is_available:
            return candidate
    pytest.fail("every candidate syntax has a decoder here; add one that does not")


def _compress(folder: Path, syntax) -> None:
    import pydicom
    from pydicom.encaps import encapsulate

    path = sorted(folder.glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8 not a real codestream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


def test_every_defect_names_patient_file_and_attribute(tmp_path):
    root = tmp_path / "dicom"
    patient(root, "GOOD")
    patient(root, "GAP", skip=(6,))  # a slice missing in the middle of the stack
    other = patient(root, "REF")
    write_rtstruct(root / "REF" / "RS" / "rs.dcm", other, "REF", phantom_rois(G), series="1.2.3")
    rois = {k: v for k, v in phantom_rois(G).items() if not k.startswith("GTV")}
    patient(root, "NOROI", rois=rois)
    ct = patient(root, "DOSE")
    write_pet(root / "DOSE" / "PET", PetPhantom(), G, "DOSE", ct, drop="dose")
    patient(root, "JPEG")
    _compress(root / "JPEG" / "CT", _no_decoder_syntax())
    patient(root, "TILT")
    import pydicom

    tilted = sorted((root / "TILT" / "CT").glob("*.dcm"))[3]
    ds = pydicom.dcmread(tilted)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.98, 0.199]
    ds.save_as(tilted, enforce_file_format=True)
    patient(root, "OBLIQUE")
    for path in (root / "OBLIQUE" / "CT").glob("*.dcm"):  # every slice tilted by 11 degrees
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.98, 0.199]
        ds.save_as(path, enforce_file_format=True)
    write_ct(root / "MIXED" / "CT", G, "MIXED")
    write_ct(root / "MIXED" / "CT", G, "MIXED", prefix="B")  # a second series, same folder
    patient(root, "NOROW")
    ids = ["GOOD", "GAP", "REF", "NOROI", "DOSE", "JPEG", "TILT", "OBLIQUE", "MIXED", "NOIMAGES"]
    csv = clinical(tmp_path / "c.csv", [f"{p},61,male,adenocarcinoma,I,400,0" for p in ids])
    out = tmp_path / "raw"
    report = run("dicom", root, out, csv, mapping())
    assert report.kept == ["GOOD"]
    by_patient = {d.patient_id: d for d in report.defects}
    expected = {
        "GAP": ("GAP/CT", "ImagePositionPatient", "gap"),
        "REF": ("REF/RS/rs.dcm", "RTReferencedSeriesSequence", "another series"),
        "NOROI": ("NOROI/RS/rs.dcm", "ROIName", "^GTV"),
        "DOSE": ("DOSE/PET/", "RadionuclideTotalDose", "SUV"),
        "JPEG": ("JPEG/CT/", "TransferSyntaxUID", "cannot be decoded"),
        "TILT": ("TILT/CT/", "ImageOrientationPatient", "mixed orientations"),
        "OBLIQUE": ("OBLIQUE/CT/", "ImageOrientationPatient", "oblique"),
        "MIXED": ("MIXED/CT", "SeriesInstanceUID", "mixed in one folder"),
        "NOROW": (".", "patient", "without a clinical row"),
        "NOIMAGES": ("c.csv", "patient", "no images"),
    }
    assert set(by_patient) == set(expected)
    for pid, (file, tag, words) in expected.items():
        d = by_patient[pid]
        assert d.file.startswith(file) and tag in d.field and words in d.message, str(d)
    assert not (out / "images" / "GAP").exists()  # nothing half-written
    assert "DOE^JOHN" not in report.summary()
    code = main(
        [
            "import-dicom",
            str(root),
            str(tmp_path / "raw3"),
            "--clinical",
            str(csv),
            "--mapping",
            "lung1",
            "--executor",
            "serial",
        ]
    )
    assert code == 1


def test_seg_read_through_highdicom_and_the_threshold_lung_fallback(tmp_path):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    root = tmp_path / "dicom"
    ct = write_ct(root / "S1" / "CT", G, "S1")
    datasets = sorted(ct["datasets"], key=lambda ds: float(ds.ImagePositionPatient[2]))
    _, lungs, truth = G.masks()
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="GTV-1",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=truth.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="phantom",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(root / "S1" / "seg.dcm")
    csv = clinical(tmp_path / "c.csv", ["S1,61,female,squamous cell carcinoma,IV,100,1"])
    out = tmp_path / "raw"
    report = run("dicom", root, out, csv, mapping())
    assert report.ok, report.summary()
    inner = (slice(None), slice(PAD, PAD + 48), slice(PAD, PAD + 48))
    np.testing.assert_array_equal(stack(out, "S1", "lesion")[inner] > 0, truth[3:11])  # voxels
    lung = stack(out, "S1", "lung")[inner] > 0  # no lung segment: the threshold mask
    dice = 2 * (lung & lungs[3:11]).sum() / (lung.sum() + lungs[3:11].sum())
    assert dice > 0.9
    assert "threshold" in (out / "import" / "S1.json").read_text()
    assert read_cohort(out).ok


def test_nifti_gives_the_same_raw_layout_as_dicom(tmp_path):
    root = tmp_path / "dicom"
    patient(root, "N1")
    csv = clinical(tmp_path / "c.csv", ["N1,61,male,adenocarcinoma,II,300,0"])
    run("dicom", root, tmp_path / "from-dicom", csv, mapping())
    _, lungs, lesion = G.masks()
    write_nifti(tmp_path / "nifti" / "N1" / "N1_ct.nii.gz", G.hu(), G, las=True)  # reoriented
    write_nifti(tmp_path / "nifti" / "N1" / "N1_lesion.nii.gz", lesion.astype(float), G)
    write_nifti(tmp_path / "nifti" / "N1" / "N1_lung.nii.gz", lungs.astype(float), G)
    report = run("nifti", tmp_path / "nifti", tmp_path / "from-nifti", csv, mapping())
    assert report.ok, report.summary()
    # The same CT slices, pixel for pixel (same slices chosen, same orientation and window).
    ct = stack(tmp_path / "from-nifti", "N1", "ct")
    np.testing.assert_array_equal(stack(tmp_path / "from-dicom", "N1", "ct"), ct)
    # The mask volumes are the voxel truth (the DICOM side drew them as contours).
    inner = (slice(None), slice(PAD, PAD + 48), slice(PAD, PAD + 48))
    np.testing.assert_array_equal(
        stack(tmp_path / "from-nifti", "N1", "lesion")[inner] > 0, lesion[3:11]
    )
    np.testing.assert_array_equal(
        stack(tmp_path / "from-nifti", "N1", "lung")[inner] > 0, lungs[3:11]
    )
    assert read_cohort(tmp_path / "from-nifti").ok


def test_resampling_to_the_mapping_spacing_and_size(tmp_path):
    root = tmp_path / "dicom"
    patient(root, "R1")
    csv = clinical(tmp_path / "c.csv", ["R1,61,male,adenocarcinoma,II,300,0"])
    out = tmp_path / "raw"
    assert run("dicom", root, out, csv, mapping(spacing_mm=0.45, size=96, slices="all")).ok
    lesion = stack(out, "R1", "lesion")
    assert lesion.shape == (14, 96, 96)  # every slice; 43.2 mm at 0.45 mm = 96 px
    _, _, truth = G.masks()
    assert (lesion > 0).sum() == pytest.approx(4 * truth.sum(), rel=0.1)  # half the spacing


def test_mapping_errors_name_the_setting(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("clinical: {center: X, units: {os_time: fortnights}}\n")
    with pytest.raises(ValueError, match="os_time"):
        load_mapping(str(bad))
    bad.write_text("clinical: {center: X, columns: {weight: w}}\n")
    with pytest.raises(ValueError, match="weight"):
        load_mapping(str(bad))
    bad.write_text("lesion_roi: '('\nclinical: {center: X}\n")
    with pytest.raises(ValueError, match="lesion_roi"):
        load_mapping(str(bad))
