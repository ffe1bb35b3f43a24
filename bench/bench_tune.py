"""Sweep throughput and the per-trial overhead of a Train run inside a Tune trial.

    python bench/bench_tune.py [--trials 3 --epochs 3 --set run.num_workers=2]

Runs a FIFO sweep (no early stopping, so every trial does the same work) of the debug
preset on the embedded synthetic cohort with the local Ray, then prints:
- trials per hour (wall clock of the whole sweep, with the concurrency the cluster allows);
- per trial: time to the first epoch report minus a steady epoch (what starting the Train
  run costs: worker group, process group, loaders, model), and the wall time after the
  last report (shutdown), from Tune's per-iteration timings;
- for reference, the same startup cost of a plain Train run outside Tune.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdls_dist.config import load_config  # noqa: E402
from mmdls_dist.data.prepare import resolve_data  # noqa: E402
from mmdls_dist.parallel import init_ray, ray_mapper  # noqa: E402
from mmdls_dist.train.launch import fit  # noqa: E402
from mmdls_dist.train.tune import load_sweep, run_sweep  # noqa: E402


def startup_of(times: list[float]) -> float:
    """First iteration's time minus a steady iteration's: the run's start-up cost."""
    return times[0] - statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default="bench-out/tune")
    args = parser.parse_args()
    init_ray()
    out = Path(args.out).resolve()
    cfg = load_config(
        "debug",
        [f"optim.epochs={args.epochs}", f"run.storage_path={out / 'runs'}", *args.set],
    )
    cfg, _, _ = resolve_data(
        cfg, raw=None, shards=None, workdir=Path("mmdls-work"), mapper=lambda d: ray_mapper(d)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as spec:
        values = [round(0.5 + i * 0.5, 2) for i in range(args.trials)]
        yaml.safe_dump(
            {
                "num_samples": 1,
                "scheduler": "fifo",
                "space": {"loss.w_os": {"type": "grid", "values": values}},
            },
            spec,
        )
    sweep = load_sweep(spec.name, cfg)
    name = f"bench-{time.strftime('%H%M%S')}"
    t0 = time.perf_counter()
    summary = run_sweep(cfg, sweep, name)
    wall = time.perf_counter() - t0
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(summary["root"])
    startups, tails = [], []
    for trial in analysis.trials:
        history = analysis.trial_dataframes[trial.trial_id]
        iters = history["time_this_iter_s"].tolist()
        startups.append(startup_of(iters))
        tails.append(trial.last_result.get("time_total_s", 0) - sum(iters))
    plain_name = f"plain-{time.strftime('%H%M%S')}"
    import dataclasses

    plain = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=plain_name))
    t1 = time.perf_counter()
    result = fit(plain)
    plain_wall = time.perf_counter() - t1
    print(
        f"\n{summary['trials']} trials of the debug preset ({cfg.run.num_workers} Ray Train "
        f"workers each, {args.epochs} epochs, {summary['errors']} failed), FIFO"
    )
    print(
        f"sweep wall clock        : {wall:.0f} s  ->  {summary['trials'] / wall * 3600:.0f} "
        "trials/hour"
    )
    print(
        f"trial start-up overhead : {statistics.mean(startups):.1f} s per trial "
        f"(first epoch minus a steady epoch; min {min(startups):.1f}, max {max(startups):.1f})"
    )
    print(
        f"plain Train run (no Tune): {plain_wall:.0f} s for {result.metrics['epoch'] + 1} "
        f"epochs; per trial in the sweep: {wall / summary['trials']:.0f} s"
    )


if __name__ == "__main__":
    main()
