"""Driver-side data preparation for jobs: raw export or synthetic cohort -> shards.

Used by `mmdls shard` and by the training job when it is given raw data or nothing at all
(the embedded default makes a synthetic cohort from the config's `synth` block and shards
it as the `prep` block says).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from mmdls_dist import storage
from mmdls_dist.config import Config, PrepConfig, SynthConfig, to_dict
from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.shards import MANIFEST, build_shards, load_manifest
from mmdls_dist.data.synth import generate, oracle_metrics

log = logging.getLogger(__name__)

MapperFactory = Callable[[str], Callable]


def shard_cohort(raw: str, out: str, prep: PrepConfig, mapper: MapperFactory) -> dict:
    """Validate `raw`, split, shard to `out`; logs the import summary. -> manifest."""
    t0 = time.perf_counter()
    report = read_cohort(raw, mapper=mapper("check images"))
    log.info("%s", report.summary(max_defects=50))
    manifest = build_shards(report, out, prep, mapper=mapper("write shards"))
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


def ensure_shards(raw: str, out: Path, prep: PrepConfig, mapper: MapperFactory) -> str:
    """Shard `raw` into `out` unless a finished sharding with the same prep block is
    already there (one with another is refused, not silently reused)."""
    if (out / MANIFEST).exists():
        _same_settings(load_manifest(str(out))["prep"], to_dict(prep), "prep", out)
        log.info("reusing shards in %s (delete the folder to re-shard)", out)
    else:
        shard_cohort(raw, str(out), prep, mapper)
    return str(out)


def _same_settings(saved: dict, wanted: dict, block: str, folder: Path) -> None:
    diffs = [
        f"{block}.{key}: {saved.get(key)!r} there, {value!r} now"
        for key, value in wanted.items()
        if saved.get(key) != value
    ]
    if diffs:
        raise ValueError(
            f"{folder} was made with other {block} settings:\n  "
            + "\n  ".join(diffs)
            + "\nuse another --workdir, or delete the folder to make it again"
        )


def synthetic_cohort(synth: SynthConfig, workdir: Path, mapper: MapperFactory) -> tuple[str, dict]:
    """Make (once) the synthetic cohort the synth block describes. -> (raw root, truth)."""
    base = workdir / "synthetic"
    raw, truth_path = base / "raw", base / "truth.json"
    if not (raw / "clinical.csv").exists():
        log.info("no data given: generating a synthetic cohort in %s", raw)
        generate(synth, raw, truth_path, mapper=mapper("synth"))
    truth = json.loads(truth_path.read_text())
    _same_settings(truth["spec"], to_dict(synth), "synth", base)
    return str(raw), truth


def resolve_data(
    cfg: Config, raw: str | None, shards: str | None, workdir: Path, mapper: MapperFactory
) -> tuple[Config, dict | None, str | None]:
    """Decide where the run's shards come from. -> (config with data.shards and absolute
    local paths, the synthetic ground truth or None, the raw folder or None)."""
    truth = None
    if shards:
        pass
    elif raw:
        shards = ensure_shards(raw, workdir / "shards", cfg.prep, mapper)
    elif cfg.data.shards:
        shards = cfg.data.shards
    else:
        raw, truth = synthetic_cohort(cfg.synth, workdir, mapper)
        shards = ensure_shards(raw, workdir / "shards", cfg.prep, mapper)
    # Ray workers do not share the driver's cwd: local paths absolute.
    data = dataclasses.replace(cfg.data, shards=storage.absolute(shards))
    run = dataclasses.replace(cfg.run, storage_path=storage.absolute(cfg.run.storage_path))
    load_manifest(data.shards)  # fail early, on the driver, if the shards are not there
    return dataclasses.replace(cfg, data=data, run=run), truth, raw


def synthetic_oracle(truth: dict, raw: str, shards: str, split: str = "val") -> dict[str, float]:
    """Oracle metrics of a synthetic cohort on one split of its shards (labels read from the
    raw tables, so label gaps match what the model was scored on)."""
    manifest = load_manifest(shards)
    keys = {k for e in manifest["shards"] if e["split"] == split for k in e["keys"]}
    records = [r for r in read_cohort(raw, check_pixels=False).records if r.patient_id in keys]
    return oracle_metrics(truth, records)
