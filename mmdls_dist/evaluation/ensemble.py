"""Fold ensembles: the K cross-validation runs of `mmdls train --folds K` as one model.

An ensemble is a folder holding ensemble.json ({"members": [run folder names, relative to
the ensemble folder's parent]}); `mmdls evaluate` and `mmdls predict` accept it wherever
they accept a run folder. Its prediction for a patient is the mean of its members' log
hazards and of their probabilities, each member calibrated first with its own fold's
validation temperatures and calibration slopes and its own survival stack.

The ensemble's reference (reference.py) is fixed on the cross-validated cohort: censoring
and risk cut-points on the ensemble's predictions for every fold patient (as a single
model's are on its training split), the histology threshold and the Breslow baselines on
the out-of-fold predictions (each patient scored by the member that validated on it, as a
single model's are on its validation split); for a model that reads given contours, the
same again for the CT-only read (reference.py).
`mmdls train --folds K` fits it once when the folds end and stores it in the ensemble
folder (reference.json, as each member's own in its run folder), so evaluation and
prediction run the members only on the patients asked about.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from mmdls_dist import storage
from mmdls_dist.config import EvalConfig
from mmdls_dist.data.schema import ENDPOINTS, STAGES
from mmdls_dist.evaluation.inference import resolve_checkpoint, run_inference
from mmdls_dist.evaluation.reference import (
    Reference,
    endpoint_arrays,
    fit_on_training_frame,
    fit_reference,
    folder_of,
    own_cohort,
    reference_for,
    split_reads,
    store_reference,
    stored_reference,
    training_frame,
)
from mmdls_dist.metrics.classification import youden_threshold
from mmdls_dist.metrics.survival import BreslowBaseline

ENSEMBLE = "ensemble.json"
# Per-patient values averaged over members; everything else (ids, labels) is the first's.
MEAN_COLUMNS = (
    "histology_prob",
    "histology_prob_uncalibrated",
    *(f"stage_prob_{s}" for s in STAGES),
    *(f"stage_prob_{s}_uncalibrated" for s in STAGES),
    "dfs_risk",
    "dfs_risk_uncalibrated",
    "os_risk",
    "os_risk_uncalibrated",
    "dice_lung",
    "dice_lesion",
)


def write_ensemble(folder: str, members: list[str]) -> str:
    """ensemble.json in `folder` naming member run folders (siblings of `folder`)."""
    url = storage.join(folder, ENSEMBLE)
    storage.write_json(url, {"members": members})
    return url


def ensemble_members(path: str) -> list[str] | None:
    """The members' checkpoints (each run's best) if `path` is an ensemble, else None."""
    url = storage.join(path, ENSEMBLE)
    if not storage.exists(url):
        return None
    parent = folder_of(path)
    names = storage.read_json(url)["members"]
    if not names:
        raise ValueError(f"{url}: an ensemble without members")
    return [resolve_checkpoint(storage.join(parent, name)) for name in names]


def mean_frame(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Member prediction frames (same patients) -> the ensemble's: mean per patient."""
    base = frames[0].set_index("patient_id")
    for frame in frames[1:]:
        if set(frame["patient_id"]) != set(base.index):
            raise ValueError("ensemble members scored different patients")
    columns = [c for c in MEAN_COLUMNS if c in base]
    stacked = pd.concat([f.set_index("patient_id")[columns] for f in frames])
    out = base.copy()
    out[columns] = stacked.groupby(level=0).mean().loc[base.index]
    return out.reset_index()


def member_predictions(
    ckpt: str,
    shards: str,
    splits: list[str],
    cfg: EvalConfig,
    mapper: Callable,
    reference_shards: str | None = None,
    **extra,
) -> tuple[pd.DataFrame, pd.DataFrame, Reference]:
    """One member on `splits` of `shards` -> (its calibrated predictions there, its
    calibrated predictions on its own training cohort (train and val of its fold), its own
    reference). extra: inference Part options."""
    frame = run_inference(ckpt, shards, splits, cfg, mapper, **extra)
    own = training_frame(ckpt, frame, shards, reference_shards, cfg, mapper)
    ref = fit_on_training_frame(own, cfg.horizons)
    return ref.calibrate(frame), ref.calibrate(own), ref


