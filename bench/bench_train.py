"""Training benchmarks: learning quality against the synthetic oracle, and DDP scaling.

    python bench/bench_train.py quality [--patients 1000 --epochs 12]
    python bench/bench_train.py scaling

quality: one synthetic cohort (>= 1,000 patients), sharded once; the full model and a
tabular-only model (model.use_imaging=false, same data, same schedule) are trained with Ray
Train (2 CPU workers); prints validation C-index (DFS, OS) as a fraction of the oracle
C-index (the true linear predictors on the same patients), histology AUC and stage macro
AUC, at the checkpoint the run deploys (best.json: the last epoch by default, run.metric).

ceiling: what perfect perception would reach on the same split (Cox models on the true
latent factors and the tables), to tell a perception gap from an unattainable oracle.

scaling: patients/s with 1 and 2 Ray Train workers (one epoch each, same data), and the
DDP overhead per step measured in a 2-process gloo group: step time with gradient
all-reduce vs the same steps under no_sync (no all-reduce).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from mmdls_dist.config import Config, from_dict, load_config, to_dict
from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.prepare import resolve_data, synthetic_oracle
from mmdls_dist.data.shards import load_manifest
from mmdls_dist.parallel import init_ray, ray_mapper
from mmdls_dist.train.launch import fit


def bench_config(args: argparse.Namespace, *overrides: str) -> Config:
    return load_config(
        "debug",
        [
            f"synth.patients={args.patients}",
            f"synth.image_size={args.size}",
            f"prep.image_size={args.size}",
            "synth.min_slices=8",
            "synth.max_slices=16",
            "prep.val_fraction=0.2",
            "prep.test_fraction=0.1",
            f"data.max_slices={args.slices}",
            f"data.batch_size={args.batch}",
            f"optim.epochs={args.epochs}",
            f"optim.lr={args.lr}",
            "optim.warmup_epochs=1",
            "run.checkpoints_to_keep=1",
            "run.max_failures=0",
            f"run.storage_path={Path(args.out).resolve() / 'runs'}",
            *args.set,
            *overrides,
        ],
    )


def prepared(cfg: Config, args: argparse.Namespace):
    return resolve_data(
        cfg, raw=None, shards=None, workdir=Path(args.out), mapper=lambda desc: ray_mapper(desc)
    )


def best_val(result, metric: str) -> dict:
    """The metrics of the checkpoint ranked best by run.metric (what a user deploys)."""
    return max((m for _, m in result.best_checkpoints), key=lambda m: m["score"])


def quality(args: argparse.Namespace) -> None:
    init_ray()
    stamp = time.strftime("%H%M%S")
    runs = {
        "full model": bench_config(args, f"run.name=quality-full-{stamp}"),
        "tabular only": bench_config(
            args, f"run.name=quality-tab-{stamp}", "model.use_imaging=false"
        ),
    }
    rows = {}
    truth = raw = None
    for label, cfg in runs.items():
        cfg, truth, raw = prepared(cfg, args)
        t0 = time.perf_counter()
        result = fit(cfg)
        rows[label] = (best_val(result, cfg.run.metric), time.perf_counter() - t0)
    manifest = load_manifest(cfg.data.shards)
    oracle = synthetic_oracle(truth, raw, cfg.data.shards)
    n_train = manifest["splits"]["train"]["n_patients"]
    n_val = manifest["splits"]["val"]["n_patients"]
    if args.set:
        print("\noverrides: " + " ".join(args.set))
    print(
        f"\ncohort: {args.patients} synthetic patients, {args.size} px, train {n_train}, "
        f"val {n_val}; {args.epochs} epochs, 2 CPU workers; deployed epoch by {cfg.run.metric}"
    )
    header = f"{'':<14}{'C-index DFS':>14}{'C-index OS':>14}{'AUC histology':>15}{'AUC stage':>11}"
    print(header + f"{'Dice lesion':>12}{'minutes':>9}")
    print(f"{'oracle':<14}{oracle['cindex_dfs']:>14.3f}{oracle['cindex_os']:>14.3f}")
    for label, (m, seconds) in rows.items():
        fd = m["val/cindex_dfs"] / oracle["cindex_dfs"]
        fo = m["val/cindex_os"] / oracle["cindex_os"]
        print(
            f"{label:<14}{m['val/cindex_dfs']:>7.3f} ({fd:4.0%}){m['val/cindex_os']:>7.3f} "
            f"({fo:4.0%}){m['val/auc_histology']:>15.3f}{m['val/auc_stage']:>11.3f}"
            f"{m.get('val/dice_lesion', float('nan')):>12.3f}{seconds / 60:>9.1f}"
        )


def ceiling(args: argparse.Namespace) -> None:
    """What perfect perception would reach: Cox models (lifelines) fitted on the training
    split with the true latent factors and/or the tables, C-index on the validation split."""
    import numpy as np
    from lifelines import CoxPHFitter

    from mmdls_dist.metrics.survival import harrell_c

    init_ray()
    cfg, truth, raw = prepared(bench_config(args), args)
    manifest = load_manifest(cfg.data.shards)
    split = {k: e["split"] for e in manifest["shards"] for k in e["keys"]}
    rows = []
    for r in read_cohort(raw, check_pixels=False).records:
        t = truth["patients"][r.patient_id]
        rows.append(
            {
                **{k: t[k] for k in ("margin", "texture", "density", "central", "upper", "size")},
                "log_diameter": np.log(r.clinical["tumor_diameter_mm"]),
                "log_suv": np.log(r.pet["suv_max"]),
                "age": r.clinical["age"],
                "smoker": float(r.clinical["smoking_status"] == 2),
                "split": split[r.patient_id],
                **{
                    f"{e}_{k}": r.labels[f"{e}_{k}"]
                    for e in ("dfs", "os")
                    for k in ("time", "event")
                },
                **{f"eta_{e}": t[f"eta_{e}"] for e in ("dfs", "os")},
            }
        )
    import pandas as pd

    table = pd.DataFrame(rows)
    tables = ["log_diameter", "log_suv", "age", "smoker"]
    sets = {
        "tables only": tables,
        "tables + true margin": tables + ["margin"],
        "tables + true margin + texture": tables + ["margin", "texture"],
        "all true latent factors + tables": tables
        + ["margin", "texture", "density", "central", "upper", "size"],
    }
    print(
        f"\nCox (lifelines, penalizer 0.01) on train, Harrell's C on validation; "
        f"{args.patients} patients"
    )
    for endpoint in ("dfs", "os"):
        d = table.dropna(subset=[f"{endpoint}_time", *tables])
        train, val = d[d.split == "train"], d[d.split == "val"]
        time_, event = val[f"{endpoint}_time"].values, val[f"{endpoint}_event"].values > 0
        oracle = harrell_c(val[f"eta_{endpoint}"].values, time_, event)
        print(f"  {endpoint.upper()}: oracle {oracle:.3f}")
        for label, cols in sets.items():
            cph = CoxPHFitter(penalizer=0.01).fit(
                train[cols + [f"{endpoint}_time", f"{endpoint}_event"]],
                f"{endpoint}_time",
                f"{endpoint}_event",
            )
            risk = np.log(cph.predict_partial_hazard(val[cols]).values)
            print(f"    {label:<34}{harrell_c(risk, time_, event):.3f}")


def _ddp_worker(rank: int, init_file: str, steps: int, out: str, config: dict) -> None:
    """One of 2 gloo ranks: time training steps with and without the gradient all-reduce."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mmdls_dist.train.loop import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    trainer = Trainer(
        from_dict(Config, config), torch.device("cpu"), rank, 2, DistributedDataParallel
    )
    batch = next(iter(trainer.train_loader))
    timings = {}
    for label, sync in (("sync", True), ("no_sync", False)):
        trainer.step(batch, 0.0, last_micro=True)  # warm-up
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            if sync:
                trainer.step(batch, 0.0, last_micro=True)
            else:
                with trainer.module.no_sync():
                    trainer.step(batch, 0.0, last_micro=False)
                trainer.optimizer.zero_grad()
        dist.barrier()
        timings[label] = (time.perf_counter() - t0) / steps
    if rank == 0:
        Path(out).write_text(json.dumps(timings))
    dist.destroy_process_group()


