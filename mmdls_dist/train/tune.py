"""Hyperparameter sweeps with Ray Tune over whole Ray Train runs.

Flow: sweep YAML (search space over dotted config names, objective, scheduler) + base
Config -> Tuner of a function trainable; each trial = `with_values(base, sample)` -> its
own TorchTrainer (train.build_trainer) named after the trial, reporting every epoch to Tune
through TuneReportCallback -> ASHA stops weak trials early -> results.csv (every trial's
config, status, error and metrics), best.yaml (the best trial's full config, which
`jobs/train.py --config best.yaml` takes unchanged), TensorBoard logs per trial.

Ray Train V2 style: the trial function builds the trainer and calls fit();
`Tuner(trainer)` is deprecated. The trial function only drives its Train run, so it asks
for a sliver of CPU (`driver_cpus`); `max_concurrent_trials`, derived from the cluster, is
what keeps trials from starving each other.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mmdls_dist import storage
from mmdls_dist.config import PRESETS_DIR, Config, dump_yaml, from_dict, to_dict, with_values
from mmdls_dist.train import checkpoint
from mmdls_dist.train.launch import build_trainer, check_data, guard_run_identity

log = logging.getLogger(__name__)

OBJECTIVE = "val/composite"  # mean of histology AUC, stage macro AUC, DFS and OS C-index
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")


@dataclass(frozen=True)
class Sweep:
    """A sweep file (YAML). `space` maps dotted config names to distributions:
    {type: loguniform, low: 1e-4, high: 3e-3} | {type: choice, values: [...]} |
    {type: grid, values: [...]} | {type: uniform, low, high} | {type: randint, low, high}
    (high exclusive) | {type: quniform, low, high, q}."""

    space: dict[str, dict] = field(default_factory=dict)
    num_samples: int = 8  # samples of the space (each grid point is run num_samples times)
    metric: str = OBJECTIVE  # reported validation metric the sweep maximises / minimises
    mode: str = "max"
    scheduler: str = "asha"  # "asha" (early stopping) or "fifo" (run every trial to the end)
    grace_period: int = 2  # ASHA: epochs every trial gets before it can be stopped, >= 1
    reduction_factor: int = 3  # ASHA: keep the best 1/reduction_factor at each rung, >= 2
    max_t: int = 0  # ASHA: epochs after which every trial is stopped; 0 = optim.epochs
    time_budget_s: float = 0.0  # wall-clock budget of the whole sweep; 0 = none
    max_concurrent_trials: int = 0  # 0 = derived from the cluster's GPUs / CPUs per trial
    trial_max_failures: int = 0  # Tune retries of a failed trial (Train retries inside it)
    driver_cpus: float = 0.01  # CPU reserved for each trial's driver (it only waits), > 0
    seed: int | None = 0  # search seed (random sampling)

    def __post_init__(self) -> None:
        for name, spec in self.space.items():
            if not isinstance(spec, dict) or spec.get("type") not in DISTRIBUTIONS:
                raise ValueError(
                    f"sweep.space.{name}: expected a mapping with type in {DISTRIBUTIONS}"
                )
        if self.mode not in ("max", "min"):
            raise ValueError("sweep.mode must be 'max' or 'min'")
        if self.scheduler not in ("asha", "fifo"):
            raise ValueError("sweep.scheduler must be 'asha' or 'fifo'")
        if self.driver_cpus <= 0:
            raise ValueError("sweep.driver_cpus must be > 0 (Ray refuses an empty request)")
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("sweep: num_samples >= 1, grace_period >= 1, reduction_factor >= 2")


SWEEPS_DIR = PRESETS_DIR / "sweeps"


def sweep_path(name_or_path: str) -> Path:
    """A sweep preset name (configs/sweeps/<name>.yaml) or a YAML file."""
    preset = SWEEPS_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    if Path(name_or_path).is_file():
        return Path(name_or_path)
    names = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
    raise ValueError(f"sweep {name_or_path!r} is neither a preset ({', '.join(names)}) nor a file")


def load_sweep(path: str | Path, base: Config) -> Sweep:
    """Read a sweep YAML and check every space entry against the base config: the name
    must be a config field, and one sample of each distribution must validate there."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    try:
        sweep = from_dict(Sweep, data)
    except (TypeError, ValueError) as exn:
        raise ValueError(f"{path}: {exn}") from exn
    for name, spec in sweep.space.items():
        try:
            with_values(base, {name: _example(spec)})
        except (TypeError, ValueError) as exn:
            raise ValueError(f"{path}: space.{name}: {exn}") from exn
    return sweep


