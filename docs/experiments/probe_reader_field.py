"""Probe: which field of view the lesion reader's crop should have. A small CNN (the
reader's layers) on the crop alone, or on the crop and the clinical + PET table, trained on
the internal centers' outcomes (DFS and OS Cox), scored by Harrell's C on the held-out
center (bench_external's), for several crops cut at the ground-truth lesion:

* fixed side S pixels (model/reader.py until this probe: one pixel per model pixel);
* a field of F equivalent lesion radii (the largest annotated slice's sqrt(area / pi)),
  resampled to S x S: the lesion and its surroundings at one relative scale, whatever the
  lesion's size or the center's pixel spacing;
* the same with the fixed side as a floor (never zooms in past one pixel per pixel).

    python docs/experiments/probe_reader_field.py --style findings [--patients 1500]
        [--size 96] [--side 36] [--fields 6,8] [--epochs 12] [--seeds 2]

No shards and no Ray: the cohort is rendered in memory with the draws of cohort.generate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from probe_findings import EXTERNAL, draws, table  # noqa: E402

from mmdls_dist.data.synth.cohort import STYLES  # noqa: E402
from mmdls_dist.metrics.survival import harrell_c  # noqa: E402
from mmdls_dist.model.layers import normalise_ct  # noqa: E402
from mmdls_dist.model.reader import crop, locate  # noqa: E402
from mmdls_dist.train.losses import cox_loss  # noqa: E402


def render(style: str, n: int, size: int, keep=None):
    """Factors, centers, and per patient CT [S,H,W] in [0,1] and the lesion mask, rendered
    at the model's size (every center's field is the same body, so this is what prep's
    resize gives, less the interpolation); with `keep`, keep(ct, lesion) per patient instead
    (a crop: a large cohort's volumes need not all be held at once)."""
    st, f, centers, n_slices, seeds = draws(style, n, size)
    images = []
    for i in range(n):
        factors = {k: float(f[k][i]) for k in st.factor_keys}
        ct, _, lesion = st.render(factors, st.centers[centers[i]], int(n_slices[i]), size,
                                  int(seeds[i]))  # fmt: skip
        pair = torch.from_numpy(ct).float() / 255, torch.from_numpy(lesion > 0).float()
        images.append(pair if keep is None else keep(*pair))
    return f, centers, images


def crops(images, side: int, field: float, floor: bool) -> torch.Tensor:
    """[N,6,side,side]: CT and lesion mask of the largest lesion slice and its neighbours.
    field 0: one pixel per pixel; else F equivalent radii across, `floor`: at least side."""
    out = []
    for ct, lesion in images:
        valid = torch.ones(1, ct.shape[0], dtype=torch.bool)
        idx, centre, radius = locate(lesion[None], valid)
        view = torch.full((1,), float(side)) if field == 0 else field * radius.clamp(min=1.0)
        if floor:
            view = view.clamp(min=float(side))
        x = [crop(image[None], idx, centre, side, view) for image in (normalise_ct(ct), lesion)]
        out.append(torch.cat(x, 1)[0])
    return torch.stack(out)


def block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class Probe(nn.Module):
    """The reader's CNN (width 16) -> 2 log-hazards; with `n_tab`, a linear table term."""

    def __init__(self, n_tab: int):
        super().__init__()
        self.cnn = nn.Sequential(
            *block(6, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
            *block(64, 64),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 2))
        self.tab = nn.Linear(n_tab, 2) if n_tab else None

    def forward(self, x: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        out = self.head(self.cnn(x).mean((2, 3)))
        return out + self.tab(tab) if self.tab is not None else out


def outcome_loss(out: torch.Tensor, y: torch.Tensor, i) -> torch.Tensor:
    """The DFS + OS Cox loss of log-hazards out [n,>=2] for the patients i of y [N,4]."""
    return sum(
        cox_loss(out[:, j], y[i, 2 * j], y[i, 2 * j + 1] > 0, torch.ones(len(i)) > 0).loss
        for j in (0, 1)
    )


def harrell_pair(out: torch.Tensor, y_ext: torch.Tensor) -> tuple[float, float]:
    """Harrell's C (DFS, OS) of log-hazards out [n,>=2] against y_ext [n,4]."""
    out, y_ext = out.numpy(), y_ext.numpy()
    return tuple(harrell_c(out[:, j], y_ext[:, 2 * j], y_ext[:, 2 * j + 1] > 0) for j in (0, 1))


def summary(name: str, scores: np.ndarray, oracle, t0: float) -> str:
    """One printed line: the seeds' mean DFS / OS C-index, its fraction of the oracle, each
    seed's, and the seconds since t0."""
    dfs, os_ = scores.mean(0)
    return (f"  {name} crop + table: DFS {dfs:.3f} ({dfs / oracle[0]:.2f})  OS {os_:.3f} "
            f"({os_ / oracle[1]:.2f}); per seed {np.round(scores, 3).tolist()} "
            f"[{time.perf_counter() - t0:.0f} s]")  # fmt: skip


def fit_and_score(
    x, tab, y, internal, epochs: int, seed: int, start: Probe | None = None
) -> tuple[float, float]:
    """Train on the internal patients (from `start`'s weights where given), Harrell's C
    (DFS, OS) on the external center."""
    torch.manual_seed(seed)
    model = Probe(tab.shape[1]) if start is None else start
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-3)
    train = np.flatnonzero(internal)
    for _ in range(epochs):
        model.train()
        order = train[torch.randperm(len(train)).numpy()]
        for start in range(0, len(order) - 31, 32):
            i = order[start : start + 32]
            loss = outcome_loss(model(x[i], tab[i]), y, i)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    ext = ~internal
    with torch.no_grad():
        return harrell_pair(model(x[ext], tab[ext]), y[ext])


def cohort(style: str, n: int, size: int, keep=None):
    """-> (rendered images (or keep(ct, lesion) each), internal-center mask, [N,4] DFS / OS
    times and events, the standardised clinical + PET table, the oracle's external C-index
    DFS / OS)."""
    f, centers, images = render(style, n, size, keep)
    internal = centers != EXTERNAL[style]
    y = torch.tensor(np.stack([f["dfs_time"], f["dfs_event"], f["os_time"], f["os_event"]], 1),
                     dtype=torch.float32)  # fmt: skip
    x_tab = table(f)
    x_tab = (x_tab - x_tab[internal].mean()) / x_tab[internal].std().replace(0, 1)
    tab = torch.tensor(x_tab.to_numpy(), dtype=torch.float32)
    ext = ~internal
    oracle = [harrell_c(f[f"eta_{e}"][ext], f[f"{e}_time"][ext], f[f"{e}_event"][ext])
              for e in ("dfs", "os")]  # fmt: skip
    return images, internal, y, tab, oracle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--style", choices=sorted(STYLES), default="findings")
    parser.add_argument("--patients", type=int, default=1500)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--side", type=int, default=36)
    parser.add_argument("--fields", default="6,8", help="equivalent radii across, comma-separated")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    t0 = time.perf_counter()
    images, internal, y, tab, oracle = cohort(args.style, args.patients, args.size)
    print(f"{args.style}, {args.patients} patients at {args.size} px, side {args.side}, "
          f"{args.epochs} epochs, {args.seeds} seeds; oracle DFS {oracle[0]:.3f} OS "
          f"{oracle[1]:.3f}; rendered in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    variants = [("fixed", 0.0, False)]
    for field in (float(v) for v in args.fields.split(",")):
        variants += [(f"{field:g} radii", field, False), (f"{field:g} radii, floor", field, True)]
    for name, field, floor in variants:
        x = crops(images, args.side, field, floor)
        for label, t in (("crop", tab[:, :0]), ("crop + table", tab)):
            scores = np.array([fit_and_score(x, t, y, internal, args.epochs, s)
                               for s in range(args.seeds)])  # fmt: skip
            dfs, os_ = scores.mean(0)
            elapsed = time.perf_counter() - t0
            print(f"  {name:18s} {label:13s} DFS {dfs:.3f} ({dfs / oracle[0]:.2f})  "
                  f"OS {os_:.3f} ({os_ / oracle[1]:.2f})  [{elapsed:.0f} s]")  # fmt: skip


if __name__ == "__main__":
    main()
