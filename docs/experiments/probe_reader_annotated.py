"""Probe: does a radiologist's read of the findings on some patients teach the lesion reader
what the outcomes alone do not? probe_reader_depth's deeper CNN with the clinical + PET
table, trained on the DFS + OS outcomes of every internal patient and, for a random
FRACTION of them, also on the generator's image-only factors (spicule count, satellites,
cavitation, pleural contact; margin and texture on classic), z-scored, squared error at
weight 1 on extra outputs: the stand-in for findings annotated in a consortium's reads
(LIDC-style spiculation and lobulation scores). Harrell's C of the log-hazards on the
held-out center, 3 seeds; FRACTION 0 is probe_reader_depth's "deep" row.

    python docs/experiments/probe_reader_annotated.py STYLE FRACTION [EPOCHS]

No shards and no Ray; the cohort of probe_reader_field (1,500 patients at 96 px, seed 0).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import probe_reader_field as field_probe  # noqa: E402
from probe_findings import EXTERNAL, IMAGE_ONLY, draws  # noqa: E402
from probe_reader_depth import fit_and_score  # noqa: E402


def main() -> None:
    style, fraction = sys.argv[1], float(sys.argv[2])
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 12
    t0 = time.perf_counter()
    images, internal, y, tab, oracle = field_probe.cohort(style, 1500, 96)
    x = field_probe.crops(images, 48, 5.0, False)
    f, centers = draws(style, 1500, 96)[1:3]
    assert ((centers != EXTERNAL[style]) == internal).all()
    truth = np.stack([f[k] for k in IMAGE_ONLY[style]], 1).astype(np.float32)
    mu, sd = truth[internal].mean(0), truth[internal].std(0) + 1e-6
    target = torch.from_numpy((truth - mu) / sd)
    rng = np.random.default_rng(0)
    annotated = torch.from_numpy(internal & (rng.random(len(internal)) < fraction))
    read, inside = int(annotated.sum()), int(internal.sum())
    print(f"{style}; oracle DFS {oracle[0]:.3f} OS {oracle[1]:.3f}; findings read on {read} "
          f"of {inside} internal patients", flush=True)  # fmt: skip

    def findings_loss(estimate: torch.Tensor, i) -> torch.Tensor:
        seen = annotated[i]
        if not seen.any():
            return estimate.sum() * 0
        return ((estimate[seen] - target[i][seen]) ** 2).mean()

    extra = (target.shape[1], findings_loss)
    scores = np.array([fit_and_score("deep", x, tab, y, internal, epochs, s, *extra)
                       for s in range(3)])  # fmt: skip
    print(field_probe.summary(f"annotated {fraction:g}", scores, oracle, t0), flush=True)


if __name__ == "__main__":
    main()
