"""Configurations kept apart in the report, and the paper's claims with their verdicts computed.

Runs carry the params a real trial logs (`trial_params` of the trial specs a sweep expands), so
that every setting a sweep can vary is seen by the grouping, not only the ablation axes.
"""

from __future__ import annotations

import csv
import math

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from cpm_model.config import load_config
from pipeline import report
from pipeline.distributed.space import expand_grid, make_trial
from pipeline.reporting import claims as claims_module
from pipeline.reporting.runs import group_by_config
from pipeline.reporting.tables import build_report
from pipeline.tracking.run_ops import trial_params
from pipeline.train import metric_names as names



def _run(spec, val: float, test: float | None = None, status: str = "FINISHED") -> dict:
    params = {k: str(v) for k, v in trial_params(spec, {}).items()}
    metrics = {"pck": val / 2, "best_pck": val, **({"test_pck": test} if test is not None else {})}
    return {"run_id": f"{spec.key}-{params['seed']}", "name": spec.run_name, "status": status, "params": params,
            "metrics": metrics, "error": ""}


def _specs(preset: str, *overrides: str):
    return expand_grid(load_config(preset, list(overrides)))


def test_a_learning_rate_grid_with_one_seed_gives_one_row_per_rate():
    # RF of synthetic_tiny at T=3: stage 1 sees 45 px, each later stage adds 2 x (5 - 1) x 8 = 64 px.
    specs = _specs("synthetic_tiny", "sweep.grid={train.lr: [0.001, 0.004]}")
    groups = group_by_config([_run(spec, 0.3 + i / 10) for i, spec in enumerate(specs)])
    assert [len(g.runs) for g in groups] == [1, 1]
    assert [g.varying for g in groups] == [{"learning_rate": "0.001"}, {"learning_rate": "0.004"}]
    assert [g.label() for g in groups] == ["T=3 rf=173px is=on learning_rate=0.001",
                                           "T=3 rf=173px is=on learning_rate=0.004"]
    assert [g.val().mean for g in groups] == [pytest.approx(0.3), pytest.approx(0.4)]
    assert all(g.val().n == 1 and g.val().std == 0.0 for g in groups)


def test_a_sampled_search_gives_one_row_per_sample():
    (spec,) = _specs("search_lr_sigma")
    samples = [(3e-4 * 1.5 ** i, 0.6 + 0.1 * i) for i in range(8)]
    runs = [_run(make_trial(spec.config, {"train.lr": lr, "preprocess.sigma": sigma}), 0.2)
            for lr, sigma in samples]
    groups = group_by_config(runs)
    assert len(groups) == 8 and all(len(g.runs) == 1 for g in groups)
    assert {tuple(g.varying) for g in groups} == {("learning_rate", "preprocess.sigma")}


def test_two_seeds_of_one_configuration_give_one_row_of_two_seeds():
    specs = _specs("synthetic_tiny", "sweep.grid={train.seed: [0, 1]}", "data.cache_dir=/elsewhere")
    runs = [_run(spec, val) for spec, val in zip(specs, (0.30, 0.40))]
    runs[1]["params"]["sweep.storage_path"] = "/another/disk"  # placement never splits a configuration
    (group,) = group_by_config(runs)
    assert group.varying == {}
    stat = group.val()
    assert (stat.n, stat.mean, stat.std) == (2, pytest.approx(0.35), pytest.approx(math.sqrt(0.005)))


def test_the_report_shows_a_varying_setting_as_a_column(tmp_path):
    specs = _specs("synthetic_tiny", "sweep.grid={train.lr: [0.001, 0.004], model.stages: [1, 3]}")
    built = build_report([_run(spec, 0.1 * (i + 1), 0.1 * i) for i, spec in enumerate(specs)], tmp_path)
    stages = next(t for t in built.tables if t.name == "ablation_stages")
    assert "learning_rate" in stages.columns and "train.lr" not in stages.columns
    lr_of = {(row[0], row[stages.columns.index("learning_rate")]) for row in stages.rows if row[-1].startswith("ours")}
    assert lr_of == {(1, "0.001"), (1, "0.004"), (3, "0.001"), (3, "0.004")}


