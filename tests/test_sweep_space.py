"""Trial expansion, identity and run names; resource planning; config overrides."""


import pytest

from cpm_model.config import ConfigError, load_config
from pipeline.distributed.resources import ResourceError, plan_resources
from pipeline.distributed.space import expand_grid, format_trial_table, make_trial, trial_key


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


def test_tune_gets_the_distributions_parsed_when_the_config_loaded():
    from pipeline.distributed.runner import tune_domain

    config = load_config(None, ["sweep.search={train.lr: {loguniform: ['1e-4', 1.0e-2]}, "
                                "model.width: {uniform: [0.5, 1]}, train.seed: {choice: [0, 1]}}"])
    space = {key: tune_domain(distribution) for key, distribution in config.search_space.items()}
    lr, width, seed = space["train.lr"], space["model.width"], space["train.seed"]
    assert (lr.lower, lr.upper, type(lr.get_sampler()).__name__) == (1e-4, 1e-2, "_LogUniform")
    assert (width.lower, width.upper, type(width.get_sampler()).__name__) == (0.5, 1.0, "_Uniform")
    assert seed.categories == [0, 1]


def one_node(**resources: float) -> dict:
    return {"nodes": [resources], "node_types": [], "max_workers": None}


def autoscaling(head_cpus: float, gpu_nodes: int, gpu_cpus: float, max_gpu_nodes: int, cap: int | None = None) -> dict:
    """A CPU head alive, `gpu_nodes` of the gpu_worker type alive, up to `max_gpu_nodes` of them."""
    nodes = [{"CPU": head_cpus}] + [{"CPU": gpu_cpus, "GPU": 1.0}] * gpu_nodes
    return {"nodes": nodes, "max_workers": cap, "node_types": [
        {"name": "gpu_worker", "resources": {"CPU": gpu_cpus, "GPU": 1.0}, "max_workers": max_gpu_nodes,
         "alive": gpu_nodes}]}


def test_resource_plan_two_cpus_runs_two_single_worker_trials():
    plan = plan_resources(one_node(CPU=2.0), workers_per_trial=1, use_gpu=None, max_concurrent_trials=None,
                          num_trials=10)
    assert (plan.max_concurrent_trials, plan.cpus_per_worker, plan.use_gpu) == (2, 1.0, False)
    assert plan.describe() == ("2 trial(s) at a time, 1 worker(s) per trial, 1 CPU per worker "
                               "(GPUs: none now; no node type adds GPUs)")
    plan = plan_resources(one_node(CPU=2.0), workers_per_trial=2, use_gpu=None, max_concurrent_trials=None,
                          num_trials=10)
    assert plan.max_concurrent_trials == 1


def test_resource_plan_gpus():
    plan = plan_resources(one_node(CPU=32.0, GPU=4.0), workers_per_trial=2, use_gpu=None,
                          max_concurrent_trials=None, num_trials=10)
    assert (plan.max_concurrent_trials, plan.use_gpu, plan.gpus_per_worker, plan.cpus_per_worker) == (2, True, 1.0, 8.0)
    # Fewer trials than slots, and an explicit cap.
    assert plan_resources(one_node(CPU=32.0, GPU=4.0), 1, None, None, num_trials=3).max_concurrent_trials == 3
    assert plan_resources(one_node(CPU=32.0, GPU=4.0), 1, None, 2, num_trials=8).max_concurrent_trials == 2
    # use_gpu false on a GPU cluster: CPU workers.
    assert plan_resources(one_node(CPU=8.0, GPU=4.0), 1, False, None, 8).use_gpu is False


def test_resource_plan_gpu_workers_fit_a_gpu_node_not_the_whole_cluster():
    # A 16-CPU head and two 8-CPU one-GPU nodes: a worker gets a GPU node's 8 CPUs, not 40 / 2.
    plan = plan_resources(autoscaling(16.0, gpu_nodes=2, gpu_cpus=8.0, max_gpu_nodes=2), 1, None, None, 10)
    assert (plan.use_gpu, plan.cpus_per_worker, plan.max_concurrent_trials) == (True, 8.0, 2)


def test_resource_plan_autoscaling_cluster_without_gpu_nodes_yet_plans_gpus():
    # ray_cluster.yaml: a CPU head, no GPU node yet, up to 8 g5.2xlarge (8 CPU, 1 GPU).
    capacity = autoscaling(16.0, gpu_nodes=0, gpu_cpus=8.0, max_gpu_nodes=8, cap=8)
    plan = plan_resources(capacity, 1, None, None, num_trials=2)
    assert (plan.use_gpu, plan.gpus_per_worker, plan.cpus_per_worker, plan.max_concurrent_trials) == (True, 1.0, 8.0, 2)
    assert plan.describe() == ("2 trial(s) at a time, 1 worker(s) per trial, 1 GPU + 8 CPU per worker "
                               "(GPUs: none now; node type gpu_worker can add up to 8 x 1 GPU)")
    # Concurrency from what the cluster can have at most: 8 GPUs, 2 per trial.
    assert plan_resources(capacity, 2, None, None, num_trials=10).max_concurrent_trials == 4
    # Alive GPU nodes count once: 3 alive of at most 8 still means 8 GPUs.
    plan = plan_resources(autoscaling(16.0, gpu_nodes=3, gpu_cpus=8.0, max_gpu_nodes=8), 1, None, None, 20)
    assert plan.max_concurrent_trials == 8
    assert plan.reason == "GPUs: 3 now; node type gpu_worker can add up to 5 x 1 GPU"
    # The cluster's own cap on worker nodes bounds what the node types can add.
    capped = autoscaling(16.0, gpu_nodes=0, gpu_cpus=8.0, max_gpu_nodes=8, cap=3)
    assert plan_resources(capped, 1, None, None, 20).max_concurrent_trials == 3


