"""One local Ray session (2 CPUs) shared by every integration test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()
