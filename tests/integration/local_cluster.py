"""A multi-node Ray cluster on this machine for the tests: a head and extra nodes, each a
`ray start --block` process of its own (its own raylet, object store and temp dir) with its
own ports on 127.0.0.1 and its own custom resources. The tests stop exactly what they started:
every node by the pid of its `ray start`, a node's loss by the pid of its raylet."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
STATUS_TIMEOUT_S = 60  # one status query: a driver's start, ray.nodes() and exit


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def children(pid: int) -> list[int]:
    """Every descendant process of `pid` (from /proc)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class LocalCluster:
    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir = log_dir
        self.nodes: list[subprocess.Popen] = []
        self.temp_dirs: list[str] = []
        self.gcs_port, self.dashboard_port = free_ports(2)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # Token auth off: the cluster listens on 127.0.0.1 only and lives for one test.
        # Its own API server address pinned, as parallel.init_ray pins a local Ray's: with
        # another Ray on the machine (the test session's), Ray Train's placement-group
        # cleaner would otherwise pick one of the two.
        self.env = {
            **env,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_API_SERVER_ADDRESS": self.dashboard,
        }
        self.env.pop("RAY_ADDRESS", None)

    def _start(self, name: str, args: list[str], cpus: int, resources: dict) -> subprocess.Popen:
        node_manager, object_manager, agent, agent_grpc, metrics, runtime_env, low = free_ports(7)
        # A temp dir of its own, as on a machine of its own. Nodes sharing /tmp/ray share
        # one session dir and so one unpacked working_dir, which every node's runtime-env
        # agent deletes and unpacks again when it first needs it (overwrite=True): the
        # driver, already running from it on the head, then found half a package (seen in
        # CI: "config 'debug' is neither a preset () nor a file"). Short, under /tmp: the
        # session's Unix socket paths must stay under 108 characters.
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        cmd = [
            RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}", f"--resources={json.dumps(resources)}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 40}",
            "--object-store-memory=150000000", f"--temp-dir={temp_dir}",
            *args,
        ]  # fmt: skip
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 (lives with the node)
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env, start_new_session=True)
        self.nodes.append(proc)
        return proc

    def start_head(self, cpus: int, resources: dict) -> subprocess.Popen:
        (client_port,) = free_ports(1)
        proc = self._start(
            "head",
            [
                "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                f"--ray-client-server-port={client_port}",
            ],
            cpus, resources,
        )  # fmt: skip
        self.wait_for(lambda s: s.get("alive", 0) >= 1, 90)
        return proc

    def add_node(self, name: str, cpus: int, resources: dict) -> subprocess.Popen:
        before = self.status().get("alive", 0)
        log = f"{name}-{len(self.nodes)}"  # a module's tests may each add a "worker-1"
        proc = self._start(log, [f"--address={self.address}"], cpus, resources)
        self.wait_for(lambda s: s.get("alive", 0) > before, 90)
        return proc

    def raylet_pid(self, node: subprocess.Popen) -> int:
        pids = [p for p in children(node.pid) if "/raylet/raylet" in command_of(p)]
        assert len(pids) == 1, f"raylets of node {node.pid}: {pids}"
        return pids[0]

    def kill_raylet(self, node: subprocess.Popen) -> None:
        """The node's loss: SIGKILL its raylet, then at once everything else that node ran
        (its workers die with the machine), then reap its `ray start`."""
        kids = children(node.pid)
        os.kill(self.raylet_pid(node), signal.SIGKILL)
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._stop(node)

    def status(self) -> dict:
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR');"
            "print(json.dumps({'alive': sum(n['Alive'] for n in ray.nodes()),"
            " 'resources': ray.cluster_resources()}))"
        )
        # Bounded: a driver that cannot reach the GCS would otherwise wait in ray.init for
        # as long as Ray retries, and wait_for's deadline would never be checked again.
        try:
            out = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True, text=True, env=self.env, timeout=STATUS_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:  # run() has killed the driver it started
            return {}
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {}

    def wait_for(self, ok, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status and ok(status):
                return status
            time.sleep(1)
        raise TimeoutError(f"cluster not ready in {timeout:.0f} s: {self.status()}")

    def _stop(self, *nodes: subprocess.Popen, grace_s: float = 20) -> None:
        """SIGTERM each node's `ray start --block` (it stops its processes), all at once,
        then SIGKILL what is left of their descendants after grace_s. Only processes this
        cluster started."""
        kids = [pid for node in nodes for pid in children(node.pid)]
        running = [node for node in nodes if node.poll() is None]
        for node in running:
            node.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in running:
            try:
                node.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop_extra_nodes(self) -> None:
        """Back to the head alone: every other node this cluster started is stopped and
        the GCS counts one node alive."""
        extra = [node for node in self.nodes[1:] if node.poll() is None]
        if extra:
            self._stop(*extra)
        self.wait_for(lambda s: s.get("alive", 0) == 1, 90)

    def stop(self) -> None:
        # The whole cluster goes: a head that has not stopped its processes in 5 s (its
        # `ray start` takes about 20 on SIGTERM) has them killed.
        self._stop(*reversed(self.nodes), grace_s=5)
        for temp_dir in self.temp_dirs:  # only the dirs this cluster made
            shutil.rmtree(temp_dir, ignore_errors=True)
