"""MLflow tracking: where runs go, and finding or creating the sweep's and each trial's run.

One process writes each run (the sweep driver, through `pipeline.tracking.trial_logger`): SQLite takes
one writer well, and a network file system not at all. Runs are found by identity tags before one
is created, so a resumed sweep or a restarted trial keeps writing to the same run.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException

from pipeline.redaction import REDACTED, redact_uri, uri_secrets
from pipeline.tracking.errors import TrackingError

SWEEP_TAG = "cpm.sweep_id"  # on the parent run
TRIAL_TAG = "cpm.trial_key"  # on each trial's run, with the sweep id
KIND_TAG = "cpm.run_kind"  # "sweep" or "trial"
DEFAULT_HOME = Path("~/.cache/cpm-pipeline/mlflow")


def default_tracking_uri() -> str:
    """The embedded default: a SQLite file at an absolute path (it survives a job's temporary
    working directory), with artifacts beside it."""
    home = DEFAULT_HOME.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None) -> str:
    """--tracking-uri / config, else MLFLOW_TRACKING_URI, else the embedded SQLite default.

    A relative sqlite path is made absolute, so it means the same thing in every process."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    return uri


# Commands that only read (report, evaluate, predict) give up on a silent store after about this
# long per request, where MLflow's client retries for minutes.
READ_TIMEOUT_S = 8


@contextlib.contextmanager
def env_set(**values: str):
    """Set these environment variables inside the block; on exit each is put back as it was, or
    removed when it was not set."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def bounded_requests(timeout_s: float = READ_TIMEOUT_S):
    """MLflow's HTTP requests inside the block: one try each, at most `timeout_s` (its client would
    retry 7 times with back-off); the environment is put back after."""
    return env_set(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout_s)))


def quiet_artifact_downloads():
    """No download bar for the small files the project fetches itself (a bar per file in a log)."""
    return env_set(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")


def reading_uri(configured: str | None) -> str:
    """The tracking URI for a command that only reads, checked: a SQLite store must already exist
    (a look-up never creates one) and a server or database must answer within seconds (run the
    reads themselves inside `bounded_requests`). TrackingError, naming the store, otherwise."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_HOME.expanduser() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        if not path.is_file():
            raise TrackingError(f"no MLflow store at {path}: nothing was tracked there (pass --tracking-uri, "
                                f"or set MLFLOW_TRACKING_URI)")
        uri = f"sqlite:///{path}"
    check_reachable(uri, timeout_s=READ_TIMEOUT_S / 2, answer_timeout_s=READ_TIMEOUT_S)
    return uri


def artifact_root_for(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database (an explicit, absolute location)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None  # a tracking server decides (its --artifacts-destination)


def scrub(text: str, uri: str) -> str:
    """Error text on one line, with the URI's secrets (as written and percent-decoded) masked."""
    text = text.split("\n(Background on this error", 1)[0]  # SQLAlchemy's link to its FAQ
    for secret in uri_secrets(uri):
        for form in {secret, urllib.parse.unquote(secret)}:
            text = text.replace(form, REDACTED)
    return " ".join(text.split())[:800]


def hide_run_links_with_secrets(uri: str) -> None:
    """MLflow prints each closed run's link built from the tracking URI as given, a password or
    token included; for such a URI it prints none."""
    if uri_secrets(uri):
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def is_database_uri(uri: str) -> bool:
    """A SQLAlchemy URI of a database server (MLflow's SQL store), e.g. postgresql://u:p@host:5432/db."""
    return uri.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql")


def where_to_look(uri: str, experiment_id: str, run_id: str, has_report: bool = True) -> str:
    """One line naming the sweep's report (its run's `report/` artifacts) and how to open it in
    the MLflow UI: the run's page on a tracking server, else the `mlflow ui` command for the store."""
    shown = redact_uri(uri)
    if uri.startswith(("http://", "https://")):
        ui = f"{shown.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    else:
        ui = f"mlflow ui --backend-store-uri {shown}"
    report = f"artifacts report/ of sweep run {run_id}" if has_report else f"none (sweep run {run_id})"
    return f"Report: {report}; MLflow UI: {ui}"


def check_reachable(uri: str, timeout_s: float = 5.0, answer_timeout_s: float = 60.0) -> None:
    """Fail fast, before any trial starts, when the tracking store does not answer: one bounded try
    where MLflow's clients retry for minutes (7 HTTP retries with back-off; 10 attempts, about
    100 s, to create a database engine). Errors name the URI with its secrets masked.

    `timeout_s` bounds connecting; `answer_timeout_s` the first query, which on a fresh server
    also creates MLflow's tables (10-30 s against PostgreSQL on a busy machine)."""
    shown = redact_uri(uri)
    if uri.startswith(("http://", "https://")):
        _check_health(uri, shown, timeout_s)
    elif is_database_uri(uri):
        _check_database_login(uri, shown, timeout_s)
    # A server whose own database is down answers /health but fails every request: no retries here.
    with bounded_requests(answer_timeout_s):
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:  # any store error means runs could not be written
            raise TrackingError(f"MLflow tracking store {shown} cannot be used: {scrub(str(exc), uri)}") from None


def _check_health(uri: str, shown: str, timeout_s: float) -> None:
    parts = urllib.parse.urlsplit(uri.rstrip("/"))
    request = urllib.request.Request(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl() + "/health")
    if parts.username is not None:  # user:token@host: HTTP basic auth, as MLflow's client sends it
        credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow tracking server {shown} answered {response.status} on /health")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(f"MLflow tracking server {shown} cannot be reached ({scrub(str(exc), uri)}); start it "
                            f"with `mlflow server` or pass another --tracking-uri") from None


