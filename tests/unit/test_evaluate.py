"""Evaluation on prediction tables (no model): the reference is fixed on the training split,
metrics per split and center, bootstrap CIs, and the HTML report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmdls_dist.config import EvalConfig
from mmdls_dist.evaluation.evaluate import evaluate_frame, group_metrics
from mmdls_dist.evaluation.reference import fit_reference
from mmdls_dist.evaluation.report import write_report
from mmdls_dist.metrics.survival import harrell_c, risk_cutpoints

HORIZONS = (12.0, 24.0, 36.0)


def frame(
    rng, n: int, split: str, centers=("A", "B"), shift: float = 0.0, follow_up: float = 72.0
) -> pd.DataFrame:
    """Predictions with signal: risk drives time, histology_prob drives the label;
    administrative censoring uniform in [6, follow_up] months."""
    risk = rng.normal(size=n) + shift
    hist = rng.integers(0, 2, n)
    stage = rng.integers(0, 3, n)
    stage_logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[stage]
    stage_p = np.exp(stage_logits) / np.exp(stage_logits).sum(1, keepdims=True)
    out = {
        "patient_id": [f"{split}-{i:04d}" for i in range(n)],
        "center": [centers[i % len(centers)] for i in range(n)],
        "split": split,
        "histology": hist,
        "histology_prob": np.clip(0.35 * hist + 0.65 * rng.random(n), 0, 1),
        "stage": stage,
        "stage_prob_I-II": stage_p[:, 0],
        "stage_prob_III": stage_p[:, 1],
        "stage_prob_IV": stage_p[:, 2],
        "dice_lung": rng.uniform(0.9, 1.0, n),
        "dice_lesion": np.where(rng.random(n) < 0.2, np.nan, rng.uniform(0.5, 0.9, n)),
    }
    for endpoint in ("dfs", "os"):
        t = rng.exponential(30.0 * np.exp(-0.8 * risk)) + 0.5
        c = rng.uniform(6, follow_up, n)
        out[f"{endpoint}_risk"] = risk
        out[f"{endpoint}_time"] = np.minimum(t, c)
        out[f"{endpoint}_event"] = t <= c
        out[f"{endpoint}_known"] = True
    return pd.DataFrame(out)


@pytest.fixture
def cohort():
    rng = np.random.default_rng(0)
    return pd.concat(
        [
            frame(rng, 400, "train"),
            frame(rng, 120, "val"),
            frame(rng, 150, "external", centers=("EXT",), shift=1.5),
        ],
        ignore_index=True,
    )


def test_reference_is_fixed_on_train_and_applied_unchanged(cohort):
    train = cohort[cohort.split == "train"]
    ref = fit_reference(train, cohort[cohort.split == "val"], HORIZONS)
    # On the slope-scaled log-hazards, the scale evaluation hands on (the groups are the same).
    assert ref.cutpoints["os"] == pytest.approx(risk_cutpoints(ref.slope["os"] * train["os_risk"]))
    out = evaluate_frame(cohort, ref, ["train", "external"], EvalConfig(bootstrap=0))
    groups = out["external"]["all"]["os"]["risk_groups"]["curves"]
    ext = cohort[cohort.split == "external"]["os_risk"].to_numpy()
    cuts = np.quantile(train["os_risk"], [1 / 3, 2 / 3])
    # The external set is shifted to high risk: with training cut-points most of it is
    # "high"; cut-points re-derived from the external set would give three equal thirds.
    assert groups["high"]["n"] == int(np.sum(ext >= cuts[1])) > 100
    assert groups.get("low", {"n": 0})["n"] == int(np.sum(ext < cuts[0]))
    on_train = out["train"]["all"]["os"]["risk_groups"]["curves"]
    assert abs(on_train["low"]["n"] - on_train["high"]["n"]) <= 2


def test_group_metrics_and_bootstrap_ci(cohort):
    ref = fit_reference(cohort[cohort.split == "train"], cohort[cohort.split == "val"], HORIZONS)
    val = cohort[cohort.split == "val"]
    m = group_metrics(val, ref, n_boot=100, seed=4)
    assert m["os"]["harrell_c"] == pytest.approx(
        harrell_c(val["os_risk"], val["os_time"], val["os_event"])
    )
    for key, value in (
        ("os.harrell_c", m["os"]["harrell_c"]),
        ("histology.auc", m["histology"]["auc"]),
        ("stage.macro_auc", m["stage"]["macro_auc"]),
        ("dfs.td_auc.24", m["dfs"]["td_auc"]["24"]),
    ):
        lo, hi = m["ci95"][key]
        assert lo < value < hi and hi - lo < 0.4, key
    assert m["ci95"] == group_metrics(val, ref, n_boot=100, seed=4)["ci95"]  # seeded
    assert m["segmentation"]["dice_lesion_n"] == int(val["dice_lesion"].notna().sum())
    assert 0.0 < m["os"]["brier"]["12"] < 0.3
    surv = m["os"]["mean_predicted_survival"]
    assert surv["12"] > surv["24"] > surv["36"]


def test_centers_get_their_own_sections_and_report_is_written(cohort, tmp_path):
    ref = fit_reference(cohort[cohort.split == "train"], cohort[cohort.split == "val"], HORIZONS)
    out = evaluate_frame(cohort, ref, ["val", "external"], EvalConfig(bootstrap=20))
    assert set(out["val"]["centers"]) == {"A", "B"}
    assert out["external"]["centers"] == {}  # one center: the split is the center
    assert out["val"]["centers"]["A"]["n_patients"] == 60
    results = {"full": out, "clinical only": out}
    page = write_report(
        tmp_path, results, {"summary": "test", "overlay_split": "val", "horizons": HORIZONS}, {}
    )
    text = page.read_text()
    assert "Model comparison" in text
    assert "full / external (held-out centers): all centers" in text
    assert "full / validation (internal): A" in text
    assert text.count("data:image/png;base64,") >= 12
    for name in ("external-km-os", "external-stage-roc", "external-calibration-dfs"):
        assert (tmp_path / "figures" / f"full-{name}.png").stat().st_size > 10_000
    assert "val-0001" not in text  # patient ids stay out of the report
    # The headline comes first: the external split with its CI and the published range.
    head = text.index("Headline: full")
    assert head < text.index("Model comparison") < text.index("every split")
    assert "external (held-out centers)" in text[head : text.index("Headline: clinical only")]
    assert "0.85-0.92" in text and "publication (reported)" in text
    ext = out["external"]["all"]
    auc, (lo, hi) = ext["histology"]["auc"], ext["ci95"]["histology.auc"]
    assert f"{auc:.3f} <small>({lo:.3f}–{hi:.3f})</small>" in text[head:]
    assert "Small sample" not in text  # no group here is under 50 patients
    hist = ext["histology"]  # calibration in the large: mean P(LUSC) and the LUSC fraction
    known = ref.calibrate(cohort[(cohort.split == "external") & (cohort.histology >= 0)])
    assert hist["prevalence"] == pytest.approx(known["histology"].mean())
    assert hist["mean_prob"] == pytest.approx(known["histology_prob"].mean())
    assert f"{hist['mean_prob']:.3f} / {hist['prevalence']:.3f}" in text
    mix = hist["case_mix"]  # the label-free case-mix cell: estimate, and ECE or no shift
    cell = (
        f"{mix['estimated_prevalence']:.3f} / {mix['ece']:.3f}"
        if mix["adapted"]
        else f"{mix['estimated_prevalence']:.3f} (no shift, p {mix['p_value']:.2f})"
    )
    assert "case mix: LUSC est. / ECE" in text and cell in text


def test_degenerate_estimates_small_groups_and_p_values_are_flagged(tmp_path):
    from mmdls_dist.evaluation.report import _p, hazard_table, small_sample_warnings

    m = {
        "n_patients": 12,
        "dfs": {"n": 12, "events": 4, "risk_groups": {}},
        "os": {
            "n": 12,
            "events": 5,
            "risk_groups": {
                "logrank_p": 2e-5,
                "hazard_ratios": {
                    "high": {
                        "hr": 78413842.33,
                        "ci_low": 0.0,
                        "ci_high": float("inf"),
                        "p": 0.99,
                        "estimable": False,
                    },
                    "intermediate": {
                        "hr": 2.5,
                        "ci_low": 1.1,
                        "ci_high": 5.0,
                        "p": 0.0004,
                        "estimable": True,
                    },
                },
            },
        },
    }
    table = hazard_table(m)
    assert "78413842" not in table and "not estimable" in table
    assert "2.50" in table and "< 0.001" in table  # the estimable one, its p as < 0.001
    warnings = small_sample_warnings(m)
    assert any("12 patients" in w for w in warnings)
    assert any(w.startswith("DFS: 4 events") for w in warnings)
    assert _p(0.0123) == "0.012" and _p(float("nan")) == "–"


def test_the_provenance_section_names_checkpoint_hashes_and_versions(tmp_path):
    from mmdls_dist.evaluation.evaluate import software_versions
    from mmdls_dist.evaluation.report import provenance_section

    provenance = {
        "models": {
            "run": {
                "members": [
                    {
                        "checkpoint": "r/checkpoint_1",
                        "epoch": 6,
                        "config_sha256": "abc123",
                        "manifest_sha256": "def456",
                        "shards": "/data/shards",
                    }
                ],
                "reference": "cut-points on 400 training patients",
            }
        },
        "software": software_versions(),
    }
    text = provenance_section(provenance, "baselines from the training split")
    for expected in ("r/checkpoint_1", "abc123", "def456", "400 training patients", "torch"):
        assert expected in text
    assert provenance["software"]["torch"].startswith("2.")


def test_longer_external_follow_up_is_scored_not_an_abort(tmp_path):
    """An external center followed twice as long as the training split, with events after
    the training split's last (censored) follow-up: the metrics that need the censoring
    distribution only up to their horizon are computed; one beyond its support is NaN
    with a note in the report, never an abort."""
    rng = np.random.default_rng(3)
    train = frame(rng, 300, "train", follow_up=60.0)
    last = train.sort_values("os_time").iloc[-1]
    assert not last["os_event"]  # the training censoring distribution reaches 0 there
    external = frame(rng, 200, "external", centers=("EXT",), follow_up=120.0)
    end = last["os_time"]
    assert (external["os_event"] & (external["os_time"] > end)).sum() > 5
    cohort = pd.concat([train, external], ignore_index=True)
    ref = fit_reference(train, None, HORIZONS)
    m = evaluate_frame(cohort, ref, ["external"], EvalConfig(bootstrap=20))["external"]["all"]
    assert all(np.isfinite(m["os"]["td_auc"][h]) for h in ("12", "24", "36"))
    assert all(np.isfinite(m["os"]["brier"][h]) for h in ("12", "24", "36"))
    assert np.isfinite(m["os"]["uno_c"]) and np.isfinite(m["os"]["integrated_brier"])
    assert m["os"]["notes"] == []
    # A horizon past the training follow-up: NaN, and the report says why.
    late = fit_reference(train, None, (12.0, 36.0, 100.0))
    m = evaluate_frame(cohort, late, ["external"], EvalConfig(bootstrap=0))["external"]["all"]
    assert np.isfinite(m["os"]["td_auc"]["36"]) and np.isnan(m["os"]["td_auc"]["100"])
    assert np.isnan(m["os"]["brier"]["100"]) and np.isnan(m["os"]["uno_c"])
    notes = " ".join(m["os"]["notes"])
    assert "at 100 months are not defined" in notes and f"ends at {end:g} months" in notes
    assert "Uno's C (truncated at 100 months) is not defined" in notes
    out = {"m": {"external": {"all": m, "centers": {}}}}
    page = write_report(tmp_path, out, {"overlay_split": "", "horizons": late.horizons}, {})
    assert "at 100 months are not defined" in page.read_text()


def test_probabilities_are_temperature_scaled_on_validation_and_applied_elsewhere(cohort):
    """An over-confident histology head: the temperature fitted on validation lowers the
    external split's ECE; AUC is unchanged; the threshold is Youden on calibrated values."""
    from scipy.special import expit, logit

    from mmdls_dist.metrics.calibration import binary_logits, fit_temperature, scaled_binary
    from mmdls_dist.metrics.classification import youden_threshold

    rng = np.random.default_rng(5)
    z = rng.normal(0, 1.5, len(cohort))
    cohort = cohort.assign(
        histology=(rng.random(len(cohort)) < expit(z)).astype(int),
        histology_prob=expit(3.0 * z),
    )
    train, val = cohort[cohort.split == "train"], cohort[cohort.split == "val"]
    ref = fit_reference(train, val, HORIZONS)
    t = ref.temperature["histology"]
    assert t == pytest.approx(fit_temperature(binary_logits(val.histology_prob), val.histology))
    assert 2.0 < t < 4.5
    calibrated_val = scaled_binary(val.histology_prob, t)
    assert ref.histology_threshold == pytest.approx(youden_threshold(calibrated_val, val.histology))
    external = ref.calibrate(cohort[cohort.split == "external"])
    np.testing.assert_allclose(logit(external.histology_prob), 3.0 * z[-150:] / t, rtol=1e-5)
    m = group_metrics(external, ref, 0, 0)["histology"]
    assert m["ece"] < m["ece_uncalibrated"] / 1.5
    raw = group_metrics(cohort[cohort.split == "external"], ref, 0, 0)["histology"]
    assert m["auc"] == pytest.approx(raw["auc"], abs=1e-12)


