"""`mmdls <subcommand>`: the command line. jobs/*.py are thin wrappers around it.

Every setting comes from the config: `--config PRESET|FILE`, repeated `--set
section.key=value`, and the flags of a command's own block (`mmdls shard --val-fraction
0.15` is `--set prep.val_fraction=0.15`; options.add_flags), so a flag can never disagree
with the config it stands for. What is not a setting (inputs, outputs, how to run: serial
or on Ray) is a plain argument. `mmdls <subcommand> --help` explains each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from functools import partial
from pathlib import Path

from mmdls_dist.commands import EXECUTOR, RAY, Registry, arg, run
from mmdls_dist.config import Config

log = logging.getLogger("mmdls")
COMMANDS = Registry()
command = COMMANDS.command


RUN_SOURCES = (
    arg("--data", help="raw DATA_ROOT to import and shard (the prep block's settings)"),
    arg("--shards", help="existing shard folder / prefix (overrides data.shards)"),
    arg("--workdir", default="mmdls-work", help="where generated data and shards go"),
    RAY,
)


def _mapper(args: argparse.Namespace, desc: str, gpus: float = 0.0):
    from mmdls_dist import parallel

    if getattr(args, "executor", "ray") == "serial":
        return parallel.serial_mapper(desc)
    parallel.init_ray(args.ray_address)
    return parallel.ray_mapper(desc, num_gpus=gpus)


@command(
    "synth",
    "write a synthetic multi-center cohort (raw layout)",
    arg("out", help="DATA_ROOT to create"),
    arg("--truth", help="ground-truth JSON (default: <out>.truth.json beside out)"),
    *EXECUTOR,
    block="synth",
)
def cmd_synth(args: argparse.Namespace, cfg: Config) -> int:
    """Write a synthetic cohort in the raw layout plus its ground truth (linear predictors,
    oracle C-index) in a file beside it."""
    from mmdls_dist.data.synth import generate

    out = Path(args.out)
    truth = Path(args.truth) if args.truth else out.parent / f"{out.name}.truth.json"
    result = generate(cfg.synth, out, truth, mapper=_mapper(args, "synth"))
    print(f"{cfg.synth.patients} synthetic patients in {out}; ground truth: {truth}")
    for endpoint, info in result["endpoints"].items():
        print(
            f"  {endpoint.upper()}: oracle C-index {info['oracle_cindex']:.3f}, "
            f"event rate {info['event_rate']:.2f}"
        )
    return 0


@command(
    "ingest",
    "validate a raw export and report every defect",
    arg("raw", help="DATA_ROOT"),
    arg("--report", help="also write the full report as JSON"),
    arg("--no-pixels", action="store_true", help="skip decoding PNGs (tables only)"),
    arg("--max-defects", type=int, default=200, help="defects printed"),
    arg(
        "--for-prediction",
        action="store_true",
        help="new patients for `mmdls predict`: outcome columns and lung/ folders may be "
        "absent (predict's rules)",
    ),
    *EXECUTOR,
    settings=False,
)
def cmd_ingest(args: argparse.Namespace, cfg: None) -> int:
    """Read DATA_ROOT (docs/RAW_LAYOUT.md) and report every defect with file, patient and
    field. Exit 1 if there are defects. With --for-prediction, the folder is checked as
    `mmdls predict --data` reads it."""
    from mmdls_dist.data.ingest import read_cohort

    mapper = _mapper(args, "check images")
    report = read_cohort(
        args.raw,
        check_pixels=not args.no_pixels,
        mapper=mapper,
        for_prediction=args.for_prediction,
    )
    print(report.summary(max_defects=args.max_defects))
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1))
        log.info("full report written to %s", args.report)
    return 0 if report.ok else 1


def _import(kind: str, args: argparse.Namespace) -> int:
    from mmdls_dist.data.imports.importer import run_import
    from mmdls_dist.data.imports.mapping import load_mapping
    from mmdls_dist.data.ingest import read_cohort

    mapping = load_mapping(args.mapping)
    report = run_import(
        kind, args.source, args.out, args.clinical, mapping, _mapper(args, f"import {kind}")
    )
    print(report.summary(max_defects=args.max_defects))
    written = read_cohort(args.out, mapper=_mapper(args, "check images"))
    print(written.summary(max_defects=args.max_defects))
    return 0 if report.ok and written.ok else 1


IMPORT_ARGS = (
    arg("out", help="new DATA_ROOT to write (the raw layout)"),
    arg("--clinical", required=True, help="the site's clinical table (CSV)"),
    arg("--mapping", help="mapping YAML (columns, units, codes, ROIs, window), or lung1"),
    arg("--max-defects", type=int, default=200, help="defects printed"),
    *EXECUTOR,
)


@command(
    "import-dicom",
    "DICOM CT (+ RTSTRUCT / SEG, PET) and a clinical table -> the raw layout",
    arg("source", help="folder of DICOM files (any depth, one or more patients)"),
    *IMPORT_ARGS,
    settings=False,
)
def cmd_import_dicom(args: argparse.Namespace, cfg: None) -> int:
    """Import a DICOM export: per patient the CT series (slices ordered by position along
    the slice normal, HU from the rescale tags), the lesion and lung ROIs of its RTSTRUCT
    or SEG rasterised onto it, SUV features from a PET series, the clinical table mapped by
    --mapping; resampled, windowed PNG slices in OUT. Every defect is listed (file, patient,
    DICOM attribute), such patients are not written; exit 1 if any. Then OUT is checked as
    `mmdls ingest` checks it."""
    return _import("dicom", args)


@command(
    "import-nifti",
    "NIfTI CT + mask volumes and a clinical table -> the raw layout",
    arg("source", help="one folder per patient with its CT and mask volumes"),
    *IMPORT_ARGS,
    settings=False,
)
def cmd_import_nifti(args: argparse.Namespace, cfg: None) -> int:
    """Import NIfTI volumes (file names from --mapping: nifti_ct, nifti_lesion, nifti_lung),
    reoriented from their affine to the layout a DICOM import gives, resampled and
    windowed the same way."""
    return _import("nifti", args)


@command(
    "shard",
    "validate, split and write WebDataset shards",
    arg("raw", help="DATA_ROOT"),
    arg("out", help="new shard folder"),
    *EXECUTOR,
    block="prep",
)
def cmd_shard(args: argparse.Namespace, cfg: Config) -> int:
    """Validate DATA_ROOT, assign patient-level splits, write tar shards and manifest.json
    (last) to OUT."""
    from mmdls_dist.data.prepare import shard_cohort

    shard_cohort(args.raw, args.out, cfg.prep, lambda desc: _mapper(args, desc))
    return 0


@command(
    "verify",
    "check shards against manifest.json",
    arg("shards", help="shard folder or s3:// / gs:// prefix"),
    arg("--splits", help="comma-separated splits (default: all)"),
    arg("--size-only", action="store_true", help="skip sha256"),
    settings=False,
)
def cmd_verify(args: argparse.Namespace, cfg: None) -> int:
    """Check every shard's size and sha256 against manifest.json. Exit 1 on a mismatch."""
    from mmdls_dist.data.shards import load_manifest
    from mmdls_dist.data.verify import verify_shards

    manifest = load_manifest(args.shards)
    splits = args.splits.split(",") if args.splits else None
    problems = verify_shards(args.shards, manifest, splits, check_hash=not args.size_only)
    n = sum(splits is None or e["split"] in splits for e in manifest["shards"])
    print(
        "\n  ".join([f"{len(problems)} of {n} shards do not match manifest.json:", *problems])
        if problems
        else f"all {n} shards match manifest.json"
    )
    return 1 if problems else 0


