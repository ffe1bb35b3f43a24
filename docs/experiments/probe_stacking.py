"""Probe: two post-hoc refits of a trained network's survival output, scored on a held-out
split, to decide whether the reference should hold them.

    python docs/experiments/probe_stacking.py RUN_OR_CHECKPOINT SHARDS [--split external]

1. Stacking: a lifelines Cox on the network's log-hazard plus the clinical and PET inputs
   as the network receives them (z-scored with the training statistics, a missing value at
   the training mean), fitted on the validation split, or on the train and validation
   splits; Harrell's C of its linear predictor on `--split`, beside the network's own and
   a Cox on the same inputs without the network.
2. Calibration slope: the network's log-hazard times the slope of a one-covariate Cox fitted
   on the validation split, with the Breslow baseline on the training or validation split;
   the integrated calibration index (survival_calibration's ici, deciles) on `--split` at
   12 / 24 / 36 months, beside today's (slope 1, baseline on the training split).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from probe_args import model_on_split

from mmdls_dist.evaluation.inference import (
    eval_loader,
    load_model,
    model_manifest,
    resolve_checkpoint,
)
from mmdls_dist.metrics.calibration import survival_calibration
from mmdls_dist.metrics.survival import BreslowBaseline, harrell_c

HORIZONS = (12.0, 24.0, 36.0)


@torch.no_grad()
def table(ckpt: str, shards: str, splits: list[str]) -> pd.DataFrame:
    """One row per patient: split, the model's tabular inputs x0.., log-hazards, labels."""
    loaded = load_model(ckpt)
    manifest = model_manifest(shards, loaded.identity)
    rows = []
    for split in splits:
        for batch in eval_loader(loaded, shards, split, manifest, 16):
            out = loaded.model(batch)
            x = torch.cat([batch.clinical, batch.pet], 1).numpy()
            for i in range(len(batch)):
                row = {"split": split, **{f"x{j}": float(v) for j, v in enumerate(x[i])}}
                for e in ("dfs", "os"):
                    row[f"{e}_risk"] = float(getattr(out, f"{e}_log_hazard")[i])
                    row[f"{e}_time"] = float(getattr(batch, f"{e}_time")[i])
                    row[f"{e}_event"] = bool(getattr(batch, f"{e}_event")[i])
                    row[f"{e}_known"] = bool(getattr(batch, f"{e}_known")[i])
                rows.append(row)
    return pd.DataFrame(rows)


def cox_risk(frame: pd.DataFrame, fit_on, columns: list[str], e: str, penalizer: float):
    from lifelines import CoxPHFitter

    data = frame.loc[fit_on, columns].assign(
        time=frame.loc[fit_on, f"{e}_time"], event=frame.loc[fit_on, f"{e}_event"].astype(int)
    )
    cph = CoxPHFitter(penalizer=penalizer).fit(data, "time", "event")
    return np.log(cph.predict_partial_hazard(frame[columns]).to_numpy()), cph


def main() -> None:
    args = model_on_split(__doc__)
    frame = table(resolve_checkpoint(args.checkpoint), args.shards, ["train", "val", args.split])
    tab = [c for c in frame if c.startswith("x")]
    for e in ("dfs", "os"):
        known = frame[f"{e}_known"]
        held = (frame["split"] == args.split) & known

        def c(risk, held=held, e=e):
            risk = np.asarray(risk)[held.to_numpy()]
            h = frame[held]
            return harrell_c(risk, h[f"{e}_time"].to_numpy(), h[f"{e}_event"].to_numpy(bool))

        cells = {"network": c(frame[f"{e}_risk"])}
        trval = frame["split"].isin(["train", "val"]) & known
        cells["Cox, inputs only (train+val)"] = c(cox_risk(frame, trval, tab, e, 0.01)[0])
        for name, fit_on in (("val", (frame["split"] == "val") & known), ("train+val", trval)):
            for pen in (0.01, 0.1):
                risk, _ = cox_risk(frame, fit_on, [*tab, f"{e}_risk"], e, pen)
                cells[f"stack on {name}, penalizer {pen}"] = c(risk)
        print(f"{e.upper()} C-index on {args.split}:")
        for name, value in cells.items():
            print(f"  {name:<38}{value:.3f}")

        val = (frame["split"] == "val") & known
        _, cph = cox_risk(frame, val, [f"{e}_risk"], e, 0.0)
        slope = float(cph.params_[f"{e}_risk"])

        def ici(slope, baseline_split, e=e, held=held, known=known):
            fit = frame[(frame["split"] == baseline_split) & known]
            base = BreslowBaseline.fit(
                slope * fit[f"{e}_risk"], fit[f"{e}_time"], fit[f"{e}_event"]
            )
            h = frame[held]
            surv = base.survival_at(slope * h[f"{e}_risk"].to_numpy(), HORIZONS)
            cal = survival_calibration(surv, h[f"{e}_time"], h[f"{e}_event"], HORIZONS)
            return " / ".join(f"{cal[f'{t:g}']['ici']:.3f}" for t in HORIZONS)

        print(f"  calibration slope on val {slope:.2f}; ICI at 12 / 24 / 36 months:")
        print(f"    slope 1, baseline on train (today)   {ici(1.0, 'train')}")
        print(f"    slope, baseline on train            {ici(slope, 'train')}")
        print(f"    slope, baseline on val              {ici(slope, 'val')}")


if __name__ == "__main__":
    main()
