"""The reference an evaluated cohort is scored against, fixed on the training cohort: the
Breslow baselines, censoring distributions and risk-group cut-points of the *training*
split, and the temperatures of the classification heads and the histology threshold of the
*validation* split. `mmdls evaluate` writes it as
reference-<label>.json; `mmdls predict` and an evaluation at a site without the training
shards apply it unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mmdls_dist.config import EvalConfig
from mmdls_dist.data.schema import ENDPOINTS, STAGES
from mmdls_dist.evaluation.inference import (
    checkpoint_identity,
    model_manifest,
    run_inference,
    stage_probs,
)
from mmdls_dist.metrics.calibration import (
    binary_logits,
    class_logits,
    fit_temperature,
    scaled_binary,
    scaled_multiclass,
)
from mmdls_dist.metrics.classification import youden_threshold
from mmdls_dist.metrics.survival import BreslowBaseline, CensoringKM, risk_cutpoints


@dataclass
class Reference:
    """What the evaluated sets are scored against, all fixed on the training cohort."""

    histology_threshold: float  # Youden on the validation split (0.5 if undefined)
    cutpoints: dict[str, list[float]]  # endpoint -> risk tertiles of the training split
    baselines: dict[str, BreslowBaseline]  # endpoint -> Breslow S0 on the training split
    censoring: dict[str, CensoringKM]  # endpoint -> censoring KM on the training split
    horizons: tuple[float, ...]  # months (eval.horizons): survival probabilities, td-AUC
    notes: list[str] = field(default_factory=list)
    # Temperature scaling of the heads, fitted on the validation split (1 = none).
    temperature: dict[str, float] = field(default_factory=lambda: {"histology": 1.0, "stage": 1.0})

    def calibrate(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Inference frame -> the same with temperature-scaled histology and stage
        probabilities; the network's own are kept as *_uncalibrated columns."""
        out = frame.copy()
        if "histology_prob_uncalibrated" in out:
            return out  # already calibrated
        columns = [f"stage_prob_{name}" for name in STAGES]
        out["histology_prob_uncalibrated"] = out["histology_prob"]
        out["histology_prob"] = scaled_binary(out["histology_prob"], self.temperature["histology"])
        probs = scaled_multiclass(stage_probs(out), self.temperature["stage"])
        for k, column in enumerate(columns):
            out[f"{column}_uncalibrated"] = out[column]
            out[column] = probs[:, k]
        return out

    def to_dict(self) -> dict:
        return {
            "histology_threshold": self.histology_threshold,
            "cutpoints": self.cutpoints,
            "baselines": {e: b.to_dict() for e, b in self.baselines.items()},
            "censoring": {e: c.to_dict() for e, c in self.censoring.items()},
            "horizons": list(self.horizons),
            "notes": self.notes,
            "temperature": self.temperature,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Reference:
        return cls(
            histology_threshold=d["histology_threshold"],
            cutpoints=d["cutpoints"],
            baselines={e: BreslowBaseline.from_dict(b) for e, b in d["baselines"].items()},
            censoring={e: CensoringKM.from_dict(c) for e, c in d["censoring"].items()},
            horizons=tuple(d["horizons"]),
            notes=list(d["notes"]),
            # References written before calibration existed apply none.
            temperature=d.get("temperature", {"histology": 1.0, "stage": 1.0}),
        )


def endpoint_arrays(frame: pd.DataFrame, endpoint: str):
    """-> (risk, time, event) of the patients whose `endpoint` label is known."""
    known = frame[f"{endpoint}_known"].to_numpy(bool)
    sub = frame[known]
    return (
        sub[f"{endpoint}_risk"].to_numpy(float),
        sub[f"{endpoint}_time"].to_numpy(float),
        sub[f"{endpoint}_event"].to_numpy(bool),
    )


def fit_reference(
    train: pd.DataFrame, val: pd.DataFrame | None, horizons: tuple[float, ...]
) -> Reference:
    """Fit the reference on the training split's predictions (temperatures and threshold
    on validation, the threshold on the calibrated probabilities)."""
    notes = []
    temperature = {"histology": 1.0, "stage": 1.0}
    if val is not None and len(val):
        temperature = {
            "histology": fit_temperature(binary_logits(val["histology_prob"]), val["histology"]),
            "stage": fit_temperature(class_logits(stage_probs(val)), val["stage"]),
        }
        calibrated = scaled_binary(val["histology_prob"], temperature["histology"])
        threshold = youden_threshold(calibrated, val["histology"])
    else:
        threshold = 0.5
        notes.append(
            "no validation split: histology threshold fixed at 0.5, probabilities not calibrated"
        )
    cutpoints, baselines, censoring = {}, {}, {}
    for endpoint in ENDPOINTS:
        risk, time, event = endpoint_arrays(train, endpoint)
        cutpoints[endpoint] = risk_cutpoints(risk)
        baselines[endpoint] = BreslowBaseline.fit(risk, time, event)
        censoring[endpoint] = CensoringKM.fit(time, event)
    return Reference(
        threshold, cutpoints, baselines, censoring, tuple(horizons), notes, temperature
    )


def load_reference(path: str | Path) -> Reference:
    """A reference-<label>.json written by an earlier evaluation (where the training shards
    were reachable), for scoring a cohort where they are not."""
    return Reference.from_dict(json.loads(Path(path).read_text()))


def training_frame(
    ckpt: str,
    frame: pd.DataFrame,
    shards: str,
    reference_shards: str | None,
    cfg: EvalConfig,
    mapper: Callable,
) -> pd.DataFrame:
    """The model's predictions on its training cohort's train and val splits: the evaluated
    frame itself when it holds them, else inference on the training shards (the
    checkpoint's own by default)."""
    source = reference_shards or checkpoint_identity(ckpt)["config"]["data"]["shards"]
    if source != shards or "train" not in set(frame["split"]):
        have = set(model_manifest(source, checkpoint_identity(ckpt))["splits"])
        splits = [s for s in ("train", "val") if s in have]
        frame = run_inference(ckpt, source, splits, cfg, mapper)
    if "train" not in set(frame["split"]):
        raise ValueError(f"{source}: no training split to fix the reference on")
    return frame[frame["split"].isin(("train", "val"))]


def fit_on_training_frame(frame: pd.DataFrame, horizons: tuple[float, ...]) -> Reference:
    """fit_reference on a training_frame (its train split, and its val split if any)."""
    val = frame[frame["split"] == "val"]
    return fit_reference(frame[frame["split"] == "train"], val if len(val) else None, horizons)


def reference_for(
    ckpt: str,
    frame: pd.DataFrame,
    shards: str,
    reference_shards: str | None,
    cfg: EvalConfig,
    mapper: Callable,
) -> Reference:
    """The Reference from the training cohort (training_frame)."""
    own = training_frame(ckpt, frame, shards, reference_shards, cfg, mapper)
    return fit_on_training_frame(own, cfg.horizons)
