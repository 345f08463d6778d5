"""The real thing on small inputs: `python pipeline/sweep.py` on a local Ray cluster, tracked in a
SQLite MLflow store, with a trial that fails, a training worker killed mid-trial, and a driver
killed then resumed."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_processes_mentioning
from mlflow import MlflowClient
from services import RayHead, free_port, option_of, start_ray

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
KILLED_RUN_EPOCHS = 8


def sweep_command(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / "sweep.py"), "--config", "synthetic_tiny",
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--storage-path", str(tmp / "ray"),
            "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "data.spec=synthetic:300",
            "--set", f"train.epochs={EPOCHS}", "--set", "tracking.experiment=test-sweep", *extra]


def sweep_env(cluster: str | RayHead) -> dict:
    """The driver's environment: it joins `cluster` (the module's shared cluster), or, given a
    temp dir, starts a local cluster of its own there (the tests that kill Ray's processes)."""
    if isinstance(cluster, RayHead):
        return dict(cluster.env)
    env = dict(os.environ)
    # Its own local cluster, in its own temp dir, even when a cluster (`ray start --head`, e.g.
    # from `make sweep`) is running on this machine: "auto" would join it.
    env["RAY_ADDRESS"] = "local"
    env["RAY_TMPDIR"] = cluster
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_sweep(tmp: Path, cluster: str | RayHead, *extra: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(tmp, *extra), cwd=tmp, env=sweep_env(cluster), capture_output=True,
                          text=True, timeout=timeout)


def trial_runs(tmp: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test-sweep")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`cpm.run_kind` = 'trial'")
    return client, runs


def epochs_logged(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "pck"))


# The three sweeps on the module's shared cluster run on one pytest worker, so that they share it.
on_shared_cluster = pytest.mark.xdist_group("sweep-shared-cluster")
FAILED_NAME = "T=2 rf=109px is=on batch_size=100000 seed=0"
DIVERGING_NAME = "T=1 rf=45px is=on lr=1e+06 optimizer=sgd seed=0"


@pytest.fixture(scope="module")
def sweep_with_failures(tmp_path_factory, shared_ray):
    """One sweep, two tests: two trials that finish, one that cannot start (its batch is larger
    than the training split) and one that diverges (SGD at lr 1e6 on the synthetic figures: the
    loss is NaN within the first few steps). One sweep instead of two saves a driver and a trial
    (about a minute of the suite's CPU)."""
    tmp = tmp_path_factory.mktemp("failures")
    result = run_sweep(tmp, shared_ray, "--set", "sweep.variants=[{model.stages: 1}, {model.stages: 3}, "
                                   "{model.stages: 2, train.batch_size: 100000}, "
                                   "{model.stages: 1, train.optimizer: sgd, train.lr: 1.0e+6}]", "--register", "cpm-test")
    return tmp, result.returncode, result.stdout + result.stderr


@on_shared_cluster
def test_sweep_tracks_every_trial_and_survives_a_failing_one(sweep_with_failures):
    tmp_path, returncode, output = sweep_with_failures
    assert returncode == 0, output[-3000:]

    client, runs = trial_runs(tmp_path)
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == [DIVERGING_NAME, "T=1 rf=45px is=on seed=0", FAILED_NAME, "T=3 rf=173px is=on seed=0"]
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["cpm.run_kind"] == "sweep" and parent.info.status == "FINISHED"

    for name in ("T=1 rf=45px is=on seed=0", "T=3 rf=173px is=on seed=0"):
        run = by_name[name]
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["stages"] == name[2] and params["receptive_field_px"] == name.split("rf=")[1].split("px")[0]
        assert params["intermediate_supervision"] == "True" and params["dataset"] == "synthetic:300"
        assert epochs_logged(client, run.info.run_id) == list(range(1, EPOCHS + 1))
        stages = int(params["stages"])
        assert all(f"pck_stage{t}" in run.data.metrics for t in range(1, stages + 1))
        for t in range(1, stages + 1):  # sampled gradient norms, one per epoch and stage
            history = client.get_metric_history(run.info.run_id, f"grad_norm_stage{t}")
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)) and all(m.value > 0 for m in history)
        assert 0.0 <= run.data.metrics["best_pck"] <= 1.0 and "test_pck" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "belief_maps_per_stage.png", "gradients.json"} <= artifacts
        models = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == run.info.run_id]
        assert [m.status.name for m in models] == ["READY"]  # the best weights, as an MLflow model
        assert run.data.tags["mlflow.source.git.commit"]

    # `pipeline.evaluate --run-id` scores the run's best checkpoint: on val it reproduces best_pck.
    for run in (by_name["T=3 rf=173px is=on seed=0"], by_name["T=1 rf=45px is=on seed=0"]):
        assert evaluated_pck(tmp_path, "--run-id", run.info.run_id) == pytest.approx(run.data.metrics["best_pck"], abs=1e-9)

    # --register: the finished trial with the best validation PCK is version 1, and scores as it did.
    best = max((by_name[n] for n in ("T=1 rf=45px is=on seed=0", "T=3 rf=173px is=on seed=0")),
               key=lambda r: r.data.metrics["best_pck"])
    version = client.get_model_version("cpm-test", "1")
    assert version.run_id == best.info.run_id
    assert f"Registered models:/cpm-test/1: {best.info.run_name} (run {best.info.run_id})" in output
    assert evaluated_pck(tmp_path, "--model", "models:/cpm-test/1") == pytest.approx(best.data.metrics["best_pck"],
                                                                                        abs=1e-9)

    failed = by_name[FAILED_NAME]
    assert failed.info.status == "FAILED"
    assert "fewer than one batch" in failed.data.tags["cpm.error"]
    # The table lists the finished configurations and names the failed one.
    assert "| 3 | 173 |" in output and f"{FAILED_NAME}: FAILED" in output
    # The claims close the output: T=1 against T=3 (T=2 failed), one seed each, so no verdict.
    assert "| stages | T=3 rf=173px is=on | T=1 rf=45px is=on | 1 / 1 |" in output
    assert output.rstrip().index("**inconclusive**") > output.index("| 3 | 173 |")
    assert {"report/claims.md", "report/claims.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id,
                                                                                                "report")}


