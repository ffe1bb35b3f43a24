"""External-center benchmark: trained on the internal centers, scored on a center held out.

    python bench/bench_external.py --style findings [--patients 1500 --size 96 --folds 3]

One synthetic cohort of the chosen style, one center held out whole (prep.external_centers)
and the internal patients dealt to K cross-validation folds. On the external center it
prints DFS and OS C-index (Harrell) with 95 % bootstrap CIs and as a fraction of the oracle
(the generator's true linear predictor on the same patients), for

  (a) a Cox model (lifelines) on clinical + PET, fitted on the internal fold patients;
  (b) the network with tables only (model.use_imaging=false);
  (c) the full network, lesion contours given;
  (d) the same full network read CT-only (contours withheld, as `mmdls predict` on a folder
      without them);

each as the fold-0 single model and as the K-fold ensemble; and the external histology ECE
(10 bins) after the temperature scaling fitted on validation, with the uncalibrated ECE,
and the survival calibration error (ICI per risk decile, mean over 12 / 24 / 36 months);
for (b)-(d) also the C-index of the network's own log-hazards, without the survival stack
(evaluation/stacking.py).

--selection also keeps every epoch's checkpoint of the full network's fold 0 and scores each
on the external center, then prints which epoch each model-selection rule picks (best
validation OS C-index, best validation composite, lowest validation Cox loss, the last
epoch) and the external C-index of that pick.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import bench_train  # this folder's: the shared benchmark config
import numpy as np
import pandas as pd

from mmdls_dist.config import Config, EvalConfig, with_values
from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.prepare import resolve_data, synthetic_oracle
from mmdls_dist.data.shards import load_manifest
from mmdls_dist.evaluation.ensemble import combine_members, member_predictions
from mmdls_dist.evaluation.evaluate import SHIFT_ALPHA, evaluate_frame
from mmdls_dist.evaluation.inference import CONTOUR_READ, resolve_checkpoint, run_inference
from mmdls_dist.metrics.calibration import adapt_binary_prior, binary_logits
from mmdls_dist.metrics.classification import reliability
from mmdls_dist.metrics.survival import harrell_c
from mmdls_dist.parallel import init_ray, ray_mapper, serial_mapper
from mmdls_dist.train import checkpoint
from mmdls_dist.train.folds import fold_config
from mmdls_dist.train.launch import fit

ENDPOINTS = ("dfs", "os")
MAP = serial_mapper()  # inference in this process, one part per split
HISTOLOGY_DIAGNOSTICS = (
    "mean_prob", "prevalence", "internal_prevalence", "ece_offset", "offset", "ece_floor",
    "n_histology", "prior_em", "ece_em", "p_em", "internal_ece", "internal_ece_em",
    "internal_ece_gated", "internal_shifted",
)  # fmt: skip
EXTERNAL = {"classic": "HOSP-B", "findings": "HOSP-C"}  # the most shifted of HOSP-A..C


def bench_config(args: argparse.Namespace) -> Config:
    """bench_train's cohort, schedule and run settings, plus this benchmark's style, held-out
    center and folds (no test split); the --set overrides still come last."""
    return bench_train.bench_config(
        args,
        f"synth.style={args.style}",
        f"synth.centers={args.centers}",
        f"prep.external_centers=[{args.external or EXTERNAL[args.style]}]",
        f"prep.folds={args.folds}",
        "prep.test_fraction=0.0",
        *args.set,
    )


def tabular_cox(raw: str, shards: str) -> pd.DataFrame:
    """Log relative hazards on the external center from lifelines Cox models (penalizer
    0.01) on clinical + PET (log1p), fitted on the internal fold patients; missing cells
    imputed with the internal median. -> frame: patient_id, dfs_risk, os_risk."""
    from lifelines import CoxPHFitter

    manifest = load_manifest(shards)
    split = {k: e["split"] for e in manifest["shards"] for k in e["keys"]}
    rows = []
    for r in read_cohort(raw, check_pixels=False).records:
        if r.patient_id not in split:
            continue
        row = {"patient_id": r.patient_id, "external": split[r.patient_id] == "external"}
        for key, value in r.clinical.items():
            if key == "smoking_status":
                for code in (1, 2):
                    row[f"smoking_{code}"] = float(value == code) if value == value else np.nan
            elif isinstance(value, int | float):
                row[key] = float(value)
        for key, value in r.pet.items():
            row[f"log_{key}"] = np.log1p(value) if value is not None else np.nan
        for e in ENDPOINTS:
            row[f"{e}_time"], row[f"{e}_event"] = r.labels[f"{e}_time"], r.labels[f"{e}_event"]
        rows.append(row)
    table = pd.DataFrame(rows)
    labels = {"patient_id", "external", *(f"{e}_{k}" for e in ENDPOINTS for k in ("time", "event"))}
    features = [c for c in table if c not in labels]
    internal = table[~table["external"]]
    x = table[features].astype(float).fillna(internal[features].astype(float).median())
    x = (x - x[~table["external"]].mean()) / x[~table["external"]].std().replace(0, 1)
    out = table[["patient_id"]].copy()
    for e in ENDPOINTS:
        fit_rows = internal.index[internal[f"{e}_time"].notna() & internal[f"{e}_event"].notna()]
        data = x.loc[fit_rows].assign(
            time=table.loc[fit_rows, f"{e}_time"], event=table.loc[fit_rows, f"{e}_event"]
        )
        cph = CoxPHFitter(penalizer=0.01).fit(data, "time", "event")
        out[f"{e}_risk"] = np.log(cph.predict_partial_hazard(x).to_numpy())
    return out[table["external"].to_numpy()]


def c_with_ci(risk, time, event, n_boot: int, seed: int = 0) -> tuple[float, float, float]:
    """Harrell's C and its 95 % percentile bootstrap CI (patient resamples)."""
    rng = np.random.default_rng(seed)
    c = harrell_c(risk, time, event)
    if n_boot == 0:
        return c, float("nan"), float("nan")
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(risk), len(risk))
        if event[i].any():
            boots.append(harrell_c(risk[i], time[i], event[i]))
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return c, lo, hi


