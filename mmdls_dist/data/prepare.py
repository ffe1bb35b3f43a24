"""Driver-side data preparation for jobs: raw export or synthetic cohort -> shards.

Used by `mmdls shard` and by the training job when it is given raw data or nothing at all
(the embedded default makes a synthetic cohort from the config's `prep` block).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from mmdls_dist import storage
from mmdls_dist.config import Config, PrepConfig
from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.shards import MANIFEST, ShardOptions, build_shards, load_manifest
from mmdls_dist.data.splits import SplitRecipe
from mmdls_dist.data.synth import SynthSpec, generate, oracle_metrics

log = logging.getLogger(__name__)

MapperFactory = Callable[[str], Callable]


def shard_cohort(
    raw: str,
    out: str,
    recipe: SplitRecipe,
    options: ShardOptions,
    mapper: MapperFactory,
    allow_rejects: bool = False,
) -> dict:
    """Validate `raw`, split, shard to `out`; logs the import summary. -> manifest."""
    t0 = time.perf_counter()
    report = read_cohort(raw, mapper=mapper("check images"))
    log.info("%s", report.summary(max_defects=50))
    manifest = build_shards(
        report, out, recipe, options, allow_rejects=allow_rejects, mapper=mapper("write shards")
    )
    total = sum(e["bytes"] for e in manifest["shards"])
    log.info(
        "wrote %d shards (%.1f MiB) to %s in %.1fs",
        len(manifest["shards"]),
        total / 2**20,
        out,
        time.perf_counter() - t0,
    )
    for split, info in manifest["splits"].items():
        log.info(
            "  %-8s %4d patients, %d shards, centers %s",
            split,
            info["n_patients"],
            len(info["shards"]),
            info["centers"],
        )
    return manifest


def recipe_of(prep: PrepConfig) -> SplitRecipe:
    return SplitRecipe(
        seed=prep.seed,
        val_fraction=prep.val_fraction,
        test_fraction=prep.test_fraction,
        external_centers=prep.external_centers,
    )


def ensure_shards(raw: str, out: Path, prep: PrepConfig, mapper: MapperFactory) -> str:
    """Shard `raw` into `out` unless a finished sharding is already there."""
    if (out / MANIFEST).exists():
        log.info("reusing shards in %s (delete the folder to re-shard)", out)
    else:
        shard_cohort(
            raw, str(out), recipe_of(prep), ShardOptions(image_size=prep.shard_image_size), mapper
        )
    return str(out)


def synthetic_cohort(prep: PrepConfig, workdir: Path, mapper: MapperFactory) -> tuple[str, dict]:
    """Make (once) the synthetic cohort the prep block describes. -> (raw root, truth)."""
    base = workdir / "synthetic"
    raw, truth_path = base / "raw", base / "truth.json"
    if not (raw / "clinical.csv").exists():
        log.info("no data given: generating a synthetic cohort in %s", raw)
        spec = SynthSpec(
            n_patients=prep.patients,
            seed=prep.seed,
            n_centers=prep.centers,
            image_size=prep.synth_image_size,
            min_slices=prep.min_slices,
            max_slices=prep.max_slices,
        )
        generate(spec, raw, truth_path, mapper=mapper("synth"))
    return str(raw), json.loads(truth_path.read_text())


def resolve_data(
    cfg: Config, *, raw: str | None, shards: str | None, workdir: Path, mapper: MapperFactory
) -> tuple[Config, dict | None, str | None]:
    """Decide where the run's shards come from. -> (config with data.shards, truth, raw)."""
    truth = None
    if shards:
        pass
    elif raw:
        shards = ensure_shards(raw, workdir / "shards", cfg.prep, mapper)
    elif cfg.data.shards:
        shards = cfg.data.shards
    else:
        raw, truth = synthetic_cohort(cfg.prep, workdir, mapper)
        shards = ensure_shards(raw, workdir / "shards", cfg.prep, mapper)
    shards = storage.absolute(shards)  # Ray workers do not share the driver's cwd
    load_manifest(shards)  # fail early, on the driver, if the shards are not there
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=shards)), truth, raw


def synthetic_oracle(truth: dict, raw: str, shards: str, split: str = "val") -> dict[str, float]:
    """Oracle metrics of a synthetic cohort on one split of its shards (labels read from the
    raw tables, so label gaps match what the model was scored on)."""
    manifest = load_manifest(shards)
    keys = {k for e in manifest["shards"] if e["split"] == split for k in e["keys"]}
    records = [r for r in read_cohort(raw, check_pixels=False).records if r.patient_id in keys]
    return oracle_metrics(truth, records)
