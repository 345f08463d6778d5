"""The sweep driver's work: tracking store, caches, parent run, Tune over Train, the final table."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import ray
from mlflow import MlflowClient
from ray import tune

from cpm_model.config import ExperimentConfig

from . import sweep_identity, tracking
from .interrupts import SweepStopped, stop_requested, stop_signals
from .mlflow_callback import MLflowTrialLogger
from .node_versions import VersionMismatchError, check_cluster_versions
from .cluster_capacity import cluster_capacity
from .resources import TRIAL_DRIVER_RESOURCES, ResourceError, plan_resources
from .sweep_space import TrialSpec
from .tracking_writer import SPOOL_FILE, TrackingWriter, bound_http_retries, run_ref
from .trial import run_trial


# How long the driver waits for the tracking store to take queued writes: at the end of a sweep,
# and (shorter: `ray job stop` SIGKILLs 3 s after SIGTERM) when it is stopped.
DRAIN_TIMEOUT_S = 120.0
STOP_DRAIN_TIMEOUT_S = 2.5


class SweepError(RuntimeError):
    """The sweep cannot start (tracking store, resume target, cluster, data)."""


@dataclass
class SweepOutcome:
    sweep_id: str
    parent_run_id: str
    completed: bool
    failed_trials: list[str]
    table: str


def latest_sweep_id(storage_path: Path, name: str) -> str:
    candidates = sorted((p for p in storage_path.glob(f"{name}-*") if tune.Tuner.can_restore(str(p))),
                        key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SweepError(f"--resume: no sweep of preset '{name}' to resume under {storage_path}")
    return candidates[-1].name


def tune_domain(key: str, spec: dict):
    """{'loguniform': [lo, hi]} | {'uniform': [lo, hi]} | {'choice': [...]} -> a Tune domain."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SweepError(f"sweep.search['{key}'] must be one of {{loguniform|uniform: [lo, hi]}} or {{choice: [...]}}")
    kind, args = next(iter(spec.items()))
    if kind in ("loguniform", "uniform") and isinstance(args, list) and len(args) == 2:
        return getattr(tune, kind)(float(args[0]), float(args[1]))
    if kind == "choice" and isinstance(args, list) and args:
        return tune.choice(args)
    raise SweepError(f"sweep.search['{key}']: unknown distribution {spec!r}; use loguniform, uniform or choice")


def build_caches(trials: list[TrialSpec]) -> dict[str, dict[str, str]]:
    """Each distinct (data, preprocessing) cache built once, in the driver, before any trial."""
    from preprocessing.build import build_cache

    built: dict[tuple, dict[str, str]] = {}
    per_trial: dict[str, dict[str, str]] = {}
    for trial in trials:
        c = trial.config
        key = (c.data.spec, repr(c.preprocess), c.data.cache_dir, c.data.max_train_samples, c.data.max_val_samples)
        if key not in built:
            caps = {"train": c.data.max_train_samples, "val": c.data.max_val_samples, "test": c.data.max_val_samples}
            built[key] = {split: str(build_cache(c.data.spec, split, c.preprocess, c.data.cache_dir,
                                                 max_samples=caps[split]))
                          for split in ("train", "val", "test")}
        per_trial[trial.key] = built[key]
    return per_trial


def _checkout_runtime_env() -> dict | None:
    """Workers import the project from its installation; where it is not installed (a plain
    checkout), they get this checkout on PYTHONPATH instead."""
    from importlib import metadata

    try:
        metadata.distribution("cpm-pipeline")
        return None
    except metadata.PackageNotFoundError:
        repo_root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)
        return {"env_vars": {"PYTHONPATH": path}}


def connect_ray() -> None:
    if ray.is_initialized():
        return
    # Under `ray job submit` RAY_ADDRESS points at the cluster; otherwise join a running local
    # cluster (`ray start --head`) if there is one, else start one in this process.
    runtime_env = _checkout_runtime_env()
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), runtime_env=runtime_env)
    except ConnectionError:
        ray.init(runtime_env=runtime_env)