@command(
    "stream",
    "stream one epoch per simulated rank and report",
    arg("shards", help="shard folder or s3:// / gs:// prefix"),
    arg("--split", default="train"),
    arg("--mode", choices=("train", "eval"), default="train"),
    arg("--world-size", type=int, default=2, help="simulated ranks (default: 2)"),
    block="data",
    only=("batch_size", "max_slices", "image_size", "num_workers", "seed"),
)
def cmd_stream(args: argparse.Namespace, cfg: Config) -> int:
    """Stream one epoch of a split as each of --world-size ranks would (the data block's
    loader settings), and print batch counts, coverage and speed."""
    from mmdls_dist.data.loader import stream_report

    data = dataclasses.replace(cfg.data, shards=args.shards)
    print(stream_report(data, args.split, args.mode, args.world_size))
    return 0


@command(
    "train",
    "the main job: DDP training on Ray Train",
    arg(
        "--folds",
        type=int,
        help="K-fold cross-validation (sets prep.folds): one run per fold, then their "
        "ensemble (a folder that evaluate and predict accept as one model)",
    ),
    *RUN_SOURCES,
)
def cmd_train(args: argparse.Namespace, cfg: Config) -> int:
    """Train MM-DLS with Ray Train (DDP). With no --data, --shards or data.shards it makes
    a synthetic cohort (the synth block), shards it (the prep block) and trains on it: the
    embedded default. Under `ray job submit` it joins that cluster; otherwise it starts a
    local Ray. Starting the same run.name again resumes it. Shards cut into folds (--folds
    K, prep.folds) train every fold as runs NAME-fold0.. (as many at once as the cluster
    holds, as Tune trials) and write the ensemble NAME (each fold run resumes like any
    run)."""
    from mmdls_dist.config import with_values
    from mmdls_dist.data.prepare import synthetic_oracle
    from mmdls_dist.data.shards import load_manifest
    from mmdls_dist.evaluation.reference import fit_and_store
    from mmdls_dist.train.launch import fit, run_url, summary_text

    if args.folds is not None:
        cfg = with_values(cfg, {"prep.folds": args.folds})
    cfg, truth, raw = _with_data(cfg, args)
    _print_changes(cfg, args.config)
    folds = load_manifest(cfg.data.shards)["prep"].get("folds", 0)
    if args.folds is not None and folds != args.folds:
        raise ValueError(f"--folds {args.folds}, but {cfg.data.shards} holds {folds} folds")
    if folds and cfg.data.fold < 0:
        return _train_folds(cfg, folds, _eval_mapper(args, cfg, "reference"))
    result = fit(cfg)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    stored = fit_and_store(run_url(cfg), cfg.eval, _eval_mapper(args, cfg, "reference"))
    oracle = synthetic_oracle(truth, raw, cfg.data.shards) if truth and raw else {}
    print(summary_text(cfg, result, oracle))
    print(f"reference   : {stored}  (what predict applies: thresholds, cut-points, baselines)")
    return 0