def _example(spec: dict) -> Any:
    if spec["type"] in ("choice", "grid"):
        return spec["values"][0]
    if spec["type"] == "randint":
        return int(spec["low"])
    return float(spec["low"])


def search_space(sweep: Sweep) -> dict[str, Any]:
    """Sweep.space -> Tune distributions, keyed by the dotted config name."""
    from ray import tune

    build = {
        "choice": lambda s: tune.choice(s["values"]),
        "grid": lambda s: tune.grid_search(s["values"]),
        "uniform": lambda s: tune.uniform(float(s["low"]), float(s["high"])),
        "loguniform": lambda s: tune.loguniform(float(s["low"]), float(s["high"])),
        "randint": lambda s: tune.randint(int(s["low"]), int(s["high"])),
        "quniform": lambda s: tune.quniform(float(s["low"]), float(s["high"]), float(s["q"])),
    }
    return {name: build[spec["type"]](spec) for name, spec in sweep.space.items()}


def concurrent_trials(cfg: Config, resources: dict[str, float], sweep: Sweep) -> int:
    """How many trials fit at once: the limiting resource (GPUs when the runs use GPUs,
    else CPUs) divided by what one Train run needs (its driver's sliver is carved out of
    the workers' CPUs, see trial_config). Trials beyond that would only hold a driver while
    their Train run waits. At least 1."""
    if sweep.max_concurrent_trials > 0:
        return sweep.max_concurrent_trials
    if cfg.run.use_gpu:
        have, need = resources.get("GPU", 0.0), cfg.run.num_workers * 1.0
    else:
        have, need = resources.get("CPU", 0.0), cfg.run.num_workers * cfg.run.cpus_per_worker
    return max(1, int(math.floor(have / need + 1e-9)))


def without_driver_share(cfg: Config, driver_cpus: float) -> Config:
    """The run's workers give up a trial driver's CPU sliver between them, so a trial needs
    exactly what a plain Train run needs (else 2 workers on a 2-CPU machine plus the
    driver would never be scheduled)."""
    per_worker = max(cfg.run.cpus_per_worker - driver_cpus / cfg.run.num_workers, 0.01)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, cpus_per_worker=per_worker))


def trial_config(
    base: dict, sample: dict, sweep_name: str, trial_name: str, driver_cpus: float = 0.0
) -> Config:
    """The trial's full config: base + sampled values; the Train run is named after the
    trial and stored under the sweep (so a restored sweep resumes its unfinished runs),
    its workers without the driver's share (without_driver_share)."""
    cfg = with_values(from_dict(Config, base), sample)
    run = dataclasses.replace(
        cfg.run,
        name=trial_name,
        storage_path=storage.join(cfg.run.storage_path, sweep_name, "train-runs"),
    )
    return without_driver_share(dataclasses.replace(cfg, run=run), driver_cpus)


def release_placement_groups(train_runs: str):
    """A Tune callback that removes a finished trial's worker-group placement group
    (recorded by the worker: loop._record_placement_group), for a trial stopped by ASHA
    or failed as much as for one that ended. Ray Train's own detached cleaner does this
    too; when it is gone (it dies if its state API calls fail), a leaked group would hold
    its CPUs and the next trial would wait for them forever."""
    from ray import tune
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    class ReleasePlacementGroups(tune.Callback):
        def _release(self, trial) -> None:
            url = storage.join(train_runs, str(trial), checkpoint.PLACEMENT_GROUP)
            if not storage.exists(url):
                return
            group = PlacementGroup(PlacementGroupID.from_hex(storage.read_json(url)["id"]))
            try:
                if placement_group_table(group).get("state") not in (None, "REMOVED"):
                    remove_placement_group(group)
                    log.info("released the placement group of trial %s", trial)
            except Exception as exn:  # never let cleanup break the sweep
                log.warning("could not release trial %s's placement group: %s", trial, exn)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)

    return ReleasePlacementGroups()


