"""Probe: does a deeper lesion reader learn more of the image-only risk from outcomes? The
reader's CNN against probe_reader_perception's Deep (twice the width, six convolutions),
both on the 5-radii crop at side 48 with the clinical + PET table, trained with the DFS +
OS Cox loss on the internal centers, a random quarter-turn of the crop per batch and a
one-cycle learning rate, the four quarter-turns averaged at evaluation; Harrell's C on the
held-out center, 3 seeds. With STAGE_WEIGHT > 0 the CNN also predicts the TNM stage (three
logits, cross-entropy at that weight): the stage label depends on spicules and satellites
too, so it is a second signal for the same findings.

    python docs/experiments/probe_reader_depth.py STYLE [EPOCHS] [STAGE_WEIGHT] [ARCHS]

ARCHS, comma-separated: deep, reader, deep-rank4 (the deeper CNN's features reach the
log-hazards through a linear bottleneck of 4, as model.radiomics_rank does for radiomics).

No shards and no Ray; the cohort of probe_reader_field (1,500 patients at 96 px, seed 0).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).parent))
import probe_reader_field as field_probe  # noqa: E402
from probe_findings import draws  # noqa: E402
from probe_reader_perception import Deep, quarter_turns  # noqa: E402


def fit_and_score(
    arch, x, tab, y, internal, epochs, seed, n_extra: int = 0, extra_loss=None, train=None
) -> tuple[float, float]:
    """Train `arch` on the internal patients' outcomes (only the indices `train` of them
    where given; and extra_loss(out[:, 2:], i) on n_extra more outputs where given),
    Harrell's C (DFS, OS) on the external center."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    n_out = 2 + n_extra
    deep = arch.startswith("deep")
    model = Deep(n_out, tab.shape[1]) if deep else field_probe.Probe(tab.shape[1])
    if arch == "deep-rank4":  # the CNN's features reach the log-hazards through 4 numbers
        features = model.head[-1].in_features
        model.head = torch.nn.Sequential(
            torch.nn.Dropout(0.2), torch.nn.Linear(features, 4), torch.nn.Linear(4, n_out)
        )
    if not deep and n_extra:
        model.head[-1] = torch.nn.Linear(64, n_out)
        model.tab = torch.nn.Linear(tab.shape[1], n_out)
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-3)
    train = np.flatnonzero(internal) if train is None else train
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (len(train) // 32))
    for _ in range(epochs):
        model.train()
        order = train[torch.randperm(len(train)).numpy()]
        for start in range(0, len(order) - 31, 32):
            i = order[start : start + 32]
            out = model(torch.rot90(x[i], int(np.random.randint(4)), (2, 3)), tab[i])
            loss = field_probe.outcome_loss(out, y, i)
            if extra_loss is not None:
                loss = loss + extra_loss(out[:, 2:], i)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    ext = ~internal
    with torch.no_grad():
        return field_probe.harrell_pair(quarter_turns(model, x[ext], tab[ext]), y[ext])


def main() -> None:
    style = sys.argv[1]
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    stage_weight = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    t0 = time.perf_counter()
    images, internal, y, tab, oracle = field_probe.cohort(style, 1500, 96)
    stage = torch.tensor(draws(style, 1500, 96)[1]["tnm_stage"], dtype=torch.long)
    x = field_probe.crops(images, 48, 5.0, False)
    extra = (
        (3, lambda logits, i: stage_weight * F.cross_entropy(logits, stage[i]))
        if stage_weight
        else ()
    )
    print(f"{style}; oracle DFS {oracle[0]:.3f} OS {oracle[1]:.3f}; stage weight "
          f"{stage_weight:g}", flush=True)  # fmt: skip
    for arch in sys.argv[4].split(",") if len(sys.argv) > 4 else ("deep", "reader"):
        scores = np.array([fit_and_score(arch, x, tab, y, internal, epochs, s, *extra)
                           for s in range(3)])  # fmt: skip
        print(field_probe.summary(f"{arch:6s}", scores, oracle, t0), flush=True)


if __name__ == "__main__":
    main()
