"""The tracking writer's typed operations against a real MLflow store (SQLite): a spool file in the
form earlier drivers wrote is replayed without duplicating what already reached the store; a write
the store rejects is dropped with a warning, one it cannot take now is queued and spooled; a bug
(an operation whose payload has the wrong type) raises."""

from __future__ import annotations

import json

import pytest
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE
from services import LOOPBACK_ENV, free_port

from pipeline.tracking import store
from pipeline.tracking.operations import LogMetrics, OpenRun, SetStatus, SetTags, from_json, run_ref, to_json
from pipeline.tracking.writer import TrackingWriter, failure_kind

IDENTITY = {store.SWEEP_TAG: "sweep-1", store.TRIAL_TAG: "T=1"}


@pytest.fixture
def sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, run_ref(store.get_or_create_experiment(client, "writer"), IDENTITY)


def spool_lines(ref: dict) -> list[dict]:
    """What the writer of earlier versions put in a spool file (their dicts, dumped as they were)."""
    return [
        {"kind": "open", "run": ref, "run_name": "T=1 trial", "history_key": "train_loss",
         "tags": {store.KIND_TAG: "trial"}, "params": {"stages": "1"}, "datasets": [], "config_yaml": "seed: 0\n",
         "attempts": 1},
        {"kind": "metrics", "run": ref, "metrics": {"train_loss": 0.5, "pck": 0.25}, "step": 1,
         "timestamp": 1_700_000_000_000, "probe": "train_loss", "guard": False, "behind": True},
        {"kind": "metrics", "run": ref, "metrics": {"train_loss": 0.4, "pck": 0.375}, "step": 2,
         "timestamp": 1_700_000_060_000, "probe": "train_loss", "guard": False, "behind": True, "replayed": True},
        {"kind": "tags", "run": ref, "tags": {"cpm.stopped_early": "true"}, "behind": True},
        {"kind": "status", "run": ref, "status": "FINISHED", "behind": True, "attempts": 2},
    ]


def test_a_spool_in_the_form_earlier_drivers_wrote_is_replayed_once(sqlite_store, tmp_path):
    uri, client, ref = sqlite_store
    lines = spool_lines(ref)
    assert [to_json(from_json(line)) for line in lines] == lines  # read and written back key for key
    # Epoch 1 reached the store before the driver died (another timestamp: only the guard can tell).
    run_id, _ = store.get_or_create_run(client, ref["experiment_id"], IDENTITY, "T=1 trial")
    client.log_batch(run_id, metrics=[Metric("train_loss", 0.5, 1_699_999_999_000, 1)])
    spool = tmp_path / "mlflow_spool.jsonl"
    spool.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"kind": "tags", "ru')

    messages = []
    writer = TrackingWriter(uri, spool, log=messages.append)
    assert writer.pending == 5
    assert "replaying 5 write(s)" in messages[0] and "(1 torn line(s) skipped)" in messages[0]
    assert writer.drain(30)
    assert not spool.exists()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"stages": "1"}
    assert run.data.tags["cpm.stopped_early"] == "true"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == [(1, 0.5), (2, 0.4)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "pck")] == [(2, 0.375)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]


def test_a_bug_raises_where_a_rejected_write_is_dropped(sqlite_store):
    uri, client, ref = sqlite_store
    messages = []
    writer = TrackingWriter(uri, log=messages.append)
    writer.submit(OpenRun(run=ref, run_name="T=1 trial"))
    run_id = writer.run_id(ref)

    with pytest.raises(ValueError, match="could not convert string to float: 'high'"):
        writer.submit(LogMetrics(run=ref, metrics={"pck": "high"}, step=1, timestamp=1, probe="pck"))
    with pytest.raises(ValueError, match=r"unknown field\(s\) tag"):  # a misspelt write read back from a spool
        writer.submit(from_json({"kind": "tags", "run": ref, "tag": {"cpm.note": "x"}}))
    # The store's own refusal (no run has these identity tags) is no bug: dropped with a warning.
    writer.submit(SetStatus(run=run_ref(ref["experiment_id"], {store.SWEEP_TAG: "none"}), status="FINISHED"))
    assert messages == ["Tracking: dropped a 'status' write the store rejects: no run with tags "
                        "{'cpm.sweep_id': 'none'}"]
    # The bug's write left the queue: the writes after it still go out.
    writer.submit(SetTags(run=ref, tags={"cpm.note": "after"}))
    assert writer.pending == 0
    run = client.get_run(run_id)
    assert run.data.tags["cpm.note"] == "after" and run.data.metrics == {}


