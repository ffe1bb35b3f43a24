"""One local Ray session (2 CPUs) shared by every integration test, and an S3 API server on
127.0.0.1 for the tests marked `s3`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The standard AWS variables, for this test run only and before any Ray worker starts (the
# workers inherit them: pyarrow and s3fs read them there). Always overridden: a test run
# never reaches a real bucket with a developer's credentials.
S3_PORT = _free_port()
os.environ.update(
    {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "mmdls-test",
        "AWS_SECRET_ACCESS_KEY": "mmdls-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def ray_session():
    """Started as the commands start theirs (parallel.init_ray: a local Ray pinned to its
    own API server address)."""
    ray = pytest.importorskip("ray")
    from mmdls_dist.parallel import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory):
    """An S3 API (moto's standalone server) on 127.0.0.1 at AWS_ENDPOINT_URL with one empty
    bucket -> "s3://mmdls-test". Stopped by the pid it was started with."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.fail("moto[server] (the dev extra: bash scripts/bootstrap.sh) is not installed")
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:  # this interpreter's moto, not whichever is first on PATH
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"], timeout=1)
                break
            except urllib.error.HTTPError:  # it answers: it is up
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the S3 server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        import s3fs

        s3fs.S3FileSystem().mkdir("mmdls-test")
        yield "s3://mmdls-test"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