def evaluated_pck(tmp: Path, *source: str) -> float:
    scores = tmp / "scores.json"
    evaluation = subprocess.run([sys.executable, "-m", "pipeline.evaluate", *source,
                                 "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--split", "val",
                                 "--quiet", "--json", str(scores)], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    return json.loads(scores.read_text())["pck"]


def _result_rows(storage: Path) -> list[dict]:
    rows = []
    for path in storage.glob("*/trial_*/result.json"):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def processes_named(fragment: str) -> list[int]:
    """Pids whose command line contains `fragment` (Ray names actor processes ray::ClassName)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if fragment in cmdline:
                pids.append(int(entry.name))
    return pids


def parent_pid(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# How long a sweep may take to reach a point a test waits for (a trial's first epoch, its end):
# about a minute on an idle machine, several times that on 2 cores shared with another pytest
# worker's clusters (CI once took more than 300 s). Only a failing test waits it out; it stays
# under pytest's 600 s per test so that the failure shows the sweep's output.
SWEEP_WAIT_S = 450


def _wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"sweep exited ({proc.returncode}) while waiting for {what}:\n{out[-3000:]}")
        time.sleep(0.5)
    if proc is not None and proc.stdout is not None:
        proc.kill()  # its output so far says where it stood (a pending trial, a worker restarting ...)
        out = proc.communicate()[0] or ""
        pytest.fail(f"timed out after {timeout:g} s waiting for {what}; the sweep's output:\n{out[-3000:]}")
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def test_killed_worker_resumes_from_its_checkpoint_in_the_same_run(tmp_path, ray_tmpdir):
    # Enough epochs that the trial is still training when the test sees epoch 1 in Tune's result
    # file (written a moment after the report): seven more of about a second each.
    proc = subprocess.Popen(sweep_command(tmp_path, "--set", f"train.epochs={KILLED_RUN_EPOCHS}"),
                            cwd=tmp_path, env=sweep_env(ray_tmpdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for(lambda: any(r.get("epoch") == 1 and "train_loss" in r for r in _result_rows(tmp_path / "ray")),
                  SWEEP_WAIT_S, "epoch 1", proc)
        # Ray Train workers of this test's cluster: children of a raylet started under ray_tmpdir.
        raylets = set(processes_named(ray_tmpdir))
        workers = [pid for pid in processes_named("RayTrainWorker") if parent_pid(pid) in raylets]
        assert workers, "no Ray Train worker process found"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]

    rows = [r for r in _result_rows(tmp_path / "ray") if "train_loss" in r]
    # The restarted worker sends its checkpoint's rows again, marked `resent`; every other row is a
    # new epoch, each once (a restart from scratch would train and report epochs 1, 2, ... again).
    epochs = [r["epoch"] for r in rows if not r.get("resent")]
    expected = list(range(1, KILLED_RUN_EPOCHS + 1))
    assert epochs == sorted(set(epochs)) == expected, f"epochs reported: {epochs} (a restart from scratch repeats them)"
    resent = [r["epoch"] for r in rows if r.get("resent")]
    assert resent and max(resent) < KILLED_RUN_EPOCHS, f"rows sent again after the restart: {resent}"
    client, runs = trial_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert epochs_logged(client, runs[0].info.run_id) == expected


def test_killed_driver_resumes_without_duplicate_runs(tmp_path, ray_tmpdir):
    # One trial at a time, killed once the first has finished: the second is then starting or
    # pending, and the resumed sweep must finish it in its run and not train the first again.
    grid = "sweep.grid={model.stages: [1, 2]}"
    env = sweep_env(ray_tmpdir)
    proc = subprocess.Popen(sweep_command(tmp_path, "--set", grid, "--set", "sweep.max_concurrent_trials=1"),
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        # Kill the driver (and the local cluster it started) once the first trial has finished.
        _wait_for(lambda: any(r.get("artifacts_dir") for r in _result_rows(tmp_path / "ray")), SWEEP_WAIT_S,
                  "the first trial to finish", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    kill_processes_mentioning(ray_tmpdir)  # the cluster the dead driver started

    resumed = run_sweep(tmp_path, ray_tmpdir, "--set", grid, "--set", "sweep.max_concurrent_trials=1", "--resume")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    client, runs = trial_runs(tmp_path)
    names = sorted(r.info.run_name for r in runs)
    assert names == ["T=1 rf=45px is=on seed=0", "T=2 rf=109px is=on seed=0"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert epochs_logged(client, run.info.run_id) == list(range(1, EPOCHS + 1))
    sweeps = client.search_runs([runs[0].info.experiment_id], filter_string="tags.`cpm.run_kind` = 'sweep'")
    assert len(sweeps) == 1


@on_shared_cluster
def test_random_search_with_asha_gives_each_sample_its_own_run(tmp_path, shared_ray):
    # Two samples of a searched learning rate and sigma (sigma changes the cache: workers build it).
    result = run_sweep(tmp_path, shared_ray, "--set", "sweep.search={train.lr: {loguniform: [1.0e-3, 5.0e-3]}, "
                                          "preprocess.sigma: {uniform: [0.8, 1.2]}}",
                       "--set", "sweep.num_samples=2", "--set", "sweep.scheduler=asha", "--set", "train.epochs=2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    client, runs = trial_runs(tmp_path)
    assert len(runs) == 2
    lrs = {float(r.data.params["train.lr"]) for r in runs}
    sigmas = {float(r.data.params["preprocess.sigma"]) for r in runs}
    assert len(lrs) == 2 and all(1e-3 <= lr <= 5e-3 for lr in lrs)
    assert all(0.8 <= s <= 1.2 for s in sigmas)
    for run in runs:
        assert f"lr={float(run.data.params['train.lr']):g}" in run.info.run_name
        assert run.info.status == "FINISHED" and epochs_logged(client, run.info.run_id)[0] == 1


@on_shared_cluster
def test_a_diverging_trial_fails_naming_its_step_and_the_sweep_goes_on(sweep_with_failures):
    tmp_path, returncode, output = sweep_with_failures
    assert returncode == 0, output[-3000:]  # some trials completed
    client, runs = trial_runs(tmp_path)
    by_name = {r.info.run_name: r for r in runs}
    failed, finished = by_name[DIVERGING_NAME], by_name["T=1 rf=45px is=on seed=0"]
    assert (failed.info.status, finished.info.status) == ("FAILED", "FINISHED"), sorted(
        (r.info.run_name, r.info.status) for r in runs)
    assert failed.data.params["train.lr"] == "1000000.0" and failed.data.params["train.optimizer"] == "sgd"
    error = failed.data.tags["cpm.error"]
    assert re.search(r"loss became (NaN|inf) at epoch 1, step \d+ ", error.splitlines()[0]), error[:500]
    # Stopped in its first epoch: no NaN epoch reached MLflow, and Ray Train did not retry it.
    assert epochs_logged(client, failed.info.run_id) == []
    assert epochs_logged(client, finished.info.run_id) == list(range(1, EPOCHS + 1))
    assert f"{DIVERGING_NAME}: FAILED" in output


RAY = str(Path(sys.executable).with_name("ray"))


def start_head(env: dict) -> tuple[str, str]:
    """A one-node cluster on free ports (any other cluster on this machine keeps its own); returns
    (GCS address, dashboard URL). Token authentication on, with the token in `env`."""
    def head() -> tuple[list[str], dict]:
        ports = {name: free_port() for name in (
            "port", "dashboard-port", "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")}
        return [RAY, "start", "--head", "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", *(f"--{name}={port}" for name, port in ports.items())], env

    command, _ = start_ray(head)
    return f"127.0.0.1:{option_of(command, '--port')}", f"http://127.0.0.1:{option_of(command, '--dashboard-port')}"


@pytest.mark.xdist_group("ray-start")  # a `ray start` head: see tests/test_multinode.py
# Alone: beside other sweeps under load the driver did not mark its runs KILLED within the 3 s
# between `ray job stop`'s SIGTERM and SIGKILL (seen twice under `pytest -n 2`).
@pytest.mark.alone
def test_ray_job_stop_marks_the_runs_killed_and_resume_finishes_them(tmp_path, ray_tmpdir):
    """`ray job stop` sends SIGTERM and SIGKILLs 3 s later: the driver marks the sweep's run and the
    running trials' runs KILLED in that time. `--resume` then finishes every trial in its run."""
    import secrets

    # Full epochs (15 steps, 1.2-1.4 s each here) and enough of them: from the first epoch in Tune's
    # result file to the stop, the faster trial trained 9 to 20 more epochs (the test's poll, the
    # `ray job stop` CLI, the job server, the driver's handler). At 2 steps an epoch took 0.4 s and
    # both trials had trained all 30 by then.
    epochs = 60
    env = dict(os.environ, RAY_TMPDIR=ray_tmpdir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PYTHONUNBUFFERED="1")
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    gcs, dashboard = start_head(env)
    args = sweep_command(tmp_path, "--set", "sweep.grid={model.stages: [1, 2]}", "--set", f"train.epochs={epochs}")
    job = [RAY, "job", "submit", "--address", dashboard, "--submission-id", "stop-me", "--no-wait", "--", *args]
    for _ in range(30):  # the head's job agent starts a few seconds after `ray start` returns
        submitted = subprocess.run(job, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        if "No available agent" not in submitted.stderr:
            break
        time.sleep(2)
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]
    storage = tmp_path / "ray"

    def job_logs() -> str:
        return subprocess.run([RAY, "job", "logs", "--address", dashboard, "stop-me"], env=env, capture_output=True,
                              text=True, timeout=60).stdout

    last_status_check = [time.monotonic()]

    def first_epoch_reported() -> bool:
        if any(r.get("epoch") == 1 and "train_loss" in r for r in _result_rows(storage)):
            return True
        if time.monotonic() - last_status_check[0] > 20:  # the CLI is slow: ask now and then
            last_status_check[0] = time.monotonic()
            status = subprocess.run([RAY, "job", "status", "--address", dashboard, "stop-me"], env=env,
                                    capture_output=True, text=True, timeout=60).stdout
            if "FAILED" in status or "SUCCEEDED" in status:
                pytest.fail(f"the job ended by itself:\n{status}\n{job_logs()[-3000:]}")
        return False

    _wait_for(first_epoch_reported, SWEEP_WAIT_S, "a trial's first epoch")
    stopped = subprocess.run([RAY, "job", "stop", "--address", dashboard, "stop-me"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    client, runs = trial_runs(tmp_path)
    sweeps = client.search_runs([runs[0].info.experiment_id], filter_string="tags.`cpm.run_kind` = 'sweep'")
    assert [s.info.status for s in sweeps] == ["KILLED"]
    assert sweeps[0].data.tags["cpm.error"] == "sweep stopped by SIGTERM"
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]
    # The driver says so too; its last lines reach the job's log a moment after it exits.
    message = "sweep stopped by SIGTERM: the sweep run and 2 open trial run(s) marked KILLED"
    _wait_for(lambda: message in job_logs(), 60, "the driver's stop message in the job's log")
    logged_before = {r.info.run_id: epochs_logged(client, r.info.run_id) for r in runs}
    assert any(logged_before.values()) and all(len(e) < epochs for e in logged_before.values())

    # The driver's own `python pipeline/sweep.py --resume`, joining the same cluster.
    resumed = subprocess.run(args + ["--resume"], cwd=tmp_path, env=dict(env, RAY_ADDRESS=gcs), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    client, runs = trial_runs(tmp_path)
    assert sorted(r.info.run_name for r in runs) == ["T=1 rf=45px is=on seed=0", "T=2 rf=109px is=on seed=0"]
    assert {r.info.run_id for r in runs} == set(logged_before)  # the same runs, none added
    for run in runs:
        assert run.info.status == "FINISHED" and "cpm.error" not in run.data.tags, run.data.tags
        for key in ("pck", "train_loss"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, epochs + 1)), f"{run.info.run_name} {key}: {steps}"
        assert len(client.get_metric_history(run.info.run_id, "test_pck")) == 1
    sweeps = client.search_runs([runs[0].info.experiment_id], filter_string="tags.`cpm.run_kind` = 'sweep'")
    assert [s.info.status for s in sweeps] == ["FINISHED"] and "cpm.error" not in sweeps[0].data.tags
