"""GPU planning against a real Ray autoscaler, and sweeps that ask for what the cluster can never have.

The autoscaling cluster: a 2-CPU head and a `gpu_worker` node type ({"CPU": 1, "GPU": 1},
min_workers 0, max_workers 2) served by Ray's `fake_multinode` provider, the one Ray's own
autoscaler tests use: when a demand needs a gpu_worker, the real autoscaler (monitor.py) launches
one by starting another raylet on this machine with that node type's resources. The GPUs are only
resource labels: there is no CUDA here.

What the first test proves: the driver reads the node types from the autoscaler and, with no GPU
node alive, plans GPU workers (the plan line says so and why); the trials ask Ray for GPU bundles;
the autoscaler launches gpu_worker nodes for them (two trials at a time: two nodes, the node type's
maximum) and Ray places the bundles there. What it cannot prove: that training runs on those
nodes (torch sees no CUDA device, so the trials fail once placed and the test stops the sweep),
anything about a cloud provider launching instances, or the resources `ray up` fills in from an
instance type (tests/test_sweep_space.py reads such a config).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import kill_processes_mentioning
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
GPU_WORKER = {"CPU": 1, "GPU": 1}
MAX_GPU_WORKERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(ray_tmpdir: str) -> dict:
    env = dict(os.environ, RAY_TMPDIR=ray_tmpdir, PYTHONUNBUFFERED="1")
    # New clusters turn on token authentication. An explicit token in the environment (which Ray
    # reads before ~/.ray/auth_token) makes this test's cluster independent of whatever ~/.ray
    # holds; every process (head, autoscaler, the nodes it launches, drivers) inherits it.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    env.pop("RAY_ADDRESS", None)
    return env


def fake_multinode_config(gcs_address: str, head_cpus: int) -> dict:
    """A cluster launcher config for the fake_multinode provider (what Ray's AutoscalingCluster
    writes: its start() and shutdown() run `ray stop --force`, which stops every Ray cluster on the
    machine, so the cluster is started by hand here and stopped by its temp dir)."""
    no_commands = {key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                       "worker_setup_commands", "head_start_ray_commands",
                                       "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                                       "rsync_filter")}
    return {
        "cluster_name": "fake-autoscaling", "max_workers": 8,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": GPU_WORKER, "node_config": {}, "min_workers": 0,
                           "max_workers": MAX_GPU_WORKERS},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "upscaling_speed": 1.0,
        # Launched nodes stay while the test looks at them.
        "idle_timeout_minutes": 10, "file_mounts": {}, "file_mounts_sync_continuously": False, **no_commands,
    }


@pytest.fixture
def autoscaling_cluster(tmp_path, ray_tmpdir):
    from ray._private.services import get_node_ip_address

    env = ray_env(ray_tmpdir)
    # RAY_FAKE_CLUSTER lets the autoscaler use the fake_multinode provider; it updates every second.
    head_env = dict(env, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    for attempt in range(3):  # a raylet that does not register within Ray's 30 s on a busy machine
        port = free_port()
        address = f"{get_node_ip_address()}:{port}"
        config_file = tmp_path / "autoscaling.json"
        config_file.write_text(json.dumps(fake_multinode_config(address, head_cpus=2)))
        started = subprocess.run(["ray", "start", "--head", f"--port={port}", f"--autoscaling-config={config_file}",
                                  "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                                 env=head_env, capture_output=True, text=True, timeout=180)
        if started.returncode == 0:
            break
        kill_processes_mentioning(ray_tmpdir)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
    # Teardown: the ray_tmpdir fixture kills every process of this cluster, the launched nodes too.
    yield address, env


# Runs as a driver of the cluster: waits until the autoscaler has launched GPU nodes for the
# sweep's GPU bundles, then prints what it saw.
PROBE = r"""
import json, sys, time
import ray
from ray.experimental.internal_kv import _internal_kv_get
from ray.util import placement_group_table