def test_a_store_that_does_not_answer_queues_and_spools_in_the_spool_format(tmp_path, monkeypatch):
    for key, value in {**LOOPBACK_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}.items():
        monkeypatch.setenv(key, value)
    ref = run_ref("1", IDENTITY)
    spool = tmp_path / "mlflow_spool.jsonl"
    messages = []
    writer = TrackingWriter(f"http://127.0.0.1:{free_port()}", spool, log=messages.append)
    writer.submit(SetTags(run=ref, tags={"cpm.note": "x"}))
    writer.submit(SetStatus(run=ref, status="FINISHED"))
    assert writer.pending == 2 and "unreachable" in messages[0]
    assert [json.loads(line) for line in spool.read_text().splitlines()] == [
        {"kind": "tags", "run": ref, "tags": {"cpm.note": "x"}, "attempts": 1},
        {"kind": "status", "run": ref, "status": "FINISHED", "behind": True}]


def test_only_the_stores_own_errors_are_transient_or_rejected():
    assert failure_kind(MlflowException("gone", error_code=RESOURCE_DOES_NOT_EXIST)) == "rejected"
    assert failure_kind(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE)) == "transient"
    assert failure_kind(requests.exceptions.ConnectionError("refused")) == "transient"
    assert failure_kind(ConnectionRefusedError(111, "refused")) == "transient"
    for bug in (KeyError("run"), TypeError("unhashable"), AttributeError("items"), ValueError("float")):
        assert failure_kind(bug) is None


@pytest.mark.integration  # waits out MLflow's 20 s SQLite busy timeout
def test_a_locked_store_queues_the_write_and_sends_it_once_free(sqlite_store, tmp_path):
    """A SQLite store another process holds locked: MLflow answers TEMPORARILY_UNAVAILABLE (after
    its 20 s busy timeout), the write waits in the queue and the spool, and goes out once free."""
    import sqlite3

    uri, client, ref = sqlite_store
    spool = tmp_path / "mlflow_spool.jsonl"
    messages = []
    writer = TrackingWriter(uri, spool, log=messages.append)
    writer.submit(OpenRun(run=ref, run_name="T=1 trial"))
    lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        writer.submit(SetTags(run=ref, tags={"cpm.note": "queued"}))
        assert writer.pending == 1 and "unreachable" in messages[-1]
        assert [json.loads(line)["kind"] for line in spool.read_text().splitlines()] == ["tags"]
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert writer.drain(60) and "is back after" in messages[-1] and not spool.exists()
    assert client.get_run(writer.run_id(ref)).data.tags["cpm.note"] == "queued"


def test_a_stop_signal_during_a_write_waits_for_it_then_closes_the_runs(sqlite_store, tmp_path):
    """`ray job stop` sends SIGTERM and SIGKILLs 3 s later. A signal that lands while a write holds
    the SQLite store's lock is handled once that write is done: the write goes out once and the runs
    are closed KILLED at once. Handled inside the write, the handler's own writes would send it again
    and wait on its lock for MLflow's 20 s busy timeout, past the SIGKILL."""
    import os
    import signal
    import sqlite3
    import time

    from pipeline.distributed.interrupts import SweepStopped, stop_signals, uninterrupted
    from pipeline.distributed.runner import _end_runs

    uri, client, ref = sqlite_store
    parent_ref = run_ref(ref["experiment_id"], {store.SWEEP_TAG: "sweep-1", store.KIND_TAG: "sweep"})
    messages = []
    writer = TrackingWriter(uri, tmp_path / "mlflow_spool.jsonl", log=messages.append, uninterrupted=uninterrupted)
    parent_run_id, _ = store.get_or_create_run(client, ref["experiment_id"], parent_ref["identity"], "sweep-1")
    writer.register(parent_ref, parent_run_id)  # the sweep's run, as the driver opens it
    writer.submit(OpenRun(run=ref, run_name="T=1 trial"))
    log_batch = writer.client.log_batch

    def log_batch_signalled_holding_the_lock(*args, **kwargs):
        writer.client.log_batch = log_batch  # once
        lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the store's write lock, as a write holds it mid-transaction
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next line
        lock.execute("COMMIT")
        lock.close()
        return log_batch(*args, **kwargs)

    writer.client.log_batch = log_batch_signalled_holding_the_lock
    started = time.monotonic()
    with pytest.raises(SweepStopped), stop_signals(
            lambda signum: _end_runs(writer, parent_ref, "KILLED", "sweep stopped by SIGTERM")):
        writer.submit(LogMetrics(run=ref, metrics={"train_loss": 0.5}, step=1, timestamp=1_700_000_000_000,
                                 probe="train_loss"))
    assert time.monotonic() - started < 3, messages
    run_ids = (writer.run_id(parent_ref), writer.run_id(ref))
    assert [client.get_run(run_id).info.status for run_id in run_ids] == ["KILLED", "KILLED"]
    assert [(m.step, m.value) for m in client.get_metric_history(writer.run_id(ref), "train_loss")] == [(1, 0.5)]
    assert "sweep stopped by SIGTERM: the sweep run and 1 open trial run(s) marked KILLED" in messages[-1]