def test_the_survival_block_checks_calibration_per_decile(cohort):
    ref = fit_reference(cohort[cohort.split == "train"], None, HORIZONS)
    block = group_metrics(cohort[cohort.split == "train"], ref, 0, 0)["os"]["calibration"]
    assert set(block) == {"12", "24", "36"}
    # Fitted on these patients, the Breslow baseline is calibrated in the large.
    assert all(block[h]["ici"] < 0.08 for h in block)
    shifted = group_metrics(cohort[cohort.split == "external"], ref, 0, 0)["os"]["calibration"]
    assert len(shifted["24"]["groups"]) == 10


def test_overspread_hazards_get_a_calibration_slope_on_validation():
    """A network whose log-hazards are 3x the true ones: the slope fitted on validation is
    about 1/3 (lifelines' one-covariate Cox), the calibrated log-hazards are the true scale,
    the C-index is unchanged, and the external survival probabilities are closer to
    Kaplan-Meier per decile than with the training Breslow baseline of the raw hazards."""
    from mmdls_dist.metrics.calibration import survival_calibration
    from mmdls_dist.metrics.survival import BreslowBaseline

    rng = np.random.default_rng(11)

    def spread(n, split):
        part = frame(rng, n, split)
        for e in ("dfs", "os"):
            eta = rng.normal(size=n)
            t = rng.exponential(20.0 * np.exp(-eta))
            c = rng.uniform(6, 72, n)
            part[f"{e}_risk"] = 3.0 * eta
            part[f"{e}_time"], part[f"{e}_event"] = np.minimum(t, c), t <= c
        return part

    train, val, ext = spread(800, "train"), spread(800, "val"), spread(800, "external")
    ref = fit_reference(train, val, HORIZONS)
    assert ref.slope["os"] == pytest.approx(1 / 3, abs=0.04)
    assert ref.slope["dfs"] == pytest.approx(1 / 3, abs=0.04)
    out = ref.calibrate(ext)
    np.testing.assert_allclose(out["os_risk"], ref.slope["os"] * ext["os_risk"])
    np.testing.assert_allclose(out["os_risk_uncalibrated"], ext["os_risk"])
    assert ref.calibrate(out)["os_risk"].equals(out["os_risk"])  # calibrated once only
    m = evaluate_frame(ext, ref, ["external"], EvalConfig(bootstrap=0))["external"]["all"]["os"]
    assert m["harrell_c"] == pytest.approx(harrell_c(ext.os_risk, ext.os_time, ext.os_event))
    raw = BreslowBaseline.fit(train.os_risk, train.os_time, train.os_event)
    before = survival_calibration(
        raw.survival_at(ext.os_risk, HORIZONS), ext.os_time, ext.os_event, HORIZONS
    )
    for h in ("12", "24", "36"):
        assert m["calibration"][h]["ici"] < before[h]["ici"] / 2
    # The stored reference keeps the slope; one written before slopes existed applies none.
    from mmdls_dist.evaluation.reference import Reference

    assert Reference.from_dict(ref.to_dict()).slope == ref.slope
    old = {k: v for k, v in ref.to_dict().items() if k != "slope"}
    assert Reference.from_dict(old).slope == {"dfs": 1.0, "os": 1.0}


