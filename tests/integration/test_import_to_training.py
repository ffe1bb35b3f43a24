"""A small synthetic DICOM cohort end to end: `mmdls import-dicom` -> `mmdls shard` ->
a Ray Train run of the embedded default's preset (tiny model) on it."""

from __future__ import annotations

import pytest
from dicom_phantom import write_cohort
from helpers import train_config

from mmdls_dist.cli import main
from mmdls_dist.data.shards import load_manifest
from mmdls_dist.train.launch import fit

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HEADER = "PatientID,age,gender,Histology,Overall.Stage,Survival.time,deadstatus.event\n"


def test_dicom_import_shards_and_trains(ray_session, tmp_path):
    rows = write_cohort(tmp_path / "dicom", 30)
    (tmp_path / "clinical.csv").write_text(HEADER + "\n".join(rows) + "\n")
    mapping = tmp_path / "site.yaml"
    mapping.write_text(
        "clinical:\n  center: SITE-A\n  columns: {age: age, sex: gender, histology: Histology,"
        " tnm_stage: Overall.Stage, os_time: Survival.time, os_event: deadstatus.event}\n"
        "  units: {os_time: days}\n"
        "  codes: {sex: {male: 1, female: 0},"
        " histology: {adenocarcinoma: 0, squamous cell carcinoma: 1},"
        " tnm_stage: {I: 0, II: 0, IIIa: 1, IIIb: 1, IV: 2}, os_event: {'0': 0, '1': 1}}\n"
        "spacing_mm: 0.9\nsize: 64\n"
    )
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    argv = ["import-dicom", str(tmp_path / "dicom"), str(raw)]
    argv += ["--clinical", str(tmp_path / "clinical.csv"), "--mapping", str(mapping)]
    assert main([*argv, "--executor", "serial"]) == 0
    assert main(["shard", str(raw), str(shards), "--executor", "serial", "--image-size", "32"]) == 0
    manifest = load_manifest(str(shards))
    assert sum(s["n_patients"] for s in manifest["splits"].values()) == 30
    result = fit(train_config(shards, tmp_path / "runs", "dicom", "optim.epochs=1"))
    assert result.error is None
    assert result.metrics["epoch"] == 0 and result.metrics["val/n_patients"] > 0
