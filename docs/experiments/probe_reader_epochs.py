"""Probe: does the lesion reader alone get nearer the findings oracle with twice the
training? probe_reader_field's CNN on 5-radii crops of side SIDE (48: the default preset's
model.lesion_reader) with the clinical + PET table, 3 seeds per epoch count, Harrell's C on
the held-out center. No shards and no Ray.

    python docs/experiments/probe_reader_epochs.py STYLE SIDE EPOCHS[,EPOCHS...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import probe_reader_field as field_probe  # noqa: E402


def main() -> None:
    style, side = sys.argv[1], int(sys.argv[2])
    epoch_counts = [int(e) for e in sys.argv[3].split(",")]
    t0 = time.perf_counter()
    images, internal, y, tab, oracle = field_probe.cohort(style, 1500, 96)
    x = field_probe.crops(images, side, 5.0, False)
    print(f"{style}, side {side}; oracle DFS {oracle[0]:.3f} OS {oracle[1]:.3f}")
    for epochs in epoch_counts:
        scores = np.array([field_probe.fit_and_score(x, tab, y, internal, epochs, seed)
                           for seed in range(3)])  # fmt: skip
        print(field_probe.summary(f"{epochs:3d} epochs,", scores, oracle, t0))


if __name__ == "__main__":
    main()
