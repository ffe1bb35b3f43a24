"""Prediction for new patients: raw-layout folder (CT alone is enough) or shards -> CSV.

Flow: raw folder -> ingest (for_prediction: no labels or lung masks needed) -> shards of a
single "predict" split in a work folder -> inference (training normalisation) -> the
Reference fixed on the training cohort (risk cut-points, calibration slopes, survival
stack, Breslow baselines, temperatures, histology threshold) -> one CSV row per patient.
Patients that fail validation get a row too, with status "rejected" and the reasons (file
and field, never cell values): nobody is silently missing from the output.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from mmdls_dist import storage
from mmdls_dist.config import EvalConfig, PrepConfig
from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.schema import ENDPOINTS, STAGES
from mmdls_dist.data.shards import build_shards, load_manifest
from mmdls_dist.evaluation.ensemble import ensemble_members, ensemble_predictions
from mmdls_dist.evaluation.inference import (
    checkpoint_identity,
    resolve_checkpoint,
    run_inference,
    stage_probs,
)
from mmdls_dist.evaluation.reference import (
    Reference,
    checkpoint_name,
    load_reference,
    reference_for,
)
from mmdls_dist.metrics.survival import RISK_GROUPS

log = logging.getLogger(__name__)

PREDICT_SPLIT = "predict"


def shard_for_prediction(
    raw: str, out: str, image_size: int, mapper_factory
) -> tuple[dict, dict[str, list[str]]]:
    """Validate a raw folder for prediction and shard its valid patients. -> (manifest, its
    "rejected" block listing who could not be read and why; patient -> slice file names)."""
    report = read_cohort(raw, mapper=mapper_factory("check images"), for_prediction=True)
    file_level = report.file_defects
    if file_level:
        raise ValueError(f"{raw} cannot be read as a cohort:\n{report.summary(max_defects=50)}")
    if report.defects:
        log.warning("%d patient(s) rejected:\n%s", len(report.rejected), report.summary(50))
    if not report.records:
        raise ValueError(f"no readable patients in {raw}:\n{report.summary(max_defects=50)}")
    manifest = build_shards(
        report,
        out,
        PrepConfig(image_size=image_size, allow_rejects=True),
        mapper=mapper_factory("write shards"),
        single_split=PREDICT_SPLIT,
    )
    return manifest, {r.patient_id: r.slice_files for r in report.records}


DECIMALS = 3  # probabilities, survival and log hazards in the CSV: model error is larger


def prediction_table(frame: pd.DataFrame, ref: Reference, model: str) -> pd.DataFrame:
    """Inference frame -> the clinician-facing columns (probabilities, log relative hazards,
    risk groups, survival probabilities at the reference horizons), rounded to DECIMALS,
    with the model that made them and the inputs each patient lacked."""
    out = pd.DataFrame({"patient_id": frame["patient_id"], "center": frame["center"]})
    out["status"] = "ok"
    out["reason"] = ""
    out["model"] = model
    out["missing_inputs"] = frame["missing_inputs"].fillna("") if "missing_inputs" in frame else ""
    out["histology_prob_lusc"] = frame["histology_prob"]
    out["histology_pred"] = np.where(
        frame["histology_prob"] >= ref.histology_threshold, "LUSC", "LUAD"
    )
    probs = stage_probs(frame)
    for k, name in enumerate(STAGES):
        out[f"stage_prob_{name}"] = probs[:, k]
    out["stage_pred"] = [STAGES[k] for k in probs.argmax(axis=1)]
    for endpoint in ENDPOINTS:
        risk = frame[f"{endpoint}_risk"].to_numpy(float)
        out[f"{endpoint}_log_relative_hazard"] = risk
        groups = ref.risk_groups(frame, endpoint)
        out[f"{endpoint}_risk_group"] = [RISK_GROUPS[g] for g in groups]
        surv = ref.survival_at(frame, endpoint, ref.horizons)
        for k, h in enumerate(ref.horizons):
            out[f"{endpoint}_survival_{h:g}m"] = surv[:, k]
    return out.round(DECIMALS)


def with_rejected(table: pd.DataFrame, manifest: dict, model: str) -> pd.DataFrame:
    """Append a row (status "rejected", the reasons, no values) per unreadable patient."""
    rows = [
        {"patient_id": pid, "status": "rejected", "reason": " | ".join(reasons), "model": model}
        for pid, reasons in manifest["rejected"].items()
    ]
    return pd.DataFrame(table.to_dict("records") + rows, columns=table.columns)


def run_prediction(
    checkpoint: str,
    out_csv: str | Path,
    cfg: EvalConfig,
    mapper_factory: Callable[[str], Callable],
    *,
    data: str | None = None,
    shards: str | None = None,
    split: str | None = None,
    reference: str | None = None,
    workdir: str | None = None,
    masks: str | None = None,
) -> pd.DataFrame:
    """Predict for a raw folder (`data`) or for a split of existing shards (`shards`);
    mapper_factory(description) gives the mapper of each parallel step. masks: also write
    the predicted masks as PNGs into this folder."""
    if (data is None) == (shards is None):
        raise ValueError("give exactly one of --data (a raw folder) and --shards")
    raw, masks_dir = data, masks
    members = ensemble_members(checkpoint)  # a fold ensemble: the mean of its members
    if members and masks:
        raise ValueError("--masks needs one model; give one member of the ensemble")
    ckpt = members[0] if members else resolve_checkpoint(checkpoint)
    identity = checkpoint_identity(ckpt)
    tmp = None
    slice_names = None
    if raw is not None:
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="mmdls-predict-")
            workdir = tmp.name
        shards = str(Path(workdir, "shards").resolve())
        manifest, names = shard_for_prediction(raw, shards, _image_size(identity), mapper_factory)
        split = PREDICT_SPLIT
        slice_names = names if masks_dir else None
    else:
        manifest = load_manifest(shards)
        split = split or PREDICT_SPLIT
    try:
        mapper = mapper_factory("predict")
        if members:
            frame, ref = ensemble_predictions(
                members, shards, [split], cfg, mapper, folder=checkpoint, dice=False
            )
            ref = load_reference(reference) if reference else ref
            model = model_name(checkpoint, members)
            return _write(prediction_table(frame, ref, model), manifest, out_csv, model)
        frame = run_inference(
            ckpt,
            shards,
            [split],
            cfg,
            mapper,
            dice=False,
            mask_dir=masks_dir,
            slice_names=slice_names,
        )
        ref = (
            load_reference(reference)
            if reference
            else reference_for(ckpt, frame, shards, None, cfg, mapper)
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    model = model_name(ckpt, None)
    return _write(prediction_table(ref.calibrate(frame), ref, model), manifest, out_csv, model)


def model_name(path: str, members: list[str] | None) -> str:
    """What the model column says: "run/checkpoint", or the ensemble and its size."""
    if members:
        return f"{path.rstrip('/').rsplit('/', 1)[-1]} (ensemble of {len(members)})"
    return checkpoint_name(path)


def _write(table: pd.DataFrame, manifest: dict, out_csv: str | Path, model: str) -> pd.DataFrame:
    table = with_rejected(table, manifest, model)
    storage.write_text(str(out_csv), table.to_csv(index=False))  # a local file or a URL
    return table


def _image_size(identity: dict) -> int:
    """The slice size the model was trained on: data.image_size, or the training shards'
    stored size when that is 0 (as stored)."""
    return int(identity["config"]["data"]["image_size"] or identity["image_size"])