def _eval_mapper(args: argparse.Namespace, cfg: Config, desc: str):
    return _mapper(args, desc, 1.0 if cfg.eval.gpu else 0.0)


def _print_changes(cfg: Config, preset: str) -> None:
    """The settings that differ from the preset, one line each; the whole resolved config
    is written to the run folder (config.yaml)."""
    from mmdls_dist.config import changes, load_config

    changed = changes(load_config(preset), cfg)
    print(f"config: {preset}" + (", with" if changed else " (no changes)"))
    for key, value in changed.items():
        print(f"  {key} = {value!r}")


def _train_folds(cfg: Config, folds: int, mapper) -> int:
    """Every fold's run (concurrent Tune trials where the cluster has room; each resumable
    as any run), then the ensemble folder and the references."""
    from mmdls_dist import storage
    from mmdls_dist.evaluation.ensemble import fit_and_store_ensemble, write_ensemble
    from mmdls_dist.train.folds import fold_summary, train_folds

    configs = train_folds(cfg, folds)
    print(f"\n{folds} folds (validation metrics of each fold's deployed checkpoint):")
    for fold_cfg in configs:
        print(fold_summary(fold_cfg))
    folder = storage.join(cfg.run.storage_path, cfg.run.name)
    url = write_ensemble(folder, [c.run.name for c in configs])
    fit_and_store_ensemble(folder, cfg.eval, mapper)
    print(f"ensemble of {folds} folds: {url} (mmdls evaluate / predict take its folder)")
    return 0


@command(
    "tune",
    "Ray Tune sweep of task weights and architecture over Ray Train runs",
    arg("--sweep", default="default", help="sweep preset (debug, default) or YAML file"),
    arg("--name", default="sweep", help="sweep name (default: sweep)"),
    *RUN_SOURCES,
)
def cmd_tune(args: argparse.Namespace, cfg: Config) -> int:
    """Sweep config fields (dotted names) with Ray Tune; every trial is a full multi-worker
    Ray Train run of --config; ASHA stops weak trials on the sweep metric (default
    val/composite = mean of histology AUC, stage macro AUC, DFS and OS C-index). Writes
    results.csv and best.yaml (a config for `train --config`) under run.storage_path/NAME.
    Starting the same --name again resumes the sweep."""
    from mmdls_dist.train.tune import load_sweep, run_sweep, summary_text, sweep_path

    sweep = load_sweep(sweep_path(args.sweep), cfg)  # a bad sweep file fails before Ray
    cfg, _, _ = _with_data(cfg, args)
    summary = run_sweep(cfg, sweep, args.name)
    print(summary_text(summary))
    return 0 if summary["best"] else 1