def combine_members(
    members: list[tuple[pd.DataFrame, pd.DataFrame, Reference]], horizons: tuple[float, ...]
) -> tuple[pd.DataFrame, Reference]:
    """member_predictions of every member -> (the ensemble's predictions, its reference;
    the predictions are None where the members came without held-out frames). Where the
    members' training frames hold both reads, the CT-only read gets its own (ct_only)."""
    reads = [split_reads(own) for _, own, _ in members]
    if len({len(r) for r in reads}) != 1:
        raise ValueError("ensemble members were read differently (contours in some only)")
    ref = _fold_reference([r[0] for r in reads], horizons)
    if len(reads[0]) == 2:
        ref.ct_only = _fold_reference([r[1] for r in reads], horizons)
        ref.origin += "; the same for the CT-only read, on its own predictions"
    held_out = [frame for frame, _, _ in members if frame is not None]
    return (mean_frame(held_out) if held_out else None), ref


def _fold_reference(owns: list[pd.DataFrame], horizons: tuple[float, ...]) -> Reference:
    """The ensemble's reference from its members' (calibrated) training frames of one read."""
    oof = pd.concat([own[own["split"] == "val"] for own in owns], ignore_index=True)
    cohort = [own.assign(split="train") for own in owns]
    ref = fit_reference(mean_frame(cohort), None, horizons)
    ref.histology_threshold = youden_threshold(oof["histology_prob"], oof["histology"])
    for endpoint in ENDPOINTS:  # on held-out predictions, as a single model's on validation
        ref.baselines[endpoint] = BreslowBaseline.fit(*endpoint_arrays(oof, endpoint))
    ref.notes = [
        f"fold ensemble of {len(owns)} members: each member calibrated on its own "
        "validation fold; histology threshold and Breslow baselines on the out-of-fold "
        "predictions"
    ]
    ref.origin = (
        f"fold ensemble of {len(owns)}: cut-points and censoring on the ensemble's "
        f"predictions for {len(oof)} cross-validated patients; the histology threshold and "
        "the Breslow baselines on their out-of-fold predictions; each member's temperatures "
        "and calibration slopes on its own validation fold, its survival stack on its own "
        "training and validation folds"
    )
    return ref


def ensemble_predictions(
    members: list[str],
    shards: str,
    splits: list[str],
    cfg: EvalConfig,
    mapper: Callable,
    reference_shards: str | None = None,
    folder: str | None = None,
    **extra,
) -> tuple[pd.DataFrame, Reference]:
    """-> (the ensemble's predictions for `splits` of `shards`, its reference).

    With the reference stored in the ensemble `folder` (and no reference_shards), each
    member runs on `splits` only, calibrated by its own stored reference. Otherwise each
    member is run once on `splits` and once on its training cohort (train and val of its
    fold; not again where `shards` is that cohort and `splits` hold them): its own
    reference calibrates both, and the ensemble's is fixed on the cross-validated cohort
    (module docstring)."""
    stored = None
    if folder is not None and reference_shards is None:
        stored = stored_reference(folder, members, cfg.horizons)
    if stored is not None:
        frames = []
        for ckpt in members:
            frame = run_inference(ckpt, shards, splits, cfg, mapper, **extra)
            frames.append(reference_for(ckpt, frame, shards, None, cfg, mapper).calibrate(frame))
        return mean_frame(frames), stored
    results = [
        member_predictions(ckpt, shards, splits, cfg, mapper, reference_shards, **extra)
        for ckpt in members
    ]
    return combine_members(results, cfg.horizons)


def fit_and_store_ensemble(folder: str, cfg: EvalConfig, mapper: Callable) -> str:
    """When the folds end: every member's reference (in its run folder) and the
    ensemble's (in `folder`), each member run once on its training cohort."""
    members = ensemble_members(folder)
    results = []
    for ckpt in members:
        own = own_cohort(ckpt, cfg, mapper)
        ref = fit_on_training_frame(own, cfg.horizons)
        store_reference(folder_of(ckpt), [ckpt], ref)
        results.append((None, ref.calibrate(own), ref))
    _, ref = combine_members(results, cfg.horizons)
    return store_reference(folder, members, ref)
