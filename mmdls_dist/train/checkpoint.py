"""Checkpoint contents, compatibility checks and the run folder's bookkeeping files.

A checkpoint directory holds:
  state.pt      "model" (MMDLS weights: all that serving loads), "weighting" (task weights),
                optimizer / scheduler / scaler state, progress, RNG states: tensors and
                plain Python values only, so it loads with torch.load(weights_only=True)
  config.json   the resolved config, the data manifest hash, the training normalisation
  metrics.json  the epoch's reported metrics
  complete.json written last: every other file's size. A checkpoint is complete when all
                of them are there at those sizes, whatever order a copy wrote them in.

A run folder (<run.storage_path>/<run.name>) holds Ray's checkpoint_* folders and:
  mmdls_run.json   the run's config and data identity (a restart must match it)
  best.json        the best checkpoint (its folder name) by run.metric and its metrics:
                   what evaluate and predict take for a run folder; relative, so a moved
                   or synced run folder still works
  executions.jsonl one line per epoch execution (rank 0, at the epoch's start): a restart
                   shows as an epoch that ran twice
  fatal.json       a data or config error a worker met: retrying cannot help, so a
                   restarted worker group stops at once and fit() raises it
  placement_group.json  the worker group's placement group (a sweep releases it itself)

Plain torch / json only: evaluation and prediction load weights through here without
importing the training loop or Ray.
"""

from __future__ import annotations

import json
import pickle
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmdls_dist import storage
from mmdls_dist.config import resumable_fields
from mmdls_dist.options import flatten

STATE = "state.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
COMPLETE = "complete.json"
RUN_IDENTITY = "mmdls_run.json"
BEST = "best.json"
CONFIG_YAML = "config.yaml"  # the run's resolved config, a file `mmdls train --config` takes
EXECUTIONS = "executions.jsonl"
FATAL = "fatal.json"
PLACEMENT_GROUP = "placement_group.json"
PREFIX = "checkpoint_"  # Ray Train's checkpoint folder names


class IncompatibleCheckpointError(ValueError):
    """Resuming with a different experiment config or different data."""


class RefusedCheckpointError(ValueError):
    """A checkpoint that holds pickled Python objects (code) instead of tensors."""


@dataclass
class Progress:
    """Training progress saved with every checkpoint."""

    epoch: int = 0  # next epoch to run
    global_step: int = 0  # optimizer steps taken so far
    best: float | None = None  # best value of run.metric so far
    bad_epochs: int = 0  # epochs since the best (early stopping)


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ, ignoring the fields a resumed run may change
    (config.resumable_fields: field metadata)."""
    a, b = flatten(saved), flatten(current)
    free = resumable_fields()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in free or key.split(".")[0] in free or a.get(key) == b.get(key):
            continue
        diffs.append(f"{key}: {a.get(key)!r} in the run, {b.get(key)!r} now")
    return diffs


def check_compatible(saved: dict, current: dict, where: str) -> None:
    """Raise IncompatibleCheckpointError naming every difference in config or data."""
    diffs = config_differences(saved["config"], current["config"])
    if saved["manifest_hash"] != current["manifest_hash"]:
        diffs.append(
            f"data: manifest hash {saved['manifest_hash'][:12]} in the run, "
            f"{current['manifest_hash'][:12]} now (different shards)"
        )
    if diffs:
        raise IncompatibleCheckpointError(
            f"cannot resume {where}: the config or data differ from the run's:\n  "
            + "\n  ".join(diffs)
            + "\nuse a new run.name, or restore the original settings"
        )


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def save(
    directory: str | Path,
    *,
    modules: dict[str, Any],
    progress: Progress,
    identity: dict,
    metrics: dict,
    rng: list[dict] | None = None,
) -> None:
    """Write a checkpoint. modules: name -> object with state_dict() (None entries skipped);
    rng: every rank's RNG states (rank order), this process's alone when not given."""
    directory = Path(directory)
    state = {name: m.state_dict() for name, m in modules.items() if m is not None}
    state["progress"] = asdict(progress)
    state["rng"] = rng if rng is not None else [rng_state()]
    torch.save(state, directory / STATE)
    (directory / CONFIG).write_text(json.dumps(identity, indent=1))
    (directory / METRICS).write_text(json.dumps(metrics, indent=1))
    sizes = {p.name: p.stat().st_size for p in directory.iterdir()}
    (directory / COMPLETE).write_text(json.dumps(sizes))


def load(directory: str | Path) -> tuple[dict, dict]:
    """-> (state, identity). weights_only: a checkpoint can never execute code on load; one
    that holds pickled objects is refused (RefusedCheckpointError), not half-loaded."""
    directory = Path(directory)
    try:
        state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exn:
        raise RefusedCheckpointError(
            f"{directory / STATE}: refused: it contains pickled Python objects (code), not "
            "only tensors; checkpoints are never loaded with code"
        ) from exn
    identity = json.loads((directory / CONFIG).read_text())
    return state, identity


def is_complete(url: str) -> bool:
    """Whether the checkpoint folder holds every file its complete.json lists, at size."""
    marker = storage.join(url, COMPLETE)
    if not storage.exists(marker):
        return False
    sizes = storage.read_json(marker)
    return all(storage.size(storage.join(url, name)) == size for name, size in sizes.items())


def checkpoints(run: str) -> list[str]:
    """The run folder's checkpoint folders (complete or not), as URLs."""
    return [
        storage.join(run, n) for n in storage.list_names(run, dirs=True) if n.startswith(PREFIX)
    ]


def newest_complete(run: str) -> str | None:
    """The complete checkpoint with the most optimizer steps, whether or not Ray registered
    it (a worker killed right after reporting one leaves it on storage, unregistered)."""
    done = [url for url in checkpoints(run) if is_complete(url)]
    steps = {url: storage.read_json(storage.join(url, METRICS))["global_step"] for url in done}
    return max(done, key=lambda url: (steps[url], url), default=None)


def log_execution(run: str, epoch: int, global_step: int, world: int = 1) -> None:
    """One line in executions.jsonl: epoch `epoch` starts here (at `global_step`, with
    `world` workers)."""
    url = storage.join(run, EXECUTIONS)
    line = json.dumps(
        {"epoch": epoch, "global_step": global_step, "world": world, "time": time.time()}
    )
    old = storage.read_text(url) if storage.exists(url) else ""
    storage.write_text(url, old + line + "\n")


def executions(run: str) -> list[dict]:
    url = storage.join(run, EXECUTIONS)
    text = storage.read_text(url) if storage.exists(url) else ""
    return [json.loads(line) for line in text.splitlines() if line]
