"""Probe: does the outcome-trained lesion reader approach its perception ceiling with more
patients alone? One cohort of PATIENTS (seed 0, 96 px, bench_external's held-out center);
the reader (probe_reader_depth's recipe: the 5-radii crop at side 48 with the clinical +
PET table, DFS + OS Cox loss, a random quarter-turn per batch, one-cycle learning rate, the
four quarter-turns averaged at evaluation) trained on the first N of a fixed shuffle of the
internal patients for each N in SIZES, scored by Harrell's C on the whole external center
(the same patients for every N), 3 seeds.

    python docs/experiments/probe_reader_data.py STYLE [PATIENTS] [SIZES] [ARCHS] [EPOCHS]

PATIENTS 4500 gives about 3,000 internal and 1,500 external patients; SIZES defaults to
1000,2000,3000 (1,000 is the internal cohort of the other reader probes' 1,500); ARCHS as in
probe_reader_depth (reader, deep). The same number of epochs at every N: more patients are
also more steps. No shards and no Ray.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import probe_reader_field as field_probe  # noqa: E402
from probe_reader_depth import fit_and_score  # noqa: E402
from probe_reader_perception import RADII, SIDE  # noqa: E402


def main() -> None:
    style = sys.argv[1]
    patients = int(sys.argv[2]) if len(sys.argv) > 2 else 4500
    sizes = [int(v) for v in (sys.argv[3] if len(sys.argv) > 3 else "1000,2000,3000").split(",")]
    archs = (sys.argv[4] if len(sys.argv) > 4 else "reader").split(",")
    epochs = int(sys.argv[5]) if len(sys.argv) > 5 else 12
    t0 = time.perf_counter()

    def keep(ct, lesion):  # the crop only: a 4,500-patient cohort's volumes are 5 GB
        return field_probe.crops([(ct, lesion)], SIDE, RADII, False)[0]

    crops, internal, y, tab, oracle = field_probe.cohort(style, patients, 96, keep)
    x = torch.stack(crops)
    shuffled = np.flatnonzero(internal)[np.random.default_rng(0).permutation(internal.sum())]
    print(f"{style}, {patients} patients: {internal.sum()} internal, {(~internal).sum()} "
          f"external; oracle DFS {oracle[0]:.3f} OS {oracle[1]:.3f}; rendered in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    for arch in archs:
        for n in sizes:
            if n > len(shuffled):
                raise SystemExit(f"SIZES: {n} > {len(shuffled)} internal patients")
            train = shuffled[:n]
            scores = np.array([fit_and_score(arch, x, tab, y, internal, epochs, s, train=train)
                               for s in range(3)])  # fmt: skip
            print(field_probe.summary(f"{arch:6s} N={n:4d}", scores, oracle, t0), flush=True)


if __name__ == "__main__":
    main()
