"""Evaluation: predictions table -> every number of the report, per split and per center.

Flow: predictions -> the `Reference` fixed on the training cohort (reference.py) ->
`group_metrics` for each split and each center of it, with patient-level bootstrap CIs
for the headline metrics -> metrics.json, predictions-<label>.csv, reference-<label>.json
and report.html. Nothing here is fitted on the set being evaluated: that is what the
original research code got wrong (cut-points from the evaluated set, a min-max-scaled
risk as "Brier").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from mmdls_dist import storage
from mmdls_dist.config import EvalConfig
from mmdls_dist.data.schema import ENDPOINTS, SPLITS, STAGES
from mmdls_dist.evaluation import stacking
from mmdls_dist.evaluation.ensemble import ensemble_members, ensemble_predictions
from mmdls_dist.evaluation.inference import (
    checkpoint_identity,
    model_manifest,
    overlay_batch,
    resolve_checkpoint,
    run_inference,
    stage_probs,
)
from mmdls_dist.evaluation.reference import (
    Reference,
    checkpoint_name,
    endpoint_arrays,
    load_reference,
    reference_for,
)
from mmdls_dist.metrics.calibration import adapt_binary_prior, survival_calibration
from mmdls_dist.metrics.classification import (
    ECE_BINS,
    binary_auc,
    binary_metrics,
    macro_ovr_auc,
    multiclass_metrics,
    reliability,
)
from mmdls_dist.metrics.segmentation import mean_dice
from mmdls_dist.metrics.survival import (
    brier_scores,
    cumulative_dynamic_auc,
    harrell_c,
    integrated_brier,
    kaplan_meier_groups,
    uno_c,
)
from mmdls_dist.train import checkpoint

log = logging.getLogger(__name__)

AT_RISK_TIMES = (0.0, 12.0, 24.0, 36.0, 48.0, 60.0)  # months, under the KM curves


# --- metrics of one group of patients ------------------------------------------------------


def support_notes(endpoint: str, censoring, horizons, time, event) -> list[str]:
    """Why IPCW metrics are blank: a horizon at or beyond the end of the training split's
    censoring support (nobody there was still followed; G = 0), or an event before Uno's
    truncation time out there."""
    end = censoring.support_end
    late = [f"{h:g}" for h in horizons if h >= end]
    notes = []
    if late:
        notes.append(
            f"{endpoint.upper()}: time-dependent AUC and Brier at {', '.join(late)} months "
            f"are not defined: the training split's follow-up ends at {end:g} months"
        )
    if np.any(event & (time >= end) & (time < horizons[-1])):
        notes.append(
            f"{endpoint.upper()}: Uno's C (truncated at {horizons[-1]:g} months) is not "
            f"defined: events after the training split's last follow-up ({end:g} months)"
        )
    return notes


def survival_block(frame: pd.DataFrame, endpoint: str, ref: Reference) -> dict:
    """Every survival metric of one group of patients; notes say why one is blank."""
    risk, time, event = endpoint_arrays(frame, endpoint)
    out: dict = {"n": int(len(risk)), "events": int(event.sum())}
    if len(risk) < 2 or not event.any():
        return out | {"harrell_c": math.nan, "uno_c": math.nan, "notes": []}
    known = frame[frame[f"{endpoint}_known"].to_numpy(bool)]
    horizons = np.asarray(ref.horizons)
    censoring = ref.censoring[endpoint]
    surv = ref.survival_at(known, endpoint, horizons)
    grid = np.arange(1.0, horizons[-1] + 1.0)
    grid = grid[grid < time.max()]
    groups = ref.risk_groups(known, endpoint)
    return out | {
        "harrell_c": harrell_c(risk, time, event),
        "uno_c": uno_c(risk, time, event, censoring, tau=float(horizons[-1])),
        "uno_tau_months": float(horizons[-1]),
        "td_auc": _by_horizon(
            horizons, cumulative_dynamic_auc(risk, time, event, horizons, censoring)
        ),
        "brier": _by_horizon(horizons, brier_scores(surv, time, event, horizons, censoring)),
        "integrated_brier": (
            integrated_brier(ref.survival_at(known, endpoint, grid), time, event, grid, censoring)
            if len(grid) >= 2
            else math.nan
        ),
        "ibs_grid_months": [float(grid[0]), float(grid[-1])] if len(grid) >= 2 else None,
        "mean_predicted_survival": _by_horizon(horizons, surv.mean(axis=0)),
        "calibration": survival_calibration(surv, time, event, horizons),
        "risk_groups": kaplan_meier_groups(time, event, groups, AT_RISK_TIMES),
        "notes": support_notes(endpoint, censoring, horizons, time, event),
    }


def _by_horizon(horizons, values) -> dict[str, float]:
    return {f"{h:g}": float(v) for h, v in zip(horizons, values, strict=True)}


def segmentation_block(frame: pd.DataFrame) -> dict:
    """Mean Dice per structure over patients; empty-vs-empty patients (NaN) are excluded."""
    out = {}
    for key in ("dice_lung", "dice_lesion"):
        if key in frame:
            out[key], out[f"{key}_n"] = mean_dice(frame[key].to_numpy(float))
    return out


def group_metrics(frame: pd.DataFrame, ref: Reference, n_boot: int, seed: int) -> dict:
    """Every metric of the report for one set of patients."""
    histology = binary_metrics(
        frame["histology_prob"].to_numpy(), frame["histology"].to_numpy(), ref.histology_threshold
    )
    if "histology_prob_uncalibrated" in frame and "ece" in histology:
        raw = frame["histology_prob_uncalibrated"].to_numpy()
        keep = frame["histology"].to_numpy() >= 0
        histology["ece_uncalibrated"] = reliability(raw[keep], frame["histology"].to_numpy()[keep])[
            "ece"
        ]
    if ref.histology_prevalence is not None and "ece" in histology:
        histology["case_mix"] = case_mix_block(frame, ref.histology_prevalence)
    out = {
        "n_patients": int(len(frame)),
        "histology": histology,
        "stage": multiclass_metrics(stage_probs(frame), frame["stage"].to_numpy(), STAGES),
        **{e: survival_block(frame, e, ref) for e in ENDPOINTS},
        "segmentation": segmentation_block(frame),
    }
    out["ci95"] = bootstrap_ci(frame, ref, n_boot, seed) if n_boot > 0 else {}
    return out


SHIFT_ALPHA = 0.05  # the level of the case-mix shift test


def case_mix_block(frame: pd.DataFrame, training: float) -> dict:
    """The histology probabilities adapted to this set's own case mix, without its labels
    (metrics/calibration.adapt_prior: EM over every patient's calibrated probability), where
    the likelihood-ratio test finds its LUSC fraction shifted from the training cohort's at
    p < SHIFT_ALPHA; elsewhere they stay as they are (on a small set the estimate is mostly
    noise). -> the estimated LUSC fraction, the test's p-value, whether it adapted, and the
    ECE and mean P(LUSC) of the probabilities it keeps."""
    prob = frame["histology_prob"].to_numpy(np.float64)
    estimated, adapted, p = adapt_binary_prior(prob, training)
    shifted = p < SHIFT_ALPHA
    kept = adapted if shifted else prob
    y = frame["histology"].to_numpy()
    keep = y >= 0
    return {
        "training_prevalence": training,
        "estimated_prevalence": estimated,
        "p_value": p,
        "adapted": bool(shifted),
        "mean_prob": float(np.mean(kept[keep])),
        "ece": reliability(kept[keep], y[keep])["ece"],
    }


# --- bootstrap ------------------------------------------------------------------------------


def headline(frame: pd.DataFrame, ref: Reference) -> dict[str, float]:
    """The metrics that get confidence intervals (cheap enough to recompute per resample)."""
    out = {}
    y, p = frame["histology"].to_numpy(), frame["histology_prob"].to_numpy()
    keep = y >= 0
    if len(np.unique(y[keep])) == 2:
        out["histology.auc"] = binary_auc(p, y)
        out["histology.ap"] = average_precision_score(y[keep], p[keep])
    out["stage.macro_auc"] = macro_ovr_auc(stage_probs(frame), frame["stage"].to_numpy())
    for endpoint in ENDPOINTS:
        risk, time, event = endpoint_arrays(frame, endpoint)
        if len(risk) < 2 or not event.any():
            continue
        out[f"{endpoint}.harrell_c"] = harrell_c(risk, time, event)
        out[f"{endpoint}.uno_c"] = uno_c(
            risk, time, event, ref.censoring[endpoint], tau=ref.horizons[-1]
        )
        aucs = cumulative_dynamic_auc(risk, time, event, ref.horizons, ref.censoring[endpoint])
        for h, v in zip(ref.horizons, aucs, strict=True):
            out[f"{endpoint}.td_auc.{h:g}"] = v
    return out


def bootstrap_ci(frame: pd.DataFrame, ref: Reference, n_boot: int, seed: int) -> dict:
    """Percentile 95% CIs from `n_boot` patient-level resamples (with replacement)."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, len(frame), len(frame))
        for key, value in headline(frame.iloc[idx], ref).items():
            samples.setdefault(key, []).append(value)
    out = {}
    for key, values in samples.items():
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if len(values) >= max(10, n_boot // 2):
            lo, hi = np.percentile(values, [2.5, 97.5])
            out[key] = [float(lo), float(hi)]
    return out


# --- the whole evaluation -------------------------------------------------------------------


def evaluate_frame(frame: pd.DataFrame, ref: Reference, splits: list[str], cfg: EvalConfig) -> dict:
    """Per split: all patients, then each center with at least cfg.min_center_patients;
    `frame` calibrated by `ref` first where it is not yet (group_metrics takes calibrated
    frames: the cut-points and baselines are on the calibrated log-hazards)."""
    frame = ref.calibrate(frame)
    out = {}
    for split in splits:
        part = frame[frame["split"] == split]
        if part.empty:
            continue
        centers = {}
        for center, sub in part.groupby("center"):
            if len(sub) >= cfg.min_center_patients and part["center"].nunique() > 1:
                centers[str(center)] = group_metrics(sub, ref, cfg.bootstrap, cfg.seed)
        all_patients = group_metrics(part, ref, cfg.bootstrap, cfg.seed)
        out[split] = {"all": all_patients, "centers": centers}
    return out


def labelled_models(specs: list[str]) -> dict[str, str]:
    """["full=runs/a", "runs/b"] -> {"full": "runs/a", "b": "runs/b"} (label = folder name)."""
    out = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or storage.is_url(label):
            label, path = Path(spec.rstrip("/")).name, spec
        if label in out:
            raise ValueError(f"two models are labelled {label!r}; name them as LABEL=PATH")
        out[label] = path
    return out


# --- the job: checkpoints + shards -> metrics.json, predictions, report.html ---------------


def _expand_ensembles(checkpoints: dict[str, str]) -> dict[str, str | list[str]]:
    """label -> checkpoint, or -> member checkpoints for a fold ensemble, followed by each
    member under "<label> fold<k>" (fold-wise metrics beside the ensemble's)."""
    out: dict[str, str | list[str]] = {}
    for label, path in checkpoints.items():
        members = ensemble_members(path)
        if members is None:
            out[label] = resolve_checkpoint(path)
            continue
        out[label] = members
        for k, ckpt in enumerate(members):
            out[f"{label} fold{k}"] = ckpt
    return out


def _config_hash(config: dict) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_provenance(ckpt: str | list[str], reference: dict) -> dict:
    """What produced a model's numbers: its checkpoint(s), epoch, config and data hashes,
    and where its reference was fitted."""
    members = ckpt if isinstance(ckpt, list) else [ckpt]
    rows = []
    for url in members:
        identity = checkpoint_identity(url)
        saved = storage.join(url, checkpoint.METRICS)
        epoch = storage.read_json(saved).get("epoch") if storage.exists(saved) else None
        rows.append(
            {
                "checkpoint": checkpoint_name(url),
                "epoch": None if epoch is None else int(epoch) + 1,
                "config_sha256": _config_hash(identity["config"]),
                "manifest_sha256": str(identity["manifest_hash"])[:16],
                "shards": identity["config"]["data"]["shards"],
            }
        )
    return {"members": rows, "reference": reference.get("origin", "")}


def software_versions() -> dict[str, str]:
    """Versions of what computed the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("mmdls-dist", "torch", "ray", "torchsurv", "lifelines", "scikit-learn", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_evaluation(
    checkpoints: dict[str, str],
    shards: str | None,
    out: str | Path,
    cfg: EvalConfig,
    mapper: Callable,
    splits: list[str] | None = None,
    reference_shards: str | None = None,
    reference: str | None = None,
) -> dict:
    """Evaluate one or more checkpoints (label -> checkpoint or run folder) on `shards`
    (None: the first model's training shards), inference through `mapper`
    (parallel.serial_mapper / ray_mapper); `splits` None = all in the shards.

    `reference`: a reference-<label>.json to score against instead of refitting it on the
    training split (one model only). Writes to `out`: metrics.json, predictions-<label>.csv,
    reference-<label>.json (what `mmdls predict` applies to new patients), report.html and
    figures/. Returns metrics."""
    # matplotlib is imported only when a report is drawn, not by the metrics alone.
    from mmdls_dist.evaluation.figures import overlay_samples
    from mmdls_dist.evaluation.report import slug, write_report

    models_in = _expand_ensembles(checkpoints)  # an ensemble is several models too
    if reference and len(models_in) > 1:
        raise ValueError("--reference fits one model; evaluate the models one at a time")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(models_in.values()))
    first = first[0] if isinstance(first, list) else first
    if shards is None:
        shards = checkpoint_identity(first)["config"]["data"]["shards"]
    available = [
        s for s in SPLITS if s in model_manifest(shards, checkpoint_identity(first))["splits"]
    ]
    splits = splits or available
    overlay_split = next((s for s in ("test", "val", "external") if s in splits), splits[0])
    results, models, overlays = {}, {}, {}
    for label, ckpt in models_in.items():
        log.info("%s: inference with %s on %s (%s)", label, ckpt, shards, ", ".join(splits))
        if isinstance(ckpt, list):  # a fold ensemble: held-out splits only
            held_out = [s for s in splits if s in ("test", "external")]
            if not held_out:
                raise ValueError(f"{label}: a fold ensemble is scored on test / external only")
            frame, ref = ensemble_predictions(
                ckpt, shards, held_out, cfg, mapper, reference_shards, folder=checkpoints[label]
            )
            results[label] = evaluate_frame(frame, ref, held_out, cfg)
            overlay_ckpt = ckpt[0]
        else:
            wanted = sorted(set(splits) | ({"train", "val"} & set(available)))
            frame = run_inference(ckpt, shards, wanted, cfg, mapper)
            ref = (
                load_reference(reference)
                if reference
                else reference_for(ckpt, frame, shards, reference_shards, cfg, mapper)
            )
            frame = ref.calibrate(frame)
            results[label] = evaluate_frame(frame, ref, splits, cfg)
            overlay_ckpt = ckpt
        models[label] = {"checkpoint": ckpt, "reference": ref.to_dict(), "splits": results[label]}
        written = frame.drop(columns=[c for c in stacking.COLUMNS if c in frame])
        written.to_csv(out / f"predictions-{slug(label)}.csv", index=False)
        storage.write_json(
            str(out / f"reference-{slug(label)}.json"), {"checkpoint": ckpt, **ref.to_dict()}
        )
        batch, output = overlay_batch(overlay_ckpt, shards, overlay_split)
        overlays[label] = overlay_samples(batch, output) if output.lung_logits is not None else []
    horizons = ref.horizons  # eval.horizons, or the given reference's
    metrics = {
        "settings": {
            "shards": shards,
            "splits": splits,
            "bootstrap_resamples": cfg.bootstrap,
            "bootstrap_seed": cfg.seed,
            "ece_bins": ECE_BINS,
            "horizons_months": list(horizons),
            "min_center_patients": cfg.min_center_patients,
            "reference": "censoring KM and risk tertiles from the training split; temperature "
            "scaling of histology and stage, the histology threshold (Youden, on the "
            "calibrated probabilities), the calibration slope of each log-hazard and the "
            "Breslow baselines (on the scaled log-hazards) from the validation split; the "
            "histology case-mix column adapts each set's probabilities to its own LUSC "
            "fraction without its labels (EM, Saerens et al. 2002) where a likelihood-ratio "
            f"test finds it shifted from the training cohort's (p < {SHIFT_ALPHA:g}), the "
            "headline ECE stays the temperature-scaled one",
        },
        "models": models,
        "provenance": {
            "models": {
                label: model_provenance(models_in[label], m["reference"])
                for label, m in models.items()
            },
            "software": software_versions(),
        },
    }
    storage.write_json(str(out / "metrics.json"), metrics)
    temperatures = "; ".join(
        f"{label}: T histology {m['reference']['temperature']['histology']:.2f}, "
        f"stage {m['reference']['temperature']['stage']:.2f}, slope DFS "
        f"{m['reference']['slope']['dfs']:.2f}, OS {m['reference']['slope']['os']:.2f}"
        for label, m in models.items()
    )
    summary = (
        f"{len(checkpoints)} model(s) on {shards}; splits {', '.join(splits)}; 95% CIs from "
        f"{cfg.bootstrap} patient-level bootstrap resamples; horizons "
        f"{', '.join(f'{h:g}' for h in horizons)} months. Histology and stage probabilities "
        "are temperature-scaled and the DFS / OS log-hazards multiplied by their calibration "
        f"slope, both fitted on the validation split ({temperatures}); 'ECE raw' is the "
        "network's own."
    )
    meta = {
        "summary": summary,
        "overlay_split": overlay_split,
        "horizons": horizons,
        "provenance": metrics["provenance"],
        "methods": metrics["settings"]["reference"],
    }
    write_report(out, results, meta, overlays)
    return metrics
