"""Opening a sweep's MLflow run against a real store (SQLite) that is busy or raced: the driver
cannot place any trial without that run, so a store that stays locked past MLflow's own 20 s busy
timeout is waited out with back-off, and a store that never frees is one line naming it, before
any trial starts. Two sweeps creating one experiment at the same moment share it."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from mlflow import MlflowClient

from cpm_model.config import load_config
from pipeline.distributed import runner
from pipeline.distributed.resources import ResourcePlan
from pipeline.tracking import store

PLAN = ResourcePlan(workers_per_trial=1, use_gpu=False, cpus_per_worker=1.0, gpus_per_worker=0.0,
                    max_concurrent_trials=2)


def locked_for(database, seconds: float) -> threading.Thread:
    """Another process's exclusive lock on the SQLite file (readers wait too), released after `seconds`."""
    lock = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")

    def release():
        threading.Event().wait(seconds)
        lock.execute("ROLLBACK")
        lock.close()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def sweep_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], filter_string=f"tags.`{store.KIND_TAG}` = 'sweep'")


@pytest.fixture
def sqlite_uri(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store.get_or_create_experiment(MlflowClient(uri), "made-first")  # the schema exists before the lock
    return uri


@pytest.mark.integration  # waits out MLflow's 20 s SQLite busy timeout once
def test_a_store_locked_past_its_busy_timeout_delays_the_sweep_run_which_is_opened_once(
        sqlite_uri, tmp_path, capsys):
    config = load_config("synthetic_tiny", ["tracking.experiment=busy"])
    holder = locked_for(tmp_path / "mlflow.db", 24)  # the first try gives up at 20 s, the next one waits
    runs = runner._open_sweep_run(config, sqlite_uri, tmp_path / "sweep", "sweep-busy", 2, PLAN)
    holder.join()
    out = capsys.readouterr().out
    assert "did not answer" in out and "trying again in 2 s" in out, out
    [run] = sweep_runs(sqlite_uri, "busy")
    assert run.info.run_id == runs.parent_run_id and run.data.params["num_trials"] == "2"
    assert run.data.params["resources"] == PLAN.describe()


@pytest.mark.integration  # waits out MLflow's 20 s SQLite busy timeout once
def test_a_store_that_stays_locked_stops_the_sweep_in_one_line_naming_it(sqlite_uri, tmp_path, monkeypatch):
    config = load_config("synthetic_tiny", ["tracking.experiment=never"])
    monkeypatch.setattr(runner, "DRAIN_TIMEOUT_S", 1.0)  # no second try: the first one takes 20 s
    holder = locked_for(tmp_path / "mlflow.db", 22)
    with pytest.raises(runner.SweepError) as stopped:
        runner._open_sweep_run(config, sqlite_uri, tmp_path / "sweep", "sweep-never", 2, PLAN)
    holder.join()
    message = str(stopped.value)
    assert message.startswith(f"the tracking store {sqlite_uri} did not open the sweep's run (")
    assert message.endswith("; no trial was started") and "\n" not in message
    assert MlflowClient(sqlite_uri).get_experiment_by_name("never") is None


def test_two_sweeps_creating_one_experiment_at_once_share_it(sqlite_uri):
    """The second sweep looked the name up before the first created it: its create is refused
    (RESOURCE_ALREADY_EXISTS) and it takes the experiment the first made."""
    first = MlflowClient(sqlite_uri)

    class LookedUpTooEarly(MlflowClient):
        def get_experiment_by_name(self, name):
            looked_up = super().get_experiment_by_name(name)
            if not hasattr(self, "raced"):
                self.raced = store.get_or_create_experiment(first, name)  # the other sweep, in between
                return None
            return looked_up

    second = LookedUpTooEarly(sqlite_uri)
    assert store.get_or_create_experiment(second, "shared") == second.raced
    assert [e.name for e in first.search_experiments()].count("shared") == 1
