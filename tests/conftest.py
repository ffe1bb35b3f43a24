"""Session-wide fixtures: one small synthetic cohort and its shards, built once."""

from __future__ import annotations

import os
import tempfile

import pytest
from helpers import TINY, TINY_PREP

from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.shards import build_shards
from mmdls_dist.data.synth import generate

# The cache of verified shard files (data/verify.py) lives in a folder of this test run,
# not in ~/.cache; set before any Ray worker starts, so the workers share it.
os.environ["MMDLS_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmdls-test-cache-")


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory):
    """(raw root, truth dict) of a 40-patient, 3-center synthetic cohort."""
    base = tmp_path_factory.mktemp("synth")
    truth = generate(TINY, base / "raw", base / "truth.json")
    return base / "raw", truth


@pytest.fixture(scope="session")
def synth_report(synth_cohort):
    return read_cohort(synth_cohort[0])


@pytest.fixture(scope="session")
def shard_dir(synth_report, tmp_path_factory):
    """Shards of the synthetic cohort: HOSP-C external, small shards so splits span several."""
    out = tmp_path_factory.mktemp("shards") / "s"
    build_shards(
        synth_report,
        out,
        TINY_PREP,
    )
    return out
