"""Two Ray nodes on this machine (tests/integration/local_cluster.py: a head and worker
nodes, one CPU each, so two training workers land one per node), the training job submitted
with `ray job submit`, its storage on the S3 API.

- Node loss: the worker node's raylet is killed mid-run and a fresh node joins; the run
  resumes from its S3 checkpoint and ends with every epoch's checkpoint written once and
  the optimizer step count of an uninterrupted run.
- Elastic: a run allowed 1..2 workers starts on the head alone and grows to two workers
  when a node joins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import s3fs
from helpers import TINY_TRAIN
from local_cluster import LocalCluster

from mmdls_dist.data.shards import load_manifest
from mmdls_dist.train import checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.two_nodes]

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def head_cluster(tmp_path_factory, s3_bucket):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), dict(os.environ))
    try:
        c.start_head(cpus=1, resources={"mmdls_head": 1})
        yield c
    finally:
        c.stop()


@pytest.fixture()
def cluster(head_cluster):
    """One cluster for the module (its start and stop cost ~30 s); each test gets it with
    the head alone, the nodes an earlier test added stopped."""
    head_cluster.stop_extra_nodes()
    return head_cluster


class Job:
    """`ray job submit` of jobs/train.py to the cluster; the run's files read from S3."""

    def __init__(self, cluster, bucket: str, shards, log: Path, *settings: str):
        self.run = f"{bucket}/two-nodes/{uuid.uuid4().hex[:8]}/two"
        storage = self.run.rsplit("/", 1)[0]
        overrides = [*TINY_TRAIN, f"run.storage_path={storage}", "run.name=two", *settings]
        entry = [sys.executable, "jobs/train.py", "--shards", str(shards)]
        entry += [a for s in overrides for a in ("--set", s)]
        ray = str(Path(sys.executable).parent / "ray")
        submit = [ray, "job", "submit", f"--address={cluster.dashboard}", "--working-dir", "."]
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 (closed in wait)
        self.proc = subprocess.Popen(
            [*submit, "--", *entry], cwd=REPO, stdout=self._out, stderr=self._out, env=cluster.env
        )
        self.fs = s3fs.S3FileSystem(use_listings_cache=False)

    def started(self) -> list[dict]:
        """executions.jsonl: one line per epoch start (epoch, global_step, world)."""
        url = f"{self.run}/{checkpoint.EXECUTIONS}"
        if not self.fs.exists(url):
            return []
        return [json.loads(x) for x in self.fs.cat(url).decode().splitlines() if x]

    def until(self, ok, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ok(self.started()):
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"timed out; started: {self.started()}"
            time.sleep(0.2)

    def wait(self) -> None:
        try:
            assert self.proc.wait(timeout=600) == 0, self.log.read_text()[-3000:]
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._out.close()

    def checkpoint_metrics(self) -> list[dict]:
        return [
            json.loads(self.fs.cat(f"{url}/{checkpoint.METRICS}"))
            for url in checkpoint.checkpoints(self.run)
        ]


def test_a_lost_node_is_replaced_and_the_run_resumes_from_s3(
    cluster, s3_bucket, shard_dir, tmp_path
):
    epochs = 8  # long enough that the loss lands while training
    node = cluster.add_node("worker-1", cpus=1, resources={"mmdls_worker": 1})
    job = Job(
        cluster, s3_bucket, shard_dir, tmp_path / "job.log",
        "run.num_workers=2", "run.cpus_per_worker=1", f"optim.epochs={epochs}",
        "run.max_failures=3",
    )  # fmt: skip
    job.until(lambda runs: any(e["epoch"] == 1 for e in runs))  # epoch 1 under way
    lost_at = time.monotonic()
    cluster.kill_raylet(node)  # the worker node's loss, by its raylet's pid
    cluster.add_node("worker-2", cpus=1, resources={"mmdls_worker": 1})
    before = len(job.started())
    job.until(lambda runs: len(runs) > before or job.proc.poll() is not None)
    back_after = time.monotonic() - lost_at
    job.wait()

    steps = load_manifest(str(shard_dir))["splits"]["train"]["n_patients"] // (2 * 3)
    runs = job.started()
    started = [e["epoch"] for e in runs]
    assert len(runs) == epochs + 1 and sorted(set(started)) == list(range(epochs))
    (again,) = [e for e in set(started) if started.count(e) == 2]  # the one the loss cut
    first, second = (r for r in runs if r["epoch"] == again)
    assert first["global_step"] == second["global_step"] == again * steps  # from its start
    assert all(r["world"] == 2 for r in runs)
    metrics = job.checkpoint_metrics()
    assert sorted(m["epoch"] for m in metrics) == list(range(epochs))  # each written once
    assert max(m["global_step"] for m in metrics) == epochs * steps  # as uninterrupted
    best = json.loads(job.fs.cat(f"{job.run}/{checkpoint.BEST}"))
    assert best["metrics"]["epoch"] == epochs - 1
    sizes = [job.fs.du(url) for url in checkpoint.checkpoints(job.run)]
    print(
        f"\ntwo nodes: training again {back_after:.1f} s after the node loss (a fresh node "
        f"joining included); {sum(sizes) / len(sizes) / 1e6:.2f} MB of checkpoint per epoch"
    )


def test_an_elastic_run_grows_when_a_node_joins(cluster, s3_bucket, shard_dir, tmp_path):
    # A few seconds each; the group grew by epoch 6-9 here (40 epochs ran 30 more at two
    # workers): time for a node that joins three times slower.
    epochs = 30
    job = Job(
        cluster, s3_bucket, shard_dir, tmp_path / "job.log",
        "run.num_workers=2", "run.min_workers=1", "run.resize_interval_s=2",
        "run.cpus_per_worker=1", f"optim.epochs={epochs}", "run.max_failures=3",
    )  # fmt: skip
    job.until(lambda runs: any(e["epoch"] == 1 for e in runs))  # training on the head alone
    cluster.add_node("worker-1", cpus=1, resources={"mmdls_worker": 1})
    job.until(lambda runs: runs[-1]["world"] == 2, timeout=120)  # it grew, mid-run
    job.wait()
    runs = job.started()
    assert runs[0]["world"] == 1 and runs[-1]["world"] == 2
    grown = next(i for i, r in enumerate(runs) if r["world"] == 2)
    assert all(r["world"] == 2 for r in runs[grown:])
    assert sorted({e["epoch"] for e in runs}) == list(range(epochs))
    metrics = job.checkpoint_metrics()
    assert sorted(m["epoch"] for m in metrics) == list(range(epochs))  # each written once
    print(f"\nelastic: two workers from epoch {runs[grown]['epoch']} of {epochs}")


def test_a_command_beside_a_running_cluster_starts_a_ray_of_its_own(cluster):
    """Without RAY_ADDRESS a command never joins another cluster on the machine (a bare
    ray.init() would, and the command would die with that cluster)."""
    code = (
        "import ray; from mmdls_dist.parallel import init_ray; init_ray(num_cpus=1); "
        "print('GCS', ray.get_runtime_context().gcs_address)"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    gcs = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("GCS"))
    assert gcs.rsplit(":", 1)[1] != str(cluster.gcs_port)
