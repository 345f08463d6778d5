"""The training loop's `WorkerContext` inside a Ray Train worker.

Reports go through `ray.train.report` (metrics to the trial's driver, the checkpoint directory to
the run's storage path); resume comes from `ray.train.get_checkpoint()`, which Ray Train fills in
when a restarted worker group or a restored run picks up where it stopped.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.train import metric_names as names
from pipeline.train.context import WorkerContext

# A trial's start-up, moment by moment (wall-clock times; the first two come from the trial's
# driver, on the same node as Tune): the trial's process started -> its trainable ran ->
# this worker's loop function ran -> its context was ready -> caches open -> model ready -> first step.
# The context sees the last three through the loop's own calls, so the loop carries no timing:
# the loop asks for its checkpoints once the caches are open and the model is built (building
# takes milliseconds), wraps the model once it is restored, and reports progress from its first step.
STARTUP_MOMENTS = ("trial_process", "trial", "worker_loop", "context", "caches_open", "model_ready", "first_step")


def startup_metrics(moments: dict[str, float]) -> dict[str, float]:
    """startup_s (the trial's start to its first training step) and startup_{moment}_s (the time up
    to each moment from the one before), from the moments that were recorded."""
    seen = [(name, moments[name]) for name in STARTUP_MOMENTS if name in moments]
    out = {f"startup_{name}_s": round(t - t_before, 3) for (_, t_before), (name, t) in zip(seen, seen[1:])}
    if len(seen) > 1:
        out["startup_s"] = round(seen[-1][1] - seen[0][1], 3)
    return out


class _FirstStep:
    """Marks the first training step of the run, then passes every step on."""

    def __init__(self, ctx: "RayTrainContext", inner):
        self.ctx, self.inner = ctx, inner

    def step(self, images: int) -> None:
        if "first_step" not in self.ctx.moments:
            self.ctx.mark("first_step")
        self.inner.step(images)

    def close(self) -> None:
        self.inner.close()


class RayTrainContext(WorkerContext):
    def __init__(self, cpus_per_worker: float = 1.0, moments: dict[str, float] | None = None):
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        # Ray sets OMP_NUM_THREADS from the worker's CPUs; make torch agree so workers do not oversubscribe.
        torch.set_num_threads(max(1, int(round(cpus_per_worker))))
        self._restored = ray.train.get_checkpoint()
        self.moments = dict(moments or {})  # start-up moments so far (STARTUP_MOMENTS)
        self.mark("context")
        self._startup_reported = False

    def mark(self, moment: str) -> None:
        """Record a start-up moment the first time it happens."""
        self.moments.setdefault(moment, time.time())

    def epoch_progress(self, epoch: int, epochs: int, steps: int, batch_size: int):
        inner = super().epoch_progress(epoch, epochs, steps, batch_size)
        return inner if "first_step" in self.moments else _FirstStep(self, inner)

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if self.world_size == 1:
            return values.copy()
        # gloo reduces on the CPU; NCCL needs the tensor on the worker's GPU.
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.from_numpy(values.copy()).to(device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.mark("model_ready")
        if self.world_size == 1:
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        if not self._startup_reported and names.is_epoch_row(metrics):  # the first epoch of this start
            metrics = {**metrics, **startup_metrics(self.moments)}
            self._startup_reported = True
        ray.train.report(_scalars(metrics), checkpoint=checkpoint)

    def report_restored(self, rows: list[dict]) -> None:
        """Sent again (every rank, no checkpoint): a sweep driver stopped between Ray Train's
        checkpoint of an epoch and that epoch's row never logged the row; its tracking callback
        logs the ones its run lacks and skips the others."""
        for row in rows:
            ray.train.report({**_scalars(row), names.RESENT: 1})

    def restore_checkpoint_dir(self) -> str | None:
        if self._restored is None:
            return None
        # Local or shared storage: read in place; cloud storage: download to a local directory.
        if os.path.isdir(self._restored.path):
            return self._restored.path
        return self._restored.to_directory()

    def restore_checkpoint_dirs(self) -> list[str]:
        """Ray hands only the latest checkpoint; on local or shared storage the run's other kept
        ones (CheckpointConfig num_to_keep) lie beside it and are the fallbacks, newest first."""
        self.mark("caches_open")
        latest = self.restore_checkpoint_dir()
        if latest is None:
            return []
        if latest != self._restored.path:  # downloaded from cloud storage: no siblings to fall back to
            return [latest]
        return [latest, *older_sibling_checkpoints(latest)]


def older_sibling_checkpoints(latest: str) -> list[str]:
    """The other `checkpoint_*` directories next to `latest` that hold a checkpoint file, newest
    first (by the file's modification time: Ray writes them once, in report order)."""
    from pipeline.train.checkpoint import CHECKPOINT_FILE

    parent = os.path.dirname(os.path.abspath(latest))
    found = []
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        file = os.path.join(path, CHECKPOINT_FILE)
        if name.startswith("checkpoint_") and os.path.isfile(file) and not os.path.samefile(path, latest):
            found.append((os.path.getmtime(file), path))
    return [path for _, path in sorted(found, reverse=True)]


def _scalars(metrics: dict) -> dict:
    """Ray's result rows take plain scalars; lists and arrays are left to the checkpoint."""
    clean = {}
    for key, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (bool, int, float, str)) or value is None:
            clean[key] = value
    return clean
