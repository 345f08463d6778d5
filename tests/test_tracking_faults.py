"""The tracking server goes away mid-sweep: a real `mlflow server` (SQLite store) is killed while two
trials report epochs, and started again on the same port and store 10 s later. The sweep must not
notice beyond a message: every epoch reaches MLflow exactly once, in order, every run ends FINISHED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from services import LOOPBACK_ENV, MLFLOW_SERVER_ENV, free_port, mlflow_server_command, wait_healthy
from test_sweep_integration import SWEEP_WAIT_S, _wait_for, sweep_command, sweep_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 10 s down is enough to prove the point: the writer's retries (2 s, then 4 s, 8 s apart) fail at
# least twice and epochs are reported meanwhile (asserted below); a longer outage adds only waiting.
OUTAGE_S = 10
# Two steps each, about a second per epoch: after epoch 2 the trials have 28 epochs left, more
# than the outage plus the server's restart (5-15 s), so they are still training when it is back.
EPOCHS = 30


class RestartableServer:
    """`mlflow server` on a fixed port and store, killed (SIGKILL, no goodbye) and started again."""

    def __init__(self, workdir: Path):
        self.workdir, self.port, self.process = workdir, free_port(), None
        self.base = f"http://127.0.0.1:{self.port}"
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.workdir / f"server-{self.starts}.log"
        command = mlflow_server_command(self.port, f"sqlite:///{self.workdir / 'mlflow.db'}", self.workdir)
        with log.open("w") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=self.workdir,
                                            env={**os.environ, **LOOPBACK_ENV, **MLFLOW_SERVER_ENV},
                                            start_new_session=True)
        try:
            wait_healthy(self.base, self.process, log)
        except BaseException:  # pytest.fail included: a server that never answered is stopped, not left behind
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    server = RestartableServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def epoch_rows(storage: Path) -> list[dict]:
    rows = []
    for path in storage.glob("*/trial_*/result.json"):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "train_loss" in row:
                    rows.append(row)
    return rows


def test_a_tracking_server_outage_loses_and_duplicates_nothing(tmp_path, server, ray_tmpdir):
    command = sweep_command(tmp_path, "--set", "sweep.grid={model.stages: [1, 2]}", "--set", f"train.epochs={EPOCHS}",
                            "--set", "train.max_steps_per_epoch=2", "--set", "tracking.experiment=outage")
    command[command.index("--tracking-uri") + 1] = server.base
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env={**sweep_env(ray_tmpdir), **LOOPBACK_ENV}, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    storage = tmp_path / "ray"
    try:
        _wait_for(lambda: len({r["trial_id"] for r in epoch_rows(storage) if r["epoch"] >= 2}) == 2, SWEEP_WAIT_S,
                  "epoch 2 of both trials", proc)
        server.kill()
        down_at = time.time()
        time.sleep(OUTAGE_S)
        up_at = time.time()
        during = [r for r in epoch_rows(storage) if down_at < r["timestamp"] < up_at - 1]
        server.start()
        proc.wait(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    # The outage really overlapped training: epochs were reported while the server was down.
    assert len(during) >= 2, f"only {len(during)} epoch(s) reported during the outage"
    assert max(r["epoch"] for r in epoch_rows(storage)) == EPOCHS
    assert "unreachable" in output and "is back after" in output, output[-4000:]

    client = MlflowClient(server.base)
    experiment = client.get_experiment_by_name("outage")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get("cpm.run_kind") == "trial"]
    sweeps = [r for r in runs if r.data.tags.get("cpm.run_kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in trials) == ["T=1 rf=45px is=on seed=0", "T=2 rf=109px is=on seed=0"]
    for run in trials:
        assert run.info.status == "FINISHED", run.info.run_name
        for key in ("pck", "train_loss"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), f"{run.info.run_name} {key}: steps {sorted(steps)}"
        # The test split (a summary row) is logged once; best_* once at each new best epoch, the
        # last of them the best validation PCK.
        assert len(client.get_metric_history(run.info.run_id, "test_pck")) == 1
        best_steps = [m.step for m in client.get_metric_history(run.info.run_id, "best_pck")]
        assert len(best_steps) == len(set(best_steps)) >= 1, f"{run.info.run_name} best_pck steps {best_steps}"
        pck = client.get_metric_history(run.info.run_id, "pck")
        assert run.data.metrics["best_pck"] == max(m.value for m in pck)
        # The best weights went into the run's pose model, which the outage did not stop or double.
        models = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == run.info.run_id]
        assert [m.status.name for m in models] == ["READY"]
    # Nothing is left to replay.
    assert not list(storage.glob("*/mlflow_spool.jsonl"))
