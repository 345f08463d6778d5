"""Two Ray nodes on one machine: a head and a second node with its own resources and its own
local cache directory (as a node without shared storage has). A sweep's trials run on both; the
second node copies the cache once; all runs land in one MLflow experiment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster(tmp_path, ray_tmpdir):
    port = free_port()
    # Ray turns on token authentication for a new cluster; every process that joins must send it.
    # RAY_TMPDIR: this test's clusters only, stopped by the ray_tmpdir fixture.
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="token", RAY_TMPDIR=ray_tmpdir)
    env.pop("RAY_ADDRESS", None)
    head = ["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
            "--disable-usage-stats"]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
    node_cache = tmp_path / "node2-cache"
    worker_env = dict(env, CPM_LOCAL_CACHE_DIR=str(node_cache))
    subprocess.run(["ray", "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--disable-usage-stats"],
                   env=worker_env, check=True, capture_output=True, timeout=120)
    yield f"127.0.0.1:{port}", node_cache, ray_tmpdir


def test_sweep_runs_on_two_nodes_and_the_cache_reaches_the_second(tmp_path, two_node_cluster):
    address, node_cache, ray_tmpdir = two_node_cluster
    env = dict(os.environ, RAY_ADDRESS=address, RAY_AUTH_MODE="token", RAY_TMPDIR=ray_tmpdir, PYTHONUNBUFFERED="1")
    command = [sys.executable, str(REPO / "pipeline" / "sweep.py"), "--config", str(REPO / "configs" / "synthetic_tiny.yaml"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-path", str(tmp_path / "ray"),
               "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.spec=synthetic:300",
               "--set", "train.epochs=2", "--set", "tracking.experiment=two-nodes",
               "--set", "sweep.grid={model.stages: [1, 2]}"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "2 trial(s) at a time, 1 worker(s) per trial, 1 CPU per worker" in output

    # The second node read the cache from its own disk: a copy, byte for byte the head's file.
    copies = sorted(node_cache.glob("*.h5"))
    assert copies, f"the second node made no copy of the cache; output:\n{output[-2000:]}"
    for copy in copies:
        original = tmp_path / "cache" / copy.name
        assert original.is_file() and copy.stat().st_size == original.stat().st_size
    assert not list(node_cache.glob(".*copying*")), "a partial copy was left behind"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("two-nodes")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`cpm.run_kind` = 'trial'")
    assert sorted(r.info.run_name for r in runs) == ["T=1 rf=45px is=on seed=0", "T=2 rf=109px is=on seed=0"]
    assert all(r.info.status == "FINISHED" for r in runs)
