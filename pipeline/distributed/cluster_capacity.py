"""What the connected Ray cluster has now and what its autoscaler may add, as plain dicts.

    {"nodes": [{"CPU": 2.0, ...}, ...],                 # resources of every alive node
     "node_types": [{"name": "gpu_worker", "resources": {"CPU": 8, "GPU": 1}, "max_workers": 8, "alive": 0}],
     "max_workers": 8,                                  # the cluster's cap on worker nodes, or None
                                                        # (a node type's max_workers None: no limit)
     "source": "autoscaling config /home/ubuntu/ray_bootstrap_config.yaml"}   # or "GCS", or None

Ray has no public call for the node types an autoscaler may launch. Two places hold them:
- the cluster config an autoscaler reports to GCS (`ray._private.state.state.get_cluster_config()`,
  what Ray Train itself checks before waiting for workers); Ray 2.60's own autoscaler does not
  report it, KubeRay's does;
- the config file the head's autoscaler (`monitor.py --autoscaling-config=FILE`) was started with:
  `ray up` writes ~/ray_bootstrap_config.yaml on the head with each node type's resources filled
  in from its instance type. The sweep's driver runs on the head under `ray job submit`, so it
  finds that process (for this cluster's GCS address) and reads the file.
A driver that finds neither plans from the nodes alive now.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray


def cluster_capacity() -> dict:
    """The connected cluster's capacity (ray.init() must have run)."""
    alive_nodes = [n for n in ray.nodes() if n["Alive"]]
    nodes = [dict(n["Resources"]) for n in alive_nodes]
    config, source = _reported_cluster_config()
    if config is None:
        config, source = _autoscaling_config_file()
    if config is None:
        return {"nodes": nodes, "node_types": [], "max_workers": None, "source": None}
    alive = _alive_nodes_per_type() or _alive_nodes_per_group_label(alive_nodes)
    for node_type in config["node_types"]:
        node_type["alive"] = alive.get(node_type["name"], 0)
    return {"nodes": nodes, **config, "source": source}


def _reported_cluster_config() -> tuple[dict | None, str | None]:
    try:
        import ray._private.state

        reported = ray._private.state.state.get_cluster_config()
    except Exception:  # an older or newer Ray without it: fall back to the config file
        return None, None
    if reported is None or not reported.node_group_configs:
        return None, None
    node_types = [{"name": group.name, "resources": {k: float(v) for k, v in group.resources.items()},
                   # -1: no limit (None)
                   "max_workers": group.max_count if group.max_count >= 0 else None}
                  for group in reported.node_group_configs]
    return {"node_types": node_types, "max_workers": None}, "GCS"


def _autoscaling_config_file() -> tuple[dict | None, str | None]:
    path = _autoscaler_config_path(ray.get_runtime_context().gcs_address)
    if path is None:
        return None, None
    try:
        import yaml

        config = yaml.safe_load(path.read_text())  # JSON is YAML too
    except (OSError, ValueError, yaml.YAMLError):
        return None, None
    return parse_autoscaling_config(config), f"autoscaling config {path}"


def parse_autoscaling_config(config: dict) -> dict:
    """The worker node types of a cluster launcher config (`available_node_types`), head left out."""
    head = config.get("head_node_type")
    node_types = [{"name": name, "resources": {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                   "max_workers": int(spec.get("max_workers", config.get("max_workers", 0)))}
                  for name, spec in (config.get("available_node_types") or {}).items() if name != head]
    cap = config.get("max_workers")
    return {"node_types": node_types, "max_workers": int(cap) if cap is not None else None}


def _autoscaler_config_path(gcs_address: str) -> Path | None:
    """The --autoscaling-config of the autoscaler serving `gcs_address`, when it runs on this machine
    (matched by the GCS port: two clusters on one machine cannot share it, whatever address each names)."""
    import psutil

    port = gcs_address.rsplit(":", 1)[-1]
    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        if not any(a.endswith(("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")) for a in args[:3]):
            continue
        options = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        if options.get("gcs-address", "").rsplit(":", 1)[-1] == port and options.get("autoscaling-config"):
            return Path(options["autoscaling-config"]).expanduser()
    return None


def _alive_nodes_per_type() -> dict[str, int]:
    """Nodes of each type already running, from the status the autoscaler publishes for `ray status`."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return {}
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not status:
        return {}
    try:
        report = json.loads(status).get("autoscaler_report") or {}
    except ValueError:
        return {}
    return {name: int(count) for name, count in (report.get("active_nodes") or {}).items()}


def _alive_nodes_per_group_label(alive_nodes: list[dict]) -> dict[str, int]:
    """The same from the node-group label KubeRay puts on its nodes (its autoscaler publishes no status)."""
    counts: dict[str, int] = {}
    for node in alive_nodes:
        group = (node.get("Labels") or {}).get("ray.io/node-group")
        if group:
            counts[group] = counts.get(group, 0) + 1
    return counts
