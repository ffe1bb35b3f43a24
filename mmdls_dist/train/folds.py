"""Cross-validation: every fold of shards cut into folds (prep.folds) as a run of its own,
NAME-fold0 .. NAME-fold{K-1}, then the ensemble folder NAME (evaluation/ensemble.py).

Where the cluster has room for more than one run at a time (the same arithmetic as a
sweep's concurrency: GPUs, or CPUs, over what one run's workers take), the folds run as
concurrent Tune trials, each a function trainable that fits its fold's Train run; otherwise
one after another on the driver. Either way each fold is an ordinary run under
run.storage_path: rerunning the command resumes every unfinished fold from its checkpoint
and passes over finished ones (their loop has no epoch left), so no Tune state needs
restoring.
"""

from __future__ import annotations

import logging

from mmdls_dist import storage
from mmdls_dist.config import Config, from_dict, to_dict, with_values
from mmdls_dist.train.launch import fit
from mmdls_dist.train.tune import Sweep, concurrent_trials, trial_progress, without_driver_share

log = logging.getLogger(__name__)

DRIVER_CPUS = 0.01  # what a fold trial's own process takes (it only waits on its run)


def fold_config(base: Config, k: int, driver_cpus: float = 0.0) -> Config:
    """Fold k's run: data.fold = k, named NAME-foldk; as a Tune trial, its workers without
    the trial driver's share (as a sweep trial's, tune.without_driver_share)."""
    cfg = with_values(base, {"data.fold": k, "run.name": f"{base.run.name}-fold{k}"})
    return without_driver_share(cfg, driver_cpus) if driver_cpus else cfg


def at_once(cfg: Config, folds: int, resources: dict[str, float]) -> int:
    """How many fold runs the cluster holds at once, 1..folds."""
    return min(folds, concurrent_trials(cfg, resources, Sweep()))


def _fit_fold(base: dict, k: int, driver_cpus: float = 0.0) -> None:
    result = fit(fold_config(from_dict(Config, base), k, driver_cpus))
    if result.error:
        raise RuntimeError(f"training fold {k} failed: {result.error}")


def _concurrently(cfg: Config, folds: int, limit: int) -> None:
    from ray import tune

    base = to_dict(cfg)

    def train_fold(sample: dict) -> None:
        _fit_fold(base, sample["fold"], DRIVER_CPUS)

    tuner = tune.Tuner(
        tune.with_resources(train_fold, {"CPU": DRIVER_CPUS}),
        param_space={"fold": tune.grid_search(list(range(folds)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=limit),
        run_config=tune.RunConfig(
            name=f"{cfg.run.name}-trials",
            storage_path=cfg.run.storage_path,
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[trial_progress(folds, "val/composite", "max", unit="fold")],
            verbose=0,
        ),
    )
    failed = [r for r in tuner.fit() if r.error]
    if failed:
        raise RuntimeError(f"training a fold failed: {failed[0].error}")


def train_folds(cfg: Config, folds: int) -> list[Config]:
    """Train (or resume) every fold on the connected Ray cluster; -> the folds' configs, in
    fold order."""
    import ray

    limit = at_once(cfg, folds, ray.cluster_resources())
    if limit > 1:
        log.info("training %d folds, %d at a time as Tune trials", folds, limit)
        _concurrently(cfg, folds, limit)
    else:
        log.info("training %d folds one after another", folds)
        for k in range(folds):
            _fit_fold(to_dict(cfg), k)
    return [fold_config(cfg, k) for k in range(folds)]


def fold_summary(cfg: Config) -> str:
    """One line for a fold run: its deployed checkpoint (best.json) and that epoch's
    validation metrics."""
    from mmdls_dist.train import checkpoint
    from mmdls_dist.train.launch import run_url

    best = storage.read_json(storage.join(run_url(cfg), checkpoint.BEST))
    m = best["metrics"]
    cells = ", ".join(
        f"{k} {m[f'val/{k}']:.3f}"
        for k in ("cindex_dfs", "cindex_os", "auc_histology", "auc_stage")
        if f"val/{k}" in m
    )
    return f"  {cfg.run.name}: epoch {m['epoch'] + 1} (run.metric {best['metric']}): {cells}"
