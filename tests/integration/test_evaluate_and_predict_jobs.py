"""Evaluation report and prediction end to end from a tiny checkpoint trained with Ray Train;
inference runs as Ray tasks on the shared local Ray session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import TINY_TRAIN

from mmdls_dist.cli import main
from mmdls_dist.config import EvalConfig, load_config
from mmdls_dist.data.schema import STAGES
from mmdls_dist.data.shards import load_manifest
from mmdls_dist.evaluation.evaluate import run_evaluation
from mmdls_dist.evaluation.predict import run_prediction
from mmdls_dist.metrics.classification import macro_ovr_auc
from mmdls_dist.parallel import ray_mapper

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained_run(ray_session, shard_dir, tmp_path_factory) -> Path:
    """Trained as `mmdls train` trains: fit, then the reference stored in the run folder."""
    storage = tmp_path_factory.mktemp("runs")
    argv = ["train", "--shards", str(shard_dir)]
    for item in (*TINY_TRAIN, f"run.storage_path={storage}", "run.name=tiny", "optim.epochs=2"):
        argv += ["--set", item]
    assert main(argv) == 0
    return storage / "tiny"


@pytest.fixture(scope="module")
def evaluation(trained_run, shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    checkpoints = sorted(p for p in trained_run.glob("checkpoint_*") if p.is_dir())
    metrics = run_evaluation(
        {"best": str(trained_run), "first epoch": str(checkpoints[0])},
        str(shard_dir),
        out,
        EvalConfig(bootstrap=20, min_center_patients=2, parts=2, batch_size=4),
        ray_mapper("inference"),
    )
    return out, metrics


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_report_has_every_split_center_and_model(trained_run, evaluation, shard_dir):
    out, metrics = evaluation
    manifest = load_manifest(str(shard_dir))
    saved = strict_json(out / "metrics.json")  # NaN written as null
    assert set(saved["models"]) == {"best", "first epoch"}
    splits = saved["models"]["best"]["splits"]
    assert set(splits) == set(manifest["splits"])  # train, val, test, external
    for split, info in manifest["splits"].items():
        m = splits[split]["all"]
        assert m["n_patients"] == info["n_patients"]
        if len(info["centers"]) > 1:  # centers with >= min_center_patients get a section
            expected = {c for c, n in info["centers"].items() if n >= 2}
            assert set(splits[split]["centers"]) == expected
        assert {"harrell_c", "uno_c", "td_auc", "brier", "risk_groups"} <= set(m["os"])
        assert set(m["histology"]) >= {"n", "positives"}
    page = (out / "report.html").read_text()
    assert "Model comparison" in page and "best / external (held-out centers): all centers" in page
    assert page.index("Headline: best") < page.index("Model comparison")
    assert "Provenance and methods" in page and "stored in" not in page  # refit on train here
    best = json.loads((trained_run / "best.json").read_text())["checkpoint"]
    assert f"tiny/{best}" in page  # the checkpoint named in the provenance
    assert (out / "figures" / "best-test-overlays.png").exists()
    assert "HOSP-A-0" not in page  # no patient ids in the shared report
    # The tabular inputs and lesion descriptors the survival stack reads stay in memory:
    # not in the written table.
    written = pd.read_csv(out / "predictions-best.csv")
    assert not [c for c in written if c.startswith(("input_", "lesion_"))]
    assert {"os_risk", "os_risk_uncalibrated"} <= set(written)


def test_training_validation_metrics_equal_the_reports(trained_run, evaluation):
    """One implementation per metric: what the run reported for its deployed epoch on the
    validation split is what the report computes for that checkpoint and split."""
    out, metrics = evaluation
    best = json.loads((trained_run / "best.json").read_text())
    reported = json.loads((trained_run / best["checkpoint"] / "metrics.json").read_text())
    report = metrics["models"]["best"]["splits"]["val"]["all"]
    assert reported["val/cindex_os"] == pytest.approx(report["os"]["harrell_c"], abs=1e-9)
    assert reported["val/cindex_dfs"] == pytest.approx(report["dfs"]["harrell_c"], abs=1e-9)
    assert reported["val/auc_histology"] == pytest.approx(report["histology"]["auc"], abs=1e-9)
    # The report scores the temperature-scaled stage probabilities, and one temperature
    # can reorder a class's probabilities across patients (a one-vs-rest AUC moves, the
    # argmax does not): the training-time value is the metric of the unscaled ones.
    val = pd.read_csv(out / "predictions-best.csv").query("split == 'val'")
    raw = val[[f"stage_prob_{s}_uncalibrated" for s in STAGES]].to_numpy()
    assert reported["val/auc_stage"] == pytest.approx(
        macro_ovr_auc(raw, val["stage"].to_numpy()), abs=1e-9
    )


def test_predictions_cover_each_patient_once_and_cutpoints_come_from_train(evaluation, shard_dir):
    out, metrics = evaluation
    table = pd.read_csv(out / "predictions-best.csv")
    manifest = load_manifest(str(shard_dir))
    assert len(table) == sum(s["n_patients"] for s in manifest["splits"].values())
    assert not table["patient_id"].duplicated().any()
    ref = metrics["models"]["best"]["reference"]
    # The contour read's cut-points are its training patients' tertiles; patients read on
    # the segmentor's mask are grouped by the CT-only read's.
    train = table[(table.split == "train") & table.contour_read]["os_risk"]
    assert 0 < len(train) < (table.split == "train").sum()
    np.testing.assert_allclose(ref["cutpoints"]["os"], np.quantile(train, [1 / 3, 2 / 3]))
    external = table[table.split == "external"]
    cut = np.where(
        external.contour_read, ref["cutpoints"]["os"][1], ref["ct_only"]["cutpoints"]["os"][1]
    )
    curves = metrics["models"]["best"]["splits"]["external"]["all"]["os"]["risk_groups"]["curves"]
    high = curves.get("high", {"n": 0})["n"]
    assert high == int(np.sum(external["os_risk"].to_numpy() >= cut))


def new_patients_copy(raw: Path, dest: Path, broken: str) -> tuple[list[str], set[str]]:
    """New patients as a hospital would send them: no outcome columns, no lung masks, a
    lesion contour for every other annotated patient (CT only for the rest); one patient's
    first slice is corrupt. -> (patient ids, ids whose contour was withheld)."""
    clinical = pd.read_csv(raw / "clinical.csv", dtype=str, keep_default_na=False)
    clinical = clinical.drop(
        columns=["histology", "tnm_stage", "dfs_time", "dfs_event", "os_time", "os_event"]
    )
    dest.mkdir(parents=True)
    clinical.to_csv(dest / "clinical.csv", index=False)
    shutil.copy(raw / "radiomics.csv", dest / "radiomics.csv")
    annotated = sorted(p for p in clinical.patient_id if (raw / "images" / p / "lesion").is_dir())
    withheld = set(annotated[1::2])
    for pid in clinical.patient_id:
        kinds = ("ct",) if pid in withheld or pid not in annotated else ("ct", "lesion")
        for kind in kinds:
            shutil.copytree(raw / "images" / pid / kind, dest / "images" / pid / kind)
    first = sorted((dest / "images" / broken / "ct").iterdir())[0]
    first.write_bytes(b"\x89PNG not really")
    return list(clinical.patient_id), withheld


def test_predict_on_new_patients(trained_run, evaluation, synth_cohort, tmp_path):
    out, _ = evaluation
    raw = synth_cohort[0]
    ids, withheld = new_patients_copy(raw, tmp_path / "new", broken="HOSP-B-0002")
    table = run_prediction(
        str(trained_run),
        tmp_path / "pred.csv",
        EvalConfig(parts=2, batch_size=4),
        ray_mapper,
        data=str(tmp_path / "new"),
        masks=str(tmp_path / "masks"),
    )
    assert sorted(table["patient_id"]) == sorted(ids)  # nobody silently missing
    bad = table.set_index("patient_id").loc["HOSP-B-0002"]
    assert bad["status"] == "rejected" and "ct" in bad["reason"] and "unreadable" in bad["reason"]
    ok = table[table.status == "ok"].set_index("patient_id")
    assert set(ok["os_risk_group"]) <= {"low", "intermediate", "high"}
    assert (ok["os_survival_12m"] >= ok["os_survival_36m"]).all()
    # Same patients, same weights: without labels and lung masks, a patient with its lesion
    # contour (or with none to begin with) is predicted as in the fully labelled shards, so
    # neither labels nor lung masks reach inference and the training normalisation is
    # applied. The model reads a given contour (model.given_lesion_mask): withheld, the
    # segmentor's mask stands in and the prediction moves.
    evaluated = pd.read_csv(out / "predictions-best.csv").set_index("patient_id")
    assert ok.index.isin(evaluated.index).all()
    same = ok.index[~ok.index.isin(withheld)]
    moved = ok.index[ok.index.isin(withheld)]
    assert len(same) and len(moved)
    pairs = (("os_log_relative_hazard", "os_risk"), ("histology_prob_lusc", "histology_prob"))
    for column, theirs in pairs:  # the CSV rounds to 3 decimals
        np.testing.assert_allclose(ok.loc[same, column], evaluated.loc[same, theirs], atol=6e-4)
    risk = ok["os_log_relative_hazard"]
    assert not np.allclose(risk.loc[moved], evaluated.loc[moved, "os_risk"], atol=2e-3)
    assert (
        ok["model"] == f"tiny/{json.loads((trained_run / 'best.json').read_text())['checkpoint']}"
    ).all()
    assert ok.loc[moved, "missing_inputs"].str.contains("lesion contour").all()
    contoured = [p for p in ok.index if (tmp_path / "new" / "images" / p / "lesion").is_dir()]
    assert contoured
    assert not ok.loc[contoured, "missing_inputs"].fillna("").str.contains("contour").any()
    assert (ok["histology_prob_lusc"].round(3) == ok["histology_prob_lusc"]).all()
    masks = sorted((tmp_path / "masks" / same[0] / "lesion").glob("*.png"))
    assert masks and masks[0].name in {p.name for p in (raw / "images" / same[0] / "ct").iterdir()}


def test_cli_evaluate_and_predict_from_shards(trained_run, shard_dir, tmp_path, capsys):
    code = main(
        [
            "evaluate",
            f"tiny={trained_run}",
            "--shards",
            str(shard_dir),
            "--splits",
            "val,test",
            "--bootstrap",
            "0",
            "--out",
            str(tmp_path / "ev"),
            "--parts",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and "report.html" in printed
    assert set(strict_json(tmp_path / "ev" / "metrics.json")["models"]["tiny"]["splits"]) == {
        "val",
        "test",
    }
    # A site without the training shards scores an external cohort against the reference
    # file of the first evaluation: same cut-points, nothing refitted.
    reference = tmp_path / "ev" / "reference-tiny.json"
    code = main(
        [
            "evaluate",
            f"tiny={trained_run}",
            "--shards",
            str(shard_dir),
            "--splits",
            "external",
            "--bootstrap",
            "0",
            "--reference",
            str(reference),
            "--out",
            str(tmp_path / "ext"),
            "--parts",
            "1",
        ]
    )
    assert code == 0
    again = strict_json(tmp_path / "ext" / "metrics.json")["models"]["tiny"]["reference"]
    assert again["cutpoints"] == json.loads(reference.read_text())["cutpoints"]
    code = main(
        [
            "predict",
            str(trained_run),
            "--shards",
            str(shard_dir),
            "--split",
            "external",
            "--reference",
            str(tmp_path / "ev" / "reference-tiny.json"),
            "--out",
            str(tmp_path / "ext.csv"),
        ]
    )
    assert code == 0
    n_external = load_manifest(str(shard_dir))["splits"]["external"]["n_patients"]
    assert len(pd.read_csv(tmp_path / "ext.csv")) == n_external


def test_the_reference_is_fitted_when_training_ends(
    trained_run, evaluation, shard_dir, tmp_path, monkeypatch
):
    """`mmdls train` stores the deployed checkpoint's reference beside best.json; it is
    the one an evaluation fits on the training split, and predict applies it from a moved
    run folder without running inference on the training cohort again."""
    from mmdls_dist.evaluation import reference as reference_module

    _, metrics = evaluation
    resolved = load_config(str(trained_run / "config.yaml"))  # the run's config, as a file
    assert resolved.run.name == "tiny" and resolved.optim.epochs == 2
    stored = json.loads((trained_run / "reference.json").read_text())
    best = json.loads((trained_run / "best.json").read_text())["checkpoint"]
    assert stored["checkpoints"] == [f"tiny/{best}"]
    refit = metrics["models"]["best"]["reference"]
    # The model reads given contours: the CT-only read has its own reference, fitted on the
    # training cohort read without them, stored and refitted alike.
    assert stored["ct_only"] is not None and stored["ct_only"]["ct_only"] is None
    assert stored["ct_only"]["cutpoints"] != stored["cutpoints"]
    for endpoint in ("dfs", "os"):
        for ours, theirs in ((stored, refit), (stored["ct_only"], refit["ct_only"])):
            np.testing.assert_allclose(
                ours["cutpoints"][endpoint], theirs["cutpoints"][endpoint], atol=1e-5
            )
    assert stored["temperature"] == pytest.approx(refit["temperature"], abs=1e-4)
    assert stored["histology_threshold"] == pytest.approx(refit["histology_threshold"], abs=1e-4)
    moved = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(trained_run, moved)

    def no_refit(*args, **kwargs):
        raise AssertionError("the training cohort was scored again")

    monkeypatch.setattr(reference_module, "training_frame", no_refit)
    table = run_prediction(
        str(moved),
        tmp_path / "p.csv",
        EvalConfig(parts=1, batch_size=4),
        ray_mapper,
        shards=str(shard_dir),
        split="external",
    ).set_index("patient_id")
    evaluated = pd.read_csv(evaluation[0] / "predictions-best.csv").set_index("patient_id")
    np.testing.assert_allclose(
        table["os_log_relative_hazard"], evaluated.loc[table.index, "os_risk"], atol=6e-4
    )
    rows = evaluated.loc[table.index]  # each patient grouped by the cut-points of its read
    cut = np.where(
        rows.contour_read, stored["cutpoints"]["os"][1], stored["ct_only"]["cutpoints"]["os"][1]
    )
    groups = np.where(rows["os_risk"] >= cut, "high", "x")
    assert ((table["os_risk_group"] == "high") == (groups == "high")).all()
