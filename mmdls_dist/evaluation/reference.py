"""The reference an evaluated cohort is scored against, fixed on the training cohort: the
censoring distributions and risk-group cut-points of the *training* split; the temperatures
of the classification heads, the histology threshold, the calibration slopes of the
survival heads and the Breslow baselines of the *validation* split (the baselines on the
training split where a run has no validation split or too few events there for a slope);
the survival stack (stacking.py) on the training and validation splits together.

A model that reads given lesion contours has two reads of a patient: on the contour, or on
the segmentor's own mask (no contour, as `mmdls predict` on a folder without them). The
network's log-hazards and probabilities and the lesion descriptors the stack reads all
change with the mask, so the CT-only read has a reference of its own (Reference.ct_only),
the same fit on the training cohort read without its contours; each row is calibrated and
scored by the reference of the read it got (inference.CONTOUR_READ).

`mmdls train` fits it once when the run ends and stores it in the run folder beside
best.json (reference.json, naming the checkpoint it was fitted for); `mmdls predict` and
an evaluation on other shards take it from there, so they run inference only on the
patients asked about. Without it (a run trained before it existed, another deployed
checkpoint, other horizons) it is fitted again from the training shards. `mmdls evaluate`
also writes the reference it scored against as reference-<label>.json, which `--reference`
applies unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mmdls_dist import storage
from mmdls_dist.config import EvalConfig
from mmdls_dist.data.schema import ENDPOINTS, STAGES
from mmdls_dist.evaluation import stacking
from mmdls_dist.evaluation.inference import (
    CONTOUR_READ,
    checkpoint_identity,
    model_manifest,
    resolve_checkpoint,
    run_inference,
    stage_probs,
)
from mmdls_dist.metrics.calibration import (
    MIN_SLOPE_EVENTS,
    binary_logits,
    class_logits,
    fit_hazard_slope,
    fit_temperature,
    scaled_binary,
    scaled_multiclass,
)
from mmdls_dist.metrics.classification import youden_threshold
from mmdls_dist.metrics.survival import (
    BreslowBaseline,
    CensoringKM,
    assign_risk_groups,
    risk_cutpoints,
)


@dataclass
class Reference:
    """What the evaluated sets are scored against, all fixed on the training cohort."""

    histology_threshold: float  # Youden on the validation split (0.5 if undefined)
    cutpoints: dict[str, list[float]]  # endpoint -> risk tertiles of the training split
    baselines: dict[str, BreslowBaseline]  # endpoint -> Breslow S0 (validation, else training)
    censoring: dict[str, CensoringKM]  # endpoint -> censoring KM on the training split
    horizons: tuple[float, ...]  # months (eval.horizons): survival probabilities, td-AUC
    notes: list[str] = field(default_factory=list)
    # Temperature scaling of the heads, fitted on the validation split (1 = none).
    temperature: dict[str, float] = field(default_factory=lambda: {"histology": 1.0, "stage": 1.0})
    origin: str = ""  # where and on what it was fitted (the report's provenance)
    # Calibration slope of each survival head's log-hazard, fitted on the validation split
    # (1 = none); cut-points and baselines are on the scaled log-hazards.
    slope: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 1.0))
    # The survival stack's coefficients per endpoint (stacking.py; {} = none): the reported
    # log-hazard is its linear predictor on the slope-scaled log-hazard and the inputs.
    stack: dict[str, dict[str, float]] = field(default_factory=lambda: {e: {} for e in ENDPOINTS})
    # The LUSC fraction of the training cohort (train and validation): the case mix the
    # histology probabilities are calibrated under (None: not recorded).
    histology_prevalence: float | None = None
    # The reference of the CT-only read (module docstring), fitted like this one on the
    # training cohort read on the segmentor's masks; None: every row is scored by this one
    # (a model that reads no given contour, or a reference written before the two reads).
    # The histology threshold is this one's for both reads: one decision rule on the
    # calibrated probability.
    ct_only: Reference | None = None

    def reads_ct_only(self, frame: pd.DataFrame) -> np.ndarray:
        """Per row: scored by ct_only (the lesion views read the segmentor's mask)."""
        if self.ct_only is None or CONTOUR_READ not in frame:
            return np.zeros(len(frame), dtype=bool)
        return ~frame[CONTOUR_READ].to_numpy(bool)

    def calibrate(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Inference frame -> the same with temperature-scaled histology and stage
        probabilities and the survival log-hazards slope-scaled and stacked, each row by
        the reference of its read; the network's own are kept as *_uncalibrated columns.
        A frame calibrated once is returned unchanged."""
        if "histology_prob_uncalibrated" in frame:
            return frame.copy()  # already calibrated
        ct = self.reads_ct_only(frame)
        if not ct.any():
            return self._calibrate(frame)
        parts = [self._calibrate(frame[~ct]), self.ct_only._calibrate(frame[ct])]
        return pd.concat(parts).loc[frame.index]

    def survival_at(self, frame: pd.DataFrame, endpoint: str, times) -> np.ndarray:
        """[rows, times] survival probabilities of a calibrated frame's rows, each by the
        Breslow baseline of its read."""
        risk = frame[f"{endpoint}_risk"].to_numpy(float)
        out = self.baselines[endpoint].survival_at(risk, times)
        ct = self.reads_ct_only(frame)
        if ct.any():
            out[ct] = self.ct_only.baselines[endpoint].survival_at(risk[ct], times)
        return out

    def risk_groups(self, frame: pd.DataFrame, endpoint: str) -> np.ndarray:
        """Risk group per row of a calibrated frame (0 = low), by its read's cut-points."""
        risk = frame[f"{endpoint}_risk"].to_numpy(float)
        out = assign_risk_groups(risk, self.cutpoints[endpoint])
        ct = self.reads_ct_only(frame)
        if ct.any():
            out[ct] = assign_risk_groups(risk[ct], self.ct_only.cutpoints[endpoint])
        return out

    def _calibrate(self, frame: pd.DataFrame) -> pd.DataFrame:
        out = frame.copy()
        columns = [f"stage_prob_{name}" for name in STAGES]
        out["histology_prob_uncalibrated"] = out["histology_prob"]
        out["histology_prob"] = scaled_binary(out["histology_prob"], self.temperature["histology"])
        probs = scaled_multiclass(stage_probs(out), self.temperature["stage"])
        for k, column in enumerate(columns):
            out[f"{column}_uncalibrated"] = out[column]
            out[column] = probs[:, k]
        for endpoint in ENDPOINTS:
            out[f"{endpoint}_risk_uncalibrated"] = out[f"{endpoint}_risk"]
            out[f"{endpoint}_risk"] = log_hazard(
                out, endpoint, self.slope[endpoint], self.stack[endpoint]
            )
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
            "slope": self.slope,
            "stack": self.stack,
            "origin": self.origin,
            "histology_prevalence": self.histology_prevalence,
            "ct_only": None if self.ct_only is None else self.ct_only.to_dict(),
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
            origin=d.get("origin", ""),
            # ... and before the survival slopes, none.
            slope=d.get("slope", dict.fromkeys(ENDPOINTS, 1.0)),
            # ... and before the stack, none.
            stack=d.get("stack", {e: {} for e in ENDPOINTS}),
            # ... and before the case mix was recorded, none.
            histology_prevalence=d.get("histology_prevalence"),
            # ... and before the two reads, one for both.
            ct_only=None if d.get("ct_only") is None else cls.from_dict(d["ct_only"]),
        )


def log_hazard(frame: pd.DataFrame, endpoint: str, slope: float, stack: dict) -> pd.Series:
    """The reported log-hazard of every row of an uncalibrated frame: the head's own times
    the calibration slope, then through the survival stack where there is one."""
    scaled = slope * frame[f"{endpoint}_risk"].to_numpy(float)
    return pd.Series(
        stacking.apply_stack(stack, scaled, frame) if stack else scaled, index=frame.index
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
    """Fit the reference on the network's predictions (uncalibrated frames): temperatures,
    histology threshold (on the calibrated probabilities), calibration slopes and Breslow
    baselines on the validation split; the survival stack on the training and validation
    splits (where the frames carry the tabular inputs); cut-points and censoring on the
    training split, the baselines too where no slope was fitted. Cut-points and baselines
    are on the reported log-hazards, as `calibrate` hands them on."""
    notes = []
    temperature = {"histology": 1.0, "stage": 1.0}
    has_val = val is not None and len(val) > 0
    if has_val:
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
    slope, stack, cutpoints, baselines, censoring, baseline_on = {}, {}, {}, {}, {}, {}
    stacked = has_val and stacking.has_inputs(train) and stacking.has_inputs(val)
    for endpoint in ENDPOINTS:
        fitted = fit_hazard_slope(*endpoint_arrays(val, endpoint)) if has_val else None
        if has_val and fitted is None:
            notes.append(
                f"{endpoint.upper()}: no calibration slope (under {MIN_SLOPE_EVENTS} "
                "validation events, or a fit that did not converge); the baseline is the "
                "training split's"
            )
        slope[endpoint] = 1.0 if fitted is None else fitted
        stack[endpoint] = (
            _fit_stack(train, val, endpoint, slope[endpoint], notes) if stacked else {}
        )
        fit = (endpoint, slope[endpoint], stack[endpoint])
        risk, time, event = reported_arrays(train, *fit)
        cutpoints[endpoint] = risk_cutpoints(risk)
        censoring[endpoint] = CensoringKM.fit(time, event)
        baseline_on[endpoint] = "training" if fitted is None else "validation"
        baselines[endpoint] = BreslowBaseline.fit(
            *reported_arrays(train if fitted is None else val, *fit)
        )
    n_val = len(val) if has_val else 0
    origin = f"cut-points and censoring on {len(train)} training patients; " + (
        f"temperatures, the histology threshold and the calibration slopes (DFS "
        f"{slope['dfs']:.2f}, OS {slope['os']:.2f}) on {n_val} validation patients; Breslow "
        f"baselines on the {baseline_on['dfs']} (DFS) and {baseline_on['os']} (OS) split; "
        + _stack_origin(stack, len(train) + n_val)
        if n_val
        else "Breslow baselines on the training split; no validation patients (threshold "
        "0.5, no calibration)"
    )
    return Reference(
        threshold,
        cutpoints,
        baselines,
        censoring,
        tuple(horizons),
        notes,
        temperature,
        origin,
        slope,
        stack,
        histology_prevalence(pd.concat([train, val]) if has_val else train),
    )


def histology_prevalence(frame: pd.DataFrame) -> float | None:
    """The LUSC fraction of the patients whose histology is known (None if none is)."""
    y = frame["histology"].to_numpy()
    return float((y[y >= 0] == 1).mean()) if (y >= 0).any() else None


def reported_arrays(frame: pd.DataFrame, endpoint: str, slope: float, stack: dict):
    """endpoint_arrays with the reported (slope-scaled, stacked) log-hazard as the risk."""
    known = frame[frame[f"{endpoint}_known"].to_numpy(bool)]
    _, time, event = endpoint_arrays(known, endpoint)
    return log_hazard(known, endpoint, slope, stack).to_numpy(), time, event


def _fit_stack(
    train: pd.DataFrame, val: pd.DataFrame, endpoint: str, slope: float, notes: list[str]
) -> dict[str, float]:
    """The endpoint's survival stack on the train and val patients whose label is known
    ({} with a note where too few events or no convergence)."""
    both = pd.concat([train, val], ignore_index=True)
    both = both[both[f"{endpoint}_known"].to_numpy(bool)]
    risk, time, event = endpoint_arrays(both, endpoint)
    coefs = stacking.fit_stack(slope * risk, both, time, event)
    if coefs is None:
        needed = stacking.min_events(stacking.covariates(both))
        notes.append(
            f"{endpoint.upper()}: no survival stack (under {needed} training and "
            "validation events, or a fit that did not converge); the log-hazard is the "
            "network's, slope-scaled"
        )
    return coefs or {}


def _stack_origin(stack: dict[str, dict], n: int) -> str:
    fitted = [e.upper() for e in ENDPOINTS if stack[e]]
    if not fitted:
        return "no survival stack"
    weights = ", ".join(
        f"{e.upper()} {stack[e][stacking.NETWORK]:.2f}" for e in ENDPOINTS if stack[e]
    )
    measured = any(c in stack[e] for e in ENDPOINTS for c in stacking.LESION)
    lesion = " and the lesion descriptors" if measured else ""
    return (
        f"the survival stack ({' and '.join(fitted)}: Cox on the network's log-hazard, the "
        f"clinical and PET inputs{lesion}; network coefficient {weights}) on {n} training "
        "and validation patients"
    )


STORED = "reference.json"  # in a run or ensemble folder, written when training ends


def folder_of(path: str) -> str:
    """The folder a checkpoint (or run) folder lies in."""
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."


def checkpoint_name(url: str) -> str:
    """A checkpoint URL -> "run/checkpoint": what names it wherever the run folder lies."""
    return "/".join(url.rstrip("/").split("/")[-2:])


def _names(checkpoints: list[str]) -> list[str]:
    """Checkpoint URLs -> their names: a moved run folder still matches."""
    return [checkpoint_name(c) for c in checkpoints]


def store_reference(folder: str, checkpoints: list[str], ref: Reference) -> str:
    """reference.json in `folder`: `ref`, fitted for these checkpoints (one, or an
    ensemble's members)."""
    url = storage.join(folder, STORED)
    storage.write_json(url, {"checkpoints": _names(checkpoints), **ref.to_dict()})
    return url


def stored_reference(
    folder: str, checkpoints: list[str], horizons: tuple[float, ...]
) -> Reference | None:
    """The reference stored in `folder` if it was fitted for exactly these checkpoints and
    horizons, else None."""
    url = storage.join(folder, STORED)
    if not storage.exists(url):
        return None
    saved = storage.read_json(url)
    if saved.get("checkpoints") != _names(checkpoints):
        return None
    if tuple(saved["horizons"]) != tuple(horizons):
        return None
    ref = Reference.from_dict(saved)
    ref.origin = f"stored in {url} when training ended: {ref.origin}"
    return ref


def load_reference(path: str | Path) -> Reference:
    """A reference-<label>.json written by an earlier evaluation (where the training shards
    were reachable), for scoring a cohort where they are not."""
    ref = Reference.from_dict(json.loads(Path(path).read_text()))
    ref.origin = f"given as {path}: {ref.origin}"
    return ref


def training_frame(
    ckpt: str,
    frame: pd.DataFrame | None,
    shards: str | None,
    reference_shards: str | None,
    cfg: EvalConfig,
    mapper: Callable,
) -> pd.DataFrame:
    """The model's predictions on its training cohort's train and val splits: the evaluated
    frame itself when it holds them, else inference on the training shards (the
    checkpoint's own by default); frame None: always the latter. Where the lesion views read
    contours, also the CT-only read of every patient (inference with contours withheld),
    each patient then once per read."""
    identity = checkpoint_identity(ckpt)
    source = reference_shards or identity["config"]["data"]["shards"]

    def cohort(**extra) -> pd.DataFrame:
        have = set(model_manifest(source, identity)["splits"])
        splits = [s for s in ("train", "val") if s in have]
        return run_inference(ckpt, source, splits, cfg, mapper, **extra)

    if frame is None or source != shards or "train" not in set(frame["split"]):
        frame = cohort()
    if "train" not in set(frame["split"]):
        raise ValueError(f"{source}: no training split to fix the reference on")
    frame = frame[frame["split"].isin(("train", "val"))]
    if CONTOUR_READ in frame and frame[CONTOUR_READ].any():  # the CT-only read as well
        ct_only = cohort(withhold_contours=True)
        frame = pd.concat([frame[frame[CONTOUR_READ]], ct_only], ignore_index=True)
    return frame


def fit_on_training_frame(frame: pd.DataFrame, horizons: tuple[float, ...]) -> Reference:
    """fit_reference on a training_frame (its train split, and its val split if any); where
    it holds both reads, on the contour read, with ct_only on the CT-only read."""
    reads = split_reads(frame)
    ref = _fit_split(reads[0], horizons)
    if len(reads) == 2:
        ref.ct_only = _fit_split(reads[1], horizons)
        ref.origin += f"; for the CT-only read, its own: {ref.ct_only.origin}"
    return ref


def split_reads(frame: pd.DataFrame) -> list[pd.DataFrame]:
    """[frame] for one read, [contour read, CT-only read] where the frame holds both."""
    if CONTOUR_READ not in frame:
        return [frame]
    read = frame[CONTOUR_READ].to_numpy(bool)
    if read.all() or not read.any():
        return [frame]
    return [frame[read], frame[~read]]


def _fit_split(frame: pd.DataFrame, horizons: tuple[float, ...]) -> Reference:
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
    """The Reference from the training cohort: fitted on `frame` where it holds that cohort
    (no extra inference), else the one stored when the run ended, else fitted on inference
    over the training shards (training_frame). reference_shards: always fitted there."""
    own_shards = checkpoint_identity(ckpt)["config"]["data"]["shards"]
    holds_cohort = shards == own_shards and "train" in set(frame["split"])
    if reference_shards is None and not holds_cohort:
        stored = stored_reference(folder_of(ckpt), [ckpt], cfg.horizons)
        if stored is not None:
            return stored
    own = training_frame(ckpt, frame, shards, reference_shards, cfg, mapper)
    return fit_on_training_frame(own, cfg.horizons)


def fit_and_store(run: str, cfg: EvalConfig, mapper: Callable) -> str:
    """When a run ends: its deployed checkpoint's reference, fitted on inference over its
    train and val splits, stored in the run folder. -> the file's URL."""
    ckpt = resolve_checkpoint(run)
    ref = fit_on_training_frame(own_cohort(ckpt, cfg, mapper), cfg.horizons)
    return store_reference(run, [ckpt], ref)


def own_cohort(ckpt: str, cfg: EvalConfig, mapper: Callable) -> pd.DataFrame:
    """The checkpoint's predictions on its own training shards' train and val splits."""
    return training_frame(ckpt, None, None, None, cfg, mapper)