def run_sweep(config: ExperimentConfig, trials: list[TrialSpec], resume: str | None = None,
              sweep_id: str | None = None, retry_failed: bool = False) -> SweepOutcome:
    # Trials report per-epoch rows with `pck` and summary rows (test split, artifacts) without it.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # The MLflow callback is the runs' single writer; a SQLite commit on a busy disk takes 0.5-2 s,
    # which Tune would otherwise report as a slow callback after every epoch.
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "5")
    # SIGINT stops the sweep like SIGTERM (pipeline.interrupts), not through Tune's own handler.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    bound_http_retries()
    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri)
    tracking.hide_run_links_with_secrets(uri)
    storage = Path(config.sweep.storage_path).expanduser().resolve()
    identity = sweep_identity.identity_of(config, uri)
    if resume:
        sweep_id = latest_sweep_id(storage, config.name) if resume == "latest" else resume
        if not tune.Tuner.can_restore(str(storage / sweep_id)):
            raise SweepError(f"--resume: no sweep '{sweep_id}' under {storage}")
        try:
            sweep_identity.check_resume(storage / sweep_id, identity)
        except sweep_identity.IdentityError as exc:
            raise SweepError(str(exc)) from None
    elif sweep_id and (storage / sweep_id).exists():  # Tune would replay its trials and train nothing
        raise SweepError(sweep_identity.already_exists(storage / sweep_id))
    sweep_id = sweep_id or sweep_identity.new_sweep_id(config)
    try:  # after the resume checks, so that a refused resume creates no store
        tracking.check_reachable(uri)  # before any trial starts
    except tracking.TrackingError as exc:
        raise SweepError(str(exc)) from None
    print(f"Tracking: {tracking.redact_uri(uri)}\nSweep id: {sweep_id}  (checkpoints under {storage / sweep_id})",
          flush=True)

    connect_ray()
    try:
        driver_versions = check_cluster_versions()
    except VersionMismatchError as exc:
        raise SweepError(str(exc)) from None
    try:  # from what the cluster has and what its autoscaler may add; before anything is written
        plan = plan_resources(cluster_capacity(), config.sweep.workers_per_trial, config.sweep.use_gpu,
                              config.sweep.max_concurrent_trials, len(trials) * config.sweep.num_samples)
    except ResourceError as exc:
        raise SweepError(str(exc)) from None
    print(f"Resources: {plan.describe()}", flush=True)
    storage.mkdir(parents=True, exist_ok=True)
    cache_paths = build_caches(trials)
    cache_node_id = ray.get_runtime_context().get_node_id()

    # Writes a previous driver could not send (it died during an outage) go first, in order.
    writer = TrackingWriter(uri, storage / sweep_id / SPOOL_FILE).activate(sweep_id)
    writer.drain(DRAIN_TIMEOUT_S)
    client = MlflowClient(uri)
    experiment_name = config.tracking.experiment
    experiment_id = tracking.get_or_create_experiment(client, experiment_name)
    provenance = tracking.provenance_tags()
    parent_identity = {tracking.SWEEP_TAG: sweep_id, tracking.KIND_TAG: "sweep"}
    parent_run_id, created = tracking.get_or_create_run(
        client, experiment_id, parent_identity, run_name=f"sweep {sweep_id}", extra_tags=provenance)
    parent_ref = run_ref(experiment_id, parent_identity)
    writer.register(parent_ref, parent_run_id)
    if not created:  # reopened (--resume): it no longer carries how it ended before
        writer.submit({"kind": "clear_end", "run": parent_ref})
    if created:
        tracking.log_params(client, parent_run_id, {
            "preset": config.name, "num_trials": len(trials), "dataset": config.data.spec,
            "grid": config.sweep.grid, "search": config.sweep.search, "resources": plan.describe(),
            **config.flat_params()})
    print(f"MLflow experiment '{experiment_name}', sweep run {parent_run_id}", flush=True)

    # Workers and every stored copy of the config get it without the tracking URI's secrets.
    logger = MLflowTrialLogger(sweep_id, experiment_id, parent_run_id, config.public_dict(),
                               cache_paths, provenance, repeats_grid_points=config.sweep.num_samples > 1)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_config=config.public_dict(), plan=plan, sweep_id=sweep_id,
                             storage_path=str(storage), cache_paths=cache_paths, cache_node_id=cache_node_id,
                             max_failures=config.sweep.max_failures, driver_versions=driver_versions),
        TRIAL_DRIVER_RESOURCES)
    experiment_path = str(storage / sweep_id)
    if resume:
        # Errored trials (--retry-failed) start again from their last checkpoint, in their MLflow run.
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=retry_failed)
    else:
        try:
            sweep_identity.claim(storage / sweep_id, identity)
        except sweep_identity.IdentityError as exc:
            raise SweepError(str(exc)) from None
        param_space = {"trial": tune.grid_search([t.as_dict() for t in trials])}
        if config.sweep.search:
            param_space["search"] = {k: tune_domain(k, v) for k, v in config.sweep.search.items()}
        scheduler = None
        if config.sweep.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler
            # stop_last_trials=False: a trial that reaches the last epoch still scores its test split.
            scheduler = ASHAScheduler(time_attr="epoch", max_t=config.train.epochs, grace_period=1,
                                      stop_last_trials=False)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric="pck", mode="max", scheduler=scheduler,
                                        num_samples=config.sweep.num_samples,
                                        max_concurrent_trials=plan.max_concurrent_trials,
                                        trial_name_creator=lambda t: t.config["trial"]["run_name"].replace(" ", "_"),
                                        trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=tune.RunConfig(name=sweep_id, storage_path=str(storage), callbacks=[logger],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    # Every exit closes the runs: a stop signal (KILLED, in the handler: `ray job stop` SIGKILLs
    # 3 s after its SIGTERM), an error (FAILED), the end (FINISHED).
    def stop(signum: int) -> None:
        _end_runs(writer, parent_ref, "KILLED", f"sweep stopped by {signal.Signals(signum).name}")

    with stop_signals(stop):
        try:
            results = tuner.fit()
        except BaseException as exc:
            if stop_requested():  # its SweepStopped, or the KeyboardInterrupt Ray made of it
                raise SweepStopped(stop_requested()) from exc
            _end_runs(writer, parent_ref, "FAILED", f"sweep driver failed: {type(exc).__name__}: {exc}")
            raise

    failed = [str(r.error).splitlines()[0][:200] if r.error else "" for r in results if r.error]
    writer.drain(DRAIN_TIMEOUT_S)  # the report reads every trial's run
    # A trial Tune left unfinished (its stop signal, SIGUSR1) keeps no open run either.
    stopped = writer.close_open_runs("KILLED", "the sweep ended before this trial did")
    table = _report_to_parent_run(client, experiment_id, parent_run_id)
    print("\n" + table, flush=True)
    writer.submit({"kind": "tags", "run": parent_ref, "tags": {"cpm.failed_trials": str(len(failed))}})
    writer.submit({"kind": "status", "run": parent_ref, "status": "KILLED" if stopped else "FINISHED"})
    writer.drain(DRAIN_TIMEOUT_S)
    return SweepOutcome(sweep_id, parent_run_id, completed=not failed or len(failed) < len(results),
                        failed_trials=failed, table=table)


def _end_runs(writer: TrackingWriter, parent_ref: dict, status: str, reason: str) -> None:
    """Close every open trial run and the sweep's run with `status`; spooled first, so a kill
    during the send leaves them for `--resume` to send."""
    closed = writer.close_open_runs(status, reason)
    writer.enqueue({"kind": "tags", "run": parent_ref, "tags": {"cpm.status": status.lower(), "cpm.error": reason}})
    writer.enqueue({"kind": "status", "run": parent_ref, "status": status})
    sent = writer.drain(STOP_DRAIN_TIMEOUT_S if status == "KILLED" else DRAIN_TIMEOUT_S)
    writer.log(f"{reason}: the sweep run and {closed} open trial run(s) marked {status}"
               + ("" if sent else " (queued: not sent yet)"))


def _report_to_parent_run(client: MlflowClient, experiment_id: str, parent_run_id: str) -> str:
    """The full report (pipeline.report) as artifacts of the sweep's run; returns the stage / RF
    table to print. A report that cannot be built must not fail a finished sweep."""
    import tempfile

    from .ablation import collect_trial_runs
    from .report import ReportError, build_report, to_markdown

    runs = collect_trial_runs(client, experiment_id, parent_run_id)
    with tempfile.TemporaryDirectory(prefix="cpm-report-") as tmp:
        try:
            report = build_report(runs, Path(tmp))
        except ReportError as exc:
            return f"No ablation report: {exc}"
        except Exception as exc:  # a figure or store hiccup: say so, keep the sweep's result
            return f"No ablation report ({type(exc).__name__}: {exc})"
        client.log_artifacts(parent_run_id, tmp, "report")
        stages, receptive_field = report.tables[:2]
        return to_markdown(stages, []) + "\n" + to_markdown(receptive_field, report.excluded)