def test_resource_plan_unlimited_node_type():
    capacity = {"nodes": [{"CPU": 4.0}], "max_workers": None,
                "node_types": [{"name": "gpu-group", "resources": {"CPU": 4.0, "GPU": 2.0}, "max_workers": None}]}
    plan = plan_resources(capacity, 4, None, None, num_trials=6)
    assert (plan.use_gpu, plan.cpus_per_worker, plan.max_concurrent_trials) == (True, 2.0, 6)
    assert "node type gpu-group can add any number 2 GPU" in plan.reason


def test_resource_plan_rejects_what_the_cluster_can_never_have():
    with pytest.raises(ResourceError, match=r"sweep.workers_per_trial=4 needs 4 CPUs .* at most 2 "):
        plan_resources(one_node(CPU=2.0), workers_per_trial=4, use_gpu=None, max_concurrent_trials=None, num_trials=1)
    with pytest.raises(ResourceError, match=r"sweep.use_gpu=true, but the cluster has no GPU .*no node type adds GPUs"):
        plan_resources(one_node(CPU=2.0), 1, True, None, 1)
    with pytest.raises(ResourceError, match=r"sweep.workers_per_trial=4 needs 4 GPUs .* at most 2 \(GPUs: none now; "
                                            r"node type gpu_worker can add up to 2 x 1 GPU\)"):
        plan_resources(autoscaling(2.0, 0, 1.0, max_gpu_nodes=2), 4, None, None, 1)
    # A CPU node type counts toward what the cluster can have.
    capacity = {"nodes": [{"CPU": 2.0}], "max_workers": None,
                "node_types": [{"name": "cpu_worker", "resources": {"CPU": 8.0}, "max_workers": 8, "alive": 0}]}
    plan = plan_resources(capacity, 64, None, None, 1)
    assert (plan.use_gpu, plan.max_concurrent_trials) == (False, 1)
    assert plan.reason == ("GPUs: none now; no node type adds GPUs; "
                           "CPUs: 2 now; node type cpu_worker can add up to 8 x 8 CPU")


def test_autoscaling_config_file_node_types():
    from pipeline.distributed.cluster_capacity import parse_autoscaling_config

    # The head's copy of ray_cluster.yaml after `ray up` filled in the resources of the instance types.
    config = {"max_workers": 8, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 16}, "min_workers": 0, "max_workers": 0},
        "gpu_worker": {"resources": {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}, "min_workers": 0,
                       "max_workers": 8}}}
    assert parse_autoscaling_config(config) == {"max_workers": 8, "node_types": [
        {"name": "gpu_worker", "resources": {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}, "max_workers": 8}]}


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


def test_lspet_cpu_ablation_preset_covers_the_three_claims():
    trials = expand_grid(load_config("ablation_lspet_cpu", []))
    assert len(trials) == 12  # 6 configurations x 2 seeds
    field = {(t.config.model.stages, t.config.model.later_kernel, t.config.model.batch_norm,
              t.config.train.intermediate_supervision): t.receptive_field_px for t in trials}
    # Stage 1 sees 45 px (three 3x3 convolutions and pools); a 7x7 later stage adds 3 x 6 x 8 px.
    assert field == {(1, 7, True, True): 45, (2, 7, True, True): 189, (3, 7, True, True): 333,
                     (2, 1, True, True): 45, (4, 7, False, True): 477, (4, 7, False, False): 477}
    # Intermediate supervision is compared on the paper's kind of network: deep, no BatchNorm.
    supervision = [t for t in trials if not t.config.model.batch_norm]
    assert {t.config.train.intermediate_supervision for t in supervision} == {True, False}
    assert {t.config.model.stages for t in supervision} == {4}
    # The design's 0.3-0.5 of the person for stage 1: 45 px of a 128 / 1.3 = 98.5 px person.
    stage1 = next(t for t in trials if t.config.model.stages == 1)
    assert 0.3 <= stage1.relative_receptive_field <= 0.5
    assert stage1.relative_receptive_field == pytest.approx(45 / (128 / 1.3), abs=1e-3)
    assert all(t.config.preprocess.input_size <= 160 for t in trials)
    assert sorted({t.config.train.seed for t in trials}) == [0, 1]
