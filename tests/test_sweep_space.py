"""Trial expansion, identity and run names; resource planning; config overrides."""

import pytest

from cpm_model.config import ConfigError, load_config
from pipeline.resources import plan_resources
from pipeline.sweep_space import expand_grid, format_trial_table, make_trial, trial_key


def paper_config(**grid):
    config = load_config(None, ["preprocess.input_size=368"])
    return config.with_overrides({"sweep.grid": grid})


def test_grid_is_cartesian_with_paper_receptive_fields():
    trials = expand_grid(paper_config(**{"model.stages": [1, 2, 3], "train.seed": [0, 1]}))
    assert len(trials) == 6
    rf = {(t.config.model.stages, t.config.train.seed): t.receptive_field_px for t in trials}
    assert rf[(1, 0)] == 167 and rf[(2, 1)] == 407 and rf[(3, 0)] == 647
    # Relative to the nominal person size in the crop: 368 / 1.3 px.
    t3 = next(t for t in trials if t.config.model.stages == 3)
    assert t3.relative_receptive_field == pytest.approx(647 / (368 / 1.3), abs=1e-3)


def test_run_name_says_the_configuration():
    trial = make_trial(paper_config(), {"model.stages": 3, "train.seed": 0})
    assert trial.run_name == "T=3 rf=647px is=on seed=0"
    off = make_trial(paper_config(), {"model.stages": 2, "train.intermediate_supervision": False,
                                      "model.later_kernel": 7})
    # Stage 2 sees stage 1's beliefs (167 px) through three 7x7 convs at stride 8: 167 + 3 * 6 * 8.
    assert off.run_name == "T=2 rf=311px is=off k=7 seed=0"


def test_trial_key_is_stable_and_order_free():
    assert trial_key({"a.b": 1, "c.d": [1, 2]}) == trial_key({"c.d": [1, 2], "a.b": 1})
    assert trial_key({"a.b": 1}) != trial_key({"a.b": 2})


def test_empty_grid_is_one_trial_and_table_lists_it():
    trials = expand_grid(paper_config())
    assert len(trials) == 1 and trials[0].overrides == {}
    table = format_trial_table(trials)
    # The paper's 6-stage net: 167 + 5 x 240 px.
    assert "T=6 rf=1367px is=on seed=0" in table and "1367" in table.splitlines()[-1]


def test_bad_grid_key_is_named():
    with pytest.raises(ConfigError, match="model.stagez"):
        load_config(None, ["sweep.grid={model.stagez: [1, 2]}"])
    with pytest.raises(ConfigError, match="non-empty list"):
        load_config(None, ["sweep.grid={model.stages: []}"])


def test_resource_plan_two_cpus_runs_two_single_worker_trials():
    plan = plan_resources({"CPU": 2.0}, workers_per_trial=1, use_gpu=None, max_concurrent_trials=None, num_trials=10)
    assert (plan.max_concurrent_trials, plan.cpus_per_worker, plan.use_gpu) == (2, 1.0, False)
    plan = plan_resources({"CPU": 2.0}, workers_per_trial=2, use_gpu=None, max_concurrent_trials=None, num_trials=10)
    assert plan.max_concurrent_trials == 1


def test_resource_plan_gpus():
    plan = plan_resources({"CPU": 32.0, "GPU": 4.0}, workers_per_trial=2, use_gpu=None,
                          max_concurrent_trials=None, num_trials=10)
    assert (plan.max_concurrent_trials, plan.use_gpu, plan.gpus_per_worker, plan.cpus_per_worker) == (2, True, 1.0, 8.0)
    # Fewer trials than slots, and an explicit cap.
    assert plan_resources({"CPU": 32.0, "GPU": 4.0}, 1, None, None, num_trials=3).max_concurrent_trials == 3
    assert plan_resources({"CPU": 32.0, "GPU": 4.0}, 1, None, 2, num_trials=8).max_concurrent_trials == 2
    # use_gpu false on a GPU cluster: CPU workers.
    assert plan_resources({"CPU": 8.0, "GPU": 4.0}, 1, False, None, 8).use_gpu is False


def test_resource_plan_rejects_too_few_cpus():
    with pytest.raises(ValueError, match="sweep.workers_per_trial=4"):
        plan_resources({"CPU": 2.0}, workers_per_trial=4, use_gpu=None, max_concurrent_trials=None, num_trials=1)


def test_variants_cross_the_grid():
    config = paper_config(**{"train.seed": [0, 1]}).with_overrides({"sweep.variants": [
        {"train.training_scheme": "joint"},
        {"train.training_scheme": "joint", "train.intermediate_supervision": False},
        {"train.training_scheme": "stagewise"},
    ]})
    trials = expand_grid(config)
    assert len(trials) == 6
    schemes = sorted((t.config.train.training_scheme, t.config.train.intermediate_supervision) for t in trials)
    assert schemes.count(("joint", False)) == 2 and schemes.count(("stagewise", True)) == 2
    with pytest.raises(ConfigError, match=r"sweep.variants\[0\]"):
        load_config(None, ["sweep.variants=[{model.nope: 1}]"])
