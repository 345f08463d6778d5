"""MLflow on a real PostgreSQL server (a throwaway cluster per test module): sweeps through an
`mlflow server` backed by it and straight into it, two sweeps at once, no password or token in
anything the pipeline prints or stores, and a store that cannot be used reported before any trial."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from services import LOOPBACK_ENV, RayHead, mlflow_server, postgres_server
from test_sweep_integration import sweep_env

from pipeline.redaction import redact_uri
from pipeline.tracking import store as tracking
from pipeline.tracking.pose_model import using_tracking_uri

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "pw-6f1d2c9a8b"  # distinctive, so a search of every stored byte for it cannot match by chance
TOKEN = "tok-3e7a90c41d"
integration = pytest.mark.integration
slow = pytest.mark.slow
shared_postgres = pytest.mark.xdist_group("postgres")


# redact_uri itself, and the config's masked forms: tests/test_redaction.py.


def test_error_text_is_scrubbed_of_the_uri_secrets():
    uri = "postgresql://u:p%40ss@h/db"
    assert tracking.scrub("login as u with p@ss / p%40ss failed\n(Background on this error at: x)", uri) == \
        "login as u with *** / *** failed"


# --- a real server -------------------------------------------------------------------------------

# The tests that use this server run on one worker under `pytest -n 2` (xdist_group "postgres"),
# so one PostgreSQL server serves them all, each test in its own database.
@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as server:
        yield server


def sweep_command(tmp: Path, tracking_uri: str, experiment: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / "sweep.py"), "--config", "synthetic_tiny",
            "--tracking-uri", tracking_uri, "--storage-path", str(tmp / "ray"),
            "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "data.spec=synthetic:300",
            "--set", "train.epochs=1", "--set", f"tracking.experiment={experiment}",
            "--set", "sweep.max_concurrent_trials=1", *extra]


def start_sweep(tmp: Path, cluster: str | RayHead, tracking_uri: str, experiment: str, *extra: str) -> subprocess.Popen:
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**sweep_env(cluster), **LOOPBACK_ENV}
    return subprocess.Popen(sweep_command(tmp, tracking_uri, experiment, *extra), cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 800) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out + err)[-4000:]
    return out, err


def sweep_runs(client: MlflowClient, experiment: str) -> tuple[object, list]:
    """(the sweep's parent run, its trial runs), checked to be one sweep whose runs all FINISHED."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    parents = [r for r in runs if r.data.tags.get("cpm.run_kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("cpm.run_kind") == "trial"]
    assert len(parents) == 1 and len(parents) + len(trials) == len(runs)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    return parents[0], trials


def runs_in_database(postgres, database: str, experiment: str) -> dict[str, dict]:
    """Run name -> status, params and last pck, read with SQL from MLflow's tables."""
    rows = postgres.query(database, """
        SELECT r.run_uuid, r.name, r.status FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id
        WHERE e.name = %s""", (experiment,))
    found = {}
    for run_uuid, name, status in rows:
        params = dict(postgres.query(database, "SELECT key, value FROM params WHERE run_uuid = %s", (run_uuid,)))
        pck = postgres.query(database, "SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'pck'",
                             (run_uuid,))
        found[name] = {"status": status, "params": params, "pck": pck[0][0] if pck else None}
    return found


@integration
@slow
@pytest.mark.timeout(900)  # two sweeps on two cores
@shared_postgres
# Alone: beside other sweeps under load the one-worker `mlflow server` answered after MLflow's 10 s
# read timeout, and a sweep exited or left duplicate RUNNING runs (seen twice under `pytest -n 2`).
@pytest.mark.alone
def test_two_sweeps_at_once_through_an_mlflow_server_on_postgres(postgres, tmp_path, shared_ray):
    database_uri = postgres.create_database("sweeps", "tracker", PASSWORD)
    with mlflow_server(database_uri, tmp_path) as base:
        # Two drivers on one Ray cluster, each with its own storage and experiment; the second one
        # names the server with a user:token (ignored by a server without auth).
        with_token = base.replace("http://", f"http://cpm:{TOKEN}@")
        first = start_sweep(tmp_path / "a", shared_ray, base, "pg-a", "--set", "sweep.grid={model.stages: [1, 2]}")
        second = start_sweep(tmp_path / "b", shared_ray, with_token, "pg-b")
        (out_a, _), (out_b, err_b) = finish(first), finish(second)

        client = MlflowClient(base)
        expected = {"pg-a": ["T=1 rf=45px is=on seed=0", "T=2 rf=109px is=on seed=0"],
                    "pg-b": ["T=3 rf=173px is=on seed=0"]}
        for experiment, names in expected.items():
            parent, trials = sweep_runs(client, experiment)
            assert sorted(r.info.run_name for r in trials) == names
            for run in trials:
                assert run.data.params["stages"] == run.info.run_name[2]
                assert run.data.params["receptive_field_px"] == run.info.run_name.split("rf=")[1].split("px")[0]
                assert 0.0 <= run.data.metrics["pck"] <= 1.0

            # The same runs, params and metric are rows of PostgreSQL's tables.
            in_sql = runs_in_database(postgres, "sweeps", experiment)
            assert sorted(in_sql) == sorted([parent.info.run_name, *names])
            assert all(row["status"] == "FINISHED" for row in in_sql.values())
            for run in trials:
                row = in_sql[run.info.run_name]
                assert row["params"]["stages"] == run.data.params["stages"]
                assert row["params"]["receptive_field_px"] == run.data.params["receptive_field_px"]
                assert row["pck"] == pytest.approx(run.data.metrics["pck"])
    assert f"Tracking: {base}" in out_a
    assert f"Tracking: {redact_uri(with_token)}" in out_b and TOKEN not in out_b + err_b


@integration
@slow
@shared_postgres
def test_sweep_straight_into_postgres_stores_and_prints_no_password(postgres, tmp_path, shared_ray):
    uri = postgres.create_database("direct", "direct_user", PASSWORD)
    out, err = finish(start_sweep(tmp_path, shared_ray, uri, "pg-direct"))
    assert f"Tracking: {redact_uri(uri)}" in out
    assert PASSWORD not in out + err

    client = MlflowClient(uri)
    parent, trials = sweep_runs(client, "pg-direct")
    assert [r.info.run_name for r in trials] == ["T=3 rf=173px is=on seed=0"]
    assert set(runs_in_database(postgres, "direct", "pg-direct")) == {parent.info.run_name, trials[0].info.run_name}
    stored = []  # (where, bytes) of everything the sweep wrote
    for run in (parent, *trials):
        assert run.data.params["tracking.tracking_uri"] == redact_uri(uri)
        stored += [(f"{run.info.run_name} params/tags", repr((run.data.params, run.data.tags)).encode())]
        artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloads" / run.info.run_id)))
        stored += [(str(p), p.read_bytes()) for p in artifacts.rglob("*") if p.is_file()]
    for model in client.search_logged_models([parent.info.experiment_id]):  # each trial's pose model
        with using_tracking_uri(uri):
            files = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.model_uri,
                                                             dst_path=str(tmp_path / "downloads" / model.model_id)))
        stored += [(str(p), p.read_bytes()) for p in files.rglob("*") if p.is_file()]
    assert any(where.endswith("config.yaml") for where, _ in stored)
    assert any(where.endswith("best_model.pt") for where, _ in stored)
    # Ray's files: Tune's pickled state (tuner.pkl holds the MLflow callback), results, checkpoints.
    checkpoints = [p for p in (tmp_path / "ray").rglob("*") if p.is_file()]
    assert any(p.name == "checkpoint.pt" for p in checkpoints) and any(p.name == "tuner.pkl" for p in checkpoints)
    stored += [(str(p), p.read_bytes()) for p in checkpoints]
    # What a backup of the database holds.
    dump = postgres.dump("direct")
    assert b"CREATE TABLE public.runs" in dump and trials[0].info.run_id.encode() in dump
    stored.append(("pg_dump", dump))
    leaks = [where for where, data in stored if PASSWORD.encode() in data]
    assert not leaks


