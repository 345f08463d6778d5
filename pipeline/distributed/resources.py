"""How many workers a trial gets, on what, and how many trials run at once, from the cluster.

Planned from what the cluster can have, not only what it has: an autoscaling cluster starts with
its head alone, and its GPU nodes come when trials ask for them. The input is the plain dict of
`pipeline.distributed.cluster_capacity.cluster_capacity()`: the alive nodes' resources and the node types the
autoscaler may launch (resources per node, how many more).

A trial's driver (the Tune function that fits a TorchTrainer) reserves no CPU, only a token of
memory, so on a 2-core machine two one-worker trials run side by side instead of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A trial's driver (and the Train controller, which Ray places beside it) lives on the head node:
# a worker node that is lost or preempted then takes only workers with it, which Train restarts
# from the last checkpoint, instead of the whole trial.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 1024 * 1024, "node:__internal_head__": 0.001}


class ResourceError(ValueError):
    """The sweep asks for more than the cluster can ever provide."""


@dataclass(frozen=True)
class ResourcePlan:
    workers_per_trial: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    max_concurrent_trials: int
    reason: str = ""

    def describe(self) -> str:
        device = f"{self.gpus_per_worker:g} GPU + {self.cpus_per_worker:g} CPU" if self.use_gpu \
            else f"{self.cpus_per_worker:g} CPU"
        return (f"{self.max_concurrent_trials} trial(s) at a time, {self.workers_per_trial} worker(s) per trial, "
                f"{device} per worker" + (f" ({self.reason})" if self.reason else ""))


def now_total(capacity: dict, key: str) -> float:
    return sum(float(node.get(key, 0.0)) for node in capacity.get("nodes", []))


def launchable(capacity: dict) -> list[tuple[str, dict, float]]:
    """(node type, resources per node, how many more the autoscaler may launch; inf: no limit)."""
    out = []
    for node_type in capacity.get("node_types", []):
        limit = node_type.get("max_workers")
        more = math.inf if limit is None else max(0, limit - node_type.get("alive", 0))
        if more and node_type.get("resources"):
            out.append((node_type["name"], node_type["resources"], more))
    return out


def can_have_total(capacity: dict, key: str) -> float:
    """The most of `key` the cluster can have at once: the alive nodes plus the node types'
    launchable nodes, richest first, within the cluster's cap on worker nodes."""
    cap = capacity.get("max_workers")
    room = math.inf if cap is None else max(0, cap - sum(t.get("alive", 0) for t in capacity.get("node_types", [])))
    total = now_total(capacity, key)
    for _, resources, more in sorted(launchable(capacity), key=lambda t: -float(t[1].get(key, 0.0))):
        per_node = float(resources.get(key, 0.0))
        count = min(more, room)
        if per_node <= 0 or count <= 0:
            continue
        total += per_node * count
        room -= count
    return total


def summary(capacity: dict, key: str) -> str:
    """'GPUs: none now; node type gpu_worker can add up to 8 x 1 GPU'."""
    now = now_total(capacity, key)
    parts = [f"{key}s: {f'{now:g}' if now else 'none'} now"]
    for name, resources, more in launchable(capacity):
        per_node = float(resources.get(key, 0.0))
        if per_node > 0:
            count = "any number" if more == math.inf else f"up to {more:g} x"
            parts.append(f"node type {name} can add {count} {per_node:g} {key}")
    if len(parts) == 1:
        parts.append(f"no node type adds {key}s")
    return "; ".join(parts)


def _cpus_per_gpu_worker(capacity: dict) -> float:
    """CPUs each GPU worker gets: a GPU node's CPUs shared among its GPUs, on the leanest GPU node
    (alive or launchable), so that a worker fits on any of them."""
    shapes = [node for node in capacity.get("nodes", []) if float(node.get("GPU", 0.0)) >= 1]
    shapes += [resources for _, resources, _ in launchable(capacity) if float(resources.get("GPU", 0.0)) >= 1]
    return max(1.0, min(float(int(float(s.get("CPU", 0.0)) // float(s["GPU"]))) for s in shapes))


def plan_resources(capacity: dict, workers_per_trial: int, use_gpu: bool | None,
                   max_concurrent_trials: int | None, num_trials: int) -> ResourcePlan:
    """GPUs are used when the cluster has or can have any (unless use_gpu says otherwise): one GPU
    per worker and a GPU node's CPUs shared among its GPUs. On CPU, one CPU per worker.
    Concurrency is what the cluster can hold at most, capped by the number of trials and by
    `max_concurrent_trials` when given. Raises ResourceError when a trial can never be placed."""
    max_gpus = can_have_total(capacity, "GPU")
    gpu = max_gpus >= 1 if use_gpu is None else use_gpu
    if gpu:
        reason = summary(capacity, "GPU")
        if max_gpus < 1:
            raise ResourceError(f"sweep.use_gpu=true, but the cluster has no GPU and can get none ({reason}); "
                                f"set sweep.use_gpu=false or add a GPU node type")
        if max_gpus < workers_per_trial:
            raise ResourceError(f"sweep.workers_per_trial={workers_per_trial} needs {workers_per_trial} GPUs at once "
                                f"(one per worker), but the cluster can have at most {max_gpus:g} ({reason})")
        fits, cpus_per_worker, gpus_per_worker = max_gpus / workers_per_trial, _cpus_per_gpu_worker(capacity), 1.0
    else:
        max_cpus = can_have_total(capacity, "CPU")
        reason = "sweep.use_gpu=false" if use_gpu is False else summary(capacity, "GPU")
        if any(float(resources.get("CPU", 0.0)) > 0 for _, resources, _ in launchable(capacity)):
            reason += "; " + summary(capacity, "CPU")
        if max_cpus < workers_per_trial:
            raise ResourceError(f"sweep.workers_per_trial={workers_per_trial} needs {workers_per_trial} CPUs at once "
                                f"(one per worker), but the cluster can have at most {max_cpus:g} "
                                f"({summary(capacity, 'CPU')})")
        fits, cpus_per_worker, gpus_per_worker = max_cpus / workers_per_trial, 1.0, 0.0
    concurrent = max(1, int(min(fits, num_trials)))
    if max_concurrent_trials is not None:
        concurrent = max(1, min(concurrent, max_concurrent_trials))
    return ResourcePlan(workers_per_trial, gpu, cpus_per_worker, gpus_per_worker, concurrent, reason)
