"""What runs in every Ray Train worker of a trial: the project's plain training loop
(`pipeline.train.loop.train_worker`) behind a Ray Train `WorkerContext`, then the trial's artifacts.

A module of its own so that a worker process imports only what it runs (Ray Train, torch, the
loop), not Tune: Ray Train pickles `worker_loop` by reference and each new worker imports this.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from cpm_model.config import from_dict

DIVERGED_FILE = "diverged.txt"  # in a trial's artifacts directory: why its loss stopped being finite


def worker_loop(loop_config: dict) -> None:
    """Runs in every Ray Train worker."""
    moments = {**loop_config["startup_moments"], "worker_loop": time.time()}
    from pipeline.distributed import cache_sync
    from pipeline.distributed.node_versions import check_worker_versions
    from pipeline.distributed.ray_context import RayTrainContext
    from pipeline.train.loop import TrainingDivergedError, train_worker

    _quiet_train_reports()
    # A node that joined after the sweep's start was not checked there.
    check_worker_versions(ray.util.get_node_ip_address() + f" ({ray.get_runtime_context().get_node_id()[:8]})",
                          loop_config["driver_versions"])
    ctx = RayTrainContext(cpus_per_worker=loop_config["cpus_per_worker"], moments=moments)
    config = from_dict(loop_config["config"])
    cache_paths = None
    if loop_config["cache_paths"]:
        cache_paths = {split: cache_sync.ensure_on_node(path, loop_config["cache_node_id"])
                       for split, path in loop_config["cache_paths"].items()}
    try:
        result = train_worker(config, ctx, progress=False, cache_paths=cache_paths)
    except TrainingDivergedError as exc:
        # Raised, it would make Ray Train restart the worker group (sweep.max_failures), which
        # would diverge again. Every rank got it (from the all-reduced loss): all end normally and
        # the chief leaves the message for run_trial, which fails the trial with it. A file, not a
        # last reported row: Ray Train's Result carries only the metrics of the last checkpoint.
        if ctx.is_chief:
            directory = Path(loop_config["artifacts_dir"])
            directory.mkdir(parents=True, exist_ok=True)
            (directory / DIVERGED_FILE).write_text(str(exc))
        return
    if ctx.is_chief:  # the run's storage is shared by every node, so the chief writes there directly
        _write_artifacts(Path(loop_config["artifacts_dir"]), result, config)


def _quiet_train_reports() -> None:
    """Ray Train logs every report's whole metrics dict at INFO (from loggers named by file path,
    which LoggingConfig does not reach); Tune's progress table already shows the metrics."""
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    for module in (context, storage):
        for name in (module.__file__, module.__name__):
            logging.getLogger(name).setLevel(logging.WARNING)


def _write_artifacts(directory: Path, result: dict, config) -> None:
    """Best weights (a checkpoint `pipeline.evaluate` reads), the config, the gradients sampled
    every epoch (gradients.json), the learning curve and the belief maps per stage, for the driver
    to log to MLflow."""
    from pipeline.figures import belief_maps_figure, learning_curve_figure
    from pipeline.train.checkpoint import BEST_MODEL_FILE, build_checkpoint, save_checkpoint
    from pipeline.train.gradients import write_gradients_file
    from pipeline.train.inference import confusion_example

    directory.mkdir(parents=True, exist_ok=True)
    model = result["model"]
    save_checkpoint(build_checkpoint(model, config, epoch=result["best_epoch"] or 0, metrics=result["history"],
                                     best_epoch=result["best_epoch"], joint_names=result["joint_names"],
                                     flip_pairs=result["val_cache"].flip_pairs),
                    directory / BEST_MODEL_FILE)
    (directory / "config.yaml").write_text(config.to_yaml())
    write_gradients_file(model, result["gradients"], directory)
    try:  # a picture must never fail a finished run
        learning_curve_figure(result["history"], directory / "learning_curve.png")
        example = confusion_example(model, result["val_cache"])
        if len(example["rows"]):
            pick = example["pick"]
            belief_maps_figure(example["images"][pick], example["belief_maps"][pick], result["joint_names"],
                               directory / "belief_maps_per_stage.png",
                               title=f"crop {int(example['rows'][pick])}: belief maps per stage")
    except Exception as exc:
        (directory / "figures_not_drawn.txt").write_text(f"{type(exc).__name__}: {exc}\n")