# --- claims ----------------------------------------------------------------------------------------

DEFAULT_SCORES = {  # variant index of the default preset -> (val, test) per seed 0, 1
    0: ((0.10, 0.12), (0.09, 0.11)),  # T=1 k=5
    1: ((0.40, 0.50), (0.41, 0.49)),  # T=2 k=5
    2: ((0.45, 0.47), (0.44, 0.47)),  # T=3 k=5 (RF 143)
    3: ((0.10, 0.20), (0.10, 0.20)),  # T=3 k=1 (RF 15)
    4: ((0.30, 0.31), (0.30, 0.31)),  # T=3 k=3 (RF 79)
}


def _default_runs() -> list[dict]:
    """The default job's 10 trials (5 variants x seeds 0, 1) with the scores above."""
    runs = []
    for spec in _specs("default"):
        variant = spec.config.sweep.variants.index({k: v for k, v in spec.overrides.items() if k != "train.seed"})
        seed = spec.config.train.seed
        val, test = DEFAULT_SCORES[variant][0][seed], DEFAULT_SCORES[variant][1][seed]
        runs.append(_run(spec, val, test))
    return runs


def _by_pair(found):
    return {(c.claim.name, c.worse.label(), c.better.label()): c for c in found}


def test_the_default_jobs_claims_and_their_verdicts_by_hand():
    groups = group_by_config(_default_runs())
    found = _by_pair(claims_module.comparisons(groups, names.PCK))
    assert set(found) == {
        ("stages", "T=1 rf=15px is=on", "T=2 rf=79px is=on"),
        ("stages", "T=2 rf=79px is=on", "T=3 rf=143px is=on"),
        ("receptive_field", "T=3 rf=15px is=on", "T=3 rf=79px is=on"),
        ("receptive_field", "T=3 rf=79px is=on", "T=3 rf=143px is=on"),
    }
    one_to_two = found["stages", "T=1 rf=15px is=on", "T=2 rf=79px is=on"]
    assert one_to_two.split == "test"  # every run has a test score
    # test: T=1 (0.09, 0.11), T=2 (0.41, 0.49): difference 0.45 - 0.10 = 0.35, pooled std
    # sqrt((0.0002 + 0.0032) / 2) = 0.0412, seeds +0.32 and +0.38.
    assert one_to_two.difference("test") == pytest.approx(0.35)
    assert one_to_two.difference("val") == pytest.approx(0.45 - 0.11)
    assert one_to_two.pooled_std() == pytest.approx(math.sqrt(0.0017))
    assert one_to_two.per_seed() == {"0": pytest.approx(0.32), "1": pytest.approx(0.38)}
    assert one_to_two.verdict() == claims_module.REPRODUCED
    # T=2 -> 3: test 0.45 vs 0.455: +0.005 < 2 x pooled std, and seed 0 goes the wrong way.
    two_to_three = found["stages", "T=2 rf=79px is=on", "T=3 rf=143px is=on"]
    assert two_to_three.difference("test") == pytest.approx(0.005)
    assert two_to_three.per_seed()["0"] == pytest.approx(0.03) and two_to_three.per_seed()["1"] < 0
    assert two_to_three.verdict() == claims_module.NOT_REPRODUCED
    # RF 15 -> 79: +0.155 with both seeds up, but the spread (0.0707 at RF 15) makes 2 sigma 0.1; reproduced.
    rf = found["receptive_field", "T=3 rf=15px is=on", "T=3 rf=79px is=on"]
    assert rf.pooled_std() == pytest.approx(math.sqrt((0.005 + 0.00005) / 2))
    assert rf.verdict() == claims_module.REPRODUCED


