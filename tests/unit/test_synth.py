"""The synthetic cohort: deterministic, in the raw layout, and a real learning problem."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY
from lifelines.utils import concordance_index
from PIL import Image
from sksurv.metrics import concordance_index_censored

from mmdls_dist.config import SynthConfig
from mmdls_dist.data.synth import generate, oracle_cindex


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path, synth_cohort):
    root, _ = synth_cohort
    generate(TINY, tmp_path / "again", tmp_path / "again.json")
    assert _digest(tmp_path / "again") == _digest(root)
    other = dataclasses.replace(TINY, seed=TINY.seed + 1)
    generate(other, tmp_path / "other", tmp_path / "other.json")
    assert _digest(tmp_path / "other") != _digest(root)


def test_truth_must_live_outside_data_root(tmp_path):
    with pytest.raises(ValueError, match="outside DATA_ROOT"):
        generate(TINY, tmp_path / "raw", tmp_path / "raw" / "truth.json")


def test_imports_cleanly_with_documented_gaps(synth_report, synth_cohort):
    report = synth_report
    assert report.ok, report.summary()
    assert len(report.records) == TINY.patients
    assert {r.center for r in report.records} == {"HOSP-A", "HOSP-B", "HOSP-C"}
    sizes = {r.center: r.image_size for r in report.records}
    assert len(set(sizes.values())) == 3  # centers differ in image size
    assert any(not r.lesion_annotated for r in report.records)
    tab = np.array([list(r.clinical.values()) + list(r.pet.values()) for r in report.records])
    assert 0 < np.isnan(tab).sum() < tab.size * 0.1
    counts = [len(r.slice_files) for r in report.records]
    assert min(counts) >= TINY.min_slices and max(counts) <= TINY.max_slices


def test_oracle_cindex_matches_lifelines(synth_report, synth_cohort):
    _, truth = synth_cohort
    for endpoint in ("dfs", "os"):
        labels = {
            r.patient_id: (r.labels[f"{endpoint}_time"], r.labels[f"{endpoint}_event"])
            for r in synth_report.records
            if r.labels[f"{endpoint}_time"] is not None
        }
        ids = sorted(labels)
        eta = np.array([truth["patients"][p][f"eta_{endpoint}"] for p in ids])
        t = np.array([labels[p][0] for p in ids])
        e = np.array([labels[p][1] for p in ids])
        expected = concordance_index(t, -eta, e)  # lifelines: higher score = longer survival
        sksurv_c = concordance_index_censored(e.astype(bool), t, eta)[0]
        assert sksurv_c == pytest.approx(expected, abs=1e-9)
        assert oracle_cindex(truth, ids, endpoint, labels) == pytest.approx(expected, abs=1e-6)
        assert truth["endpoints"][endpoint]["oracle_cindex"] == pytest.approx(expected, abs=1e-6)


def test_survival_follows_the_linear_predictor(tmp_path):
    """On a larger cohort the true eta ranks survival well and the event rate is realistic."""
    spec = SynthConfig(patients=400, seed=1, image_size=32, min_slices=2, max_slices=3)
    truth = generate(spec, tmp_path / "raw", tmp_path / "t.json")
    for endpoint in ("dfs", "os"):
        info = truth["endpoints"][endpoint]
        assert 0.68 < info["oracle_cindex"] < 0.85
        assert 0.3 < info["event_rate"] < 0.8


def test_images_show_lungs_and_a_lesion(synth_cohort, synth_report):
    root, truth = synth_cohort
    rec = next(r for r in synth_report.records if r.lesion_annotated)
    base = root / "images" / rec.patient_id
    ct = np.stack([np.asarray(Image.open(base / "ct" / f)) for f in rec.slice_files]).astype(float)
    lung = np.stack([np.asarray(Image.open(base / "lung" / f)) for f in rec.slice_files]) > 0
    lesion = np.stack([np.asarray(Image.open(base / "lesion" / f)) for f in rec.slice_files]) > 0
    assert lesion.any() and lung.any()
    assert (lesion & ~lung).sum() <= 0.05 * lesion.sum()  # the lesion lies in the lung
    lung_only = lung & ~lesion
    body = ~lung  # outside lungs: soft tissue (bright) and air (dark) mixed
    assert ct[lesion].mean() > ct[lung_only].mean() + 20  # lesion denser than lung parenchyma
    assert ct[body].std() > 30


FINDINGS = dataclasses.replace(TINY, style="findings")


def test_the_findings_style_is_deterministic_and_imports_cleanly(tmp_path):
    from mmdls_dist.data.ingest import read_cohort

    truth = generate(FINDINGS, tmp_path / "a", tmp_path / "a.json")
    generate(FINDINGS, tmp_path / "b", tmp_path / "b.json")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    report = read_cohort(tmp_path / "a")
    assert report.ok, report.summary()
    assert len(report.records) == FINDINGS.patients
    assert len({r.image_size for r in report.records}) == 3  # centers differ in image size
    assert truth["style"] == "findings"
    factors = next(iter(truth["patients"].values()))
    assert {"spicules", "satellites", "cavitation", "pleural"} <= set(factors)
    # A different generator, not a relabelled one: no image is shared with the classic style.
    classic = generate(TINY, tmp_path / "c", tmp_path / "c.json")
    assert classic["patients"].keys() == truth["patients"].keys()
    pid = next(iter(truth["patients"]))
    a = sorted((tmp_path / "a" / "images" / pid / "ct").iterdir())
    c = sorted((tmp_path / "c" / "images" / pid / "ct").iterdir())
    assert a[0].name != c[0].name  # the centers name their slices differently
    assert a[0].read_bytes() != c[0].read_bytes()


def test_findings_survival_is_ranked_by_its_eta_and_the_findings_carry_risk(tmp_path):
    spec = SynthConfig(
        style="findings", patients=600, seed=2, image_size=32, min_slices=2, max_slices=3
    )
    truth = generate(spec, tmp_path / "raw", tmp_path / "t.json")
    patients = truth["patients"]
    for endpoint in ("dfs", "os"):
        info = truth["endpoints"][endpoint]
        assert 0.68 < info["oracle_cindex"] < 0.85
        assert 0.3 < info["event_rate"] < 0.8
        eta = np.array([p[f"eta_{endpoint}"] for p in patients.values()])
        for finding in ("spicules", "satellites", "cavitation", "pleural"):
            x = np.array([p[finding] for p in patients.values()])
            assert np.corrcoef(x, eta)[0, 1] > 0.1, (endpoint, finding)


def _findings_patient(**overrides):
    from mmdls_dist.data.synth import findings

    factors = {
        "size": 0.5,
        "density": 0.5,
        "lobulation": 0.0,
        "central": 0.5,
        "lobe": 0.0,
        "side": 1.0,
        "radius_mm": 20.0,
        "spicules": 0.0,
        "satellites": 0.0,
        "cavitation": 0.0,
        "pleural": 0.0,
    } | overrides
    ct, lung, lesion = findings.render_patient(factors, findings.CENTERS[0], 8, 96, seed=5)
    return ct.astype(float), lung > 0, lesion > 0


def test_findings_images_show_cavities_and_satellites():
    ct, lung, lesion = _findings_patient(cavitation=1.0)
    k = int(np.argmax(lesion.reshape(8, -1).sum(1)))
    ys, xs = np.nonzero(lesion[k])
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    assert ct[k, cy, cx] < 40 < ct[k][lesion[k]].mean()  # an air core inside the contour
    assert (lesion & ~lung).sum() == 0  # the lesion lies in the lung mask

    def bright_outside(ct, lung, lesion):
        return int((lung & ~lesion & (ct > 85)).sum())

    assert bright_outside(*_findings_patient(satellites=4.0)) > 10
    assert bright_outside(*_findings_patient(satellites=0.0)) < 3
