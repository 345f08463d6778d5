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
    assert "--dashboard-host=127.0.0.1" in commands


def test_validation_catches_a_bad_value(cluster_config):
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "two"
    with pytest.raises(Exception, match="min_workers"):
        validate_config(prepare_config(broken))
