"""Inference from a checkpoint over shards: one table row per patient, each patient once.

Flow: checkpoint folder (or a run folder with best.json) -> Config + weights -> for each
split, `parts` eval streams (the loader's exactly-once plan for `parts` ranks) run as Ray
tasks or serially (a `mapper`, as in data prep) -> records -> pandas DataFrame.

The tabular features are z-scored with the *training* cohort's statistics (stored in the
checkpoint), so a new cohort is normalised exactly as the model saw its training data.
Weights load into the model alone: nothing here imports the training loop or Ray.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mmdls_dist import storage
from mmdls_dist.config import Config, EvalConfig, from_dict
from mmdls_dist.data.collate import select_slices
from mmdls_dist.data.loader import make_loader
from mmdls_dist.data.schema import STAGES, valid_patient_id
from mmdls_dist.data.shards import ShardError, fold_view, load_manifest
from mmdls_dist.evaluation.stacking import INPUTS, LESION
from mmdls_dist.model.mmdls import MMDLS
from mmdls_dist.model.output import missing_inputs, prediction_records
from mmdls_dist.train import checkpoint

log = logging.getLogger(__name__)

# Per record: True where the lesion views read the patient's own lesion contour, False where
# they read the segmentor's mask (no contour, contours withheld, or a model that reads none):
# the two reads have references of their own (reference.py).
CONTOUR_READ = "contour_read"


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder (holds state.pt) or a run folder (holds best.json) -> checkpoint,
    loaded once here on the driver, so a refused or unreadable one is one clear error
    before any inference task starts."""
    url = path
    if not storage.exists(storage.join(path, checkpoint.STATE)):
        best = storage.join(path, checkpoint.BEST)
        if not storage.exists(best):
            raise FileNotFoundError(
                f"{path}: neither a checkpoint (no {checkpoint.STATE}) nor a run folder "
                f"(no {checkpoint.BEST})"
            )
        url = storage.join(path, storage.read_json(best)["checkpoint"])
    with storage.local_copy(url) as local:
        checkpoint.load(local)
    return url


@dataclasses.dataclass
class LoadedModel:
    cfg: Config
    model: torch.nn.Module
    identity: dict
    path: str