def test_the_ct_only_read_is_calibrated_and_scored_by_its_own_reference():
    """A training cohort read twice: on the contours (log-hazards on the true scale) and
    CT-only (3x over-spread). The CT-only read gets its own reference with a slope of about
    1/3, the contour read keeps about 1; a mixed frame is calibrated and scored row by row
    by the reference of its read (slopes, Breslow baselines, cut-points), and the stored
    reference keeps both."""
    from mmdls_dist.evaluation.inference import CONTOUR_READ
    from mmdls_dist.evaluation.reference import Reference, fit_on_training_frame

    rng = np.random.default_rng(5)

    def read(n, split, spread, contour):
        part = frame(rng, n, split)
        for e in ("dfs", "os"):
            eta = rng.normal(size=n)
            t = rng.exponential(20.0 * np.exp(-eta))
            c = rng.uniform(6, 72, n)
            part[f"{e}_risk"] = spread * eta
            part[f"{e}_time"], part[f"{e}_event"] = np.minimum(t, c), t <= c
        return part.assign(**{CONTOUR_READ: contour})

    own = pd.concat(
        [read(600, "train", 1.0, True), read(600, "val", 1.0, True)]
        + [read(600, "train", 3.0, False), read(600, "val", 3.0, False)],
        ignore_index=True,
    )
    ref = fit_on_training_frame(own, HORIZONS)
    assert ref.slope["os"] == pytest.approx(1.0, abs=0.12)
    assert ref.ct_only is not None and ref.ct_only.ct_only is None
    assert ref.ct_only.slope["os"] == pytest.approx(1 / 3, abs=0.04)
    assert "CT-only read" in ref.origin

    ext = pd.concat([read(50, "external", 1.0, True), read(50, "external", 3.0, False)])
    ext = ext.reset_index(drop=True)
    out = ref.calibrate(ext)
    ct = ~ext[CONTOUR_READ].to_numpy(bool)
    expected = np.where(ct, ref.ct_only.slope["os"], ref.slope["os"]) * ext["os_risk"]
    np.testing.assert_allclose(out["os_risk"], expected)
    assert list(out["patient_id"]) == list(ext["patient_id"])  # rows stay in their order
    surv = ref.survival_at(out, "os", HORIZONS)
    np.testing.assert_allclose(
        surv[ct], ref.ct_only.baselines["os"].survival_at(out["os_risk"][ct], HORIZONS)
    )
    np.testing.assert_allclose(
        surv[~ct], ref.baselines["os"].survival_at(out["os_risk"][~ct], HORIZONS)
    )
    assert not np.allclose(ref.ct_only.cutpoints["os"], ref.cutpoints["os"])  # other patients
    groups = ref.risk_groups(out, "os")
    one_read = ref.risk_groups(out.assign(**{CONTOUR_READ: True}), "os")
    assert (groups[~ct] == one_read[~ct]).all()
    assert (
        groups[ct] == np.searchsorted(ref.ct_only.cutpoints["os"], out["os_risk"][ct], side="right")
    ).all()

    again = Reference.from_dict(ref.to_dict())
    np.testing.assert_allclose(again.calibrate(ext)["os_risk"], out["os_risk"])
    single = fit_on_training_frame(own[own[CONTOUR_READ]], HORIZONS)
    assert single.ct_only is None  # one read, one reference
    np.testing.assert_allclose(
        single.calibrate(ext)["os_risk"], single.slope["os"] * ext["os_risk"]
    )


