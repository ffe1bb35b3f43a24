"""Probe: is a learning signal without labels what the lesion reader lacks? The reader's
CNN (probe_reader_field's) is first trained, without any label, to fill in masked-out
patches of the internal patients' crops (half of the 8 x 8 patches of the 5-radii crop at
side 48 set to zero; a small decoder from the CNN's 12 x 12 map back to the crop; squared
error on the hidden patches), then trained on the DFS + OS outcomes with the clinical +
PET table as in probe_reader_field, against the same CNN from a random start. To fill in
a hidden patch next to a lesion the CNN has to model rays and nodules around it, which
the outcome alone does not teach it (probe_reader_perception, probe_reader_depth).

    python docs/experiments/probe_reader_pretrain.py STYLE [PRETRAIN_EPOCHS] [SEEDS]

No shards and no Ray; the cohort of probe_reader_field (1,500 patients at 96 px, seed 0).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import probe_reader_field as field_probe  # noqa: E402

SIDE, RADII, PATCH = 48, 5.0, 8


def pretrain(model: field_probe.Probe, x: torch.Tensor, train: np.ndarray, epochs: int, seed: int):
    """Masked-patch reconstruction of the crops `train` with model.cnn as the encoder."""
    gen = torch.Generator().manual_seed(1000 + seed)
    decoder = nn.Sequential(
        nn.Upsample(scale_factor=2), nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=2), nn.Conv2d(32, x.shape[1], 3, padding=1),
    )  # fmt: skip
    params = [*model.cnn.parameters(), *decoder.parameters()]
    opt = torch.optim.AdamW(params, 2e-3, weight_decay=1e-3)
    n_patch = SIDE // PATCH
    for _ in range(epochs):
        model.train()
        order = train[torch.randperm(len(train), generator=gen).numpy()]
        for start in range(0, len(order) - 31, 32):
            xi = x[order[start : start + 32]]
            keep = torch.rand(len(xi), 1, n_patch, n_patch, generator=gen) >= 0.5
            keep = keep.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3).float()
            recon = decoder(model.cnn(xi * keep))
            loss = (((recon - xi) ** 2) * (1 - keep)).sum() / ((1 - keep).sum() * xi.shape[1])
            opt.zero_grad()
            loss.backward()
            opt.step()


def main() -> None:
    style = sys.argv[1]
    pre_epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    seeds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    t0 = time.perf_counter()
    images, internal, y, tab, oracle = field_probe.cohort(style, 1500, 96)
    x = field_probe.crops(images, SIDE, RADII, False)
    print(f"{style}; oracle DFS {oracle[0]:.3f} OS {oracle[1]:.3f}; {pre_epochs} epochs of "
          f"masked-patch pre-training", flush=True)  # fmt: skip
    train = np.flatnonzero(internal)
    scores = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        start = field_probe.Probe(tab.shape[1])
        pretrain(start, x, train, pre_epochs, seed)
        scores.append(field_probe.fit_and_score(x, tab, y, internal, 12, seed, start=start))
        print(f"  seed {seed}: DFS {scores[-1][0]:.3f} OS {scores[-1][1]:.3f} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)  # fmt: skip
    print(field_probe.summary("pre-trained", np.array(scores), oracle, t0), flush=True)


if __name__ == "__main__":
    main()
