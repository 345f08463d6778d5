"""Validation PCK over the whole split across Ray Train workers: per-joint counts reduced across
ranks, no padded duplicates, so 1 and 2 workers give the same PCK for the same weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from cpm_model.config import load_config
from pipeline.train.context import LocalContext
from pipeline.train.inference import build_model
from pipeline.train.loop import validate
from preprocessing.build import build_cache
from preprocessing.cache import PoseCache

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]

OVERRIDES = ["data.spec=synthetic:300", "preprocess.input_size=64", "model.stages=2", "model.width=0.25",
             "model.stage1_kernel=3", "model.later_kernel=3", "model.later_convs=1", "model.batch_norm=true",
             "train.precision=fp32"]


def _counts_in_worker(loop_config: dict) -> None:
    from pipeline.distributed.ray_context import RayTrainContext

    ctx = RayTrainContext()
    config = load_config(None, loop_config["overrides"])
    cache = PoseCache(loop_config["cache"])
    model = build_model(config, len(cache.joint_names))
    model.load_state_dict(torch.load(loop_config["weights"], weights_only=True))
    model.eval()
    counts = validate(model, cache, config.with_overrides({"train.batch_size": 7}), ctx)
    out = Path(loop_config["out"]) / f"rank{ctx.rank}.json"
    out.write_text(json.dumps({"correct": counts.correct.tolist(), "total": counts.total.tolist(),
                               "num_samples": counts.num_samples, "world_size": ctx.world_size}))


def test_two_workers_score_the_split_exactly_like_one(tmp_path, ray_tmpdir):
    overrides = OVERRIDES + [f"data.cache_dir={tmp_path / 'cache'}"]
    config = load_config(None, overrides)
    cache_path = build_cache(config.data.spec, "val", config.preprocess, config.data.cache_dir, progress=False)
    cache = PoseCache(cache_path)
    torch.manual_seed(0)
    model = build_model(config, len(cache.joint_names))
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    model.eval()
    single = validate(model, cache, config.with_overrides({"train.batch_size": 16}), LocalContext(device="cpu", quiet=True))
    assert single.num_samples == len(cache) and single.total.sum() > 0

    # Workers import the project and this test module (the loop function is pickled by reference).
    path = os.pathsep.join([str(REPO), str(REPO / "tests")])
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=ray_tmpdir,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        trainer = TorchTrainer(
            _counts_in_worker,
            train_loop_config={"overrides": overrides, "cache": str(cache_path), "weights": str(weights),
                               "out": str(tmp_path)},
            scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
            run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="validation"),
        )
        trainer.fit()
    finally:
        ray.shutdown()
    # Every rank holds the counts reduced over both shards.
    for rank in (0, 1):
        reduced = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert reduced["world_size"] == 2
        assert reduced["num_samples"] == len(cache)  # 2 shards, no sample twice, none padded
        np.testing.assert_array_equal(np.array(reduced["correct"]), single.correct)
        np.testing.assert_array_equal(np.array(reduced["total"]), single.total)
