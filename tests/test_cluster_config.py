"""ray_cluster.yaml passes Ray's own cluster-config validation (its JSON schema and checks)."""

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


@pytest.fixture(scope="module")
def cluster_config(repo_root):
    return yaml.safe_load((repo_root / "ray_cluster.yaml").read_text())


def test_cluster_config_is_valid_for_ray(cluster_config):
    prepared = prepare_config(copy.deepcopy(cluster_config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["gpu_worker"]["max_workers"] == 8


def test_mlflow_server_is_bound_to_the_head_only(cluster_config):
    commands = " ".join(cluster_config["head_start_ray_commands"])
    assert "mlflow server --host 127.0.0.1" in commands
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in commands  # no job runner processes
    assert "--dashboard-host=127.0.0.1" in commands


def test_validation_catches_a_bad_value(cluster_config):
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "two"
    with pytest.raises(Exception, match="min_workers"):
        validate_config(prepare_config(broken))


def _start_commands(cluster_config) -> list[str]:
    return cluster_config["head_start_ray_commands"] + cluster_config["worker_start_ray_commands"]


def test_every_node_starts_ray_with_token_auth_and_the_same_token(cluster_config):
    ray_starts = [c for c in _start_commands(cluster_config) if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token" in c.split("ray start")[0] for c in ray_starts)
    # One token for every node, copied from the user's machine: a path in the home, never the repo.
    assert cluster_config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_no_secret_file_is_in_the_repository(repo_root):
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True).stdout.split()
    assert not [path for path in tracked if path.endswith(("auth_token", "mlflow-backend-uri"))]


def test_nodes_install_pinned_versions_from_the_constraints_file(cluster_config, repo_root):
    installs = [c for c in cluster_config["setup_commands"] if "pip install" in c]
    assert installs and all("-c constraints.txt" in c for c in installs)
    pins = dict(line.split("==") for line in (repo_root / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    from importlib import metadata

    for package in ("ray", "torch", "mlflow"):
        assert pins[package] == metadata.version(package).split("+")[0], package


def test_mlflow_runs_live_in_postgresql_outside_the_cluster(cluster_config):
    head = " ".join(cluster_config["head_start_ray_commands"])
    assert "sqlite" not in head
    assert 'MLFLOW_BACKEND_STORE_URI="$(cat ~/.cpm-pipeline/mlflow-backend-uri)"' in head
    assert "--artifacts-destination /shared/" in head
    assert "~/.cpm-pipeline/mlflow-backend-uri" in cluster_config["file_mounts"]
