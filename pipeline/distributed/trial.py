"""One trial: a Tune function trainable that fits a Ray Train `TorchTrainer` (Train V2 pattern).

The worker loop is the project's plain training loop (`pipeline.train.loop.train_worker`) behind a
Ray Train `WorkerContext`. Checkpoints go to the run's storage path every epoch; a restarted worker
group (FailureConfig) or a restored sweep resumes from the last one, because the Train run's name
and storage path are derived from the trial's identity and stay the same.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from cpm_model.config import from_dict
from pipeline.distributed.resources import ResourcePlan
from pipeline.distributed.space import TrialSpec, trial_of
from pipeline.train import metric_names as names

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
        # the chief leaves the message for run_trial, which fails the trial with it.
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
    """Best weights (a checkpoint `pipeline.evaluate` reads), the config, the learning curve and
    the belief maps per stage, for the driver to log to MLflow."""
    from pipeline.figures import belief_maps_figure, learning_curve_figure
    from pipeline.train.checkpoint import BEST_MODEL_FILE, build_checkpoint, save_checkpoint
    from pipeline.train.inference import confusion_example

    directory.mkdir(parents=True, exist_ok=True)
    model = result["model"]
    save_checkpoint(build_checkpoint(model, config, epoch=result["best_epoch"] or 0, metrics=result["history"],
                                     best_epoch=result["best_epoch"], joint_names=result["joint_names"]),
                    directory / BEST_MODEL_FILE)
    (directory / "config.yaml").write_text(config.to_yaml())
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


def _process_start_time() -> float | None:
    """When this process started (wall clock; for a trial's actor, about when Tune launched it),
    from Linux's /proc; None elsewhere."""
    try:
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        # Field 22 of /proc/self/stat, after the command name in parentheses: start time in ticks.
        ticks = float(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def run_trial(trial_config: dict, specs: dict[str, TrialSpec], plan: ResourcePlan, sweep_id: str,
              storage_path: str, cache_paths: dict[str, dict[str, str]], cache_node_id: str, max_failures: int,
              driver_versions: dict[str, str]) -> None:
    """The Tune trainable. `trial_config` = {"trial": {...grid point...}, "search": {...sampled...}};
    `specs` = the sweep's trials by key, as the driver expanded them."""
    startup_moments = {"trial_process": _process_start_time(), "trial": time.time()}
    startup_moments = {k: v for k, v in startup_moments.items() if v is not None}
    spec = trial_of(specs, trial_config)
    resources = {"CPU": plan.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = plan.gpus_per_worker
    run_name = f"{sweep_id}-{spec.key}"
    artifacts_dir = os.path.join(os.path.expanduser(storage_path), run_name, "artifacts")
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": spec.config.to_dict(), "cpus_per_worker": plan.cpus_per_worker,
                           # None when a searched value changes preprocessing: the workers build it.
                           "cache_paths": cache_paths.get(spec.key), "cache_node_id": cache_node_id,
                           "artifacts_dir": artifacts_dir, "driver_versions": driver_versions,
                           "startup_moments": startup_moments},
        scaling_config=ray.train.ScalingConfig(num_workers=plan.workers_per_trial, use_gpu=plan.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=names.PCK,
                                                         checkpoint_score_order="max"),
            callbacks=[TuneReportCallback()],
            # Tune's progress table shows the metrics; Train's per-report INFO lines repeat them all.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    diverged = Path(artifacts_dir) / DIVERGED_FILE
    diverged.unlink(missing_ok=True)  # from an earlier attempt (--retry-failed)
    result = trainer.fit()
    if diverged.is_file():
        from pipeline.train.loop import TrainingDivergedError
        raise TrainingDivergedError(diverged.read_text())
    # Tell the driver where the artifacts and the best checkpoint are (it logs them to MLflow).
    best_epoch = result.metrics.get(names.BEST_EPOCH) if result.metrics else None
    best = next((cp for cp, row in result.best_checkpoints if row.get(names.EPOCH) == best_epoch), None)
    tune.report({names.ARTIFACTS_DIR: artifacts_dir, names.BEST_CHECKPOINT_DIR: best.path if best else ""})
