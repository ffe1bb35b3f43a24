"""Evaluation benchmarks.

    python bench/bench_evaluate.py throughput [--patients 1000 --parts 2]
    python bench/bench_evaluate.py metrics [--sizes 10000,100000 --bootstrap 200]

throughput: inference + every metric + the report for a synthetic cohort of --patients
(all splits), inference as --parts Ray tasks per split on the local Ray. The checkpoint is
a freshly initialised debug-preset model unless --checkpoint is given: inference costs the
same for trained and untrained weights, and the bench then needs no training run.

metrics: the metric computation alone (reference fit + every number of metrics.json for
one split, with and without the bootstrap CIs) on prediction tables of 10,000 and 100,000
patients, with the peak memory of the process: C-index implementations are often O(n^2) in
memory, and the report must not fall over on a registry cohort.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdls_dist.config import EvalConfig, load_config, to_dict  # noqa: E402
from mmdls_dist.data.prepare import resolve_data  # noqa: E402
from mmdls_dist.data.shards import load_manifest, manifest_hash  # noqa: E402
from mmdls_dist.evaluation.evaluate import evaluate_frame, run_evaluation  # noqa: E402
from mmdls_dist.evaluation.reference import fit_reference  # noqa: E402
from mmdls_dist.parallel import init_ray, ray_mapper  # noqa: E402
from mmdls_dist.train import checkpoint  # noqa: E402


def fresh_checkpoint(cfg, directory: Path) -> str:
    """A debug-preset checkpoint with initial weights, written like a training run's."""
    import torch

    from mmdls_dist.model.mmdls import MMDLS
    from mmdls_dist.train.losses import TaskWeighting

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    manifest = load_manifest(cfg.data.shards)
    checkpoint.save(
        directory,
        modules={"model": MMDLS(cfg.model), "weighting": TaskWeighting(cfg.loss)},
        progress=checkpoint.Progress(),
        identity={
            "config": to_dict(cfg),
            "manifest_hash": manifest_hash(manifest),
            "normalization": manifest["normalization"],
            "image_size": manifest["image_size"],
        },
        metrics={},
    )
    return str(directory)


def throughput(args: argparse.Namespace) -> None:
    init_ray()
    out = Path(args.out)
    cfg = load_config(
        "debug",
        [
            f"synth.patients={args.patients}",
            "synth.image_size=96",
            "prep.image_size=96",
            "data.max_slices=12",
        ],
    )
    cfg, _, _ = resolve_data(
        cfg, raw=None, shards=None, workdir=out, mapper=lambda desc: ray_mapper(desc)
    )
    ckpt = args.checkpoint or fresh_checkpoint(cfg, out / "fresh-checkpoint")
    n = sum(s["n_patients"] for s in load_manifest(cfg.data.shards)["splits"].values())
    t0 = time.perf_counter()
    run_evaluation(
        {"model": ckpt},
        cfg.data.shards,
        out / "report",
        EvalConfig(bootstrap=args.bootstrap, parts=args.parts, batch_size=8),
        ray_mapper("inference"),
    )
    seconds = time.perf_counter() - t0
    size = load_manifest(cfg.data.shards)["image_size"]
    print(
        f"\n{n} patients ({cfg.data.max_slices} slices of {size} px), "
        f"{args.parts} inference tasks per split, {args.bootstrap} bootstrap resamples"
    )
    print(
        f"evaluate (inference + metrics + report): {seconds:.1f} s = {n / seconds:.1f} patients/s"
    )


def prediction_table(n: int, rng) -> pd.DataFrame:
    """n patients' predictions with realistic signal (C ~ 0.7), half train, half test."""
    risk = rng.normal(size=n)
    hist = rng.integers(0, 2, n)
    stage = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[stage]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    table = {
        "patient_id": np.arange(n).astype(str),
        "center": "C",
        "histology": hist,
        "split": np.where(np.arange(n) % 2 == 0, "train", "test"),
        "histology_prob": np.clip(0.3 * hist + 0.7 * rng.random(n), 0, 1),
        "stage": stage,
        "stage_prob_I-II": probs[:, 0],
        "stage_prob_III": probs[:, 1],
        "stage_prob_IV": probs[:, 2],
        "dice_lung": rng.uniform(0.9, 1, n),
        "dice_lesion": rng.uniform(0.5, 0.9, n),
    }
    for e in ("dfs", "os"):
        t, c = rng.exponential(30 * np.exp(-0.8 * risk)) + 0.5, rng.uniform(6, 72, n)
        table |= {
            f"{e}_risk": risk,
            f"{e}_time": np.minimum(t, c),
            f"{e}_event": t <= c,
            f"{e}_known": True,
        }
    return pd.DataFrame(table)


def metrics(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    print(f"{'patients':>10}{'bootstrap':>11}{'seconds':>10}{'peak RSS MiB':>14}")
    for n in (int(s) for s in args.sizes.split(",")):
        frame = prediction_table(n, rng)
        for n_boot in (0, args.bootstrap):
            t0 = time.perf_counter()
            cfg = EvalConfig(bootstrap=n_boot)
            ref = fit_reference(frame[frame.split == "train"], None, cfg.horizons)
            result = evaluate_frame(frame, ref, ["test"], cfg)
            seconds = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            assert 0.6 < result["test"]["all"]["os"]["harrell_c"] < 0.8
            print(f"{n:>10}{n_boot:>11}{seconds:>10.1f}{peak:>14.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("throughput", "metrics"))
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--parts", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--checkpoint", help="evaluate this checkpoint instead of a fresh one")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--out", default="bench-out/evaluate")
    args = parser.parse_args()
    {"throughput": throughput, "metrics": metrics}[args.what](args)


if __name__ == "__main__":
    main()