# --- a store that cannot be used ----------------------------------------------------------------

def failed_sweep(tmp: Path, tracking_uri: str) -> str:
    """Run a sweep expected to stop before any trial: returns its stderr after checking the exit."""
    env = {**sweep_env(str(tmp / "no-ray")), **LOOPBACK_ENV}
    result = subprocess.run(sweep_command(tmp, tracking_uri, "pg-bad"), cwd=tmp, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr and "Resources:" not in result.stdout
    assert PASSWORD not in result.stdout + result.stderr and TOKEN not in result.stdout + result.stderr
    return errors[0]


def assert_no_runs(postgres, database: str) -> None:
    assert postgres.query(database, "SELECT count(*) FROM runs") == [(0,)]
    assert postgres.query(database, "SELECT name FROM experiments") == [("Default",)]


@integration
@shared_postgres
def test_wrong_password_or_database_is_reported_before_any_trial(postgres, tmp_path):
    uri = postgres.create_database("guarded", "guarded_user", "right-password")
    MlflowClient(uri).search_experiments()  # MLflow's tables exist: a half-made run would show
    wrong = postgres.uri("guarded_user", PASSWORD, "guarded")
    error = failed_sweep(tmp_path, wrong)
    assert redact_uri(wrong) in error and "password authentication failed" in error
    error = failed_sweep(tmp_path, postgres.uri("guarded_user", "right-password", "no_such_db"))
    assert 'database "no_such_db" does not exist' in error
    assert_no_runs(postgres, "guarded")


@integration
def test_servers_that_do_not_answer_are_reported_before_any_trial(tmp_path):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    error = failed_sweep(tmp_path, f"postgresql://u:{PASSWORD}@127.0.0.1:{port}/mlflow")
    assert f"postgresql://u:***@127.0.0.1:{port}/mlflow" in error and "Connection refused" in error
    error = failed_sweep(tmp_path, f"http://cpm:{TOKEN}@127.0.0.1:{port}")
    assert f"http://cpm:***@127.0.0.1:{port} cannot be reached" in error
    # A server that accepts the connection and never says a word: psycopg's connect timeout, once.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        error = failed_sweep(tmp_path, f"postgresql://u:{PASSWORD}@127.0.0.1:{port}/mlflow")
    assert f"postgresql://u:***@127.0.0.1:{port}/mlflow" in error and "timeout expired" in error


@integration
def test_mlflow_server_whose_database_stopped_is_reported_before_any_trial(tmp_path):
    with postgres_server() as database_server:  # its own: this test stops it
        database_uri = database_server.create_database("mlflow", "tracker", PASSWORD)
        with mlflow_server(database_uri, tmp_path) as base:
            MlflowClient(base).search_experiments()  # the server has opened its database
            database_server.stop()
            error = failed_sweep(tmp_path, base)
    assert f"MLflow tracking store {base} cannot be used" in error
