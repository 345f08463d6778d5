"""The sweep driver's work: tracking store, caches, parent run, Tune over Train, the final table."""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import ray
from mlflow import MlflowClient
from ray import tune

from cpm_model.config import Distribution, ExperimentConfig
from pipeline.distributed import identity as sweep_identity
from pipeline.distributed.cluster_capacity import cluster_capacity
from pipeline.distributed.interrupts import SweepStopped, stop_requested, stop_signals, uninterrupted
from pipeline.distributed.node_versions import VersionMismatchError, check_cluster_versions
from pipeline.distributed.progress import SweepProgress
from pipeline.distributed.resources import TRIAL_DRIVER_RESOURCES, ResourceError, plan_resources
from pipeline.distributed.space import TrialSpec
from pipeline.distributed.trial import run_trial
from pipeline.redaction import public_config, redact_uri
from pipeline.tracking import store
from pipeline.tracking.operations import ClearEndTags, SetStatus, SetTags, run_ref
from pipeline.tracking.trial_logger import MLflowTrialLogger
from pipeline.tracking.writer import (
    SPOOL_FILE,
    TrackingWriter,
    bound_http_retries,
    call_while_transient,
    failure_kind,
    short_error,
)
from pipeline.train import metric_names as names
from pipeline.train.caches import build_split_cache, cache_caps
from pipeline.train.schedule import total_epochs
from pipeline.train.scoring import protocol_for

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
    experiment_id: str
    completed: bool
    failed_trials: list[str]
    table: str


def latest_sweep_id(storage_path: Path, name: str) -> str:
    candidates = sorted((p for p in storage_path.glob(f"{name}-*") if tune.Tuner.can_restore(str(p))),
                        key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SweepError(f"--resume: no sweep of preset '{name}' to resume under {storage_path}")
    return candidates[-1].name


def tune_domain(distribution: Distribution):
    """A search distribution (parsed and checked when the config loaded) -> its Tune domain."""
    if distribution.kind == "choice":
        return tune.choice(list(distribution.values))
    return getattr(tune, distribution.kind)(distribution.low, distribution.high)  # tune.loguniform / uniform


def build_caches(trials: list[TrialSpec]) -> dict[str, dict[str, str]]:
    """Each distinct (data, preprocessing, caps) cache built once, in the driver, before any trial
    (a damaged one is rebuilt here, where nothing reads it yet)."""
    from preprocessing.build import SPLITS

    built: dict[tuple, dict[str, str]] = {}
    per_trial: dict[str, dict[str, str]] = {}
    for trial in trials:
        c = trial.config
        caps = cache_caps(c)
        key = (c.data.spec, repr(c.preprocess), c.data.cache_dir, tuple(sorted(caps.items())))
        if key not in built:
            built[key] = {split: str(build_split_cache(c, split, caps[split], progress=True, rebuild_damaged=True))
                          for split in SPLITS}
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
        repo_root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)
        return {"env_vars": {"PYTHONPATH": path}}


def connect_ray() -> None:
    if ray.is_initialized():
        return
    # Under `ray job submit` RAY_ADDRESS points at the cluster; otherwise join a running local
    # cluster (`ray start --head`) if there is one, else start one in this process.
    runtime_env = _checkout_runtime_env()
    address = os.environ.get("RAY_ADDRESS", "auto")
    if address == "local":
        _start_local_ray(runtime_env)
        return
    try:
        ray.init(address=address, runtime_env=runtime_env)
    except ConnectionError:
        if address != "auto":
            raise  # the cluster named is down: say so rather than train somewhere else
        _start_local_ray(runtime_env)