def test_no_slope_without_enough_validation_events(cohort):
    val = cohort[cohort.split == "val"].head(30).assign(os_event=False)
    val.loc[val.index[:4], "os_event"] = True  # 4 events: too few for a slope
    ref = fit_reference(cohort[cohort.split == "train"], val, HORIZONS)
    assert ref.slope["os"] == 1.0 and ref.slope["dfs"] != 1.0
    assert any(n.startswith("OS: no calibration slope (under 10") for n in ref.notes)
    train = cohort[cohort.split == "train"]
    from mmdls_dist.metrics.survival import BreslowBaseline

    expected = BreslowBaseline.fit(train.os_risk, train.os_time, train.os_event)
    np.testing.assert_allclose(ref.baselines["os"].survival, expected.survival)


def test_a_fold_ensemble_applies_each_members_slope_and_its_baselines_are_out_of_fold():
    """Two members, each with its own fold: the ensemble's log-hazard is the mean of the
    members' slope-scaled ones, and its Breslow baselines are fitted on the out-of-fold
    (validation) predictions, not on the members' training patients."""
    from mmdls_dist.evaluation.ensemble import combine_members
    from mmdls_dist.evaluation.reference import fit_on_training_frame
    from mmdls_dist.metrics.survival import BreslowBaseline

    rng = np.random.default_rng(21)
    ext = frame(rng, 100, "external", centers=("EXT",))
    members = []
    for k in range(2):
        own = pd.concat([frame(rng, 300, "train"), frame(rng, 150, "val")], ignore_index=True)
        own["patient_id"] = [f"p{(i + 150 * k) % 450:04d}" for i in range(len(own))]
        own[["dfs_risk", "os_risk"]] *= 2.0 + k  # over-spread, differently per member
        held = ext.assign(os_risk=ext.os_risk * (2.0 + k), dfs_risk=ext.dfs_risk * (2.0 + k))
        ref = fit_on_training_frame(own, HORIZONS)
        assert ref.slope["os"] < 0.8
        members.append((ref.calibrate(held), ref.calibrate(own), ref))
    ensemble, ens_ref = combine_members(members, HORIZONS)
    expected = np.mean([m[2].slope["os"] * (2.0 + k) for k, m in enumerate(members)])
    got = ensemble.set_index("patient_id").loc[ext.patient_id, "os_risk"].to_numpy()
    np.testing.assert_allclose(got, expected * ext.os_risk.to_numpy())
    oof = pd.concat([own[own.split == "val"] for _, own, _ in members])
    want = BreslowBaseline.fit(oof.os_risk, oof.os_time, oof.os_event)
    np.testing.assert_allclose(ens_ref.baselines["os"].survival, want.survival)
    np.testing.assert_allclose(ens_ref.baselines["os"].times, want.times)


