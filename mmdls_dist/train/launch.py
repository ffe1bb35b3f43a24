"""The driver side of a training run: the TorchTrainer around the per-worker loop, the run's
identity guard, and best.json beside the checkpoints. Ray is imported only inside."""

from __future__ import annotations

from mmdls_dist import storage
from mmdls_dist.config import Config, dump_yaml, to_dict
from mmdls_dist.data.shards import ShardError, data_manifest, load_manifest, manifest_hash
from mmdls_dist.data.verify import check_dataset
from mmdls_dist.train import checkpoint
from mmdls_dist.train.loop import train_loop_per_worker


def run_url(cfg: Config) -> str:
    return storage.join(cfg.run.storage_path, cfg.run.name)


def guard_run_identity(cfg: Config) -> dict:
    """First start: record the run's config + data identity. Restart: refuse a mismatch
    before any worker starts (the workers check the checkpoint itself again)."""
    identity = {
        "config": to_dict(cfg),
        "manifest_hash": manifest_hash(data_manifest(cfg.data)),
    }
    url = storage.join(run_url(cfg), checkpoint.RUN_IDENTITY)
    if storage.exists(url):
        checkpoint.check_compatible(storage.read_json(url), identity, f"run {cfg.run.name!r}")
    else:
        storage.write_json(url, identity)
    return identity


def build_trainer(cfg: Config, callbacks: list | None = None):
    """The TorchTrainer for a config (also what a Tune trial builds, with Tune's report
    callback in `callbacks`)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = 1
    workers = cfg.run.num_workers
    if 0 < cfg.run.min_workers < workers:
        workers = (cfg.run.min_workers, workers)  # elastic
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(cfg),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=cfg.run.resize_interval_s,
        ),
        run_config=RayRunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            # Ray Train's own INFO lines (a ~900-character "Reporting training result" per
            # rank and epoch, "Checkpoint successfully created") off the console; its
            # system log files under the Ray session folder still hold every level.
            logging_config=LoggingConfig(log_level="WARNING"),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.checkpoints_to_keep or None,
                checkpoint_score_attribute="score",
                checkpoint_score_order=cfg.run.mode,
            ),
        ),
    )


def check_data(cfg: Config) -> dict:
    """On the driver, before any worker starts: the manifest's consistency and every
    shard's size, sha256 and sample ids (data/verify.py; cached for unchanged files). A
    data error is one ShardError here, not a worker failure that Ray would retry."""
    manifest = load_manifest(cfg.data.shards)
    check_dataset(cfg.data.shards, manifest, check_hash=cfg.data.verify == "full")
    return data_manifest(cfg.data)  # a fold of shards without folds fails here too


ERRORS = {  # what fatal.json's "kind" raises again on the driver
    "ShardError": ShardError,
    "IncompatibleCheckpointError": checkpoint.IncompatibleCheckpointError,
    "RefusedCheckpointError": checkpoint.RefusedCheckpointError,
}


def fit(cfg: Config):
    """Train (or resume) the run; writes best.json beside the checkpoints. -> ray Result.
    A data or config error a worker met is raised here, as the error it was."""
    check_data(cfg)
    guard_run_identity(cfg)
    run = run_url(cfg)
    storage.write_text(storage.join(run, checkpoint.CONFIG_YAML), dump_yaml(cfg))
    fatal = storage.join(run, checkpoint.FATAL)
    storage.remove(fatal)  # an earlier attempt's: the data may have been mended since
    result = build_trainer(cfg).fit()
    if storage.exists(fatal):
        error = storage.read_json(fatal)
        raise ERRORS.get(error["kind"], RuntimeError)(error["error"])
    _remove_orphans(cfg, result)
    best = result.get_best_checkpoint(metric="score", mode=cfg.run.mode)
    if best is not None:
        metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
        name = best.path.rstrip("/").rsplit("/", 1)[-1]
        storage.write_json(
            storage.join(run, checkpoint.BEST),
            {"checkpoint": name, "metric": cfg.run.metric, "metrics": metrics},
        )
    return result


def _remove_orphans(cfg: Config, result) -> None:
    """Checkpoint folders Ray does not keep: incomplete ones (a copy cut short), and, when
    run.checkpoints_to_keep bounds the run, complete ones it never registered (written
    right before a worker died); Ray's own retention never sees those."""
    kept = {c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in result.best_checkpoints}
    for url in checkpoint.checkpoints(run_url(cfg)):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name in kept:
            continue
        if cfg.run.checkpoints_to_keep > 0 or not checkpoint.is_complete(url):
            storage.remove(url)


SUMMARY_METRICS = (
    "auc_histology",
    "auc_stage",
    "cindex_dfs",
    "cindex_os",
    "dice_lung",
    "dice_lesion",
)


def summary_text(cfg: Config, result, oracle: dict[str, float]) -> str:
    """The end of a run for a terminal: the validation metrics of the checkpoint evaluate
    and predict will use (best.json), the last epoch's beside them where that is another
    one, the synthetic oracle where there is one; where the checkpoints, TensorBoard logs
    and the report are."""
    from mmdls_dist.train.tensorboard import tensorboard_dir

    last = result.metrics or {}
    best_url = storage.join(run_url(cfg), checkpoint.BEST)
    best = storage.read_json(best_url)["metrics"] if storage.exists(best_url) else last
    columns = [(f"epoch {best.get('epoch', -1) + 1}", best)]
    if best.get("epoch") != last.get("epoch"):
        columns.append((f"last ({last.get('epoch', -1) + 1})", last))
    head = "".join(f"{label:>12}" for label, _ in columns)
    lines = [
        f"\nrun {cfg.run.name!r}: {last.get('epoch', -1) + 1} epochs, "
        f"{last.get('global_step', 0)} optimizer steps; deployed: the checkpoint of "
        f"{columns[0][0]} (run.metric {cfg.run.metric})",
        f"{'validation metric':<22}{head}{'oracle':>9}",
    ]
    for key in SUMMARY_METRICS:
        ref = f"{oracle[key]:9.3f}" if key in oracle else f"{'':>9}"
        cells = "".join(f"{m.get(f'val/{key}', float('nan')):12.3f}" for _, m in columns)
        lines.append(f"  {key:<20}{cells}{ref}")
    board = tensorboard_dir(cfg)
    lines += [
        f"checkpoints : {run_url(cfg)}  (deployed: {checkpoint.BEST})",
        f"tensorboard : tensorboard --logdir {board}",
        f"report      : python jobs/evaluate.py {run_url(cfg)}   (metrics.json + report.html)",
    ]
    return "\n".join(lines)