ray.init(address=sys.argv[1], logging_level="ERROR")
want, deadline = int(sys.argv[2]), time.time() + float(sys.argv[3])
while True:
    status = json.loads(_internal_kv_get("__autoscaling_status") or b"{}")
    node_types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    gpu_nodes = [{"id": n["NodeID"], "resources": {k: n["Resources"][k] for k in ("CPU", "GPU")},
                  "node_type": node_types.get(n["NodeID"])}
                 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) >= 1]
    gpu_bundles = [{"state": pg["state"], "bundles": pg["bundles"], "nodes": pg["bundles_to_node_id"]}
                   for pg in placement_group_table().values()
                   if any(b.get("GPU", 0) for b in pg["bundles"].values())]
    placed = {node for pg in gpu_bundles for node in pg["nodes"].values()}
    # The autoscaler's report names a new node's type a moment after the node joins.
    settled = all(n["id"] in placed and n["node_type"] for n in gpu_nodes)
    if (len(gpu_nodes) >= want and settled) or time.time() > deadline:
        break
    time.sleep(1)
print("PROBE " + json.dumps({"gpu_nodes": gpu_nodes, "gpu_bundles": gpu_bundles,
                             "cluster_gpus": ray.cluster_resources().get("GPU", 0)}))
"""


def sweep_command(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / "sweep.py"), "--config", "synthetic_tiny",
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--storage-path", str(tmp / "ray"),
            "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "data.spec=synthetic:300",
            "--set", "train.epochs=1", "--set", "tracking.experiment=autoscaling", *extra]


@pytest.mark.xdist_group("ray-start")  # a `ray start` head: see tests/test_multinode.py
def test_gpu_trials_make_the_autoscaler_launch_gpu_nodes(tmp_path, autoscaling_cluster):
    address, env = autoscaling_cluster
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        sweep = subprocess.Popen(sweep_command(tmp_path, "--set", "sweep.grid={model.stages: [1, 2]}",
                                               "--set", "sweep.max_failures=0"),
                                 cwd=tmp_path, env=dict(env, RAY_ADDRESS=address), stdout=out, stderr=subprocess.STDOUT)
    try:
        probe = subprocess.run([sys.executable, "-c", PROBE, address, str(MAX_GPU_WORKERS), "240"],
                               env=env, capture_output=True, text=True, timeout=400)
    finally:
        sweep.send_signal(signal.SIGKILL)  # the trials cannot train here (no CUDA); stop once placed
        sweep.wait(timeout=60)
    output = log.read_text()
    assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-3000:]
    seen = json.loads(probe.stdout.split("PROBE ", 1)[1].splitlines()[0])

    # The plan: GPU workers, sized to the gpu_worker node type, although no GPU node was alive.
    assert ("Resources: 2 trial(s) at a time, 1 worker(s) per trial, 1 GPU + 1 CPU per worker "
            "(GPUs: none now; node type gpu_worker can add up to 2 x 1 GPU)") in output, output[-3000:]
    # The autoscaler launched exactly the node type's maximum of gpu_worker nodes, with its resources...
    assert len(seen["gpu_nodes"]) == MAX_GPU_WORKERS, (seen, output[-3000:])
    assert all(n["node_type"] == "gpu_worker" and n["resources"] == {"CPU": 1.0, "GPU": 1.0}
               for n in seen["gpu_nodes"]), seen
    assert seen["cluster_gpus"] == MAX_GPU_WORKERS
    # ...and the trials' GPU bundles were placed on them (one one-worker bundle per trial).
    placed = {node for pg in seen["gpu_bundles"] for node in pg["nodes"].values()}
    assert {n["id"] for n in seen["gpu_nodes"]} <= placed, seen
    assert all(bundle == {"CPU": 1.0, "GPU": 1.0} for pg in seen["gpu_bundles"] for bundle in pg["bundles"].values())


def test_sweep_asking_for_what_the_cluster_can_never_have_stops_before_writing(tmp_path, ray_tmpdir):
    env = dict(ray_env(ray_tmpdir), RAY_ADDRESS="local")  # a local CPU-only cluster: no node types
    cases = {
        "sweep.use_gpu=true": "error: sweep.use_gpu=true, but the cluster has no GPU and can get none "
                              "(GPUs: none now; no node type adds GPUs)",
        "sweep.workers_per_trial=64": "error: sweep.workers_per_trial=64 needs 64 CPUs at once (one per worker), "
                                      "but the cluster can have at most ",
    }
    for override, message in cases.items():
        result = subprocess.run(sweep_command(tmp_path, "--set", override), cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
        # Nothing written: no cache built, no checkpoint directory, no MLflow run.
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
        assert not (tmp_path / "ray").exists()
        if (tmp_path / "mlflow.db").exists():
            client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
            experiments = [e.experiment_id for e in client.search_experiments()]
            assert client.search_runs(experiments) == []
