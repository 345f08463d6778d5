"""Two Ray nodes on one machine, both with token authentication on: a head and a second node with
its own resources and its own local cache directory (as a node without shared storage has). A
sweep's trials run on both; the second node copies the cache once; all runs land in one MLflow
experiment. A lost worker node costs its trial only the epoch in progress. A node whose installed
releases differ from the driver's stops the sweep before any trial. Every process gets a token made for this test (RAY_AUTH_TOKEN), so nothing depends on what
~/.ray holds."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from services import option_of, start_ray

# Under `pytest -n 2` the tests that start clusters with `ray start` run one at a time, on one
# worker: a head takes some fixed default ports (the Ray client server's 10001) that a second one
# started at the same moment would find taken.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("ray-start")]

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


def start_nodes(env: dict, second_node_env: dict, dashboard_port: int | None = None,
                second_node_manager_port: int | None = None) -> str:
    def head() -> tuple[list[str], dict]:
        # Each node's dashboard agent on its own port: two nodes of one machine would race for the
        # default one, and the job server needs the head's.
        command = ["ray", "start", "--head", f"--port={free_port()}", "--num-cpus=1", "--disable-usage-stats",
                   f"--dashboard-agent-listen-port={free_port()}"]
        command += ([f"--dashboard-port={dashboard_port}", "--include-dashboard=true"] if dashboard_port
                    else ["--include-dashboard=false"])
        return command, env

    address = f"127.0.0.1:{option_of(start_ray(head)[0], '--port')}"

    def second() -> tuple[list[str], dict]:
        command = ["ray", "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats",
                   f"--dashboard-agent-listen-port={free_port()}"]
        if second_node_manager_port:
            command.append(f"--node-manager-port={second_node_manager_port}")
        return command, second_node_env

    start_ray(second)
    return address


def sweep_command(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / "sweep.py"), "--config", "synthetic_tiny",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-path", str(tmp_path / "ray"),
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.spec=synthetic:300",
            "--set", "train.epochs=2", "--set", "tracking.experiment=two-nodes", *extra]


@pytest.fixture
def two_node_cluster(tmp_path, ray_tmpdir):
    env = token_env(ray_tmpdir, secrets.token_hex(32))
    node_cache = tmp_path / "node2-cache"
    address = start_nodes(env, dict(env, CPM_LOCAL_CACHE_DIR=str(node_cache)))
    yield address, node_cache, env


# Under CI's load: both trials' first epoch took more than 300 s once, and after the kill the
# restarted worker waits for the head's one CPU, then trains its remaining epochs.
@pytest.mark.timeout(1200)
def test_a_lost_worker_node_costs_its_trial_only_the_epoch_in_progress(tmp_path, ray_tmpdir):
    """Two trials, one worker each: one on the head, one on the second node. The second node's
    raylet is killed once both trials have checkpointed an epoch. The trials' drivers live on the
    head, so that trial survives: Ray Train restarts its worker on the head (when the other trial
    frees the CPU) from its last checkpoint, and it finishes in the same MLflow run with every
    epoch reported once (a restart from scratch would report epochs 1, 2, ... again)."""
    from test_sweep_integration import SWEEP_WAIT_S, _result_rows, _wait_for, parent_pid, processes_named

    epochs = 8
    env = token_env(ray_tmpdir, secrets.token_hex(32))
    node_manager_port = free_port()
    address = start_nodes(env, dict(env, CPM_LOCAL_CACHE_DIR=str(tmp_path / "node2-cache")),
                          second_node_manager_port=node_manager_port)
    command = sweep_command(tmp_path, "--set", "sweep.grid={model.stages: [1, 2]}", "--set", f"train.epochs={epochs}")
    proc = subprocess.Popen(command, cwd=tmp_path, env=dict(env, RAY_ADDRESS=address), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    storage = tmp_path / "ray"

    def second_raylet() -> int | None:
        found = [pid for pid in processes_named(f"--node_manager_port={node_manager_port}")
                 if "raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()]
        return found[0] if found else None

    def both_trials_past_epoch_1() -> bool:
        trials = {path.parent.name for path in storage.glob("*/trial_*/result.json")
                  if any('"epoch": 1' in line and "train_loss" in line for line in path.read_text().splitlines())}
        return len(trials) == 2

    started = time.monotonic()
    try:
        raylet = _wait_for(second_raylet, 60, "the second node's raylet")
        _wait_for(both_trials_past_epoch_1, SWEEP_WAIT_S, "epoch 1 of both trials", proc)  # 82 s idle
        print(f"both trials past epoch 1 after {time.monotonic() - started:.0f} s")
        on_second_node = [pid for pid in processes_named("RayTrainWorker") if parent_pid(pid) == raylet]
        assert on_second_node, "no training worker runs on the second node"
        os.kill(raylet, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]

    for result_file in storage.glob("*/trial_*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        # Rows a restored worker sends again (its checkpoint's epochs) carry `resent`; the others
        # are each epoch once: the worker resumed from its checkpoint, not from scratch.
        reported = [row["epoch"] for row in rows if "train_loss" in row and not row.get("resent")]
        assert reported == list(range(1, epochs + 1)), f"{result_file.parent.name} reported epochs {reported}"
        resent = [row["epoch"] for row in rows if row.get("resent")]
        assert resent == sorted(resent) and all(epoch < epochs for epoch in resent)
    assert len(_result_rows(storage)) >= 2 * epochs
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("two-nodes")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`cpm.run_kind` = 'trial'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "pck")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), run.info.run_name


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
    """docs/cluster.md's `ray job submit --address http://127.0.0.1:8265` (through the SSH tunnel on a
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
