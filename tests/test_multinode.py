"""Two Ray nodes on one machine, both with token authentication on: a head and a second node with
its own resources and its own local cache directory (as a node without shared storage has). A
sweep's trials run on both; the second node copies the cache once; all runs land in one MLflow
experiment. A node whose installed releases differ from the driver's stops the sweep before any
trial. Every process gets a token made for this test (RAY_AUTH_TOKEN), so nothing depends on what
~/.ray holds."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_env(ray_tmpdir: str, token: str) -> dict:
    """A process environment for this test's clusters: token mode with this test's own token."""
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_TMPDIR=ray_tmpdir, PYTHONUNBUFFERED="1")
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    return env


def start_nodes(env: dict, second_node_env: dict, dashboard_port: int | None = None) -> str:
    port = free_port()
    head = ["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--disable-usage-stats"]
    head += ([f"--dashboard-port={dashboard_port}", "--include-dashboard=true"] if dashboard_port
             else ["--include-dashboard=false"])
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
    subprocess.run(["ray", "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--disable-usage-stats"],
                   env=second_node_env, check=True, capture_output=True, timeout=120)
    return f"127.0.0.1:{port}"


def sweep_command(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / "sweep.py"), "--config", str(REPO / "configs" / "synthetic_tiny.yaml"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-path", str(tmp_path / "ray"),
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.spec=synthetic:300",
            "--set", "train.epochs=2", "--set", "tracking.experiment=two-nodes", *extra]


@pytest.fixture
def two_node_cluster(tmp_path, ray_tmpdir):
    env = token_env(ray_tmpdir, secrets.token_hex(32))
    node_cache = tmp_path / "node2-cache"
    address = start_nodes(env, dict(env, CPM_LOCAL_CACHE_DIR=str(node_cache)))
    yield address, node_cache, env


def test_sweep_runs_on_two_nodes_and_the_cache_reaches_the_second(tmp_path, two_node_cluster):
    address, node_cache, env = two_node_cluster
    # Token auth is on: a client without the cluster's token is turned away.
    wrong = dict(env, RAY_AUTH_TOKEN=secrets.token_hex(32))
    refused = subprocess.run(["ray", "status", f"--address={address}"], env=wrong, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0, refused.stdout

    result = subprocess.run(sweep_command(tmp_path, "--set", "sweep.grid={model.stages: [1, 2]}"), cwd=tmp_path,
                            env=dict(env, RAY_ADDRESS=address), capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "2 trial(s) at a time, 1 worker(s) per trial, 1 CPU per worker" in output

    # The second node read the cache from its own disk: a copy, byte for byte the head's file.
    copies = sorted(node_cache.glob("*.h5"))
    assert copies, f"the second node made no copy of the cache; output:\n{output[-2000:]}"
    for copy in copies:
        original = tmp_path / "cache" / copy.name
        assert original.is_file() and copy.read_bytes() == original.read_bytes()
    assert not list(node_cache.glob(".*copying*")), "a partial copy was left behind"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("two-nodes")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`cpm.run_kind` = 'trial'")
    assert sorted(r.info.run_name for r in runs) == ["T=1 rf=45px is=on seed=0", "T=2 rf=109px is=on seed=0"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_node_with_other_releases_stops_the_sweep_before_any_trial(tmp_path, ray_tmpdir):
    """The second node's Python finds an MLflow 9.9.9 distribution first (a dist-info directory
    ahead of site-packages on its path, which is what an older or newer install looks like to
    importlib.metadata); the driver must name that node and both versions, and write nothing."""
    shadow = tmp_path / "other-install"
    dist_info = shadow / "mlflow-9.9.9.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlflow\nVersion: 9.9.9\n")
    env = token_env(ray_tmpdir, secrets.token_hex(32))
    address = start_nodes(env, dict(env, PYTHONPATH=os.pathsep.join([str(shadow), str(REPO)])))

    result = subprocess.run(sweep_command(tmp_path), cwd=tmp_path, env=dict(env, RAY_ADDRESS=address),
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "runs mlflow 9.9.9; the driver runs mlflow " + mlflow.__version__.split("+")[0] in output, output[-3000:]
    assert "constraints.txt" in output
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.h5"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment_by_name("two-nodes") is None


def test_job_submission_through_the_dashboard_needs_the_token(tmp_path, ray_tmpdir):
    """The README's `ray job submit --address http://127.0.0.1:8265` (through the SSH tunnel on a
    cluster): with the cluster's token the job runs on the cluster; without it, it is refused."""
    env = token_env(ray_tmpdir, secrets.token_hex(32))
    dashboard = free_port()
    start_nodes(env, env, dashboard_port=dashboard)
    url = f"http://127.0.0.1:{dashboard}"
    job = ["ray", "job", "submit", "--address", url, "--", sys.executable, "-c",
           "import ray; ray.init(); print('cluster CPUs', int(ray.cluster_resources()['CPU']))"]
    for _ in range(30):  # the head's job agent starts a few seconds after `ray start` returns
        accepted = subprocess.run(job, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        if "No available agent" not in accepted.stderr:
            break
        time.sleep(2)
    assert accepted.returncode == 0, (accepted.stdout + accepted.stderr)[-3000:]
    assert "cluster CPUs 2" in accepted.stdout

    refused = subprocess.run(job, env=dict(env, RAY_AUTH_TOKEN=secrets.token_hex(32)), cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "cluster CPUs" not in refused.stdout
