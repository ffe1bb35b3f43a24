"""Probe: how much of a style's image-only risk the lesion reader's crop lets a CNN see at
all. The reader's CNN (probe_reader_field's, on the 5-radii crop at side 48 of the
ground-truth lesion's largest slice and its neighbours) is trained *on the generator's true
image-only factors* (z-scored, mean squared error), information no model gets in training,
so the result is an optimistic bound on perception from that crop; its estimates then enter
a lifelines Cox model beside the clinical + PET table (probe_findings' external_c).
Cross-fitted: the CNN of each half of the internal patients estimates the other half,
where the Cox model is fitted; the external center gets the two CNNs' mean.

    python docs/experiments/probe_reader_perception.py STYLE [SIZE] [EPOCHS] [RADII] [ARCH]

ARCH "reader" (the default): the reader's CNN; "deep": twice its width and six
convolutions instead of four (Deep below), trained with a random quarter-turn of the crop
per batch and a one-cycle learning rate, the four quarter-turns averaged at evaluation.

No shards and no Ray; the cohort of probe_reader_field (1,500 patients, seed 0).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import probe_reader_field as field_probe  # noqa: E402
from probe_findings import EXTERNAL, IMAGE_ONLY, external_c, table  # noqa: E402

from mmdls_dist.metrics.survival import harrell_c  # noqa: E402

SIDE, RADII = 48, 5.0


class Deep(nn.Module):
    """A deeper reader: width w, 2w, 4w, two convolutions per scale -> n_out (+ a linear
    table term with n_tab columns)."""

    def __init__(self, n_out: int, n_tab: int = 0, width: int = 32):
        super().__init__()
        w, block = width, field_probe.block
        self.cnn = nn.Sequential(
            *block(6, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w), *block(2 * w, 2 * w),
            nn.MaxPool2d(2), *block(2 * w, 4 * w), *block(4 * w, 4 * w),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, n_out))
        self.tab = nn.Linear(n_tab, n_out) if n_tab else None

    def forward(self, x: torch.Tensor, tab: torch.Tensor | None) -> torch.Tensor:
        out = self.head(self.cnn(x).mean((2, 3)))
        return out + self.tab(tab) if self.tab is not None else out


def quarter_turns(model: nn.Module, x: torch.Tensor, tab: torch.Tensor | None) -> torch.Tensor:
    """The model's output averaged over the crop's four quarter-turns."""
    return torch.stack([model(torch.rot90(x, k, (2, 3)), tab) for k in range(4)]).mean(0)


def read(model: nn.Module, x: torch.Tensor, arch: str) -> np.ndarray:
    """The trained CNN's estimates (the deep one's averaged over quarter-turns)."""
    with torch.no_grad():
        return (quarter_turns(model, x, None) if arch == "deep" else model(x, None)).numpy()


def supervised(x, target, train: np.ndarray, epochs: int, seed: int, arch: str) -> nn.Module:
    """A CNN regressing the true factors on `train` -> the model in eval mode."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    if arch == "deep":
        model = Deep(target.shape[1])
    else:
        model = field_probe.Probe(0)
        model.head[-1] = nn.Linear(64, target.shape[1])
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-3)
    steps = epochs * (len(train) // 32)
    deep = arch == "deep"
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps) if deep else None
    for _ in range(epochs):
        model.train()
        order = train[torch.randperm(len(train)).numpy()]
        for start in range(0, len(order) - 31, 32):
            i = order[start : start + 32]
            xi = torch.rot90(x[i], int(np.random.randint(4)), (2, 3)) if deep else x[i]
            loss = ((model(xi, None) - target[i]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    return model.eval()


def main() -> None:
    style = sys.argv[1]
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 96
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    radii = float(sys.argv[4]) if len(sys.argv) > 4 else RADII
    arch = sys.argv[5] if len(sys.argv) > 5 else "reader"
    t0 = time.perf_counter()
    f, centers, images = field_probe.render(style, 1500, size)
    internal = centers != EXTERNAL[style]
    x = field_probe.crops(images, SIDE, radii, False)
    keys = IMAGE_ONLY[style]
    truth = np.stack([f[k] for k in keys], 1).astype(np.float32)
    mu, sd = truth[internal].mean(0), truth[internal].std(0) + 1e-6
    target = torch.from_numpy((truth - mu) / sd)
    inside = np.flatnonzero(internal)
    rng = np.random.default_rng(0)
    halves = np.array_split(rng.permutation(inside), 2)
    estimate = np.zeros_like(truth)
    ext = np.flatnonzero(~internal)
    for part, (fit_on, other) in enumerate(((halves[0], halves[1]), (halves[1], halves[0]))):
        model = supervised(x, target, fit_on, epochs, part, arch)
        estimate[other] = read(model, x[other], arch)
        estimate[ext] += read(model, x[ext], arch) / 2
    print(f"{style}, 1500 patients at {size} px, crop side {SIDE} over {radii:g} radii, {arch}, "
          f"{epochs} epochs [{time.perf_counter() - t0:.0f} s]")  # fmt: skip
    for j, k in enumerate(keys):
        rho = spearmanr(estimate[ext, j], truth[ext, j]).statistic
        print(f"  Spearman on the external center, {k}: {rho:.2f}")
    tab = table(f)
    est = pd.DataFrame(estimate, columns=[f"est_{k}" for k in keys])
    true = pd.DataFrame(truth, columns=[f"true_{k}" for k in keys])
    for endpoint in ("dfs", "os"):
        oracle = harrell_c(f[f"eta_{endpoint}"][ext], f[f"{endpoint}_time"][ext],
                                       f[f"{endpoint}_event"][ext])  # fmt: skip
        row = [f"{endpoint.upper()} oracle {oracle:.3f}"]
        for name, cov in (("table", tab), ("+ estimated", pd.concat([tab, est], axis=1)),
                          ("+ true", pd.concat([tab, true], axis=1))):  # fmt: skip
            c = external_c(cov, f, internal, endpoint)
            row.append(f"{name} {c:.3f} ({c / oracle:.2f})")
        print("  " + "; ".join(row))


if __name__ == "__main__":
    main()
