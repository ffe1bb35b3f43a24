"""Probe: what a small CNN learns about survival from lesion crops alone, or with the tables,
trained on outcomes only (stage CE + DFS/OS Cox), without the rest of the network.

    python docs/experiments/probe_crops.py SHARDS TRUTH_JSON [--inputs crops|tables|both]
        [--radiomics full|rank4|off] [--norm batch|group|none] [--channels ct|mask|both]
        [--pool mean|meanstd] [--side 32] [--epochs 10] [--batch 16] [--lr 2e-3]

The crop is the one model/reader.py takes, cut here at the ground-truth lesion (largest
annotated slice and its neighbours, 32 x 32 by default), so this measures what the pixels carry when
the location is right, in seconds instead of a full training run. Prints validation
Harrell's C (DFS, OS) per epoch and the Spearman correlation of the predicted DFS risk with
the generator's true margin and texture. Annotated patients only. Used for issue #4's
diagnosis (README, training benchmark).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from scipy.stats import spearmanr
from torch import nn

from mmdls_dist.config import DataConfig
from mmdls_dist.data.loader import make_loader
from mmdls_dist.data.schema import CLINICAL_FEATURES, PET_FEATURES
from mmdls_dist.metrics.survival import harrell_c
from mmdls_dist.model.descriptors import measure
from mmdls_dist.model.reader import crop, locate
from mmdls_dist.train.losses import cox_loss

SIDE = 32
DESCRIPTOR_COLUMNS = [2, 3]  # texture, irregularity (see model/descriptors.py)
# Clinical and PET values and their missing flags; radiomics (values, flags) follow them.
N_SMALL = 2 * (len(CLINICAL_FEATURES) + len(PET_FEATURES))
NORMS = {  # the reader uses BatchNorm; the others are what the README compares it with
    "batch": nn.BatchNorm2d,
    "group": lambda c: nn.GroupNorm(8, c),
    "none": lambda c: nn.Identity(),
}


def load(
    shards: str, split: str, truth: dict, channels: str = "ct", side: int = SIDE
) -> dict[str, torch.Tensor]:
    """Annotated patients of one split: crops "x" at the ground-truth lesion, tables "tab",
    targets "y" (stage, DFS time/event, OS time/event, true margin, true texture), the true
    linear predictors "eta" (DFS, OS) and the texture / irregularity descriptors measured
    on the ground-truth mask "desc" (model/descriptors.py)."""
    cfg = DataConfig(shards=shards, batch_size=16, max_slices=12, num_workers=0, verify="size")
    parts: dict[str, list] = {"x": [], "tab": [], "y": [], "eta": [], "desc": []}
    for b in make_loader(cfg, split, "eval"):
        keep = b.lesion_annotated & (b.lesion_mask.flatten(1).sum(1) >= 3)
        if not keep.any():
            continue
        lesion = b.lesion_mask.float()
        idx, centre, _ = locate(lesion, b.slice_mask)
        view = torch.full((len(idx),), float(side))  # one pixel per pixel, as when it was run
        views = []
        if channels in ("ct", "both"):
            views.append(crop(b.ct.float() / 255, idx, centre, side, view))
        if channels in ("mask", "both"):
            views.append(crop(lesion, idx, centre, side, view))
        parts["x"].append(torch.cat(views, 1)[keep])
        tab = [b.clinical, b.clinical_missing, b.pet, b.pet_missing]
        tab += [b.radiomics, b.radiomics_missing]
        parts["tab"].append(torch.cat([torch.nan_to_num(t.float()) for t in tab], 1)[keep])
        factors = [[truth[p]["margin"], truth[p]["texture"]] for p in b.patient_id]
        y = [b.stage.float(), b.dfs_time, b.dfs_event.float(), b.os_time, b.os_event.float()]
        y = torch.cat([torch.stack(y, 1), torch.tensor(factors)], 1)
        parts["y"].append(y[keep])
        eta = [[truth[p]["eta_dfs"], truth[p]["eta_os"]] for p in b.patient_id]
        parts["eta"].append(torch.tensor(eta)[keep])
        desc = measure(b.ct.float() / 255, lesion, b.slice_mask)[:, DESCRIPTOR_COLUMNS]
        parts["desc"].append(desc[keep])
    return {k: torch.cat(v) for k, v in parts.items()}


class Probe(nn.Module):
    def __init__(
        self, inputs: str, n_tab: int, rank: int, norm: str = "batch", c_in: int = 3,
        pool: str = "mean",
    ):  # fmt: skip
        super().__init__()
        self.inputs = inputs
        n = NORMS[norm]
        self.cnn = nn.Sequential(
            nn.Conv2d(c_in, 32, 3, padding=1), n(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), n(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), n(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), n(64), nn.ReLU(),
        )  # fmt: skip
        self.pool = pool
        self.drop = nn.Dropout(0.2)
        self.rank = rank
        if rank:
            self.bottleneck = nn.Sequential(nn.Dropout(0.5), nn.Linear(n_tab - N_SMALL, rank))
            n_tab = N_SMALL + rank
        self.tab = nn.Sequential(
            nn.Linear(n_tab, 64), nn.GELU(), nn.Dropout(0.3), nn.Linear(64, 64)
        )
        n_cnn = 128 if pool == "meanstd" else 64
        self.head = nn.Linear({"crops": n_cnn, "tables": 64, "both": n_cnn + 64}[inputs], 5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.cnn(x).flatten(2)
        pooled = [f.mean(2)] + ([f.std(2)] if self.pool == "meanstd" else [])
        return self.drop(torch.cat(pooled, 1))

    def forward(self, x: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        if self.rank:
            tab = torch.cat([tab[:, :N_SMALL], self.bottleneck(tab[:, N_SMALL:])], 1)
        parts = {"crops": [self.features(x)], "tables": [self.tab(tab)]}
        parts["both"] = parts["crops"] + parts["tables"]
        return self.head(torch.cat(parts[self.inputs], 1))


def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(out[:, :3], y[:, 0].long(), ignore_index=-1)
    for col, t in ((3, 1), (4, 3)):
        known = ~torch.isnan(y[:, t])
        time_ = torch.nan_to_num(y[:, t], nan=1.0)
        loss = loss + cox_loss(out[:, col], time_, y[:, t + 1] > 0, known).loss
    return loss


def evaluate(out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    scores = {}
    for name, col, t in (("C DFS", 3, 1), ("C OS", 4, 3)):
        k = ~torch.isnan(y[:, t])
        scores[name] = harrell_c(out[k, col].numpy(), y[k, t].numpy(), y[k, t + 1].numpy() > 0)
    scores["rho margin"] = spearmanr(out[:, 3], y[:, 5]).correlation
    scores["rho texture"] = spearmanr(out[:, 3], y[:, 6]).correlation
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards")
    parser.add_argument("truth")
    parser.add_argument("--inputs", choices=("crops", "tables", "both"), default="both")
    parser.add_argument("--radiomics", choices=("full", "rank4", "off"), default="off")
    parser.add_argument("--norm", choices=tuple(NORMS), default="batch")
    parser.add_argument(
        "--channels",
        choices=("ct", "mask", "both"),
        default="ct",
        help="what the crop shows: CT, the ground-truth lesion mask, or both (3 slices each)",
    )
    parser.add_argument(
        "--pool", choices=("mean", "meanstd"), default="mean",
        help="pool the CNN features by their spatial mean, or mean and standard deviation",
    )  # fmt: skip
    parser.add_argument("--side", type=int, default=SIDE, help="crop side, pixels")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    truth = json.loads(Path(args.truth).read_text())["patients"]
    t0 = time.perf_counter()
    train, val = (load(args.shards, s, truth, args.channels, args.side) for s in ("train", "val"))
    if args.radiomics == "off":
        train["tab"], val["tab"] = train["tab"][:, :N_SMALL], val["tab"][:, :N_SMALL]
    print(f"{len(train['x'])} train / {len(val['x'])} val annotated patients, {vars(args)}")
    torch.manual_seed(0)
    rank = 4 if args.radiomics == "rank4" else 0
    model = Probe(
        args.inputs, train["tab"].shape[1], rank, args.norm, train["x"].shape[1], args.pool
    )
    opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=1e-3)
    n = len(train["x"])
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(n)
        for start in range(0, n - args.batch + 1, args.batch):
            i = order[start : start + args.batch]
            loss = task_loss(model(train["x"][i], train["tab"][i]), train["y"][i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            scores = evaluate(model(val["x"], val["tab"]), val["y"])
        print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
