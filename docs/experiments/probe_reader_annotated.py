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
from probe_reader_perception import Deep, quarter_turns  # noqa: E402


def fit_and_score(x, tab, y, target, annotated, internal, epochs, seed) -> tuple[float, float]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = Deep(2 + target.shape[1], tab.shape[1])
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-3)
    train = np.flatnonzero(internal)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (len(train) // 32))
    for _ in range(epochs):
        model.train()
        order = train[torch.randperm(len(train)).numpy()]
        for start in range(0, len(order) - 31, 32):
            i = order[start : start + 32]
            out = model(torch.rot90(x[i], int(np.random.randint(4)), (2, 3)), tab[i])
            loss = field_probe.outcome_loss(out, y, i)
            seen = annotated[i]
            if seen.any():
                loss = loss + ((out[seen, 2:] - target[i][seen]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    ext = ~internal
    with torch.no_grad():
        return field_probe.external_c(quarter_turns(model, x[ext], tab[ext]), y[ext])


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
    scores = np.array([fit_and_score(x, tab, y, target, annotated, internal, epochs, s)
                       for s in range(3)])  # fmt: skip
    print(field_probe.summary(f"annotated {fraction:g}", scores, oracle, t0), flush=True)


if __name__ == "__main__":
    main()