def trial_count(sweep: Sweep) -> int:
    """How many trials the sweep runs: num_samples times every grid's size."""
    grids = [len(spec["values"]) for spec in sweep.space.values() if spec["type"] == "grid"]
    return sweep.num_samples * math.prod(grids)


def trial_progress(total: int, metric: str, mode: str, unit: str = "trial"):
    """A Tune callback drawing a progress bar on the driver: trials finished / total, those
    running, and the best `metric` reported so far (Tune's own status tables are off)."""
    from ray import tune
    from tqdm import tqdm

    class TrialProgress(tune.Callback):
        def __init__(self):
            self.best: float | None = None
            self.running: set[str] = set()
            self.done = 0
            self._tqdm = None  # made on first use: Tune pickles its callbacks with the sweep

        def __getstate__(self):
            return {k: v for k, v in self.__dict__.items() if k != "_tqdm"} | {"_tqdm": None}

        @property
        def bar(self):
            if self._tqdm is None:
                self._tqdm = tqdm(total=total, desc=f"{unit}s", unit=unit, initial=self.done)
            return self._tqdm

        def _show(self) -> None:
            best = "-" if self.best is None else f"{self.best:.3f}"
            self.bar.set_postfix_str(f"running {len(self.running)}, best {metric} {best}")

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(str(trial))
            self._show()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            if not isinstance(value, (int, float)) or value != value:
                return  # not reported, or NaN (undefined on this split)
            if self.best is None or (value > self.best if mode == "max" else value < self.best):
                self.best = float(value)
                self._show()

        def _finished(self, trial) -> None:
            self.running.discard(str(trial))
            self.done += 1
            self.bar.update(1)
            self._show()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finished(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finished(trial)

        def on_experiment_end(self, trials, **info):
            if self._tqdm is not None:
                self._tqdm.close()

    return TrialProgress()


def make_trainable(base: dict, sweep_name: str, driver_cpus: float):
    """The Tune function trainable: build this trial's TorchTrainer and fit it."""

    def train_trial(sample: dict) -> None:
        import ray.tune
        from ray.tune.integration.ray_train import TuneReportCallback

        trial = ray.tune.get_context().get_trial_name()
        cfg = trial_config(base, sample, sweep_name, trial, driver_cpus)
        guard_run_identity(cfg)
        build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()

    return train_trial


def build_tuner(base: Config, sweep: Sweep, name: str, *, resources: dict[str, float]):
    """A new Tuner, or the restored one when `name` already holds a sweep (resume)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = tune.with_resources(
        make_trainable(to_dict(base), name, sweep.driver_cpus), {"CPU": sweep.driver_cpus}
    )
    path = storage.join(base.run.storage_path, name)
    if tune.Tuner.can_restore(path):
        log.info("resuming the sweep in %s", path)
        # Unfinished trials resume; failed ones stay failed and reported (rerunning them
        # would hide the failure, and their stale error.txt would contradict the rerun).
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=False)
    max_t = sweep.max_t or base.optim.epochs
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=min(sweep.grace_period, max_t),
            reduction_factor=sweep.reduction_factor,
        )
        if sweep.scheduler == "asha"
        else FIFOScheduler()
    )
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # The concurrency limit goes to the variant generator itself: Tune ignores
    # TuneConfig.max_concurrent_trials when a search_alg like this one is given.
    searcher = BasicVariantGenerator(
        random_state=sweep.seed, max_concurrent=concurrent_trials(base, resources, sweep)
    )
    return tune.Tuner(
        trainable,
        param_space=search_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            scheduler=scheduler,
            search_alg=searcher,
            time_budget_s=sweep.time_budget_s or None,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=base.run.storage_path,
            failure_config=tune.FailureConfig(max_failures=sweep.trial_max_failures),
            callbacks=[
                release_placement_groups(storage.join(path, "train-runs")),
                trial_progress(trial_count(sweep), sweep.metric, sweep.mode),
            ],
            verbose=0,  # the progress bar above instead of Tune's status tables
        ),
    )


def results_table(grid, sweep: Sweep) -> pd.DataFrame:
    """One row per trial: name, status, error, sampled values, last and best objective."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        metric = sweep.metric
        best = math.nan
        if history is not None and metric in history:
            values = history[metric].dropna()
            if len(values):
                best = values.max() if sweep.mode == "max" else values.min()
        metrics = result.metrics or {}
        error = _trial_error(result)
        rows.append(
            {
                "trial": _trial_name(result),
                "status": "error" if error else "ok",
                "error": _first_line(error),
                "epochs": int(metrics.get("epoch", -1)) + 1,
                **{f"config/{k}": v for k, v in _trial_config(result).items()},
                f"best {metric}": best,
                **{k: v for k, v in metrics.items() if k.startswith("val/")},
                "checkpoint": metrics.get("checkpoint_path"),
            }
        )
    table = pd.DataFrame(rows)
    return table.sort_values("trial").reset_index(drop=True) if len(table) else table


def _trial_name(result) -> str:
    return Path(result.path).name if result.path else "?"


def _trial_config(result) -> dict:
    """The trial's sampled values; after Tuner.restore a failed trial's Result comes back
    without them, but Tune left params.json in the trial folder."""
    if result.config or not result.path:
        return result.config or {}
    url = storage.join(result.path, "params.json")
    return storage.read_json(url) if storage.exists(url) else {}


def _trial_error(result):
    """The trial's error; after Tuner.restore a failed trial's Result no longer carries it,
    but Tune left error.txt in the trial folder."""
    if result.error or not result.path:
        return result.error
    url = storage.join(result.path, "error.txt")
    return (storage.read_text(url) or "error") if storage.exists(url) else None


def _first_line(error) -> str:
    if not error:
        return ""
    text = str(error).strip().splitlines()
    # Ray wraps the cause; its last line names it ("RuntimeError: ...").
    return text[-1][:300] if text else type(error).__name__


def best_config(base: Config, table: pd.DataFrame, sweep: Sweep, name: str) -> Config | None:
    """The best finished trial's config, as a fresh run (its own name, base storage)."""
    column = f"best {sweep.metric}"
    done = table[(table.status == "ok") & table[column].notna()]
    if done.empty:
        return None
    row = done.loc[done[column].idxmax() if sweep.mode == "max" else done[column].idxmin()]
    sample = {k.removeprefix("config/"): v for k, v in row.items() if k.startswith("config/")}
    cfg = with_values(base, {k: _plain(v) for k, v in sample.items()})
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"{name}-best"))


