"""pipeline.report on a made-up MLflow store: the numbers in the tables, the files, bad input."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from pipeline import report
from pipeline.reporting import tables

JOINTS = ("head", "left_ankle")
# (stages, rf px, int. sup., scheme, seed) -> best val pck; test pck = val - 0.05
TRIALS = {
    (1, 15, True, "joint", 0): 0.10, (1, 15, True, "joint", 1): 0.14,
    (2, 79, True, "joint", 0): 0.40, (2, 79, True, "joint", 1): 0.50,
    (3, 79, True, "joint", 0): 0.45, (3, 79, True, "joint", 1): 0.47,
    (3, 143, True, "joint", 0): 0.60, (3, 143, True, "joint", 1): 0.64,
    (3, 143, False, "joint", 0): 0.30, (3, 143, False, "joint", 1): 0.36,
    (3, 143, True, "stagewise", 0): 0.55,
}
EXPERIMENT = "ablation-test"


def _params(stages, rf, sup, scheme, seed) -> dict:
    return {"stages": stages, "receptive_field_px": rf, "receptive_field_rel_person": round(rf / 49, 2),
            "intermediate_supervision": sup, "training_scheme": scheme, "kernel_size": 5, "width": 0.25,
            "input_size": 64, "dataset": "synthetic:300", "seed": seed, "train.epochs": 2}


def _log_trial(client, experiment_id, parent_id, key, pck, status="FINISHED", drop_param=None, error=None):
    stages, rf, sup, scheme, seed = key
    name = f"T={stages} rf={rf}px is={'on' if sup else 'off'} seed={seed}"
    run = client.create_run(experiment_id, run_name=name,
                            tags={"cpm.run_kind": "trial", "mlflow.parentRunId": parent_id})
    params = [Param(k, str(v)) for k, v in _params(*key).items() if k != drop_param]
    metrics = []
    for epoch, scale in ((1, 0.5), (2, 1.0)):  # epoch 2 is the best one
        metrics.append(Metric("pck", pck * scale, 0, epoch))
        metrics += [Metric(f"pck_stage{t}", pck * scale * t / stages, 0, epoch) for t in range(1, stages + 1)]
        metrics += [Metric(f"pck_{joint}", pck * scale + 0.1 * j, 0, epoch) for j, joint in enumerate(JOINTS)]
        metrics.append(Metric("pck_0.1", pck * scale / 2, 0, epoch))
    if status == "FINISHED":
        best = {"best_pck": pck, **{f"best_pck_stage{t}": pck * t / stages for t in range(1, stages + 1)},
                **{f"best_pck_{joint}": pck + 0.1 * j for j, joint in enumerate(JOINTS)},
                "test_pck": pck - 0.05, "test_auc": pck / 2}
        best.update({f"test_pck_curve_a{a:.2f}": min(1.0, pck * a / 0.2) for a in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)})
        metrics += [Metric(k, v, 0, 2) for k, v in best.items()]
    client.log_batch(run.info.run_id, params=params, metrics=metrics)  # one write a run: commits are the cost
    if error:
        client.set_tag(run.info.run_id, "cpm.error", error)
    client.set_terminated(run.info.run_id, status=status)
    return name


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="sweep s1", tags={"cpm.run_kind": "sweep", "cpm.sweep_id": "s1"})
    parent_id = parent.info.run_id
    for key, pck in TRIALS.items():
        _log_trial(client, experiment_id, parent_id, key, pck)
    failed = _log_trial(client, experiment_id, parent_id, (2, 79, True, "joint", 2), 0.9, status="FAILED",
                        error="ValueError: the batch is larger than the split\n\ntraceback")
    missing = _log_trial(client, experiment_id, parent_id, (2, 79, True, "joint", 3), 0.9,
                         drop_param="receptive_field_px")
    client.set_terminated(parent_id)
    return {"uri": uri, "client": client, "failed": failed, "missing": missing, "tmp": tmp_path}


def _row(table, **where):
    matches = [r for r in table.rows if all(r[table.columns.index(k)] == v for k, v in where.items())]
    assert len(matches) == 1, (where, table.rows)
    return matches[0]


def test_tables_hold_mean_and_std_over_seeds(store):
    runs = tables.load_runs(store["client"], EXPERIMENT)
    built = tables.build_report(runs, store["tmp"] / "out")
    stages = next(t for t in built.tables if t.name == "ablation_stages")
    row = _row(stages, stages=3, **{"RF (px)": 143})
    val = row[stages.columns.index("val PCK@0.2")]
    assert val.n == 2
    assert val.mean == pytest.approx(0.62) and val.std == pytest.approx(statistics.stdev([0.60, 0.64]))
    assert row[stages.columns.index("test PCK@0.2")].mean == pytest.approx(0.57)
    assert row[stages.columns.index("val left_ankle")].mean == pytest.approx(0.72)
    two = _row(stages, stages=2, **{"RF (px)": 79})[stages.columns.index("val PCK@0.2")]
    assert two.n == 2 and two.mean == pytest.approx(0.45) and two.std == pytest.approx(math.sqrt(0.005))
    # Without intermediate supervision and stage-wise runs are not in the stage ablation.
    assert len([r for r in stages.rows if r[0] == 3 and r[1] == 143]) == 1

    supervision = next(t for t in built.tables if t.name == "ablation_supervision")
    off = _row(supervision, stages=3, **{"int. sup.": "off"})
    assert off[supervision.columns.index("val PCK@0.2")].mean == pytest.approx(0.33)
    assert _row(supervision, scheme="stage-wise")[supervision.columns.index("seeds")] == 1

    per_stage = next(t for t in built.tables if t.name == "stage_pck")
    assert [r[0] for r in per_stage.rows] == [1, 2, 3]
    column = per_stage.columns.index("T=3 rf=143px is=on")
    assert per_stage.rows[0][column].mean == pytest.approx(0.62 / 3)

    rf = next(t for t in built.tables if t.name == "ablation_receptive_field")
    assert [r[0] for r in rf.rows] == sorted(r[0] for r in rf.rows)


def test_files_parse_and_name_the_papers_protocol(store):
    out = store["tmp"] / "out"
    assert report.main(["--experiment", EXPERIMENT, "--tracking-uri", store["uri"], "--out", str(out)]) == 0
    for name in ("ablation_stages", "ablation_receptive_field", "ablation_supervision", "stage_pck"):
        for suffix in (".md", ".csv", ".tex", ".png"):
            assert (out / f"{name}{suffix}").stat().st_size > 0, name + suffix
    assert (out / "pck_curves.png").stat().st_size > 10_000  # a drawn figure, not an empty canvas

    with (out / "ablation_stages.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    ours = [r for r in rows if r["stages"] == "3" and r["RF (px)"] == "143"][0]
    assert float(ours["val PCK@0.2 mean"]) == pytest.approx(0.62)
    assert float(ours["val PCK@0.2 std"]) == pytest.approx(statistics.stdev([0.60, 0.64]))
    paper = [r for r in rows if r["source / protocol"].startswith("paper: LSP")][0]
    assert float(paper["test PCK@0.2 mean"]) == pytest.approx(0.8432)

    tex = (out / "ablation_stages.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    spec = tex.split(r"\begin{tabular}{")[1].split("}")[0]
    body = tex.split(r"\hline")[2].strip().splitlines()
    assert all(line.count("&") == len(spec) - 1 and line.endswith(r"\\") for line in body)
    assert "62.0 $\\pm$ 2.8" in tex

    markdown = (out / "ablation_stages.md").read_text()
    assert "84.32" in markdown and "LSP test PCK@0.2, person-centric, 6 stages, trained on LSP+LSPET" in markdown
    assert "87.95" in markdown
    assert "MPII test-server PCKh@0.5" in markdown
    # Failed runs and runs missing a param are listed with why, in every table.
    for name in ("ablation_stages", "ablation_supervision", "stage_pck"):
        text = (out / f"{name}.md").read_text()
        assert f"{store['failed']}: FAILED: ValueError: the batch is larger than the split" in text
        assert f"{store['missing']}: missing param(s) receptive_field_px" in text


def test_unknown_experiment_lists_the_existing_ones(store, capsys):
    assert report.main(["--experiment", "nope", "--tracking-uri", store["uri"], "--out", str(store["tmp"] / "o")]) == 1
    err = capsys.readouterr().err
    assert "no experiment named 'nope'" in err and EXPERIMENT in err


def test_no_finished_runs_says_so_and_shows_what_there_is(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("broken", artifact_location=(tmp_path / "a").as_uri())
    name = _log_trial(client, experiment_id, "", (2, 79, True, "joint", 0), 0.3, status="FAILED", error="OOM")
    assert report.main(["--experiment", "broken", "--tracking-uri", uri, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "no finished trial run" in err and name in err and "FAILED: OOM" in err

    client.create_experiment("empty", artifact_location=(tmp_path / "b").as_uri())
    assert report.main(["--experiment", "empty", "--tracking-uri", uri, "--out", str(tmp_path / "o")]) == 1
    assert "has no trial runs" in capsys.readouterr().err
