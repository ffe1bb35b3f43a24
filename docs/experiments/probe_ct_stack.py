"""Probe: the CT-only read (contours withheld, as `mmdls predict` on a folder without them)
scored through a reference fitted on the contour read of the training cohort alone (what
the package did before the reference per read) or through the package's reference, whose
CT-only read has its own, fitted on the training cohort read without its contours (the
survival stack, slopes and baselines where the lesion descriptors and the network's
log-hazard come from the segmentor's own mask, as at prediction).

    python docs/experiments/probe_ct_stack.py --style classic [--patients 1500 --out DIR]

Trains (or resumes) bench_external's full network on K folds with the same cohort and
settings, then prints the external C-index (Harrell) of the CT-only read, single model
(fold 0) and fold ensemble, for: the network's own log-hazard, through the contour read's
reference, through the package's; and the stack's coefficients of both (fold 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_external as bx  # noqa: E402
import numpy as np  # noqa: E402

from mmdls_dist.config import EvalConfig  # noqa: E402
from mmdls_dist.data.prepare import resolve_data, synthetic_oracle  # noqa: E402
from mmdls_dist.evaluation.ensemble import combine_members, member_predictions  # noqa: E402
from mmdls_dist.evaluation.evaluate import evaluate_frame  # noqa: E402
from mmdls_dist.evaluation.inference import (  # noqa: E402
    CONTOUR_READ,
    checkpoint_identity,
    model_manifest,
    resolve_checkpoint,
    run_inference,
)
from mmdls_dist.evaluation.reference import fit_on_training_frame  # noqa: E402
from mmdls_dist.parallel import init_ray, ray_mapper  # noqa: E402


def contour_read_member(ckpt: str, shards: str, ecfg: EvalConfig):
    """member_predictions as before the reference per read: one reference, fitted on the
    training cohort read on its contours (the segmentor's mask for a patient without one)
    -> (external frame, own frame, reference)."""
    frame = run_inference(ckpt, shards, ["external"], ecfg, bx.MAP, withhold_contours=True)
    source = checkpoint_identity(ckpt)["config"]["data"]["shards"]
    have = set(model_manifest(source, checkpoint_identity(ckpt))["splits"])
    splits = [s for s in ("train", "val") if s in have]
    own = run_inference(ckpt, source, splits, ecfg, bx.MAP).drop(columns=[CONTOUR_READ])
    ref = fit_on_training_frame(own, ecfg.horizons)
    return ref.calibrate(frame.drop(columns=[CONTOUR_READ])), ref.calibrate(own), ref


def calibration(frame, ref, ecfg: EvalConfig) -> str:
    """External histology ECE (after temperature scaling) and survival ICI (mean over the
    horizons) of calibrated predictions, as bench_external reports them."""
    ext = evaluate_frame(frame, ref, ["external"], ecfg)["external"]["all"]
    ici = " / ".join(f"{bx.survival_ici(ext[e]):.3f}" for e in bx.ENDPOINTS)
    return f"histology ECE {ext['histology'].get('ece', float('nan')):.3f}, survival ICI {ici}"


def c_cells(frame, labels, oracle, column: str = "risk") -> str:
    scored = frame.assign(**{f"{e}_risk": frame[f"{e}_{column}"] for e in bx.ENDPOINTS})
    c = bx.score(scored, labels, 0)
    return " / ".join(
        f"{c[e][0]:.3f} ({c[e][0] / oracle[f'cindex_{e}']:.2f})" for e in bx.ENDPOINTS
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--style", choices=sorted(bx.EXTERNAL), default="classic")
    parser.add_argument("--patients", type=int, default=1500)
    parser.add_argument("--centers", type=int, default=3)
    parser.add_argument("--external", default="")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="bench-out/probe-ct-stack")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    init_ray()
    cfg, truth, raw = resolve_data(
        bx.bench_config(args), None, None, Path(args.out), mapper=lambda d: ray_mapper(d)
    )
    shards = cfg.data.shards
    ecfg = EvalConfig(bootstrap=0)
    oracle = synthetic_oracle(truth, raw, shards, "external")
    runs = bx.train_folds(cfg, "full", args.folds, {})
    ckpts = [resolve_checkpoint(run) for run in runs]
    labels = run_inference(ckpts[0], shards, ["external"], ecfg, bx.MAP)
    today = [contour_read_member(c, shards, ecfg) for c in ckpts]
    matched = [
        member_predictions(c, shards, ["external"], ecfg, bx.MAP, withhold_contours=True)
        for c in ckpts
    ]
    for _, _, ref in matched:
        assert ref.ct_only is not None, "the package's reference has no CT-only read"
    print(
        f"\n{args.style}, {args.patients} patients; oracle DFS {oracle['cindex_dfs']:.3f}, "
        f"OS {oracle['cindex_os']:.3f}; CT-only external C-index DFS / OS (fraction):"
    )
    for name, members in (("contour-read ref.", today), ("reference per read", matched)):
        ensemble, ens_ref = combine_members(members, ecfg.horizons)
        single = members[0][0]
        print(f"  {name:<20} single {c_cells(single, labels, oracle)}")
        print(f"  {'':<20} ensemble {c_cells(ensemble, labels, oracle)}")
        print(f"  {'':<20} single {calibration(single, members[0][2], ecfg)}")
        print(f"  {'':<20} ensemble {calibration(ensemble, ens_ref, ecfg)}")
        if name == "contour-read ref.":
            raw = "risk_uncalibrated"
            print(f"  {'own log-hazard':<20} single {c_cells(single, labels, oracle, raw)}")
            print(f"  {'':<20} ensemble {c_cells(ensemble, labels, oracle, raw)}")
    for name, ref in (("contour-read", today[0][2]), ("CT-only read's", matched[0][2].ct_only)):
        for e in bx.ENDPOINTS:
            coefs = ref.stack[e]
            shown = ", ".join(f"{k} {v:+.2f}" for k, v in coefs.items() if abs(v) >= 0.05)
            print(f"  fold 0 {name} stack {e.upper()}: {shown}")
    for k, (t, m) in enumerate(zip(today, matched, strict=True)):
        diff = {
            e: float(np.mean(np.abs(t[0][f"{e}_risk"].to_numpy() - m[0][f"{e}_risk"].to_numpy())))
            for e in bx.ENDPOINTS
        }
        print(f"  fold {k}: mean |difference| of the reported log-hazards {diff}")


if __name__ == "__main__":
    main()