def with_inputs(
    rng, part: pd.DataFrame, weight: float = 0.8, missed: str = "input_age", lesion: bool = False
) -> pd.DataFrame:
    """A frame whose true log-hazard is the network's risk plus `weight` x a column the
    network did not use (`missed`), as inference records carry the tabular inputs (and with
    `lesion` the lesion descriptors)."""
    from mmdls_dist.evaluation.stacking import INPUTS, LESION

    part = part.copy()
    for column in INPUTS + (LESION if lesion else ()):
        part[column] = rng.normal(size=len(part))
    for e in ("dfs", "os"):
        eta = part[f"{e}_risk"] + weight * part[missed]
        t = rng.exponential(25.0 * np.exp(-eta))
        c = rng.uniform(6, 72, len(part))
        part[f"{e}_time"], part[f"{e}_event"] = np.minimum(t, c), t <= c
    return part


def test_the_survival_stack_adds_the_tabular_signal_the_network_missed():
    """A network whose log-hazard misses a tabular input's effect: the stack (a penalised
    Cox on train + val) weighs that input, the reported log-hazard is its linear predictor,
    the external C-index rises to about the true one, cut-points and baselines are on the
    stacked values, and the reference round-trips through JSON (old ones: no stack)."""
    from mmdls_dist.evaluation.reference import Reference
    from mmdls_dist.evaluation.stacking import INPUTS, NETWORK, apply_stack

    rng = np.random.default_rng(31)
    train, val, ext = (
        with_inputs(rng, frame(rng, n, s))
        for n, s in ((500, "train"), (200, "val"), (400, "external"))
    )
    ref = fit_reference(train, val, HORIZONS)
    for e in ("dfs", "os"):
        coefs = ref.stack[e]
        assert set(coefs) == {NETWORK, *INPUTS}
        # About the truth on the slope-scaled scale (the penalty shrinks a little).
        assert coefs[NETWORK] * ref.slope[e] == pytest.approx(1.0, abs=0.2)
        assert coefs["input_age"] == pytest.approx(0.8, abs=0.2)
        assert max(abs(coefs[c]) for c in INPUTS if c != "input_age") < 0.2
    out = ref.calibrate(ext)
    expected = apply_stack(ref.stack["os"], ref.slope["os"] * ext["os_risk"], ext)
    np.testing.assert_allclose(out["os_risk"], expected)
    np.testing.assert_allclose(out["os_risk_uncalibrated"], ext["os_risk"])
    assert ref.calibrate(out)["os_risk"].equals(out["os_risk"])
    truth = ext["os_risk"] + 0.8 * ext["input_age"]
    c_true = harrell_c(truth, ext.os_time, ext.os_event)
    c_network = harrell_c(ext.os_risk, ext.os_time, ext.os_event)
    c_stack = harrell_c(out.os_risk, ext.os_time, ext.os_event)
    assert c_stack > c_network + 0.03 and c_stack == pytest.approx(c_true, abs=0.01)
    on_train = ref.calibrate(train)
    assert ref.cutpoints["os"] == pytest.approx(risk_cutpoints(on_train["os_risk"]))
    from mmdls_dist.metrics.survival import BreslowBaseline

    on_val = ref.calibrate(val)
    want = BreslowBaseline.fit(on_val.os_risk, on_val.os_time, on_val.os_event)
    np.testing.assert_allclose(ref.baselines["os"].survival, want.survival)
    assert "survival stack" in ref.origin
    again = Reference.from_dict(ref.to_dict())
    np.testing.assert_allclose(again.calibrate(ext)["os_risk"], out["os_risk"])
    old = {k: v for k, v in ref.to_dict().items() if k != "stack"}
    assert Reference.from_dict(old).stack == {"dfs": {}, "os": {}}