@command(
    "evaluate",
    "metrics.json + HTML report of one or more checkpoints",
    arg("models", nargs="+", metavar="[LABEL=]PATH", help="checkpoint or run folder (best.json)"),
    arg("--shards", help="shards to evaluate (default: the first model's training)"),
    arg("--splits", help="comma-separated splits (default: all in the shards)"),
    arg("--reference-shards", help="shards whose train/val fix the reference (default: training)"),
    arg("--reference", help="score against an earlier evaluation's reference-<label>.json"),
    arg("--out", default="mmdls-work/evaluation", help="report folder"),
    *EXECUTOR,
    block="eval",
)
def cmd_evaluate(args: argparse.Namespace, cfg: Config) -> int:
    """Evaluate checkpoints on shards, per split and per center: histology (AUC, AP, ECE,
    Brier, sens/spec/PPV/NPV at a threshold fixed on val), stage (per-stage and macro AUC,
    confusion), DFS/OS (Harrell and Uno C, time-dependent AUC and Brier at the eval
    horizons, integrated Brier, KM risk groups with cut-points fixed on train, log-rank,
    hazard ratios), Dice; bootstrap 95% CIs. Several models give a comparison table."""
    from mmdls_dist.evaluation.evaluate import labelled_models, run_evaluation
    from mmdls_dist.evaluation.report import console_table

    splits = args.splits.split(",") if args.splits else None
    mapper = _mapper(args, "inference", 1.0 if cfg.eval.gpu else 0.0)
    metrics = run_evaluation(
        labelled_models(args.models),
        args.shards,
        args.out,
        cfg.eval,
        mapper,
        splits,
        args.reference_shards,
        args.reference,
    )
    print(console_table(metrics))
    print(f"report : {Path(args.out) / 'report.html'}\nmetrics: {Path(args.out) / 'metrics.json'}")
    return 0


@command(
    "predict",
    "per-patient predictions for new patients (CT alone is enough)",
    arg("checkpoint", help="checkpoint folder or run folder (best.json)"),
    arg("--data", help="raw DATA_ROOT of the new patients"),
    arg("--shards", help="existing shards (instead of --data)"),
    arg("--split", help="split of --shards to predict (default: predict)"),
    arg("--out", default="predictions.csv", help="output CSV"),
    arg(
        "--reference",
        help="reference-<label>.json of `mmdls evaluate` (default: the run folder's "
        "reference.json, fitted when training ended)",
    ),
    arg("--masks", help="also write predicted lung/lesion masks as PNGs here"),
    arg("--workdir", help="where --data is sharded (default: a temporary folder)"),
    *EXECUTOR,
    block="eval",
    only=("parts", "batch_size", "gpu"),
)
def cmd_predict(args: argparse.Namespace, cfg: Config) -> int:
    """Predict histology, stage, DFS/OS risk, risk group (training cut-points) and survival
    at the reference's horizons for a raw-layout folder (labels and lung/ masks optional)
    or a split of existing shards. Unreadable patients get a row with status 'rejected'
    and the reason; exit 1 if there are any."""
    from mmdls_dist.evaluation.predict import run_prediction

    gpus = 1.0 if cfg.eval.gpu else 0.0
    inputs = {k: getattr(args, k) for k in ("data", "shards", "split", "reference", "workdir")}
    table = run_prediction(
        args.checkpoint,
        args.out,
        cfg.eval,
        lambda desc: _mapper(args, desc, gpus),
        masks=args.masks,
        **inputs,
    )
    ok = int((table["status"] == "ok").sum())
    print(f"{ok} patient(s) predicted, {len(table) - ok} rejected (see 'reason'): {args.out}")
    return 1 if len(table) > ok else 0


def _with_data(cfg: Config, args: argparse.Namespace):
    """Start / join Ray, then the data: given, or the synthetic cohort. -> (cfg, truth, raw)"""
    from mmdls_dist import parallel
    from mmdls_dist.data.prepare import resolve_data

    parallel.init_ray(args.ray_address)
    return resolve_data(cfg, args.data, args.shards, Path(args.workdir), partial(_mapper, args))


def main(argv: list[str] | None = None) -> int:
    from mmdls_dist.data.shards import ShardError

    args = COMMANDS.parser("mmdls", __doc__.split("\n\n")[0]).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return run(args)
    except (ValueError, FileExistsError, ShardError) as exn:
        log.error("%s", exn)
        return 2


if __name__ == "__main__":
    sys.exit(main())
