"""`pipeline.fit --tracking-uri`: one fit logged to MLflow like a sweep's trial (params, epoch rows
with the hardware figures, the test row, artifacts, the pose model), continued by --resume."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from pipeline import fit
from pipeline.tracking import store
from pipeline.train import system_metrics
from test_training import TINY, cache_dir  # noqa: F401 - the session's tiny caches

pytestmark = pytest.mark.integration


def _fit(tmp_path, cache_dir, uri: str, *extra: str) -> int:
    args = ["--out", str(tmp_path / "out"), "--quiet", "--no-figures", "--tracking-uri", uri,
            "--set", "tracking.experiment=fit-tracking", *extra]
    for override in TINY + [f"data.cache_dir={cache_dir}"]:
        args += ["--set", override]
    return fit.main(args)


def test_a_tracked_fit_is_a_run_the_report_can_place_and_resume_continues_it(tmp_path, cache_dir, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert _fit(tmp_path, cache_dir, uri, "--set", "train.epochs=1") == 0
    assert _fit(tmp_path, cache_dir, uri, "--set", "train.epochs=2", "--resume") == 0
    assert "MLflow run " in capsys.readouterr().out

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fit-tracking")
    (run,) = client.search_runs([experiment.experiment_id])  # --resume wrote the same run
    assert run.info.status == "FINISHED" and run.data.tags[store.KIND_TAG] == "trial"
    params = run.data.params
    # TINY: stage 1 sees 45 px (3x3 kernels); its one later 3x3 convolution at stride 8 adds (3 - 1) x 8 = 16 px.
    assert (params["stages"], params["receptive_field_px"], params["train.epochs"]) == ("2", "61", "2")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert run.data.metrics["test_pck"] == pytest.approx(summary["test_pck"])
    assert run.data.metrics["best_pck"] == pytest.approx(summary["best_val_pck"])
    cpu = client.get_metric_history(run.info.run_id, system_metrics.CPU_PERCENT)
    rss = client.get_metric_history(run.info.run_id, system_metrics.PEAK_RSS_MB)
    assert [m.step for m in cpu] == [1, 2] and all(m.value > 0 for m in cpu)
    assert all(100 < m.value < 20_000 for m in rss)  # a PyTorch process: hundreds of MB
    assert {"summary.json", "metrics.jsonl"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    (model,) = [m for m in client.search_logged_models([experiment.experiment_id])
                if m.source_run_id == run.info.run_id]
    assert model.status.name == "READY"

    # A fresh fit into the same directory is a new run.
    assert _fit(tmp_path, cache_dir, uri, "--set", "train.epochs=1") == 0
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_a_tracked_fit_refuses_a_store_that_does_not_answer(tmp_path, cache_dir, capsys):
    assert _fit(tmp_path, cache_dir, "http://127.0.0.1:9") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "MLflow tracking server http://127.0.0.1:9 cannot be reached" in error[0]
