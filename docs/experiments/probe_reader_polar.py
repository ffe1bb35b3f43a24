"""Probe: does the lesion reader learn more from outcomes when it cannot see the lesion's
orientation? A lesion finding (a spicule, a satellite nodule, an irregular margin) means
the same at any angle around the lesion, and a CNN trained on a few hundred patients has
to learn each orientation separately. Three ways to remove orientation, each against the
reader of today (probe_reader_field's CNN on the 5-radii crop at the default side 48, with
the clinical + PET table, 12 epochs):

* d4: the crop rotated by a random multiple of 90 degrees and mirrored, per patient and
  step, in training; the eight orientations averaged at evaluation;
* polar: the same field resampled on a (radius, angle) grid around the lesion centre
  (radius 0 .. 2.5 equivalent radii, the 5-radii field's half side; angle 0 .. 2 pi), the
  CNN with circular padding along the angle, features averaged over the angle and kept
  per radius band: a rotation is a circular shift, which the average removes;
* polar-rot: polar, plus a random circular shift of the angle in training (no effect on
  the output but through the padding seam; a check that the invariance is real).

    python docs/experiments/probe_reader_polar.py STYLE [VARIANTS] [SEEDS]

No shards and no Ray; the cohort of probe_reader_field (1,500 patients at 96 px, seed 0).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import probe_reader_field as field_probe  # noqa: E402

from mmdls_dist.model.layers import normalise_ct  # noqa: E402
from mmdls_dist.model.reader import locate  # noqa: E402

SIDE, RADII, N_RHO, N_THETA = 48, 5.0, 24, 48


def polar_crops(images) -> torch.Tensor:
    """[N,6,N_RHO,N_THETA]: CT and lesion mask of the largest lesion slice and its two
    neighbours on a (radius, angle) grid, radius 0 .. RADII / 2 equivalent radii."""
    out = []
    rho = (torch.arange(N_RHO) + 0.5) / N_RHO * (RADII / 2)
    theta = torch.arange(N_THETA) * (2 * torch.pi / N_THETA)
    for ct, lesion in images:
        s, h, w = ct.shape
        idx, centre, radius = locate(lesion[None], torch.ones(1, s, dtype=torch.bool))
        r_px = radius.clamp(min=1.0)[0]
        gx = centre[0, 0] + rho[:, None] * r_px * torch.cos(theta)[None] * 2 / w
        gy = centre[0, 1] + rho[:, None] * r_px * torch.sin(theta)[None] * 2 / h
        grid = torch.stack([gx, gy], -1)[None]
        x = []
        for image in (normalise_ct(ct), lesion):
            slices = image[idx[0]][None]  # [1,3,H,W]
            x.append(F.grid_sample(slices, grid, align_corners=False))
        out.append(torch.cat(x, 1)[0])
    return torch.stack(out)


class PolarBlock(nn.Module):
    """3x3 conv, circular along the angle (last axis), zero-padded along the radius."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, bias=False)
        self.rest = nn.Sequential(nn.BatchNorm2d(c_out), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(F.pad(x, (1, 1, 0, 0), mode="circular"), (0, 0, 1, 1))
        return self.rest(self.conv(x))


class PolarProbe(nn.Module):
    """The reader's layer sizes on the polar crop; features averaged over the angle, the
    N_RHO / 4 radius bands kept, -> 2 log-hazards (+ a linear table term)."""

    def __init__(self, n_tab: int):
        super().__init__()
        self.cnn = nn.Sequential(
            PolarBlock(6, 32), PolarBlock(32, 32), nn.MaxPool2d(2),
            PolarBlock(32, 64), nn.MaxPool2d(2), PolarBlock(64, 64),
        )  # fmt: skip
        bands = N_RHO // 4
        self.band = nn.Conv1d(64, 64, bands)  # one weight per radius band, then summed
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 2))
        self.tab = nn.Linear(n_tab, 2)

    def forward(self, x: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        f = self.cnn(x).mean(3)  # [B,64,bands]
        return self.head(torch.relu(self.band(f)[:, :, 0])) + self.tab(tab)


def d4(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, (2, 3))
    return x.flip(3) if flip else x


def fit_and_score(variant, x, tab, y, internal, epochs, seed) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = (
        PolarProbe(tab.shape[1]) if variant.startswith("polar") else field_probe.Probe(tab.shape[1])
    )
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-3)
    train = np.flatnonzero(internal)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = train[torch.randperm(len(train)).numpy()]
        for start in range(0, len(order) - 31, 32):
            i = order[start : start + 32]
            xi = x[i]
            if variant == "d4":
                k = torch.randint(0, 4, (len(i),), generator=gen)
                fl = torch.randint(0, 2, (len(i),), generator=gen)
                xi = torch.stack([d4(xi[j : j + 1], int(k[j]), bool(fl[j]))[0]
                                  for j in range(len(i))])  # fmt: skip
            elif variant == "polar-rot":
                shift = torch.randint(0, N_THETA, (len(i),), generator=gen)
                xi = torch.stack([xi[j].roll(int(shift[j]), -1) for j in range(len(i))])
            loss = field_probe.outcome_loss(model(xi, tab[i]), y, i)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    ext = np.flatnonzero(~internal)
    with torch.no_grad():
        if variant == "d4":
            out = torch.stack([model(d4(x[ext], k, fl), tab[ext])
                               for k in range(4) for fl in (False, True)]).mean(0)  # fmt: skip
        else:
            out = model(x[ext], tab[ext])
    return field_probe.harrell_pair(out, y[ext])


def main() -> None:
    style = sys.argv[1]
    variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["base", "d4", "polar"]
    seeds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    t0 = time.perf_counter()
    images, internal, y, tab, oracle = field_probe.cohort(style, 1500, 96)
    cart = field_probe.crops(images, SIDE, RADII, False)
    polar = polar_crops(images)
    print(f"{style}; oracle DFS {oracle[0]:.3f} OS {oracle[1]:.3f} "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)  # fmt: skip
    for variant in variants:
        x = polar if variant.startswith("polar") else cart
        scores = np.array([fit_and_score(variant, x, tab, y, internal, 12, s)
                           for s in range(seeds)])  # fmt: skip
        print(field_probe.summary(f"{variant:10s}", scores, oracle, t0), flush=True)


if __name__ == "__main__":
    main()