def test_no_stack_without_enough_events_or_without_the_inputs(cohort):
    """One DFS event too few over train + val (5 per covariate: the 13 inputs and the
    network's log-hazard): no DFS stack, a note, the slope-scaled log-hazard (OS, with its
    events, is stacked); frames without the inputs: no stack; a reference with a stack
    refuses predictions that lack its inputs."""
    from mmdls_dist.evaluation.stacking import INPUTS, min_events

    MIN_EVENTS = min_events(INPUTS)  # noqa: N806
    assert MIN_EVENTS == 70
    rng = np.random.default_rng(32)
    train = with_inputs(rng, frame(rng, 400, "train"))
    val = with_inputs(rng, frame(rng, 200, "val"))
    both = pd.concat([train, val])
    assert both.dfs_event.sum() > MIN_EVENTS
    kept = set(both.patient_id[both.dfs_event].sample(MIN_EVENTS - 1, random_state=0))
    for part in (train, val):
        part["dfs_event"] &= part.patient_id.isin(kept)
    assert val.dfs_event.sum() >= 10  # enough for the slope
    ref = fit_reference(train, val, HORIZONS)
    assert ref.stack["dfs"] == {} and ref.stack["os"]
    assert any(n.startswith("DFS: no survival stack") for n in ref.notes)
    out = ref.calibrate(val)
    np.testing.assert_allclose(out["dfs_risk"], ref.slope["dfs"] * val["dfs_risk"])
    plain = fit_reference(cohort[cohort.split == "train"], cohort[cohort.split == "val"], HORIZONS)
    assert plain.stack == {"dfs": {}, "os": {}} and "no survival stack" in plain.origin
    with pytest.raises(ValueError, match="input_age"):
        ref.calibrate(cohort[cohort.split == "external"])


