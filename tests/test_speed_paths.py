"""The fast paths give the results of the plain ones: bf16 + channels_last (+ compile) vs fp32, the
worker loop vs a hand-written PyTorch step, loader-side augmentation vs in-loop augmentation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cpm_model.config import ConfigError, load_config
from cpm_model.heatmaps import decode_belief_maps
from cpm_model.joints import flip_permutation
from cpm_model.loss import belief_map_loss
from cpm_model.metrics import pck
from pipeline.train.batches import CacheBatches, epoch_batches
from pipeline.train.inference import autocast, build_model
from pipeline.train.loop import compiled_for_training, train_one_epoch
from pipeline.train.schedule import make_optimizer
from preprocessing.build import build_cache
from preprocessing.cache import PoseCache

TINY = ["data.spec=synthetic:160", "preprocess.input_size=64", "model.stages=2", "model.width=0.125",
        "model.stage1_kernel=3", "model.later_kernel=3", "model.later_convs=1", "model.batch_norm=true",
        "model.center_sigma=8", "train.batch_size=8", "train.optimizer=adam", "train.lr=0.003",
        "train.lr_schedule=constant", "train.max_steps_per_epoch=3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache_dir = tmp_path_factory.getbasetemp() / "cpm_tiny_caches"  # shared with test_training
    config = load_config(None, TINY + [f"data.cache_dir={cache_dir}"])
    cache = PoseCache(build_cache(config.data.spec, "train", config.preprocess, cache_dir, progress=False))
    return config, cache


def batch_of(cache, count: int = 8):
    arrays = cache.read(np.arange(count), keys=("images", "belief_maps", "joints"))
    images = torch.from_numpy(arrays["images"]).permute(0, 3, 1, 2).float() / 255.0
    return images, torch.from_numpy(arrays["belief_maps"]).float(), torch.from_numpy(arrays["joints"]).float()


def fitted_model(config, images, targets, joints, steps: int = 40):
    """A model fitted to the batch in fp32, so that its predictions (and PCK) mean something."""
    torch.manual_seed(0)
    model = build_model(config, joints.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = belief_map_loss(model(images), targets, joints[..., 2] > 0).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def batch_pck(maps: torch.Tensor, joints: torch.Tensor) -> float:
    coords, _ = decode_belief_maps(maps[:, -1, :-1].float().numpy())
    norm = np.full(len(joints), 64.0)  # the crop side: a fixed normaliser is enough to compare paths
    return pck(coords, joints[..., :2].numpy(), joints[..., 2].numpy() > 0, norm, 0.2)[1]


@pytest.mark.parametrize("use_compile", [False, True])
def test_optimised_path_matches_plain_fp32(setup, use_compile):
    config, cache = setup
    images, targets, joints = batch_of(cache)
    model = fitted_model(config, images, targets, joints)
    mask = joints[..., 2] > 0
    with torch.no_grad():
        plain = model(images)
        plain_loss = belief_map_loss(plain, targets, mask).sum()
        fast_model = compiled_for_training(model.to(memory_format=torch.channels_last), use_compile)
        with autocast("bf16", images.device):
            fast = fast_model(images.contiguous(memory_format=torch.channels_last))
        fast_loss = belief_map_loss(fast, targets, mask).sum()
    assert float(fast_loss) == pytest.approx(float(plain_loss), rel=5e-2)
    assert batch_pck(fast, joints) == pytest.approx(batch_pck(plain, joints), abs=0.05)
    assert batch_pck(plain, joints) > 0.3  # the comparison is between meaningful predictions


def hand_written_loss(model, images, targets, joints) -> float:
    """The CPM loss written out: per stage, squared error over annotated maps and the background,
    divided by the number of map pixels counted; summed over stages."""
    pred = model(images)
    weight = torch.cat([(joints[..., 2] > 0).float(), torch.ones(len(joints), 1)], dim=1)  # (B, P+1)
    total = 0.0
    for stage in range(pred.shape[1]):
        squared = ((pred[:, stage] - targets) ** 2).sum(dim=(-2, -1))
        total = total + (squared * weight).sum() / (weight.sum() * targets.shape[-1] * targets.shape[-2])
    return total


def test_worker_loop_loss_equals_hand_written_step(setup):
    config, cache = setup
    config = replace(config, train=replace(config.train, augment=False, precision="fp32"))
    torch.manual_seed(0)
    model = build_model(config, len(cache.joint_names)).train()
    reference = build_model(config, len(cache.joint_names)).train()
    reference.load_state_dict(model.state_dict())
    optimizer = make_optimizer(model, config.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    rows = np.arange(8)
    batches = CacheBatches(cache, np.arange(len(cache)), [rows], "cpu", keys=("images", "belief_maps", "joints"),
                           prepare=lambda batch: {**batch, "targets": batch["belief_maps"]})
    sums = train_one_epoch(model, optimizer, scheduler, batches, config, None, torch.device("cpu")).sums
    images, targets, joints = batch_of(cache)
    expected = hand_written_loss(reference, images, targets, joints).detach()
    assert sums.steps == 1
    assert sums.loss == pytest.approx(float(expected), rel=1e-5)


def run_epoch(config, cache, batches):
    torch.manual_seed(0)
    model = build_model(config, len(cache.joint_names)).train()
    optimizer = make_optimizer(model, config.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sums = train_one_epoch(model, optimizer, scheduler, batches, config, None, torch.device("cpu")).sums
    return sums, model.state_dict()


def test_augmenting_in_the_reader_thread_equals_augmenting_in_the_step(setup):
    """On a CPU the loader augments in its prefetch thread; on an accelerator in the consuming
    thread. Both draw the epoch's augmentation stream in batch order: the same numbers."""
    config, cache = setup
    permutation = flip_permutation(len(cache.joint_names), cache.flip_pairs)
    in_reader = epoch_batches(cache, config, 0, 1, 0, permutation, "cpu")
    in_step = epoch_batches(cache, config, 0, 1, 0, permutation, "cpu")
    assert in_reader.prepare_in_reader
    in_step.prepare_in_reader = False  # what a CUDA device does
    reader_sums, reader_state = run_epoch(config, cache, in_reader)
    step_sums, step_state = run_epoch(config, cache, in_step)
    assert reader_sums.steps == step_sums.steps == 3
    assert reader_sums.loss == step_sums.loss
    np.testing.assert_array_equal(reader_sums.stage_losses, step_sums.stage_losses)
    for key in step_state:
        torch.testing.assert_close(reader_state[key], step_state[key], rtol=0, atol=0)


def test_compile_option_is_validated():
    assert load_config(None, ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError):
        load_config(None, ["train.compile=1"])
