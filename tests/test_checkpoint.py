"""Checkpoints: plain data (weights_only), clear errors, init weights, CLI errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpm_model.config import load_config
from cpm_model.model import CPM, VGG19_CONV_INDICES
from pipeline.train.checkpoint import (CheckpointError, build_checkpoint, capture_rng_state, load_checkpoint,
                                 load_init_weights, load_model_state, read_checkpoint, restore_rng_state,
                                 save_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def _config(*extra: str):
    return load_config(None, ["preprocess.input_size=64", "model.stages=2", "model.width=0.125",
                              "model.stage1_kernel=3", "model.later_kernel=3", "model.later_convs=1", *extra])


def _model(config) -> CPM:
    return CPM.from_config(config.model, num_parts=14, input_size=config.preprocess.input_size)


def _saved(tmp_path: Path, config, epoch: int = 3) -> Path:
    model = _model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    checkpoint = build_checkpoint(model, config, epoch, optimizer, scheduler, metrics=[{"epoch": 1, "pck": 0.25}],
                                  best_epoch=1, joint_names=[f"j{i}" for i in range(14)], flip_pairs=[(0, 5)])
    return save_checkpoint(checkpoint, tmp_path / "ckpt" / "checkpoint.pt")


def test_round_trip_with_weights_only(tmp_path):
    config = _config()
    path = _saved(tmp_path, config)
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"model", "config", "epoch", "optimizer", "scheduler", "rng", "metrics", "best_epoch"}
    assert raw["epoch"] == 3 and raw["best_epoch"] == 1 and raw["metrics"] == [{"epoch": 1, "pck": 0.25}]
    assert isinstance(raw["config"], dict) and raw["config"]["model"]["stages"] == 2
    assert isinstance(raw["rng"]["numpy"]["keys"], list) and isinstance(raw["rng"]["python"]["internal"], list)
    loaded = load_checkpoint(path, expected_config=config)
    assert loaded["config"] == config
    model = _model(config)
    load_model_state(model, loaded["model"], "test")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), raw["model"].values()))
    assert read_checkpoint(path.parent)["epoch"] == 3  # a directory holding checkpoint.pt works too


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and (first[1] == second[1]).all() and first[2] == second[2]


def test_checkpoint_from_another_config_says_what_differs(tmp_path):
    path = _saved(tmp_path, _config())
    with pytest.raises(CheckpointError, match="checkpoint has 2 stages, model has 3") as err:
        load_checkpoint(path, expected_config=_config("model.stages=3"))
    assert str(path) in str(err.value)
    three = _model(_config("model.stages=3"))
    with pytest.raises(CheckpointError, match="checkpoint has 2 stages, model has 3"):
        load_model_state(three, torch.load(path, weights_only=True)["model"], f"checkpoint {path}")
    wider = _model(_config("model.width=0.25"))
    with pytest.raises(CheckpointError, match="shape differs"):
        load_model_state(wider, torch.load(path, weights_only=True)["model"], "checkpoint")


def test_corrupt_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="broken.pt is corrupt"):
        load_checkpoint(bad)
    good = _saved(tmp_path, _config())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated.pt is corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_init_weights_from_a_cpm_state_dict(tmp_path):
    config = _config()
    torch.manual_seed(1)
    source = _model(config)
    torch.save(source.state_dict(), tmp_path / "cpm_weights.pt")
    torch.manual_seed(2)
    target = _model(config)
    assert "CPM state dict" in load_init_weights(target, tmp_path / "cpm_weights.pt")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_init_weights(_model(_config("model.stages=3")), tmp_path / "cpm_weights.pt")


def test_init_weights_vgg_into_the_vgg_front(tmp_path):
    config = _config("model.backbone=vgg", "model.width=0.0625")
    model = _model(config)
    # A torchvision-style vgg19 state dict with this (narrow) model's shapes, plus classifier keys.
    own = model.state_dict()
    vgg = {}
    for index, name in model.vgg_layer_names.items():
        vgg[f"features.{index}.weight"] = torch.full_like(own[f"{name}.weight"], 0.01 * (index + 1))
        vgg[f"features.{index}.bias"] = torch.full_like(own[f"{name}.bias"], 0.5)
    vgg["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(vgg, tmp_path / "vgg19.pth")
    note = load_init_weights(model, tmp_path / "vgg19.pth")
    assert f"{2 * len(VGG19_CONV_INDICES)} tensors" in note
    name = model.vgg_layer_names[VGG19_CONV_INDICES[3]]
    assert torch.all(model.state_dict()[f"{name}.weight"] == 0.01 * (VGG19_CONV_INDICES[3] + 1))
    with pytest.raises(CheckpointError, match="backbone"):
        load_init_weights(_model(_config()), tmp_path / "vgg19.pth")


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
@pytest.mark.parametrize("override, message", [
    ("model.stages=0", "model.stages"),
    ("model.backbone=resnet", "model.backbone"),
])
def test_fit_rejects_bad_config_with_exit_2(tmp_path, override, message):
    done = _cli("pipeline.fit", "--set", override, "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_fit_rejects_missing_data_and_config_file(tmp_path):
    done = _cli("pipeline.fit", "--data", f"lspet:{tmp_path}/no_such_dir", "--out", str(tmp_path / "run"),
                "--set", f"data.cache_dir={tmp_path}/cache")
    assert done.returncode == 2 and "no_such_dir" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = _cli("pipeline.fit", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "nope.yaml" in done.stderr
