"""One local Ray session (2 CPUs) shared by every integration test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """Started as the commands start theirs (parallel.init_ray: a local Ray pinned to its
    own API server address)."""
    ray = pytest.importorskip("ray")
    from mmdls_dist.parallel import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()