def load_model(path: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Checkpoint (local or object store) -> model in eval mode (weights_only load: no
    pickled code runs)."""
    with storage.local_copy(path) as local:
        state, identity = checkpoint.load(local)
    cfg = from_dict(Config, identity["config"])
    model = MMDLS(cfg.model)
    model.load_state_dict(state["model"])
    return LoadedModel(cfg, model.to(device).eval(), identity, path)


def eval_loader(
    loaded: LoadedModel,
    shards: str,
    split: str,
    manifest: dict,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
):
    """The model's own data settings (slices, image size) over other shards, in-process,
    as stream `rank` of `world` of the loader's exactly-once eval plan."""
    data = dataclasses.replace(loaded.cfg.data, shards=shards, batch_size=batch_size, num_workers=0)
    return make_loader(data, split, "eval", rank, world, manifest)


def checkpoint_identity(path: str) -> dict:
    """The checkpoint's config.json (config, data manifest hash, training normalisation)."""
    return storage.read_json(storage.join(path, checkpoint.CONFIG))


@dataclasses.dataclass(frozen=True)
class Part:
    """One inference task: `rank` of `world` eval streams over one split."""

    checkpoint: str
    shards: str
    split: str
    rank: int
    world: int
    batch_size: int
    manifest: dict  # with the training normalisation substituted
    mask_dir: str | None = None  # write predicted masks as PNGs here
    slice_names: dict | None = None  # patient -> original slice file names (for mask files)
    dice: bool = True  # score the predicted masks against the stored ones
    withhold_contours: bool = False  # read every patient as CT-only (the segmentor's own
    # lesion mask, as for a folder without contours), whatever contours the shards hold


def _records(batch, out, split: str, with_dice: bool, reads_contours: bool) -> list[dict]:
    """prediction_records plus the split, the inputs each patient lacked, which mask the
    lesion views read (CONTOUR_READ; reads_contours: the model reads given contours at all),
    the tabular inputs as the network received them and its lesion descriptors where it
    measures them (stacking.INPUTS, stacking.LESION: what the survival stack reads; kept out
    of every written table)."""
    records = prediction_records(batch, out)
    read = [reads_contours and bool(a) for a in batch.lesion_annotated.cpu().tolist()]
    tabular = torch.cat([batch.clinical, batch.pet], 1).float().cpu().tolist()
    lesion = [{}] * len(records)
    if out.lesion_descriptors is not None:
        measured = out.lesion_descriptors.float().cpu().tolist()
        lesion = [dict(zip(LESION, values, strict=True)) for values in measured]
    for r, missing, contour, values, descriptors in zip(
        records, missing_inputs(batch), read, tabular, lesion, strict=True
    ):
        r["split"] = split
        r["missing_inputs"] = missing
        r[CONTOUR_READ] = bool(contour)
        r |= dict(zip(INPUTS, values, strict=True))
        r |= descriptors
        if not with_dice:
            r.pop("dice_lung", None)
            r.pop("dice_lesion", None)
    return records


@torch.no_grad()
def infer_part(part: Part) -> list[dict]:
    """Run one part; a plain function so it can be a Ray task (mmdls_dist.parallel)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(part.checkpoint, device)
    loader = eval_loader(
        loaded, part.shards, part.split, part.manifest, part.batch_size, part.rank, part.world
    )
    model_cfg = loaded.cfg.model
    reads_contours = model_cfg.use_imaging and model_cfg.given_lesion_mask
    records: list[dict] = []
    for batch in loader:
        batch = batch.to(device)
        if part.withhold_contours:
            batch = dataclasses.replace(
                batch, lesion_annotated=torch.zeros_like(batch.lesion_annotated)
            )
        out = loaded.model(batch)
        records.extend(_records(batch, out, part.split, part.dice, reads_contours))
        if part.mask_dir is not None and out.lung_logits is not None:
            write_masks(
                part.mask_dir, batch, out, loaded.cfg.data.max_slices, part.slice_names or {}
            )
    return records


def write_masks(root: str, batch, out, max_slices: int, slice_names: dict) -> None:
    """Predicted lung / lesion masks as 0/255 PNGs, one per model slice, named after the
    original CT slice where known (the model sees an even subsample of the stack). Paths are
    built only from validated ids and file names, so nothing lands outside `root`."""
    lung = (out.lung_logits > 0).cpu().numpy()
    lesion = (out.lesion_logits > 0).cpu().numpy()
    n_real = batch.slice_mask.sum(1).cpu().tolist()
    for i, pid in enumerate(batch.patient_id):
        names = slice_names.get(pid)
        if not valid_patient_id(pid) or any(Path(n).name != n for n in names or ()):
            raise ShardError(f"refusing to write masks for patient id {pid!r}: not a plain name")
        n_slices = len(names) if names else int(n_real[i])
        chosen = select_slices(n_slices, max_slices) if names else np.arange(int(n_real[i]))
        for kind, masks in (("lung", lung), ("lesion", lesion)):
            folder = Path(root) / pid / kind
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(int(n_real[i])):
                name = names[chosen[k]] if names else f"slice_{k:03d}.png"
                Image.fromarray((masks[i, k] * 255).astype(np.uint8)).save(folder / name)


@torch.no_grad()
def overlay_batch(ckpt: str, shards: str, split: str, patients: int = 4):
    """(Batch, ModelOutput) of the first `patients` of a split, for the report's overlays."""
    loaded = load_model(ckpt)
    manifest = model_manifest(shards, loaded.identity)
    batch = next(iter(eval_loader(loaded, shards, split, manifest, patients)))
    return batch, loaded.model(batch)


def model_manifest(shards: str, identity: dict) -> dict:
    """The shards' manifest as this model sees it: its training normalisation in place of
    theirs, and, for a cross-validation fold model on shards cut into folds, the fold's
    train / val split (data/shards.fold_view)."""
    manifest = load_manifest(shards)
    fold = identity["config"]["data"].get("fold", -1)
    if fold >= 0 and manifest.get("prep", {}).get("folds"):
        manifest = fold_view(manifest, fold)
    return dict(manifest, normalization=identity["normalization"])


def plan_parts(
    ckpt: str,
    shards: str,
    splits: list[str],
    parts: int,
    batch_size: int,
    identity: dict,
    **extra,
) -> list[Part]:
    manifest = model_manifest(shards, identity)
    have = {e["split"] for e in manifest["shards"]}
    missing = [s for s in splits if s not in have]
    if missing:
        raise ValueError(f"{shards}: no shards for split(s) {missing} (have {sorted(have)})")
    return [
        Part(ckpt, shards, split, rank, parts, batch_size, manifest, **extra)
        for split in splits
        for rank in range(parts)
    ]


def run_inference(
    ckpt: str, shards: str, splits: list[str], cfg: EvalConfig, mapper: Callable, **extra
) -> pd.DataFrame:
    """Predictions for every patient of `splits` as a DataFrame (see `predictions_frame`),
    in cfg.parts tasks per split run through `mapper`. extra: Part's output options."""
    identity = checkpoint_identity(ckpt)
    plan = plan_parts(ckpt, shards, splits, cfg.parts, cfg.batch_size, identity, **extra)
    records = [r for part in mapper(infer_part, plan) for r in part]
    frame = predictions_frame(records)
    expected = sum(plan[0].manifest["splits"][s]["n_patients"] for s in splits)
    if len(frame) != expected or frame["patient_id"].duplicated().any():
        raise RuntimeError(
            f"inference returned {len(frame)} rows for {expected} patients; the shards do not "
            "match their manifest (run `mmdls verify`)"
        )
    return frame


def predictions_frame(records: list[dict]) -> pd.DataFrame:
    """Records -> one row per patient: ids, split, probabilities, risks, labels, Dice."""
    frame = pd.DataFrame(records)
    if frame.empty:
        return frame
    probs = np.stack(frame.pop("stage_probs").to_numpy())
    for k, name in enumerate(STAGES):
        frame[f"stage_prob_{name}"] = probs[:, k]
    for column in ("dfs_event", "os_event", "dfs_known", "os_known"):
        frame[column] = frame[column].astype(bool)
    return frame.sort_values(["split", "patient_id"]).reset_index(drop=True)


def stage_probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[[f"stage_prob_{name}" for name in STAGES]].to_numpy()