def score(frame: pd.DataFrame, labels: pd.DataFrame, n_boot: int) -> dict:
    """C-index per endpoint on the external patients of `frame` (risk columns), labels
    from `labels` (an inference frame: times, events, known flags)."""
    merged = labels.drop(columns=["dfs_risk", "os_risk"]).merge(
        frame[["patient_id", "dfs_risk", "os_risk"]], on="patient_id"
    )
    out = {}
    for e in ENDPOINTS:
        k = merged[f"{e}_known"].to_numpy(bool)
        out[e] = c_with_ci(
            merged[f"{e}_risk"].to_numpy()[k],
            merged[f"{e}_time"].to_numpy()[k],
            merged[f"{e}_event"].to_numpy(bool)[k],
            n_boot,
        )
    return out


def train_folds(cfg: Config, variant: str, folds: int, overrides: dict) -> list[str]:
    """The first `folds` folds' runs (each resumed if already there) -> run folders."""
    runs = []
    for k in range(folds):
        fold_cfg = fold_config(with_values(cfg, {**overrides, "run.name": variant}), k)
        t0 = time.perf_counter()
        result = fit(fold_cfg)
        if result.error:
            raise RuntimeError(f"{variant} fold {k}: {result.error}")
        print(f"  {variant} fold {k}: {time.perf_counter() - t0:.0f} s", flush=True)
        runs.append(str(Path(cfg.run.storage_path) / fold_cfg.run.name))
    return runs


