"""The real thing on small inputs: `python pipeline/sweep.py` on a local Ray cluster, tracked in a
SQLite MLflow store, with a trial that fails, a training worker killed mid-trial, and a driver
killed then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_processes_mentioning
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
KILLED_RUN_EPOCHS = 8


def sweep_command(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / "sweep.py"), "--config", str(REPO / "configs" / "synthetic_tiny.yaml"),
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--storage-path", str(tmp / "ray"),
            "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "data.spec=synthetic:300",
            "--set", f"train.epochs={EPOCHS}", "--set", "tracking.experiment=test-sweep", *extra]


def sweep_env(ray_tmpdir: str) -> dict:
    env = dict(os.environ)
    # Each test's driver starts its own local cluster, in its own temp dir, even when a cluster
    # (`ray start --head`, e.g. from `make sweep`) is running on this machine: "auto" would join it.
    env["RAY_ADDRESS"] = "local"
    env["RAY_TMPDIR"] = ray_tmpdir
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_sweep(tmp: Path, ray_tmpdir: str, *extra: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(tmp, *extra), cwd=tmp, env=sweep_env(ray_tmpdir), capture_output=True,
                          text=True, timeout=timeout)


def trial_runs(tmp: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test-sweep")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`cpm.run_kind` = 'trial'")
    return client, runs


def epochs_logged(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "pck"))


def test_sweep_tracks_every_trial_and_survives_a_failing_one(tmp_path, ray_tmpdir):
    # The third trial cannot fit: its batch is larger than the training split.
    result = run_sweep(tmp_path, ray_tmpdir, "--set", "sweep.variants=[{model.stages: 1}, {model.stages: 3}, "
                                          "{model.stages: 2, train.batch_size: 100000}]")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]

    client, runs = trial_runs(tmp_path)
    by_name = {r.info.run_name: r for r in runs}
    failed_name = "T=2 rf=109px is=on batch_size=100000 seed=0"
    assert sorted(by_name) == ["T=1 rf=45px is=on seed=0", failed_name, "T=3 rf=173px is=on seed=0"]
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
        assert 0.0 <= run.data.metrics["best_pck"] <= 1.0 and "test_pck" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "best_model.pt", "belief_maps_per_stage.png"} <= artifacts
        assert run.data.tags["mlflow.source.git.commit"]

    # `pipeline.evaluate --run-id` scores the run's best checkpoint: on val it reproduces best_pck.
    best = by_name["T=3 rf=173px is=on seed=0"]
    scores = tmp_path / "scores.json"
    evaluation = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--run-id", best.info.run_id,
                                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--split", "val",
                                 "--quiet", "--json", str(scores)], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    assert json.loads(scores.read_text())["pck"] == pytest.approx(best.data.metrics["best_pck"], abs=1e-9)

    failed = by_name[failed_name]
    assert failed.info.status == "FAILED"
    assert "fewer than one batch" in failed.data.tags["cpm.error"]
    # The table lists the finished configurations and names the failed one.
    assert "| 3 | 173 |" in output and f"{failed_name}: FAILED" in output


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
    pytest.fail(f"timed out waiting for {what}")


def test_killed_worker_resumes_from_its_checkpoint_in_the_same_run(tmp_path, ray_tmpdir):
    # Enough epochs that the trial is still training when the test sees epoch 1 in Tune's result
    # file (written a moment after the report): seven more of about a second each.
    proc = subprocess.Popen(sweep_command(tmp_path, "--set", f"train.epochs={KILLED_RUN_EPOCHS}"),
                            cwd=tmp_path, env=sweep_env(ray_tmpdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for(lambda: any(r.get("epoch") == 1 and "train_loss" in r for r in _result_rows(tmp_path / "ray")),
                  240, "epoch 1", proc)
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

    epochs = [r["epoch"] for r in _result_rows(tmp_path / "ray") if "train_loss" in r]
    expected = list(range(1, KILLED_RUN_EPOCHS + 1))
    assert epochs == sorted(set(epochs)) == expected, f"epochs reported: {epochs} (a restart from scratch repeats them)"
    client, runs = trial_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert epochs_logged(client, runs[0].info.run_id) == expected


def test_killed_driver_resumes_without_duplicate_runs(tmp_path, ray_tmpdir):
    grid = "sweep.grid={model.stages: [1, 2, 3]}"
    env = sweep_env(ray_tmpdir)
    proc = subprocess.Popen(sweep_command(tmp_path, "--set", grid, "--set", "sweep.max_concurrent_trials=1"),
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        # Kill the driver (and the local cluster it started) once the first trial has finished.
        _wait_for(lambda: any(r.get("artifacts_dir") for r in _result_rows(tmp_path / "ray")), 300,
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
    assert names == ["T=1 rf=45px is=on seed=0", "T=2 rf=109px is=on seed=0", "T=3 rf=173px is=on seed=0"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert epochs_logged(client, run.info.run_id) == list(range(1, EPOCHS + 1))
    sweeps = client.search_runs([runs[0].info.experiment_id], filter_string="tags.`cpm.run_kind` = 'sweep'")
    assert len(sweeps) == 1


def test_random_search_with_asha_gives_each_sample_its_own_run(tmp_path, ray_tmpdir):
    # Two samples of a searched learning rate and sigma (sigma changes the cache: workers build it).
    result = run_sweep(tmp_path, ray_tmpdir, "--set", "sweep.search={train.lr: {loguniform: [1.0e-3, 5.0e-3]}, "
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