def _start_local_ray(runtime_env: dict | None) -> None:
    """A cluster in this process, whose own processes can find it beside other clusters.

    Inside a cluster started here RAY_ADDRESS is "local" or unset, and Ray's state API (which Ray
    Train's controller and placement-group cleaner call) then scans the machine for raylets: with
    a second cluster on the machine it finds two and raises in those checks. Naming this
    cluster's API server (its dashboard) in the environment the raylet and workers inherit tells
    them which one is theirs."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    ray.init(address="local", dashboard_port=dashboard_port, runtime_env=runtime_env)


@dataclass
class SweepRuns:
    """The sweep's MLflow side: the one writer, and the parent run the trials' runs hang under."""

    writer: TrackingWriter
    client: MlflowClient
    experiment_id: str
    parent_run_id: str
    parent_ref: dict
    provenance: dict[str, str]


def run_sweep(config: ExperimentConfig, trials: list[TrialSpec], resume: str | None = None,
              sweep_id: str | None = None, retry_failed: bool = False) -> SweepOutcome:
    """Check, prepare, run the sweep, then report: each step below raises SweepError for what it
    finds wrong, before anything is written that the next step would not clean up."""
    _configure_tune()
    uri = store.resolve_tracking_uri(config.tracking.tracking_uri)
    store.hide_run_links_with_secrets(uri)
    storage = Path(config.sweep.storage_path).expanduser().resolve()
    identity = sweep_identity.identity_of(config, uri)
    sweep_id = _sweep_id_to_run(config, storage, identity, resume, sweep_id)
    try:  # after the resume checks, so that a refused resume creates no store
        store.check_reachable(uri)  # before any trial starts
    except store.TrackingError as exc:
        raise SweepError(str(exc)) from None
    print(f"Tracking: {redact_uri(uri)}\nSweep id: {sweep_id}  (checkpoints under {storage / sweep_id})",
          flush=True)

    connect_ray()
    driver_versions, plan = _check_cluster(config, len(trials) * config.sweep.num_samples)
    storage.mkdir(parents=True, exist_ok=True)
    cache_paths = build_caches(trials)
    runs = _open_sweep_run(config, uri, storage / sweep_id, sweep_id, len(trials), plan)

    # Tune, its trials and their workers get the specs without the tracking URI's secrets.
    specs = {t.key: t.public() for t in trials}
    logger = MLflowTrialLogger(sweep_id, runs.experiment_id, runs.parent_run_id, specs, cache_paths,
                               runs.provenance, repeats_grid_points=config.sweep.num_samples > 1)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, specs=specs, plan=plan, sweep_id=sweep_id, storage_path=str(storage),
                             cache_paths=cache_paths, cache_node_id=ray.get_runtime_context().get_node_id(),
                             max_failures=config.sweep.max_failures, driver_versions=driver_versions),
        TRIAL_DRIVER_RESOURCES)
    if resume:
        # Errored trials (--retry-failed) start again from their last checkpoint, in their MLflow run.
        tuner = tune.Tuner.restore(str(storage / sweep_id), trainable, resume_unfinished=True,
                                   resume_errored=retry_failed)
    else:
        try:
            sweep_identity.claim(storage / sweep_id, identity)
        except sweep_identity.IdentityError as exc:
            raise SweepError(str(exc)) from None
        tuner = _new_tuner(config, list(specs.values()), trainable, logger, plan, storage, sweep_id)
    results = _fit_closing_runs(tuner, runs)
    return _finish(runs, results, sweep_id)


def _configure_tune() -> None:
    # Trials report per-epoch rows with `pck` and summary rows (test split, artifacts) without it.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # The MLflow callback is the runs' single writer; a SQLite commit on a busy disk takes 0.5-2 s,
    # which Tune would otherwise report as a slow callback after every epoch.
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "5")
    # Tune reads that variable once, when ray.tune is first imported (before this runs): set the
    # threshold it was read into as well.
    from ray.tune.utils.util import warn_if_slow

    warn_if_slow.DEFAULT_THRESHOLD = float(os.environ["TUNE_WARN_THRESHOLD_S"])
    # SIGINT stops the sweep like SIGTERM (pipeline.distributed.interrupts), not through Tune's own handler.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    bound_http_retries()


def _sweep_id_to_run(config: ExperimentConfig, storage: Path, identity: dict, resume: str | None,
                     sweep_id: str | None) -> str:
    """The sweep to resume (checked to be the same sweep) or a new, unused sweep id."""
    if resume:
        sweep_id = latest_sweep_id(storage, config.name) if resume == "latest" else resume
        if not tune.Tuner.can_restore(str(storage / sweep_id)):
            raise SweepError(f"--resume: no sweep '{sweep_id}' under {storage}")
        try:
            sweep_identity.check_resume(storage / sweep_id, identity)
        except sweep_identity.IdentityError as exc:
            raise SweepError(str(exc)) from None
        return sweep_id
    if sweep_id and (storage / sweep_id).exists():  # Tune would replay its trials and train nothing
        raise SweepError(sweep_identity.already_exists(storage / sweep_id))
    return sweep_id or sweep_identity.new_sweep_id(config)


def _check_cluster(config: ExperimentConfig, num_trials: int):
    """(driver's package versions, resource plan): every node runs the same versions, and the
    cluster (now, or with what its autoscaler may add) can hold the trials."""
    try:
        driver_versions = check_cluster_versions()
    except VersionMismatchError as exc:
        raise SweepError(str(exc)) from None
    try:
        plan = plan_resources(cluster_capacity(), config.sweep.workers_per_trial, config.sweep.use_gpu,
                              config.sweep.max_concurrent_trials, num_trials)
    except ResourceError as exc:
        raise SweepError(str(exc)) from None
    print(f"Resources: {plan.describe()}", flush=True)
    return driver_versions, plan


def _open_sweep_run(config: ExperimentConfig, uri: str, sweep_dir: Path, sweep_id: str, num_trials: int,
                    plan) -> SweepRuns:
    """The writer (first sending what a previous driver left spooled) and the sweep's parent run,
    created with its params or reopened on --resume."""
    writer = TrackingWriter(uri, sweep_dir / SPOOL_FILE, uninterrupted=uninterrupted).activate(sweep_id)
    writer.drain(DRAIN_TIMEOUT_S)
    client = MlflowClient(uri)
    provenance = store.provenance_tags()
    parent_identity = {store.SWEEP_TAG: sweep_id, store.KIND_TAG: "sweep"}
    params = {"preset": config.name, "num_trials": num_trials, "dataset": config.data.spec,
              "grid": config.sweep.grid, "search": config.sweep.search, "resources": plan.describe(),
              "max_concurrent_trials": plan.max_concurrent_trials, **public_config(config).flat_params()}

    def open_parent_run() -> tuple[str, str, bool]:
        # Repeatable: a retry after an answer that never arrived finds what the first try made.
        experiment_id = store.get_or_create_experiment(client, config.tracking.experiment)
        run_id, created = store.get_or_create_run(client, experiment_id, parent_identity,
                                                  run_name=f"sweep {sweep_id}", extra_tags=provenance)
        store.log_params_not_yet_logged(client, run_id, params)
        return experiment_id, run_id, created

    try:
        # The trials cannot be placed in MLflow without this run: wait out a store that is busy.
        experiment_id, parent_run_id, created = call_while_transient(open_parent_run, uri, DRAIN_TIMEOUT_S)
    except Exception as exc:  # the store's errors become one line; a bug is raised
        if failure_kind(exc) is None:
            raise
        raise SweepError(f"the tracking store {redact_uri(uri)} did not open the sweep's run "
                         f"({short_error(exc, uri)}); no trial was started") from None
    parent_ref = run_ref(experiment_id, parent_identity)
    writer.register(parent_ref, parent_run_id)
    if not created:  # reopened (--resume): it no longer carries how it ended before
        writer.submit(ClearEndTags(run=parent_ref))
    print(f"MLflow experiment '{config.tracking.experiment}', sweep run {parent_run_id}", flush=True)
    return SweepRuns(writer, client, experiment_id, parent_run_id, parent_ref, provenance)


def _new_tuner(config: ExperimentConfig, specs: list[TrialSpec], trainable, logger, plan, storage: Path,
               sweep_id: str) -> tune.Tuner:
    param_space = {"trial": tune.grid_search([t.as_dict() for t in specs])}
    if config.sweep.search:
        param_space["search"] = {k: tune_domain(d) for k, d in config.search_space.items()}
    scheduler = None
    if config.sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler
        # stop_last_trials=False: a trial that reaches the last epoch still scores its test split.
        scheduler = ASHAScheduler(time_attr=names.EPOCH, max_t=total_epochs(config), grace_period=1,
                                  stop_last_trials=False)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        # The objective is validation PCK@0.2 (or PCKh@0.5 for MPII: pipeline.train.scoring.protocol_for).
        # Trial processes are not reused (reuse_actors): see bench/RESULTS.md, "Sweep start-up".
        tune_config=tune.TuneConfig(metric=protocol_for(config).name, mode="max", scheduler=scheduler,
                                    num_samples=config.sweep.num_samples,
                                    max_concurrent_trials=plan.max_concurrent_trials,
                                    trial_name_creator=lambda t: t.config["trial"]["run_name"].replace(" ", "_"),
                                    trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        # verbose=0: the sweep prints its own progress table (SweepProgress) instead of Tune's.
        run_config=tune.RunConfig(name=sweep_id, storage_path=str(storage), verbose=0,
                                  callbacks=[logger, SweepProgress({t.key: t for t in specs})],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def _fit_closing_runs(tuner: tune.Tuner, runs: SweepRuns):
    """tuner.fit(), where every exit closes the runs: a stop signal (KILLED, in the handler:
    `ray job stop` SIGKILLs 3 s after its SIGTERM) and an error (FAILED)."""
    def stop(signum: int) -> None:
        _end_runs(runs.writer, runs.parent_ref, "KILLED", f"sweep stopped by {signal.Signals(signum).name}")

    with stop_signals(stop):
        try:
            return tuner.fit()
        except BaseException as exc:
            if stop_requested():  # its SweepStopped, or the KeyboardInterrupt Ray made of it
                raise SweepStopped(stop_requested()) from exc
            _end_runs(runs.writer, runs.parent_ref, "FAILED", f"sweep driver failed: {type(exc).__name__}: {exc}")
            raise


def _finish(runs: SweepRuns, results, sweep_id: str) -> SweepOutcome:
    """The end (FINISHED, or KILLED when Tune left a trial unfinished): the report on the parent run."""
    writer = runs.writer
    failed = [str(r.error).splitlines()[0][:200] if r.error else "" for r in results if r.error]
    writer.drain(DRAIN_TIMEOUT_S)  # the report reads every trial's run
    # A trial Tune left unfinished (its stop signal, SIGUSR1) keeps no open run either.
    stopped = writer.close_open_runs("KILLED", "the sweep ended before this trial did")
    table, has_report = _report_to_parent_run(runs.client, runs.experiment_id, runs.parent_run_id)
    where = store.where_to_look(runs.client.tracking_uri, runs.experiment_id, runs.parent_run_id, has_report)
    print(f"\n{table}\n{where}", flush=True)
    writer.submit(SetTags(run=runs.parent_ref, tags={"cpm.failed_trials": str(len(failed))}))
    writer.submit(SetStatus(run=runs.parent_ref, status="KILLED" if stopped else "FINISHED"))
    writer.drain(DRAIN_TIMEOUT_S)
    return SweepOutcome(sweep_id, runs.parent_run_id, runs.experiment_id,
                        completed=not failed or len(failed) < len(results), failed_trials=failed, table=table)


def _end_runs(writer: TrackingWriter, parent_ref: dict, status: str, reason: str) -> None:
    """Close every open trial run and the sweep's run with `status`; spooled first, so a kill
    during the send leaves them for `--resume` to send."""
    closed = writer.close_open_runs(status, reason)
    writer.enqueue(SetTags(run=parent_ref, tags={"cpm.status": status.lower(), "cpm.error": reason}))
    writer.enqueue(SetStatus(run=parent_ref, status=status))
    sent = writer.drain(STOP_DRAIN_TIMEOUT_S if status == "KILLED" else DRAIN_TIMEOUT_S)
    writer.log(f"{reason}: the sweep run and {closed} open trial run(s) marked {status}"
               + ("" if sent else " (queued: not sent yet)"))


def _report_to_parent_run(client: MlflowClient, experiment_id: str, parent_run_id: str) -> tuple[str, bool]:
    """The full report (pipeline.report) as artifacts of the sweep's run; returns the stage / RF
    tables and the claims' verdicts to print, and whether the report was written. A report that cannot be built must not
    fail a finished sweep."""
    import tempfile

    from pipeline.reporting.runs import collect_trial_runs
    from pipeline.reporting.tables import ReportError, build_report, to_markdown

    runs = collect_trial_runs(client, experiment_id, parent_run_id)
    with tempfile.TemporaryDirectory(prefix="cpm-report-") as tmp:
        try:
            report = build_report(runs, Path(tmp), client)
        except ReportError as exc:
            return f"No ablation report: {exc}", False
        except Exception as exc:  # a figure or store hiccup: say so, keep the sweep's result
            return f"No ablation report ({type(exc).__name__}: {exc})", False
        client.log_artifacts(parent_run_id, tmp, "report")
        stages, receptive_field = report.tables[:2]
        tables = to_markdown(stages, []) + "\n" + to_markdown(receptive_field, report.excluded)
        return tables + "\n" + report.claims, True
