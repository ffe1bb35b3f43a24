"""Run a function over many items as Ray tasks (or serially), with a progress bar.

The data modules take a `mapper(fn, items) -> list` and never import Ray; this is the one
place where that mapper becomes Ray tasks, so data prep scales out on a cluster while the
data code stays testable without one.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence

from tqdm import tqdm

log = logging.getLogger(__name__)


def init_ray(
    address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True
) -> None:
    """Join a cluster (RAY_ADDRESS / `address`, as under `ray job submit`) or start a local
    Ray of this command's own (never silently another cluster on this machine).

    A local Ray is pinned to its own API server address for everything it starts. Two
    commands on one machine (a sweep, and an evaluation in another terminal) run two local
    Rays, and Ray's state API, which Ray Train's placement-group cleaner polls from inside
    the cluster, otherwise finds "the" cluster by scanning for running ones: with two it
    fails ("Found multiple active Ray instances"), the cleaner dies, a stopped trial's
    placement group is never released and the next trial waits forever. The dashboard
    (which serves the state API) listens on 127.0.0.1 only."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
        return
    port = _free_port()
    # Set before ray.init: its raylet, and so every worker and actor, inherits it.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # address="local": a Ray of its own even where `ray start` runs a cluster on this
    # machine (a bare ray.init() would join that one, and die with it).
    ray.init(
        address="local",
        num_cpus=num_cpus,
        log_to_driver=log_to_driver,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serial_mapper(desc: str = "") -> Callable[[Callable, Sequence], list]:
    def run(fn: Callable, items: Sequence) -> list:
        return [fn(item) for item in tqdm(items, desc=desc, disable=not desc, leave=False)]

    return run


def ray_mapper(
    desc: str = "", num_cpus: float = 1.0, num_gpus: float = 0.0
) -> Callable[[Callable, Sequence], list]:
    """A mapper that runs each item as one Ray task; results come back in input order."""

    def run(fn: Callable, items: Sequence) -> list:
        import ray

        if not items:
            return []
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=2)(fn)
        refs = [remote.remote(item) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        with tqdm(total=len(refs), desc=desc, disable=not desc, leave=False) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    results[index[ref]] = ray.get(ref)
                    bar.update(1)
        return results

    return run