def _plain(value):
    """pandas / numpy scalars back to Python (YAML and config validation want them)."""
    if hasattr(value, "item"):
        return value.item()
    return value


def run_sweep(base: Config, sweep: Sweep, name: str) -> dict:
    """Run (or resume) the sweep; write results.csv and best.yaml beside it. -> summary."""
    import ray

    check_data(base)  # once, on the driver: a bad data set fails here, not in every trial
    tuner = build_tuner(base, sweep, name, resources=ray.cluster_resources())
    grid = tuner.fit()
    table = results_table(grid, sweep)
    root = storage.join(base.run.storage_path, name)
    storage.write_text(storage.join(root, "results.csv"), table.to_csv(index=False))
    best = best_config(base, table, sweep, name)
    if best is not None:
        storage.write_text(storage.join(root, "best.yaml"), dump_yaml(best))
    return {
        "root": root,
        "trials": len(table),
        "errors": int((table.status == "error").sum()) if len(table) else 0,
        "best": None if best is None else storage.join(root, "best.yaml"),
        "table": table,
    }


def summary_text(summary: dict) -> str:
    """run_sweep's summary -> the trial table, counts and the best config, for a terminal."""
    table = summary["table"]
    shown = [
        c
        for c in table.columns
        if c in ("trial", "status", "epochs", "error") or c.startswith(("config/", "best "))
    ]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        lines = [table[shown].to_string(index=False)]
    lines.append(
        f"\n{summary['trials']} trials, {summary['errors']} failed; "
        f"table: {summary['root']}/results.csv"
    )
    best = summary["best"]
    lines.append(
        f"best config: {best}  (python jobs/train.py --config {best})"
        if best
        else "no trial finished: no best config"
    )
    return "\n".join(lines)
