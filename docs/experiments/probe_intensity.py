"""Probe: how a checkpoint's C-index on one split moves when every CT is put through an
intensity map no training center had (gain, offset, gamma), to compare CT normalisations.

    python docs/experiments/probe_intensity.py RUN_OR_CHECKPOINT SHARDS [--split external]

Scores the split as stored and under each map in MAPS (applied to the uint8 CT on load,
clipped to 0..255), and prints Harrell's C (DFS, OS) per map.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from probe_args import model_on_split

from mmdls_dist.evaluation.inference import (
    eval_loader,
    load_model,
    model_manifest,
    resolve_checkpoint,
)
from mmdls_dist.metrics.survival import harrell_c

MAPS = {  # name -> (gain, offset in 0..255 units, gamma)
    "as stored": (1.0, 0.0, 1.0),
    "darker (x0.8, -10)": (0.8, -10.0, 1.0),
    "brighter (x1.15, +25)": (1.15, 25.0, 1.0),
    "gamma 0.7": (1.0, 0.0, 0.7),
    "gamma 1.4": (1.0, 0.0, 1.4),
}


def shifted(ct: torch.Tensor, gain: float, offset: float, gamma: float) -> torch.Tensor:
    x = 255.0 * (ct.float() / 255.0) ** gamma
    return (gain * x + offset).round().clamp(0, 255).to(torch.uint8)


def main() -> None:
    args = model_on_split(__doc__)
    loaded = load_model(resolve_checkpoint(args.checkpoint))
    manifest = model_manifest(args.shards, loaded.identity)
    print(f"{'':<24}{'C DFS':>8}{'C OS':>8}")
    for name, (gain, offset, gamma) in MAPS.items():
        cols: dict[str, list] = {}
        with torch.no_grad():
            for batch in eval_loader(loaded, args.shards, args.split, manifest, 8):
                batch = dataclasses.replace(batch, ct=shifted(batch.ct, gain, offset, gamma))
                out = loaded.model(batch)
                for e in ("dfs", "os"):
                    for key, value in (
                        ("risk", getattr(out, f"{e}_log_hazard")),
                        ("time", getattr(batch, f"{e}_time")),
                        ("event", getattr(batch, f"{e}_event")),
                        ("known", getattr(batch, f"{e}_known")),
                    ):
                        cols.setdefault(f"{e}_{key}", []).extend(value.tolist())
        c = {k: np.asarray(v) for k, v in cols.items()}
        cells = []
        for e in ("dfs", "os"):
            k = c[f"{e}_known"].astype(bool)
            cells.append(harrell_c(c[f"{e}_risk"][k], c[f"{e}_time"][k], c[f"{e}_event"][k]))
        print(f"{name:<24}{cells[0]:>8.3f}{cells[1]:>8.3f}")


if __name__ == "__main__":
    main()
