"""A sweep's identity on a real Ray cluster (the module's shared one) and SQLite store: a reused id, a resume with
another config or tracking store are refused before Ray starts; `--resume --retry-failed` runs a
failed trial again in its MLflow run once its cause is fixed.

The failing trial is real: its `train.init_weights` file does not exist on the first run (the
worker raises); the test writes a valid weights file before the retry, with the config unchanged.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient
from services import RayHead

from pipeline.distributed import identity as sweep_identity

# One worker runs the module under `pytest -n 2`, so the shared first sweep runs once.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("resume-identity")]

REPO = Path(__file__).resolve().parents[1]
SWEEP_ID = "retry-test"


def command(tmp: Path, *extra: str, uri: str | None = None) -> list[str]:
    weights = tmp / "weights" / "init.pt"
    return [sys.executable, str(REPO / "pipeline" / "sweep.py"), "--config", "synthetic_tiny",
            "--tracking-uri", uri or f"sqlite:///{tmp / 'mlflow.db'}", "--storage-path", str(tmp / "ray"),
            "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "data.spec=synthetic:300",
            "--set", "train.epochs=1", "--set", "sweep.max_failures=0", "--set", "sweep.max_concurrent_trials=1",
            "--set", "tracking.experiment=test-retry",
            "--set", f"sweep.grid={{train.init_weights: [null, '{weights}']}}", *extra]


def run(tmp: Path, cluster: RayHead, *extra: str, uri: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(tmp, *extra, uri=uri), cwd=tmp, env=cluster.env, capture_output=True, text=True,
                          timeout=500)


def trial_runs(tmp: Path) -> dict[str, object]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test-retry")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`cpm.run_kind` = 'trial'")
    return {("weights" if "init.pt" in r.info.run_name else "plain"): r for r in runs}


@pytest.fixture(scope="module")
def first_sweep(shared_ray):
    """One sweep of two trials; the one whose init weights are missing fails."""
    tmp = Path(tempfile.mkdtemp(prefix="cpm-retry-"))
    try:
        result = run(tmp, shared_ray, "--sweep-id", SWEEP_ID)
        yield tmp, shared_ray, result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_first_sweep_records_its_identity_and_one_trial_fails(first_sweep):
    tmp, _, result = first_sweep
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    runs = trial_runs(tmp)
    assert runs["plain"].info.status == "FINISHED"
    assert runs["weights"].info.status == "FAILED"
    assert "init weights file" in runs["weights"].data.tags["cpm.error"]
    assert (tmp / "ray" / SWEEP_ID / sweep_identity.IDENTITY_FILE).is_file()


def _assert_refused_before_ray(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert "Traceback" not in result.stderr and "Resources:" not in result.stdout  # Ray never started
    message = result.stderr.strip().splitlines()[-1]
    for text in expected:
        assert text in message, message


def test_a_reused_sweep_id_without_resume_is_refused(first_sweep):
    tmp, cluster, _ = first_sweep
    _assert_refused_before_ray(run(tmp, cluster, "--sweep-id", SWEEP_ID),
                               f"sweep id {SWEEP_ID} already exists under {tmp / 'ray'}", f"--resume {SWEEP_ID}")


def test_resume_with_another_config_is_refused_naming_the_keys(first_sweep):
    tmp, cluster, _ = first_sweep
    result = run(tmp, cluster, "--resume", SWEEP_ID, "--set", "train.epochs=3", "--set", "train.lr=0.002")
    _assert_refused_before_ray(result, "--resume: the config differs from the sweep's:",
                               "train.epochs 1 -> 3", "train.lr 0.001 -> 0.002", "start a new sweep")


def test_resume_with_another_tracking_store_is_refused(first_sweep):
    tmp, cluster, _ = first_sweep
    other = f"sqlite:///{tmp / 'other.db'}"
    result = run(tmp, cluster, "--resume", SWEEP_ID, uri=other)
    _assert_refused_before_ray(result, "tracking URI", f"-> {other}")
    assert not (tmp / "other.db").exists()


def test_retry_failed_reruns_the_failed_trial_in_its_run(first_sweep):
    import torch

    from cpm_model.config import load_config
    from pipeline.train.inference import build_model

    tmp, cluster, _ = first_sweep
    before = trial_runs(tmp)
    # Fix the cause: a weights file that fits the trial's model (synthetic figures: 14 LSP joints).
    config = load_config("synthetic_tiny")
    (tmp / "weights").mkdir()
    torch.save(build_model(config, num_parts=14).state_dict(), tmp / "weights" / "init.pt")

    result = run(tmp, cluster, "--resume", SWEEP_ID, "--retry-failed")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    after = trial_runs(tmp)
    assert len(after) == 2
    for kind in ("plain", "weights"):
        assert after[kind].info.run_id == before[kind].info.run_id  # the same runs, no new ones
        assert after[kind].info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    retried = client.get_run(after["weights"].info.run_id)
    assert [m.step for m in client.get_metric_history(retried.info.run_id, "pck")] == [1]
    assert "test_pck" in retried.data.metrics
    # The finished trial was not trained again.
    assert [m.step for m in client.get_metric_history(after["plain"].info.run_id, "pck")] == [1]


def test_new_sweep_ids_differ_within_a_second_and_a_directory_is_claimed_once(tmp_path):
    from cpm_model.config import load_config

    config = load_config("synthetic_tiny")
    ids = {sweep_identity.new_sweep_id(config) for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("synthetic_tiny-") for i in ids)
    identity = sweep_identity.identity_of(config, "sqlite:///x.db")
    sweep_identity.claim(tmp_path / "s", identity)
    with pytest.raises(sweep_identity.IdentityError, match="already exists"):
        sweep_identity.claim(tmp_path / "s", identity)
