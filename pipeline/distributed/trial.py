"""One trial: a Tune function trainable that fits a Ray Train `TorchTrainer` (Train V2 pattern).

Its workers run `pipeline.distributed.worker.worker_loop`, the project's plain training loop behind
a Ray Train `WorkerContext`. Checkpoints go to the run's storage path every epoch; a restarted worker
group (FailureConfig) or a restored sweep resumes from the last one, because the Train run's name
and storage path are derived from the trial's identity and stay the same.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.distributed.resources import ResourcePlan
from pipeline.distributed.space import TrialSpec, trial_of
from pipeline.distributed.worker import DIVERGED_FILE, worker_loop
from pipeline.train import metric_names as names
from pipeline.train.scoring import protocol_for

# Ray Train's controller takes a worker's report when it polls the workers (every 2 s by default),
# and the worker's next report waits until then: epochs shorter than that wait for it.
TRAIN_POLL_INTERVAL_S = "0.5"


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
    # Each trial runs in a process of its own (reuse_actors is off), so its start is the trial's.
    started = _process_start_time()
    startup_moments = {"trial": time.time(), **({"trial_process": started} if started else {})}
    spec = trial_of(specs, trial_config)
    resources = {"CPU": plan.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = plan.gpus_per_worker
    run_name = f"{sweep_id}-{spec.key}"
    # Polls are cheap (bench/RESULTS.md, report cadence); Train copies the variable to its
    # controller, and a value the cluster sets wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)
    if plan.workers_per_trial == 1:
        # Ray Train's preemption watcher drains a worker group gracefully before its node goes away;
        # a one-worker trial restarts from its checkpoint either way (FailureConfig), and each watcher
        # logs a core_worker error line the user cannot act on. Train copies this variable to its
        # controller; a value the cluster sets wins.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
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
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=protocol_for(spec.config).name,
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
    _wait_until_train_reports_are_taken()
    tune.report({names.ARTIFACTS_DIR: artifacts_dir, names.BEST_CHECKPOINT_DIR: best.path if best else ""})


def _wait_until_train_reports_are_taken(settle_s: float = 1.0, poll_s: float = 0.1) -> None:
    """Wait until Tune has taken every report Ray Train passed on (TuneReportCallback puts them
    into a one-slot queue actor that this actor's main thread drains when Tune asks for a result).

    Without the wait a trial could hang for good: this thread's own `tune.report` fills the
    one-slot result queue while the last Train report still waits in the queue actor; the main
    thread then takes that report and blocks putting it into the full result queue, which only it
    drains. The symptom (seen under load): every epoch logged, the last report (the test split's
    metrics) never reaching Tune, the trial RUNNING forever."""
    from ray.train._internal.session import get_session

    session = get_session()
    pending = getattr(session, "_inter_actor_queue", None) if session else None
    if pending is None:
        return
    try:
        quiet_since = None
        while True:
            if pending.empty() and session.result_queue.empty():
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= settle_s:  # the main thread has put what it took
                    return
            else:
                quiet_since = None
            time.sleep(poll_s)
    except Exception:  # the queue actor is gone: nothing is left to hand over
        return
