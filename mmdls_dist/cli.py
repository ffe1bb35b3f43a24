"""`mmdls <subcommand>`: the command line. jobs/*.py are thin wrappers around it.

Subcommands: synth, ingest, shard, verify, stream, train, tune, evaluate, predict.
`mmdls <subcommand> --help` explains each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mmdls_dist.config import DataConfig

log = logging.getLogger("mmdls")


def _mapper(executor: str, desc: str, address: str | None = None, gpus: float = 0.0):
    from mmdls_dist import parallel

    if executor == "serial":
        return parallel.serial_mapper(desc)
    parallel.init_ray(address)
    return parallel.ray_mapper(desc, num_gpus=gpus)


def _add_executor(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        choices=("ray", "serial"),
        default="ray",
        help="ray: one Ray task per chunk/shard (local Ray, or the cluster under `ray job "
        "submit` / RAY_ADDRESS); serial: in this process. Results are identical. (default: ray)",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: auto)")


def cmd_synth(args: argparse.Namespace) -> int:
    from mmdls_dist.data.synth import SynthSpec, generate

    spec = SynthSpec(
        n_patients=args.patients,
        seed=args.seed,
        n_centers=args.centers,
        image_size=args.image_size,
        min_slices=args.min_slices,
        max_slices=args.max_slices,
    )
    out = Path(args.out)
    truth = Path(args.truth) if args.truth else out.parent / f"{out.name}.truth.json"
    t0 = time.perf_counter()
    result = generate(spec, out, truth, mapper=_mapper(args.executor, "synth", args.ray_address))
    log.info(
        "wrote %d synthetic patients from %d centers to %s in %.1fs; ground truth: %s",
        spec.n_patients,
        spec.n_centers,
        out,
        time.perf_counter() - t0,
        truth,
    )
    for endpoint, info in result["endpoints"].items():
        log.info(
            "  %s: oracle C-index %.3f, event rate %.2f",
            endpoint.upper(),
            info["oracle_cindex"],
            info["event_rate"],
        )
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from mmdls_dist.data.ingest import read_cohort

    report = read_cohort(
        args.raw,
        check_pixels=not args.no_pixels,
        mapper=_mapper(args.executor, "check images", args.ray_address),
    )
    print(report.summary(max_defects=args.max_defects))
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1))
        log.info("full report written to %s", args.report)
    return 0 if report.ok else 1


def _split_recipe(args: argparse.Namespace):
    from mmdls_dist.data.splits import SplitRecipe

    external = tuple(c for c in (args.external_centers or "").split(",") if c)
    return SplitRecipe(
        seed=args.split_seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        external_centers=external,
    )


def _shard_options(args: argparse.Namespace):
    from mmdls_dist.data.shards import ShardOptions

    return ShardOptions(
        image_size=args.image_size,
        max_patients_per_shard=args.max_patients_per_shard,
        max_shard_bytes=int(args.max_shard_mb * 2**20),
    )


def cmd_shard(args: argparse.Namespace) -> int:
    from mmdls_dist.data.prepare import shard_cohort

    shard_cohort(
        args.raw,
        args.out,
        _split_recipe(args),
        _shard_options(args),
        lambda desc: _mapper(args.executor, desc, args.ray_address),
        args.allow_rejects,
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from mmdls_dist.data.shards import load_manifest, verify_shards

    manifest = load_manifest(args.shards)
    splits = args.splits.split(",") if args.splits else None
    problems = verify_shards(args.shards, manifest, splits, check_hash=not args.size_only)
    checked = [e for e in manifest["shards"] if splits is None or e["split"] in splits]
    if problems:
        print(f"{len(problems)} of {len(checked)} shards do not match manifest.json:")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"all {len(checked)} shards match manifest.json")
    return 0


def stream_epoch(cfg: DataConfig, split: str, mode: str, world_size: int, epoch: int = 0) -> dict:
    """Stream one epoch of `split` for each simulated rank in turn; returns what was read."""
    from mmdls_dist.data.loader import make_loader

    per_rank = []
    for rank in range(world_size):
        loader = make_loader(cfg, split, mode, rank, world_size)
        loader.dataset.set_epoch(epoch)
        t0 = time.perf_counter()
        batches, ids, shape = 0, [], None
        for batch in loader:
            batches += 1
            ids.extend(batch.patient_id)
            shape = tuple(batch.ct.shape)
        per_rank.append(
            {
                "rank": rank,
                "batches": batches,
                "patients": len(ids),
                "unique": len(set(ids)),
                "seconds": time.perf_counter() - t0,
                "ct_shape": shape,
                "ids": ids,
            }
        )
    return {"split": split, "mode": mode, "ranks": per_rank}


def _print_stream(result: dict) -> None:
    all_ids = [i for r in result["ranks"] for i in r["ids"]]
    print(f"{result['mode']} epoch over split {result['split']!r}:")
    for r in result["ranks"]:
        rate = r["patients"] / r["seconds"] if r["seconds"] else float("nan")
        print(
            f"  rank {r['rank']}: {r['batches']} batches, {r['patients']} patients "
            f"({r['unique']} distinct), batch ct {r['ct_shape']} uint8, {rate:.0f} patients/s"
        )
    print(f"  all ranks: {len(all_ids)} patients read, {len(set(all_ids))} distinct")


def _data_config(args: argparse.Namespace, shards: str) -> DataConfig:
    return DataConfig(
        shards=shards,
        batch_size=args.batch_size,
        max_slices=args.max_slices,
        image_size=args.model_image_size,
        num_workers=args.num_workers,
        seed=args.seed,
    )


def cmd_stream(args: argparse.Namespace) -> int:
    cfg = _data_config(args, args.shards)
    _print_stream(stream_epoch(cfg, args.split, args.mode, args.world_size))
    return 0


def _run_config(args: argparse.Namespace):
    """--config / --set -> Config, local storage made absolute (Ray wants that)."""
    import dataclasses

    from mmdls_dist import storage
    from mmdls_dist.config import load_config

    cfg = load_config(args.config, args.set)
    run = dataclasses.replace(cfg.run, storage_path=storage.absolute(cfg.run.storage_path))
    return dataclasses.replace(cfg, run=run)


def _with_data(cfg, args: argparse.Namespace):
    """Start / join Ray, then the data: given, or the synthetic cohort. -> (cfg, truth, raw)"""
    from mmdls_dist import parallel
    from mmdls_dist.data.prepare import resolve_data

    parallel.init_ray(args.ray_address)
    return resolve_data(
        cfg,
        raw=args.data,
        shards=args.shards,
        workdir=Path(args.workdir),
        mapper=lambda desc: _mapper("ray", desc),
    )


def cmd_train(args: argparse.Namespace) -> int:
    """The main job: data (given, or a synthetic cohort) -> shards -> Ray Train DDP run."""
    from mmdls_dist.config import dump_yaml
    from mmdls_dist.train.launch import fit

    cfg, truth, raw = _with_data(_run_config(args), args)
    log.info("resolved config:\n%s", dump_yaml(cfg))
    result = fit(cfg)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    _print_summary(cfg, result, truth, raw)
    return 0


def _print_summary(cfg, result, truth: dict | None, raw: str | None) -> None:
    from mmdls_dist.data.prepare import synthetic_oracle
    from mmdls_dist.train.checkpoint import BEST
    from mmdls_dist.train.launch import run_url
    from mmdls_dist.train.loop import local_run_dir
    from mmdls_dist.train.tensorboard import tensorboard_dir

    metrics = result.metrics or {}
    oracle = {}
    if truth is not None and raw is not None:
        oracle = synthetic_oracle(truth, raw, cfg.data.shards)
    print(
        f"\nrun {cfg.run.name!r}: {metrics.get('epoch', -1) + 1} epochs, "
        f"{metrics.get('global_step', 0)} optimizer steps"
    )
    print(f"{'validation metric':<22}{'model':>8}{'oracle':>9}")
    for key in (
        "auc_histology",
        "auc_stage",
        "cindex_dfs",
        "cindex_os",
        "dice_lung",
        "dice_lesion",
    ):
        value = metrics.get(f"val/{key}", float("nan"))
        ref = f"{oracle[key]:9.3f}" if key in oracle else f"{'':>9}"
        print(f"  {key:<20}{value:8.3f}{ref}")
    print(f"checkpoints : {run_url(cfg)}  (best: {BEST})")
    print(f"tensorboard : tensorboard --logdir {tensorboard_dir(cfg, local_run_dir(cfg))}")
    print(f"report      : python jobs/evaluate.py {run_url(cfg)}   (metrics.json + report.html)")


def cmd_tune(args: argparse.Namespace) -> int:
    """Ray Tune sweep over whole Ray Train runs; results.csv + best.yaml."""
    from mmdls_dist.train.tune import load_sweep, run_sweep, sweep_path

    cfg = _run_config(args)
    sweep = load_sweep(sweep_path(args.sweep), cfg)  # a bad sweep file fails before Ray
    cfg, _, _ = _with_data(cfg, args)
    summary = run_sweep(cfg, sweep, args.name)
    table = summary["table"]
    shown = [
        c
        for c in table.columns
        if c in ("trial", "status", "epochs", "error") or c.startswith(("config/", "best "))
    ]
    with __import__("pandas").option_context("display.width", 200, "display.max_columns", 20):
        print(table[shown].to_string(index=False))
    print(
        f"\n{summary['trials']} trials, {summary['errors']} failed; table: "
        f"{summary['root']}/results.csv"
    )
    if summary["best"] is None:
        print("no trial finished: no best config")
        return 1
    print(f"best config: {summary['best']}  (python jobs/train.py --config {summary['best']})")
    return 0


def _models(specs: list[str]) -> dict[str, str]:
    """["full=runs/a", "runs/b"] -> {"full": "runs/a", "b": "runs/b"} (label = folder name)."""
    from mmdls_dist import storage

    out = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or storage.is_url(label):
            label, path = Path(spec.rstrip("/")).name, spec
        if label in out:
            raise ValueError(f"two models are labelled {label!r}; name them as LABEL=PATH")
        out[label] = path
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmdls_dist.evaluation.evaluate import run_evaluation
    from mmdls_dist.evaluation.inference import checkpoint_identity, resolve_checkpoint

    models = _models(args.models)
    first = resolve_checkpoint(next(iter(models.values())))
    shards = args.shards or checkpoint_identity(first)["config"]["data"]["shards"]
    out = Path(args.out)
    t0 = time.perf_counter()
    metrics = run_evaluation(
        models,
        shards,
        out,
        splits=args.splits.split(",") if args.splits else None,
        reference_shards=args.reference_shards,
        reference=args.reference,
        n_boot=args.bootstrap,
        seed=args.seed,
        mapper=_mapper(args.executor, "inference", args.ray_address, 1.0 if args.gpu else 0.0),
        parts=args.parts,
        batch_size=args.batch_size,
    )
    _print_evaluation(metrics)
    log.info("evaluated in %.1fs", time.perf_counter() - t0)
    print(f"report : {out / 'report.html'}\nmetrics: {out / 'metrics.json'}")
    return 0


def _print_evaluation(metrics: dict) -> None:
    print(
        f"\n{'model':<16}{'split':<10}{'n':>6}{'hist AUC':>10}{'stage AUC':>11}"
        f"{'DFS C':>8}{'OS C':>8}{'OS AUC36':>10}{'OS IBS':>8}"
    )
    for label, model in metrics["models"].items():
        for split, groups in model["splits"].items():
            m = groups["all"]

            def num(v):
                return f"{v:.3f}" if isinstance(v, float) else "  –  "

            print(
                f"{label[:15]:<16}{split:<10}{m['n_patients']:>6}"
                f"{num(m['histology'].get('auc')):>10}{num(m['stage']['macro_auc']):>11}"
                f"{num(m['dfs'].get('harrell_c')):>8}{num(m['os'].get('harrell_c')):>8}"
                f"{num(m['os'].get('td_auc', {}).get('36')):>10}"
                f"{num(m['os'].get('integrated_brier')):>8}"
            )


def cmd_predict(args: argparse.Namespace) -> int:
    from mmdls_dist.evaluation.predict import run_prediction

    table = run_prediction(
        args.checkpoint,
        args.out,
        raw=args.data,
        shards=args.shards,
        split=args.split,
        reference=args.reference,
        workdir=args.workdir,
        masks_dir=args.masks,
        mapper_factory=lambda desc: _mapper(
            args.executor, desc, args.ray_address, 1.0 if args.gpu else 0.0
        ),
        parts=args.parts,
        batch_size=args.batch_size,
    )
    ok = int((table["status"] == "ok").sum())
    rejected = len(table) - ok
    print(f"{ok} patient(s) predicted, {rejected} rejected (see the 'reason' column): {args.out}")
    return 1 if rejected else 0


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--parts",
        type=int,
        default=2,
        help="inference tasks per split (each patient is in exactly one; default: 2)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="patients per forward pass")
    p.add_argument("--gpu", action="store_true", help="one GPU per inference task")
    _add_executor(p)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Config, data and cluster options shared by train and tune."""
    p.add_argument(
        "--config",
        default="debug",
        help="preset (debug, default, paper) or a YAML file (default: debug)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config field, repeatable (e.g. --set optim.lr=3e-4)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="raw DATA_ROOT to import and shard (prep block options)")
    src.add_argument("--shards", help="existing shard folder / prefix (overrides data.shards)")
    p.add_argument(
        "--workdir",
        default="mmdls-work",
        help="where generated data and shards go (default: ./mmdls-work)",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: auto)")


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    d = DataConfig()
    p.add_argument("--world-size", type=int, default=2, help="simulated ranks (default: 2)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="patients per batch")
    p.add_argument("--max-slices", type=int, default=16, help="slices per patient (default: 16)")
    p.add_argument(
        "--model-image-size",
        type=int,
        default=0,
        help="pixels fed to the model; 0 = as stored in the shards (default: 0)",
    )
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=0, help="shuffle / synthetic seed (default: 0)")


def _add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="stored slice size in pixels (default: 224, the paper's)",
    )
    p.add_argument("--val-fraction", type=float, default=0.15, help="of internal patients")
    p.add_argument("--test-fraction", type=float, default=0.15, help="of internal patients")
    p.add_argument(
        "--external-centers",
        default="",
        help="comma-separated centers held out as the 'external' split",
    )
    p.add_argument("--split-seed", type=int, default=0, help="split seed (default: 0)")
    p.add_argument("--max-patients-per-shard", type=int, default=64)
    p.add_argument("--max-shard-mb", type=float, default=512.0)
    p.add_argument(
        "--allow-rejects",
        action="store_true",
        help="shard the valid patients of a cohort with defects; the rejected ones "
        "and why are recorded in manifest.json",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmdls",
        description="MM-DLS distributed training: data import, sharding and streaming.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "synth",
        help="write a synthetic multi-center cohort (raw layout)",
        description="Write a synthetic cohort in the raw layout plus its ground "
        "truth (linear predictors, oracle C-index) in a file beside it.",
    )
    p.add_argument("out", help="DATA_ROOT to create")
    p.add_argument("--truth", help="ground-truth JSON (default: <out>.truth.json beside out)")
    p.add_argument("--patients", type=int, default=200)
    p.add_argument("--centers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96, help="base slice size (pixels)")
    p.add_argument("--min-slices", type=int, default=10)
    p.add_argument("--max-slices", type=int, default=24)
    _add_executor(p)
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser(
        "ingest",
        help="validate a raw export and report every defect",
        description="Read DATA_ROOT (docs/RAW_LAYOUT.md), report every defect "
        "with file, patient and field. Exit 1 if there are defects.",
    )
    p.add_argument("raw", help="DATA_ROOT")
    p.add_argument("--report", help="also write the full report as JSON")
    p.add_argument("--no-pixels", action="store_true", help="skip decoding PNGs (tables only)")
    p.add_argument("--max-defects", type=int, default=200, help="defects printed")
    _add_executor(p)
    p.set_defaults(fn=cmd_ingest)

    p = sub.add_parser(
        "shard",
        help="validate, split and write WebDataset shards",
        description="Validate DATA_ROOT, assign patient-level splits, write "
        "tar shards and manifest.json (last) to OUT.",
    )
    p.add_argument("raw", help="DATA_ROOT")
    p.add_argument("out", help="new shard folder")
    _add_shard_args(p)
    _add_executor(p)
    p.set_defaults(fn=cmd_shard)

    p = sub.add_parser("verify", help="check shards against manifest.json")
    p.add_argument("shards", help="shard folder or s3:// / gs:// prefix")
    p.add_argument("--splits", help="comma-separated splits (default: all)")
    p.add_argument("--size-only", action="store_true", help="skip sha256")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser(
        "stream",
        help="stream one epoch per simulated rank and report",
        description="Stream one epoch of a split as each of --world-size ranks "
        "would, and print batch counts, coverage and speed.",
    )
    p.add_argument("shards", help="shard folder or s3:// / gs:// prefix")
    p.add_argument("--split", default="train")
    p.add_argument("--mode", choices=("train", "eval"), default="train")
    _add_stream_args(p)
    p.set_defaults(fn=cmd_stream)

    p = sub.add_parser(
        "train",
        help="the main job: DDP training on Ray Train",
        description="Train MM-DLS with Ray Train (DDP). With no --data, --shards or "
        "data.shards it makes a synthetic cohort (the config's prep block), shards it and "
        "trains on it: the embedded default. Under `ray job submit` it joins that cluster; "
        "otherwise it starts a local Ray. Starting the same run.name again resumes it.",
    )
    _add_run_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "tune",
        help="Ray Tune sweep of task weights and architecture over Ray Train runs",
        description="Sweep config fields (dotted names) with Ray Tune; every trial is a "
        "full multi-worker Ray Train run of --config; ASHA stops weak trials on the sweep "
        "metric (default val/composite = mean of histology AUC, stage macro AUC, DFS and OS "
        "C-index). Writes results.csv and best.yaml (a config for `train --config`) under "
        "run.storage_path/NAME. Starting the same --name again resumes the sweep.",
    )
    p.add_argument(
        "--sweep",
        default="default",
        help="sweep preset (debug, default) or YAML file with the search space",
    )
    p.add_argument("--name", default="sweep", help="sweep name (default: sweep)")
    _add_run_args(p)
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser(
        "evaluate",
        help="metrics.json + HTML report of one or more checkpoints",
        description="Evaluate checkpoints on shards, per split and per center: histology "
        "(AUC, AP, ECE, Brier, sens/spec/PPV/NPV at a threshold fixed on val), stage (per-"
        "stage and macro AUC, confusion), DFS/OS (Harrell and Uno C, time-dependent AUC and "
        "Brier at 12/24/36 months, integrated Brier, KM risk groups with cut-points fixed on "
        "train, log-rank, hazard ratios), Dice; 95% bootstrap CIs. Several models give a "
        "comparison table.",
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="[LABEL=]PATH",
        help="checkpoint folder, or run folder (its best.json names the best checkpoint)",
    )
    p.add_argument("--shards", help="shards to evaluate (default: the first model's training)")
    p.add_argument("--splits", help="comma-separated splits (default: all in the shards)")
    p.add_argument(
        "--reference-shards",
        help="shards whose train/val splits fix cut-points, baselines and threshold "
        "(default: each model's training shards)",
    )
    p.add_argument(
        "--reference",
        help="reference-<label>.json of an earlier evaluation: score against it instead of "
        "refitting on the training shards (for a site that cannot reach them; one model)",
    )
    p.add_argument("--out", default="mmdls-work/evaluation", help="report folder")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for 95%% CIs; 0 = off")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    _add_inference_args(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="per-patient predictions for new patients (CT alone is enough)",
        description="Predict histology, stage, DFS/OS risk, risk group (training cut-points) "
        "and survival at 12/24/36 months for a raw-layout folder (labels and lung/ masks "
        "optional) or a split of existing shards. Unreadable patients get a row with status "
        "'rejected' and the reason; exit 1 if there are any.",
    )
    p.add_argument("checkpoint", help="checkpoint folder or run folder (best.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="raw DATA_ROOT of the new patients")
    src.add_argument("--shards", help="existing shards")
    p.add_argument("--split", help="split of --shards to predict (default: predict)")
    p.add_argument("--out", default="predictions.csv", help="output CSV")
    p.add_argument(
        "--reference",
        help="reference-<label>.json from `mmdls evaluate` (default: refit from the "
        "checkpoint's training shards)",
    )
    p.add_argument("--masks", help="also write predicted lung/lesion masks as PNGs here")
    p.add_argument("--workdir", help="where --data is sharded (default: a temporary folder)")
    _add_inference_args(p)
    p.set_defaults(fn=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.fn(args)
    except (ValueError, FileExistsError) as exn:
        log.error("%s", exn)
        return 2
    except Exception as exn:
        from mmdls_dist.data.shards import ShardError

        if isinstance(exn, ShardError):
            log.error("%s", exn)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