def test_the_stack_reads_the_lesion_descriptors_where_the_model_measures_them():
    """Frames carrying the lesion descriptors (a model with model.lesion_descriptors): the
    stack weighs a descriptor the network's log-hazard missed, needs 5 events per covariate
    of the larger set, and names the descriptors in the origin line; where one frame lacks
    them, the stack reads the tabular inputs alone."""
    from mmdls_dist.evaluation.stacking import INPUTS, LESION, NETWORK, covariates, min_events

    rng = np.random.default_rng(33)
    train, val, ext = (
        with_inputs(rng, frame(rng, n, s), missed="lesion_irregularity", lesion=True)
        for n, s in ((500, "train"), (200, "val"), (400, "external"))
    )
    assert min_events(covariates(train, val)) == 5 * (len(INPUTS) + len(LESION) + 1) == 110
    ref = fit_reference(train, val, HORIZONS)
    for e in ("dfs", "os"):
        coefs = ref.stack[e]
        assert set(coefs) == {NETWORK, *INPUTS, *LESION}
        assert coefs["lesion_irregularity"] == pytest.approx(0.8, abs=0.2)
        assert max(abs(coefs[c]) for c in (*INPUTS, *LESION) if c != "lesion_irregularity") < 0.2
    assert "lesion descriptors" in ref.origin
    out = ref.calibrate(ext)
    truth = ext["os_risk"] + 0.8 * ext["lesion_irregularity"]
    c_stack = harrell_c(out.os_risk, ext.os_time, ext.os_event)
    assert c_stack > harrell_c(ext.os_risk, ext.os_time, ext.os_event) + 0.03
    assert c_stack == pytest.approx(harrell_c(truth, ext.os_time, ext.os_event), abs=0.01)
    tables_only = fit_reference(train, val.drop(columns=list(LESION)), HORIZONS)
    assert set(tables_only.stack["os"]) == {NETWORK, *INPUTS}
    assert "lesion descriptors" not in tables_only.origin