def model_rows(runs: list[str], shards: str, ecfg: EvalConfig, label: str, **extra) -> dict:
    """Single model (fold 0) and fold ensemble on the external center -> label -> metrics."""
    members = [
        member_predictions(resolve_checkpoint(run), shards, ["external"], ecfg, MAP, **extra)
        for run in runs
    ]
    ensemble, ens_ref = combine_members(members, ecfg.horizons)
    internal = internal_case_mix(members)
    out = {}
    for name, (frame, ref) in {
        f"{label}, single": (members[0][0], members[0][2]),
        f"{label}, ensemble": (ensemble, ens_ref),
    }.items():
        ext = evaluate_frame(frame, ref, ["external"], ecfg)["external"]["all"]
        out[name] = {
            "frame": frame,
            # The network's own log-hazards (for an ensemble the mean of its members' raw
            # ones): the same model without the survival stack.
            "unstacked": frame.assign(
                **{f"{e}_risk": frame[f"{e}_risk_uncalibrated"] for e in ENDPOINTS}
            ),
            "ece": ext["histology"].get("ece", float("nan")),
            "ece_raw": ext["histology"].get("ece_uncalibrated", float("nan")),
            "mean_prob": ext["histology"].get("mean_prob", float("nan")),
            "prevalence": ext["histology"].get("prevalence", float("nan")),
            "internal_prevalence": members[0][2].histology_prevalence,
            "n_histology": ext["histology"]["n"],
            **ece_diagnostics(frame),
            **case_mix(ext["histology"]),
            **internal,
            **{f"ici_{e}": survival_ici(ext[e]) for e in ENDPOINTS},
        }
    return out


def ece_diagnostics(frame: pd.DataFrame, draws: int = 200, seed: int = 0) -> dict:
    """What the external histology ECE is made of (diagnostics, never applied to a model):
    the ECE once one logit offset is fitted on the external labels themselves (what remains
    after the case mix's calibration in the large), and the ECE floor, the mean ECE of
    labels drawn from the predicted probabilities (a perfectly calibrated model's ECE on
    this many patients)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import expit

    keep = frame["histology"].to_numpy() >= 0
    prob = frame["histology_prob"].to_numpy(np.float64)[keep]
    y = frame["histology"].to_numpy(np.float64)[keep]
    z = binary_logits(prob)
    fit = minimize_scalar(
        lambda b: float(np.mean(np.logaddexp(0.0, z + b) - y * (z + b))), bounds=(-5, 5),
        method="bounded",
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    floor = [reliability(prob, rng.random(len(prob)) < prob)["ece"] for _ in range(draws)]
    return {
        "ece_offset": reliability(expit(z + fit.x), y)["ece"],
        "offset": float(fit.x),
        "ece_floor": float(np.mean(floor)),
    }


def case_mix(histology: dict) -> dict:
    """The evaluation's label-free case-mix adaptation on the external center: the LUSC
    fraction it estimates, the shift test's p-value and the ECE it leaves."""
    block = histology.get("case_mix", {})
    return {
        "prior_em": block.get("estimated_prevalence", float("nan")),
        "p_em": block.get("p_value", float("nan")),
        "ece_em": block.get("ece", float("nan")),
    }


def internal_case_mix(members) -> dict:
    """The same adaptation on each member's validation patients per internal center, where
    the case mix is the training cohort's: histology ECE as it is, adapted everywhere, and
    adapted only where the shift test finds a shift (the evaluation's rule), mean over the
    groups."""
    before, everywhere, kept, shifted = [], [], [], 0
    for frame, own, ref in members:
        if CONTOUR_READ in own:  # the validation patients read as the external ones were
            own = own[own[CONTOUR_READ] == frame[CONTOUR_READ].any()]
        val = own[(own["split"] == "val") & (own["histology"] >= 0)]
        for _, sub in val.groupby("center"):
            y = sub["histology"].to_numpy()
            prob = sub["histology_prob"].to_numpy(np.float64)
            _, adapted, p = adapt_binary_prior(prob, ref.histology_prevalence)
            before.append(reliability(prob, y)["ece"])
            everywhere.append(reliability(adapted, y)["ece"])
            kept.append(everywhere[-1] if p < SHIFT_ALPHA else before[-1])
            shifted += p < SHIFT_ALPHA
    return {
        "internal_ece": float(np.mean(before)),
        "internal_ece_em": float(np.mean(everywhere)),
        "internal_ece_gated": float(np.mean(kept)),
        "internal_shifted": f"{shifted} of {len(before)}",
    }