def _check_database_login(uri: str, shown: str, timeout_s: float) -> None:
    """One login with a connect timeout (psycopg's libpq `connect_timeout` for PostgreSQL)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    connect_args = {"connect_timeout": max(1, int(timeout_s))} if uri.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=connect_args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as exc:  # a missing driver, a refused connection, a wrong password or database
        raise TrackingError(f"MLflow tracking database {shown} cannot be used: {scrub(str(exc), uri)}") from None


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    artifact_location = artifact_root_for(client.tracking_uri)
    if artifact_location:
        artifact_location = f"{artifact_location}/{name}"
    try:
        # Open in the UI's model-training view (runs table), not the GenAI view MLflow 3 defaults to.
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException as exc:  # another sweep made it since the look-up above: use theirs
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or client.get_experiment_by_name(name) is None:
            raise
        return client.get_experiment_by_name(name).experiment_id


def find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]):
    """The run carrying all these tags, or None."""
    clauses = " and ".join(f"tags.`{k}` = {_filter_string_literal(v)}" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=clauses, max_results=2)
    return runs[0] if runs else None


def _filter_string_literal(value: str) -> str:
    """A quoted value for MLflow's filter strings, which have no escapes: a value holding a single
    quote goes in double quotes; one holding both kinds cannot be searched."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"tag value {value!r} holds both kinds of quote; MLflow cannot search for it")


def get_or_create_run(client: MlflowClient, experiment_id: str, identity: dict[str, str], run_name: str,
                      extra_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """(run id, created?) of the run holding these identity tags."""
    run = find_run(client, experiment_id, identity)
    if run is not None:
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, False
    tags = {**identity, **(extra_tags or {})}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id, True


def provenance_tags() -> dict[str, str]:
    """The git commit of the code and the versions of the packages that shape the results."""
    tags: dict[str, str] = {}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["cpm.git_dirty"] = str(bool(dirty)).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    tags["cpm.python"] = sys.version.split()[0]
    for package in ("torch", "ray", "mlflow", "numpy", "h5py", "cpm-pipeline"):
        try:
            tags[f"cpm.version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return tags


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def log_params_not_yet_logged(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log the params the run does not carry yet: a repeat after an answer that was lost, or a
    reopened run, keeps the values already logged (MLflow refuses to change one)."""
    logged = client.get_run(run_id).data.params
    log_params(client, run_id, {k: v for k, v in params.items() if k not in logged})


def metric_name(key: str) -> str:
    """MLflow's name for a metric key: '@' is not allowed there, so 'pck@0.1' is logged as 'pck_0.1'."""
    return key.replace("@", "_")


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
