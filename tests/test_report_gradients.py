"""gradients.png in the report: drawn from the runs' gradients.json artifacts (read through
MlflowClient), intermediate supervision on beside off; a store without them says why in report.md."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient

from cpm_model.model import CPM
from pipeline import report
from pipeline.reporting.gradients import choose_panels, fetch_gradients, mean_over_runs
from pipeline.train.gradients import HISTOGRAM_BINS, conv_layers, gradients_record

EXPERIMENT = "gradients-test"


def record(stages: int, supervised: bool, scale: float) -> dict:
    """A gradients.json for a tiny CPM: every layer's norm `scale` x 2^epoch, except stage 1's
    layers without intermediate supervision (1e-6 x that); all of |grad| in one bin."""
    model = CPM(num_parts=4, stages=stages, width=0.125, stage1_kernel=3, later_kernel=3, later_convs=1,
                input_size=32, center_sigma=8)
    layers = conv_layers(model)
    epochs = []
    for epoch in (1, 2):
        norms = [scale * 2 ** epoch * (1.0 if supervised or layer["stage"] > 1 else 1e-6) for layer in layers]
        histogram = [[1.0 if b == (20 if supervised else 8) else 0.0 for b in range(HISTOGRAM_BINS)] for _ in layers]
        epochs.append({"epoch": epoch, "sampled_steps": [1, 2], "stage_grad_norm": [1.0] * stages,
                       "layer_grad_norm": norms, "layer_histogram": histogram})
    return gradients_record(model, epochs)


def log_run(client, experiment_id, tmp_path, stages, supervised, seed, scale=None):
    name = f"T={stages} is={'on' if supervised else 'off'} seed={seed}"
    run_id = client.create_run(experiment_id, run_name=name, tags={"cpm.run_kind": "trial"}).info.run_id
    params = {"stages": stages, "receptive_field_px": 20 * stages, "intermediate_supervision": supervised,
              "training_scheme": "joint", "receptive_field_rel_person": 0.5, "kernel_size": 3, "width": 0.125,
              "input_size": 32, "dataset": "synthetic:100", "metric": "pck", "seed": seed, "train.seed": seed,
              "train.intermediate_supervision": supervised}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for epoch in (1, 2):
        client.log_metric(run_id, "pck", 0.1 * epoch, step=epoch)
        client.log_metric(run_id, "grad_norm_stage1", (1.0 if supervised else 1e-6) * (seed + 1), step=epoch)
    client.log_metric(run_id, "best_pck", 0.2, step=2)
    if scale is not None:
        path = tmp_path / name.replace(" ", "_") / "gradients.json"
        path.parent.mkdir()
        path.write_text(json.dumps(record(stages, supervised, scale)))
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, experiment_id


def test_report_draws_gradients_on_beside_off_for_the_deepest_pair(store, tmp_path):
    uri, client, experiment_id = store
    log_run(client, experiment_id, tmp_path, 2, True, 0, scale=1.0)
    log_run(client, experiment_id, tmp_path, 2, False, 0, scale=1.0)
    on = [log_run(client, experiment_id, tmp_path, 3, True, seed, scale=scale) for seed, scale in ((0, 1.0), (1, 3.0))]
    log_run(client, experiment_id, tmp_path, 3, False, 0, scale=1.0)
    log_run(client, experiment_id, tmp_path, 1, True, 0)  # an older run without gradients.json
    out = tmp_path / "out"
    assert report.main(["--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(out)]) == 0
    assert (out / "gradients.png").stat().st_size > 20_000  # two panels drawn, not an empty canvas
    (line,) = [x for x in (out / "report.md").read_text().splitlines() if x.startswith("gradients.png: ")]
    assert line == ("gradients.png: gradient magnitude by layer depth across epochs (T=3, RF 60 px, intermediate "
                    "supervision on (2 seeds): stage 1 grad norm 1.5 at the last epoch; T=3, RF 60 px, intermediate "
                    "supervision off (1 seed): stage 1 grad norm 1e-06 at the last epoch).")

    runs = [{"run_id": r.info.run_id, "params": dict(r.data.params), "metrics": dict(r.data.metrics),
             "gradients": fetch_gradients(client, r.info.run_id)} for r in client.search_runs([experiment_id])]
    panels = choose_panels(runs)
    assert [sorted(r["run_id"] for r in panel) for panel in panels][0] == sorted(on)
    assert {r["params"]["intermediate_supervision"] for r in panels[1]} == {"False"}
    _, epochs = mean_over_runs(panels[0])  # seeds at 1x and 3x: mean 2x, times 2^epoch
    assert [e["epoch"] for e in epochs] == [1, 2]
    np.testing.assert_allclose(epochs[1]["layer_grad_norm"], 8.0)


def test_a_report_without_gradients_says_why(store, tmp_path):
    uri, client, experiment_id = store
    log_run(client, experiment_id, tmp_path, 2, True, 0)
    out = tmp_path / "out"
    assert report.main(["--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(out)]) == 0
    assert not (out / "gradients.png").exists()
    why = "No gradients.png: no finished trial run carries gradients.json (runs trained before gradients were sampled)."
    assert why in (out / "report.md").read_text().splitlines()
