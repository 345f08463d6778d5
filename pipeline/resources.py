"""How many workers a trial gets, on what, and how many trials run at once, from the cluster.

A trial's driver (the Tune function that fits a TorchTrainer) reserves no CPU, only a token of
memory, so on a 2-core machine two one-worker trials run side by side instead of one.
"""

from __future__ import annotations

from dataclasses import dataclass

TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 1024 * 1024}


@dataclass(frozen=True)
class ResourcePlan:
    workers_per_trial: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    max_concurrent_trials: int

    def describe(self) -> str:
        device = f"{self.gpus_per_worker:g} GPU + {self.cpus_per_worker:g} CPU" if self.use_gpu \
            else f"{self.cpus_per_worker:g} CPU"
        return (f"{self.max_concurrent_trials} trial(s) at a time, {self.workers_per_trial} worker(s) per trial, "
                f"{device} per worker")


def plan_resources(cluster: dict[str, float], workers_per_trial: int, use_gpu: bool | None,
                   max_concurrent_trials: int | None, num_trials: int) -> ResourcePlan:
    """Derive the plan from `ray.cluster_resources()`-style totals ({'CPU': 2.0, 'GPU': 0.0, ...}).

    GPUs are used when the cluster has any (unless use_gpu says otherwise): one GPU per worker and
    the CPUs shared evenly among the GPU workers. On CPU, one CPU per worker. Concurrency is what
    fits at once, capped by the number of trials and by `max_concurrent_trials` when given.
    """
    cpus = float(cluster.get("CPU", 0.0))
    gpus = float(cluster.get("GPU", 0.0))
    gpu = gpus >= 1 if use_gpu is None else use_gpu
    if gpu and gpus < workers_per_trial:
        # An autoscaling cluster starts without its GPU nodes: plan for what the config asks.
        fits = max_concurrent_trials or 1
        return ResourcePlan(workers_per_trial, True, 1.0, 1.0, max(1, min(fits, num_trials)))
    if cpus < workers_per_trial:
        raise ValueError(f"the cluster has {cpus:g} CPU(s), fewer than sweep.workers_per_trial={workers_per_trial}")
    if gpu:
        fits = int(gpus // workers_per_trial)
        cpus_per_worker = max(1.0, float(int(cpus // (fits * workers_per_trial))))
        # Never ask for more CPUs than a concurrent set of workers can share.
        cpus_per_worker = min(cpus_per_worker, max(1.0, cpus / workers_per_trial))
        gpus_per_worker = 1.0
    else:
        fits = int(cpus // workers_per_trial)
        cpus_per_worker, gpus_per_worker = 1.0, 0.0
    concurrent = max(1, min(fits, num_trials))
    if max_concurrent_trials is not None:
        concurrent = max(1, min(concurrent, max_concurrent_trials))
    return ResourcePlan(workers_per_trial, gpu, cpus_per_worker, gpus_per_worker, concurrent)