def test_a_shifted_case_mix_is_adapted_without_labels_and_an_unshifted_one_is_left():
    """Histology probabilities calibrated at the training cohort's LUSC fraction (0.55), an
    external center at 0.25: the case-mix block estimates its fraction without its labels,
    finds the shift and lowers the ECE; validation, at the training fraction, is left as
    it is. A reference written before the fraction was recorded reports no block."""
    from scipy.special import expit

    from mmdls_dist.evaluation.reference import Reference

    rng = np.random.default_rng(11)
    base = pd.concat(
        [frame(rng, 800, "train"), frame(rng, 400, "val"), frame(rng, 500, "external")],
        ignore_index=True,
    )
    fraction = np.where(base.split == "external", 0.25, 0.55)
    y = (rng.random(len(base)) < fraction).astype(int)
    x = rng.normal(2 * y - 1, 1.0)  # x | y ~ N(+-1, 1): log-likelihood ratio 2x
    base = base.assign(histology=y, histology_prob=expit(2 * x + np.log(0.55 / 0.45)))
    train, val = base[base.split == "train"], base[base.split == "val"]
    ref = fit_reference(train, val, HORIZONS)
    assert ref.histology_prevalence == pytest.approx(np.mean(y[base.split != "external"]))
    external = ref.calibrate(base[base.split == "external"])
    hist = group_metrics(external, ref, 0, 0)["histology"]
    mix = hist["case_mix"]
    assert mix["adapted"] and mix["p_value"] < 1e-6
    assert mix["estimated_prevalence"] == pytest.approx(0.25, abs=0.05)
    assert mix["mean_prob"] == pytest.approx(mix["estimated_prevalence"], abs=0.01)
    assert mix["ece"] < hist["ece"] / 2
    own = group_metrics(ref.calibrate(val), ref, 0, 0)["histology"]
    assert not own["case_mix"]["adapted"] and own["case_mix"]["ece"] == own["ece"]
    assert Reference.from_dict(ref.to_dict()).histology_prevalence == ref.histology_prevalence
    legacy = {k: v for k, v in ref.to_dict().items() if k != "histology_prevalence"}
    old = Reference.from_dict(legacy)
    assert old.histology_prevalence is None
    assert "case_mix" not in group_metrics(external, old, 0, 0)["histology"]
