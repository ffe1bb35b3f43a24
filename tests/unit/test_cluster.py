"""cluster/: launcher YAMLs validate with Ray's own schema after Ray's config preparation,
KubeRay manifests request GPUs, and nothing opens Ray to the world or holds credentials."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = sorted(CLUSTER.glob("kuberay*.yaml"))
LAUNCHER = sorted(set(CLUSTER.glob("*.yaml")) - set(KUBERAY))


def test_there_are_aws_gcp_and_kuberay_files():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in LAUNCHER}
    assert providers == {"aws", "gcp"} and KUBERAY


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_validates_against_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    # The same check rejects a broken file (so the test above can fail).
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["node_confg"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_is_secure_and_pinned(path):
    config = yaml.safe_load(path.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]
    types = config["available_node_types"]
    assert any(_is_spot(t["node_config"]) for t in types.values())  # spot option
    assert any(
        t["node_config"]
        .get("InstanceType", t["node_config"].get("machineType", ""))
        .startswith(("g", "p", "a"))
        for name, t in types.items()
        if name != config["head_node_type"]
    )


def test_every_cluster_file_runs_the_one_project_image():
    """One source of truth: the Dockerfile installs the package (so pyproject's dependency
    list) on the Ray base image the project pins; every launcher and the KubeRay manifest
    run that image and pip-install nothing at boot; the versions agree."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+)\.(\d+)-py(\d)(\d+)-gpu$", dockerfile, re.M)
    assert base, "the Dockerfile builds on a pinned Ray GPU image"
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray["))
    assert ray_pin.endswith(f"=={base[1]}.*") and ray.__version__.startswith(f"{base[1]}.")
    floor = tuple(int(x) for x in project["requires-python"].removeprefix(">=").split("."))
    assert (int(base[3]), int(base[4])) >= floor
    assert 'pip install --no-cache-dir ".[cloud]"' in dockerfile  # the package, its deps
    bootstrap_torch = re.search(r"torch==[\d.]+", (ROOT / "scripts/bootstrap.sh").read_text())
    assert f'"{bootstrap_torch[0]}"' in dockerfile  # the torch the tests run with
    images = set()
    for path in LAUNCHER:
        config = yaml.safe_load(path.read_text())
        images.add(config["docker"]["image"])
        assert not any("pip" in c for c in config.get("setup_commands") or [])
        if config["provider"]["type"] == "aws":  # never Ray's old default AMI
            assert all(
                "ImageId" in t["node_config"] for t in config["available_node_types"].values()
            )
    for path in KUBERAY:
        for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
            if doc["kind"] not in ("RayJob", "RayCluster"):
                continue
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            assert spec["rayVersion"] == f"{base[1]}.{base[2]}"
            groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
            images |= {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
            if any("maxReplicas" in g for g in spec["workerGroupSpecs"]):
                assert spec.get("enableInTreeAutoscaling") is True
            if doc["kind"] == "RayJob":
                assert doc["spec"]["entrypoint"].split()[1].startswith("/")  # absolute
    assert images == {f"REPLACE_WITH_REGISTRY/mmdls-dist:{project['version']}"}


def _is_spot(node: dict) -> bool:
    market = node.get("InstanceMarketOptions", {}).get("MarketType")
    return market == "spot" or node.get("scheduling", {}).get("provisioningModel") == "SPOT"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_parses_and_requests_gpus(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    jobs = [d for d in docs if d["kind"] in ("RayJob", "RayCluster")]
    assert jobs
    for doc in jobs:
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"].startswith(".".join(ray.__version__.split(".")[:2]))
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        gpus = [
            int(c["resources"]["limits"]["nvidia.com/gpu"])
            for group in spec["workerGroupSpecs"]
            for c in group["template"]["spec"]["containers"]
        ]
        assert gpus and min(gpus) >= 1
    if any(d["kind"] == "RayJob" for d in docs):
        entry = next(d for d in docs if d["kind"] == "RayJob")["spec"]["entrypoint"]
        assert "jobs/train.py" in entry


# --- lint: nothing opens Ray to the world, no credentials in files ----------------------

FORBIDDEN = {
    "dashboard bound to all interfaces": re.compile(
        r"dashboard[-_]host[\"']?\s*[=:]\s*[\"']?0\.0\.0\.0"
    ),
    "ingress from anywhere": re.compile(r"0\.0\.0\.0/0|::/0"),
    "service exposed outside the cluster": re.compile(
        r"(serviceType|type)\s*:\s*[\"']?(LoadBalancer|NodePort)"
    ),
    "host network": re.compile(r"hostNetwork\s*:\s*true"),
    "AWS access key": re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "account id": re.compile(r"(?<![\d.])\d{12}(?![\d.])"),
}
SCANNED = {".yaml", ".yml", ".sh", ".py", ".toml", ".json", ".cfg", ".ini", ""}


def violations(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    return [f"{path.name}: {what}" for what, rx in FORBIDDEN.items() if rx.search(text)]


def scanned_files() -> list[Path]:
    """The repository's own files (tracked, or new and not ignored; caches, environments
    and results are not the project's), minus the tests, which spell out what they look
    for."""
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode == 0:
        paths = [ROOT / line for line in listed.stdout.splitlines()]
    else:  # not a git checkout (an unpacked release): everything but the usual caches
        skip = {".git", ".venv", "mmdls-work", "bench-out", "__pycache__", ".pytest_cache"}
        paths = [p for p in ROOT.rglob("*") if not set(p.relative_to(ROOT).parts) & skip]
    return [
        p
        for p in paths
        if p.is_file()
        and p.relative_to(ROOT).parts[0] != "tests"
        and (p.suffix in SCANNED or p.name == "Dockerfile")
    ]


def test_no_file_opens_ray_to_the_world_or_holds_credentials():
    files = scanned_files()
    assert any(p.parent == CLUSTER for p in files)
    found = [v for p in files for v in violations(p)]
    assert found == []


@pytest.mark.parametrize(
    "line",
    [
        "ray start --head --dashboard-host=0.0.0.0",
        "rayStartParams: {dashboard-host: '0.0.0.0'}",
        "IpRanges: [{CidrIp: 0.0.0.0/0}]",
        "serviceType: LoadBalancer",
        "aws_secret_access_key = abc",
    ],
)
def test_the_lint_catches_what_it_should(tmp_path, line):
    bad = tmp_path / "bad.yaml"
    bad.write_text(line + "\n")
    assert violations(bad)