def test_a_difference_within_twice_the_spread_is_not_reproduced():
    specs = _specs("synthetic_tiny", "sweep.grid={train.seed: [0, 1], model.stages: [1, 2]}")
    scores = {(1, 0): 0.30, (1, 1): 0.40, (2, 0): 0.36, (2, 1): 0.46}  # +0.06 each seed, std 0.0707
    runs = [_run(s, scores[s.config.model.stages, s.config.train.seed]) for s in specs]
    (comparison,) = claims_module.comparisons(group_by_config(runs), names.PCK)
    assert comparison.split == "val"  # no run has a test score
    assert all(d == pytest.approx(0.06) for d in comparison.per_seed().values())
    assert comparison.difference("val") == pytest.approx(0.06)
    assert comparison.pooled_std() == pytest.approx(math.sqrt(0.005))  # 2 sigma = 0.141 > 0.06
    assert comparison.verdict() == claims_module.NOT_REPRODUCED


def test_intermediate_supervision_with_one_seed_is_inconclusive(tmp_path):
    specs = _specs("synthetic_tiny", "sweep.grid={train.intermediate_supervision: [true, false]}")
    runs = [_run(s, 0.5 if s.config.train.intermediate_supervision else 0.2, 0.4) for s in specs]
    built = build_report(runs, tmp_path)
    (comparison,) = claims_module.comparisons(group_by_config(runs), names.PCK)
    assert comparison.claim is claims_module.SUPERVISION and comparison.better.supervised
    assert comparison.verdict() == claims_module.INCONCLUSIVE
    assert "| intermediate_supervision | T=3 rf=173px is=on | T=3 rf=173px is=off | 1 / 1 | +30.0 | +0.0 |" \
        in built.claims
    with (tmp_path / "claims.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["verdict"] == "inconclusive" and float(row["val_difference"]) == pytest.approx(0.3)
    assert (row["seeds_better"], row["seeds_worse"], row["shared_seeds"]) == ("1", "1", "1")


def test_stagewise_schemes_are_compared_with_joint_training():
    specs = expand_grid(load_config("ablation_training_scheme", ["data.spec=synthetic:400"]))
    runs = [_run(s, 0.4) for s in specs]
    found = claims_module.comparisons(group_by_config(runs), names.PCK)
    scheme = sorted((c.worse.scheme, c.worse.config["train.finetune_epochs"]) for c in found
                    if c.claim is claims_module.SCHEME)
    assert scheme == [("stagewise", "0"), ("stagewise_finetune", "12")]
    assert [c.claim for c in found if c.claim is not claims_module.SCHEME] == [claims_module.SUPERVISION]


def test_one_configuration_says_no_claim_can_be_tested(tmp_path):
    specs = _specs("synthetic_tiny", "sweep.grid={train.seed: [0, 1]}")
    built = build_report([_run(s, 0.3, 0.3) for s in specs], tmp_path)
    text = (tmp_path / "claims.md").read_text()
    assert "No claim can be tested: the sweep has 1 configuration(s)" in text and "|" not in text
    assert built.claims == text
    assert (tmp_path / "claims.csv").read_text().splitlines() == [",".join(claims_module.CSV_COLUMNS)]


def test_the_report_command_writes_the_claims(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("claims", artifact_location=(tmp_path / "artifacts").as_uri())
    for run in _default_runs():
        created = client.create_run(experiment_id, run_name=run["name"], tags={"cpm.run_kind": "trial"})
        client.log_batch(created.info.run_id,  # one write a run: the store's commits are the test's cost
                         params=[Param(key, str(value)) for key, value in run["params"].items()],
                         metrics=[Metric(key, value, 0, 0) for key, value in run["metrics"].items()])
        client.set_terminated(created.info.run_id)
    out = tmp_path / "report"
    assert report.main(["--experiment", "claims", "--tracking-uri", uri, "--out", str(out)]) == 0
    with (out / "claims.csv").open() as handle:
        verdicts = [(r["claim"], r["expected_better"], r["verdict"]) for r in csv.DictReader(handle)]
    assert ("stages", "T=2 rf=79px is=on", "reproduced") in verdicts and len(verdicts) == 4
    assert "**The paper's claims that this sweep tests**" in capsys.readouterr().out
