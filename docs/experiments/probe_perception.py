"""Probe: how close to the oracle C-index can any model get on a synthetic cohort, given how
well the lesion's margin and texture can be read from its pixels?

    python docs/experiments/probe_perception.py SHARDS TRUTH_JSON [--side 32] [--epochs 30]

Issue #4 asks for >= 0.95 of the oracle C-index. The oracle is the generator's true linear
predictor; a model has to recover its two imaging terms, the lesion margin (spiculation)
and the lesion texture (internal heterogeneity), from pixels. This probe fits Cox models
(lifelines, on the training split's annotated patients) and prints Harrell's C on the
validation split's annotated patients, as a fraction of the oracle on the same patients,
for these inputs next to the tables (clinical + PET values):

  true margin + texture   the generator's latent values: perfect perception
  measured on GT mask     texture and irregularity as model/descriptors.py measures them,
                          on the ground-truth lesion mask
  CT CNN, supervised      a crop CNN (probe_crops.py's, on the CT crop at the
                          ground-truth lesion) trained to regress the *true* margin and
                          texture: information no model gets in training, so an
                          optimistic bound on what can be read from the CT
  + measured              both of the above

Also prints the Spearman correlation of each estimate with the true value. Used for
issue #4's diagnosis (README, training benchmark).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from probe_crops import SIDE, Probe, load
from scipy.stats import spearmanr

from mmdls_dist.data.schema import CLINICAL_FEATURES, PET_FEATURES
from mmdls_dist.metrics.survival import harrell_c

N_CLINICAL, N_PET = len(CLINICAL_FEATURES), len(PET_FEATURES)  # each followed by its flags


def tables(tab: torch.Tensor) -> np.ndarray:
    """Clinical and PET values (standardised, missing = 0) from load()'s tab columns."""
    start_pet = 2 * N_CLINICAL
    return torch.cat([tab[:, :N_CLINICAL], tab[:, start_pet : start_pet + N_PET]], 1).numpy()


def supervised_cnn(train: dict, val: dict, epochs: int, seed: int = 0):
    """Crop CNN regressing the standardised true (margin, texture): (train, val) estimates."""
    torch.manual_seed(seed)
    target = train["y"][:, 5:7]
    mean, std = target.mean(0), target.std(0)
    model = Probe("crops", 1, 0, "batch", train["x"].shape[1])  # no tables: tab net unused
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
    n, batch = len(train["x"]), 32
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (n // batch))
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n)
        for start in range(0, n - batch + 1, batch):
            i = order[start : start + batch]
            # Margin and texture do not depend on orientation: flips and quarter turns.
            x = torch.rot90(train["x"][i], int(torch.randint(4, ())), (-2, -1))
            x = x.flip(-1) if torch.rand(()) < 0.5 else x
            loss = ((estimates(model, x) - (target[i] - mean) / std) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch == epochs - 1 or epoch % 5 == 4:
            est = predict(model, val["x"])
            rho = [spearmanr(est[:, j], val["y"][:, 5 + j]).correlation for j in (0, 1)]
            print(f"  CNN epoch {epoch}: Spearman margin {rho[0]:.3f}, texture {rho[1]:.3f}")
    return predict(model, train["x"]), predict(model, val["x"])


def estimates(model: Probe, x: torch.Tensor) -> torch.Tensor:
    """The probe's first two outputs, read as (margin, texture); no tables involved."""
    return model.head(model.features(x))[:, :2]


@torch.no_grad()
def predict(model: Probe, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return estimates(model, x).numpy()


def cox_cindex(x_train, y_train, x_val, y_val, col: int) -> float:
    """Cox on the training rows with a known label, Harrell's C on the validation rows."""
    import pandas as pd
    from lifelines import CoxPHFitter

    def frame(x, y):
        known = ~torch.isnan(y[:, col]).numpy()
        d = pd.DataFrame(x[known], columns=[f"x{j}" for j in range(x.shape[1])])
        d["time"], d["event"] = y[known, col].numpy(), y[known, col + 1].numpy()
        return d

    cph = CoxPHFitter(penalizer=0.01).fit(frame(x_train, y_train), "time", "event")
    val = frame(x_val, y_val)
    risk = np.log(cph.predict_partial_hazard(val.drop(columns=["time", "event"])).values)
    return harrell_c(risk, val["time"].values, val["event"].values > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards")
    parser.add_argument("truth")
    parser.add_argument("--side", type=int, default=SIDE, help="crop side, pixels")
    parser.add_argument("--epochs", type=int, default=30, help="of the supervised CNN")
    args = parser.parse_args()
    t0 = time.perf_counter()
    truth = json.loads(Path(args.truth).read_text())["patients"]
    train, val = (load(args.shards, s, truth, "ct", args.side) for s in ("train", "val"))
    print(f"{len(train['x'])} train / {len(val['x'])} val annotated patients, {vars(args)}")
    for j, name in enumerate(("texture", "irregularity")):
        true_col = 6 if name == "texture" else 5
        rho = spearmanr(val["desc"][:, j], val["y"][:, true_col]).correlation
        print(f"  measured on GT mask: Spearman {name} vs true {rho:.3f}")
    cnn_train, cnn_val = supervised_cnn(train, val, args.epochs)
    tab_train, tab_val = tables(train["tab"]), tables(val["tab"])
    rows = {
        "tables": ([], []),
        "+ true margin + texture": ([train["y"][:, 5:7].numpy()], [val["y"][:, 5:7].numpy()]),
        "+ measured on GT mask": ([train["desc"].numpy()], [val["desc"].numpy()]),
        "+ CT CNN, supervised": ([cnn_train], [cnn_val]),
        "+ CT CNN + measured": ([cnn_train, train["desc"].numpy()], [cnn_val, val["desc"].numpy()]),
    }
    print(f"\nCox on train, Harrell's C on validation ({len(val['x'])} annotated patients)")
    print(f"{'inputs':<26}{'C DFS':>16}{'C OS':>16}")
    oracle = {}
    for endpoint, col, k in (("dfs", 1, 0), ("os", 3, 1)):
        known = ~torch.isnan(val["y"][:, col])
        y = val["y"][known]
        eta = val["eta"][known, k].numpy()
        oracle[endpoint] = harrell_c(eta, y[:, col].numpy(), y[:, col + 1].numpy() > 0)
    print(f"{'oracle':<26}{oracle['dfs']:>16.3f}{oracle['os']:>16.3f}")
    for label, (extra_train, extra_val) in rows.items():
        x_train = np.concatenate([tab_train, *extra_train], 1)
        x_val = np.concatenate([tab_val, *extra_val], 1)
        cells = []
        for endpoint, col in (("dfs", 1), ("os", 3)):
            c = cox_cindex(x_train, train["y"], x_val, val["y"], col)
            cells.append(f"{c:.3f} ({c / oracle[endpoint]:4.0%})")
        print(f"{label:<26}{cells[0]:>16}{cells[1]:>16}")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