def survival_ici(block: dict) -> float:
    """An endpoint's survival calibration error on the external center: the ICI (predicted
    survival against Kaplan-Meier per risk decile), mean over the horizons."""
    values = [v["ici"] for v in block.get("calibration", {}).values()]
    return float(np.nanmean(values)) if values else float("nan")


def selection(run: str, shards: str, ecfg: EvalConfig, labels: pd.DataFrame, n_boot: int):
    """Every epoch's checkpoint of one run on the external center, and the epoch each
    model-selection rule picks from the validation metrics."""
    rows = []
    for url in checkpoint.checkpoints(run):
        metrics = json.loads((Path(url) / checkpoint.METRICS).read_text())
        frame = run_inference(url, shards, ["external"], ecfg, MAP)
        c = score(frame, labels, 0)
        rows.append(
            {
                "epoch": metrics["epoch"],
                "val_c_os": metrics["val/cindex_os"],
                "val_composite": metrics["val/composite"],
                "val_cox_nll": metrics.get("val/cox_nll", float("nan")),
                "ext_c_dfs": c["dfs"][0],
                "ext_c_os": c["os"][0],
            }
        )
    table = pd.DataFrame(rows).sort_values("epoch").reset_index(drop=True)
    picks = {
        "best val C-index OS": table["val_c_os"].idxmax(),
        "best val composite": table["val_composite"].idxmax(),
        "lowest val Cox loss": table["val_cox_nll"].idxmin(),
        "last epoch": len(table) - 1,
    }
    return table, picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--style", choices=sorted(EXTERNAL), default="findings")
    parser.add_argument("--patients", type=int, default=1500)
    parser.add_argument("--centers", type=int, default=3)
    parser.add_argument("--external", default="", help="held-out center (default per style)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument(
        "--train-folds", type=int, default=0, help="train only the first N folds (0 = all)"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--variants", default="tables,full", help="which networks to train")
    parser.add_argument("--selection", action="store_true", help="see the module docstring")
    parser.add_argument("--out", default="bench-out/external")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if args.external:
        EXTERNAL[args.style] = args.external
    init_ray()
    cfg, truth, raw = resolve_data(
        bench_config(args), None, None, Path(args.out), mapper=lambda desc: ray_mapper(desc)
    )
    shards = cfg.data.shards
    manifest = load_manifest(shards)
    ecfg = EvalConfig(bootstrap=0)
    oracle = synthetic_oracle(truth, raw, shards, "external")
    n_ext = manifest["splits"]["external"]["n_patients"]
    n_int = sum(v["n_patients"] for k, v in manifest["splits"].items() if k != "external")
    print(
        f"\n{args.style} style, {args.patients} patients at {args.size} px; external "
        f"{EXTERNAL[args.style]} ({n_ext}), internal {n_int} in {args.folds} folds; "
        f"{args.epochs} epochs; overrides: {' '.join(args.set) or '-'}"
    )
    rows: dict[str, dict] = {
        "(a) Cox clinical + PET (lifelines)": {"frame": tabular_cox(raw, shards)}
    }
    variants = args.variants.split(",")
    trained = args.train_folds or args.folds
    full_runs = None
    if "tables" in variants:
        runs = train_folds(cfg, "tables", trained, {"model.use_imaging": False})
        rows |= model_rows(runs, shards, ecfg, "(b) network, tables only")
    if "full" in variants:
        keep = {"run.checkpoints_to_keep": 0} if args.selection else {}
        full_runs = train_folds(cfg, "full", trained, keep)
        rows |= model_rows(full_runs, shards, ecfg, "(c) network, contours given")
        rows |= model_rows(full_runs, shards, ecfg, "(d) network, CT only", withhold_contours=True)
    labels = run_inference(
        resolve_checkpoint((full_runs or runs)[0]), shards, ["external"], ecfg, MAP
    )
    print(f"\n{'':<38}{'C-index DFS [95% CI]':>26}{'C-index OS [95% CI]':>26}{'ECE hist':>10}")
    print(f"{'oracle':<38}{oracle['cindex_dfs']:>26.3f}{oracle['cindex_os']:>26.3f}")
    figures = {"oracle": oracle, "rows": {}}
    for label, row in rows.items():
        c = score(row["frame"], labels, args.boot)
        cells = []
        for e in ENDPOINTS:
            v, lo, hi = c[e]
            cells.append(f"{v:.3f} ({v / oracle[f'cindex_{e}']:.2f}) [{lo:.2f}, {hi:.2f}]")
        ece = f"{row['ece']:.3f}" if "ece" in row else "-"
        print(f"{label:<38}{cells[0]:>26}{cells[1]:>26}{ece:>10}")
        figures["rows"][label] = {
            **{e: c[e] for e in ENDPOINTS},
            "ece": row.get("ece"),
            "ece_uncalibrated": row.get("ece_raw"),
            **{k: row.get(k) for k in HISTOLOGY_DIAGNOSTICS},
            **{f"ici_{e}": row.get(f"ici_{e}") for e in ENDPOINTS},
        }
    print("(fraction of the oracle in parentheses; ECE after temperature scaling on validation)")
    for label, row in rows.items():
        if "unstacked" in row:
            c = score(row["unstacked"], labels, 0)
            cells = ", ".join(
                f"{e.upper()} {c[e][0]:.3f} ({c[e][0] / oracle[f'cindex_{e}']:.2f})"
                for e in ENDPOINTS
            )
            print(f"  {label}: without the survival stack C-index {cells}")
            figures["rows"][label]["unstacked"] = {e: c[e][0] for e in ENDPOINTS}
    for label, row in rows.items():
        if "ece_raw" in row:
            print(
                f"  {label}: histology ECE {row['ece']:.3f} (uncalibrated {row['ece_raw']:.3f})"
                f"; survival ICI DFS {row['ici_dfs']:.3f}, OS {row['ici_os']:.3f}"
            )
            print(
                f"    P(LUSC) mean {row['mean_prob']:.3f}, external {row['prevalence']:.3f}"
                f" (internal {row['internal_prevalence']:.3f}); ECE after one logit offset"
                f" fitted on the external labels {row['ece_offset']:.3f} (offset"
                f" {row['offset']:+.2f}); ECE of a calibrated model on {row['n_histology']}"
                f" patients {row['ece_floor']:.3f}"
            )
            print(
                f"    prior shift adapted by EM without labels: LUSC fraction estimated"
                f" {row['prior_em']:.3f}, ECE {row['ece_em']:.3f} (shift test p"
                f" {row['p_em']:.2g}); internal validation centers ECE"
                f" {row['internal_ece']:.3f} -> {row['internal_ece_em']:.3f}, adapted only"
                f" where p < {SHIFT_ALPHA:g} ({row['internal_shifted']})"
                f" {row['internal_ece_gated']:.3f}"
            )
    if args.selection and full_runs:
        table, picks = selection(full_runs[0], shards, ecfg, labels, args.boot)
        print("\nfull network fold 0, every epoch on the external center:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        for rule, i in picks.items():
            r = table.loc[i]
            print(
                f"  {rule:<22} epoch {int(r['epoch']):>2}: external C DFS {r['ext_c_dfs']:.3f}"
                f", OS {r['ext_c_os']:.3f}"
            )
        figures["selection"] = table.to_dict("records")
    out = Path(args.out) / f"figures-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(figures, indent=1, default=float))
    print(f"\nfigures: {out}")


if __name__ == "__main__":
    main()