def scaling(args: argparse.Namespace) -> None:
    init_ray()
    cfg = bench_config(args, "optim.epochs=1")
    cfg, _, _ = prepared(cfg, args)
    stamp = time.strftime("%H%M%S")
    rates = {}
    for workers in (1, 2):
        run = dataclasses.replace(cfg.run, name=f"scaling-{workers}-{stamp}", num_workers=workers)
        result = fit(dataclasses.replace(cfg, run=run))
        rates[workers] = result.metrics["train/patients_per_s"]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _ddp_worker,
            args=(f"{tmp}/init", args.ddp_steps, f"{tmp}/out", to_dict(cfg)),
            nprocs=2,
            join=True,
        )
        timings = json.loads(Path(f"{tmp}/out").read_text())
    overhead = (timings["sync"] - timings["no_sync"]) / timings["sync"]
    print(
        f"\n{args.size} px, {args.slices} slices, batch {args.batch}/worker, CPU (1 core per "
        "worker)"
    )
    print(f"  1 worker : {rates[1]:.1f} patients/s")
    print(
        f"  2 workers: {rates[2]:.1f} patients/s  (scaling efficiency "
        f"{rates[2] / (2 * rates[1]):.0%})"
    )
    print(
        f"  DDP step: {timings['sync'] * 1e3:.0f} ms with all-reduce, "
        f"{timings['no_sync'] * 1e3:.0f} ms without -> overhead {overhead:.1%} of a step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("quality", "scaling", "ceiling"))
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--size", type=int, default=96, help="synthetic / stored pixels")
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ddp-steps", type=int, default=10)
    parser.add_argument("--out", default="bench-out/train")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override for every run of the benchmark, repeatable",
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    {"quality": quality, "scaling": scaling, "ceiling": ceiling}[args.what](args)


if __name__ == "__main__":
    main()
