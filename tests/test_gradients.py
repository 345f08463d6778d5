"""Gradient magnitudes sampled during training (pipeline.train.gradients): the norms against torch
autograd by hand, the histogram's bins, and what intermediate supervision does to stage 1's gradient."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cpm_model.config import load_config
from cpm_model.loss import belief_map_loss
from cpm_model.model import CPM
from pipeline.train.gradients import (
    HISTOGRAM_BINS,
    GradientSampler,
    conv_layers,
    histogram_edges,
    log10_histogram,
    sampled_steps,
)
from pipeline.train.loop import train_one_epoch

PARTS, SIZE, STAGES, STEPS = 4, 32, 3, 6


def tiny_model() -> CPM:
    torch.manual_seed(0)
    return CPM(num_parts=PARTS, stages=STAGES, width=0.125, stage1_kernel=3, later_kernel=3, later_convs=1,
               input_size=SIZE, center_sigma=8)


def one_batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    joints = torch.cat([torch.rand(2, PARTS, 2, generator=generator) * SIZE, torch.ones(2, PARTS, 1)], -1)
    joints[1, 0, 2] = 0  # one unannotated part: its map is left out of the loss
    return {"images": torch.rand(2, 3, SIZE, SIZE, generator=generator), "joints": joints,
            "targets": torch.rand(2, PARTS + 1, SIZE // 8, SIZE // 8, generator=generator)}


def sampled_epoch(model: CPM, supervised: bool) -> dict:
    """An epoch of STEPS copies of one batch with lr 0 (the weights, so the gradient, never change),
    through the loop's own train_one_epoch; the sampler's epoch summary."""
    config = load_config(None, [f"model.stages={STAGES}", "train.precision=fp32",
                                f"train.intermediate_supervision={str(supervised).lower()}"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sampler = GradientSampler(model, STEPS, torch.device("cpu"))
    trained = train_one_epoch(model, optimizer, scheduler, [one_batch()] * STEPS, config, None, torch.device("cpu"),
                              gradients=sampler)
    return trained.gradients


def norm_by_hand(loss: torch.Tensor, parameters: list) -> float:
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))


def losses_by_hand(model: CPM) -> torch.Tensor:
    batch = one_batch()
    return belief_map_loss(model(batch["images"]), batch["targets"], batch["joints"][..., 2] > 0)


def test_sampled_steps_are_evenly_spaced_and_one_based():
    assert sampled_steps(10, 4) == [2, 4, 7, 9]  # the middle of 1-2.5, 2.5-5, 5-7.5, 7.5-10
    assert sampled_steps(STEPS, 4) == [1, 3, 4, 6]
    assert sampled_steps(3, 4) == [1, 2, 3] and sampled_steps(1, 4) == [1]


def test_histogram_bins_by_hand():
    # log10 |g|: zero -> below the range (first bin); 1.5e-3 -> -2.82, bin (12 - 2.82) / 0.5 = 18.3 -> 18;
    # -0.5 -> -0.30, bin 23.4 -> 23; 1e5 -> above the range (last bin).
    counts = log10_histogram([torch.tensor([0.0, 1.5e-3]), torch.tensor([[-0.5, 1e5]])], "cpu")
    expected = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64)
    expected[[0, 18, 23, HISTOGRAM_BINS - 1]] = 1
    assert torch.equal(counts, expected)
    assert histogram_edges()[18] == -3.0 and len(histogram_edges()) == HISTOGRAM_BINS + 1


def test_stage_and_layer_norms_equal_autograd_by_hand():
    model = tiny_model()
    reference = copy.deepcopy(model)
    summary = sampled_epoch(model, supervised=True)
    assert summary["sampled_steps"] == [1, 3, 4, 6]
    total = losses_by_hand(reference).sum()
    for t in range(1, STAGES + 1):
        assert summary["stage_grad_norm"][t - 1] == pytest.approx(norm_by_hand(total, reference.stage_parameters(t)),
                                                                  rel=1e-5)
    layers = conv_layers(reference)
    assert layers[0]["name"] == "stage1.0" and layers[-1]["name"] == f"later_stages.{STAGES - 2}.layers.4"
    assert [layer["depth"] for layer in layers] == list(range(len(layers)))
    for layer, value in zip(layers, summary["layer_grad_norm"]):
        assert value == pytest.approx(norm_by_hand(total, list(layer["module"].parameters())), rel=1e-5)
    # Without BatchNorm a stage's parameters are its convolutions': the layer norms add up (in squares).
    stage2 = [v for layer, v in zip(layers, summary["layer_grad_norm"]) if layer["stage"] == 2]
    assert math.sqrt(sum(v * v for v in stage2)) == pytest.approx(summary["stage_grad_norm"][1], rel=1e-6)
    for fractions in summary["layer_histogram"]:
        assert sum(fractions) == pytest.approx(1.0)


def test_without_intermediate_supervision_stage1_learns_only_through_the_last_stage():
    on, off = sampled_epoch(tiny_model(), supervised=True), sampled_epoch(tiny_model(), supervised=False)
    reference = tiny_model()
    last_only = norm_by_hand(losses_by_hand(reference)[-1], reference.stage_parameters(1))
    stage1_own = norm_by_hand(losses_by_hand(reference)[0], reference.stage_parameters(1))
    print(f"stage 1 grad norm: on {on['stage_grad_norm'][0]:.4g}, off {off['stage_grad_norm'][0]:.4g}, "
          f"last-stage loss alone {last_only:.4g}, stage 1's own loss {stage1_own:.4g}")
    assert off["stage_grad_norm"][0] == pytest.approx(last_only, rel=1e-5)
    # Each stage's output convolution starts at N(0, 0.01^2): the path from the last stage's loss
    # back to stage 1 crosses two of them, so stage 1's gradient nearly vanishes without its own loss.
    assert off["stage_grad_norm"][0] < 0.01 * on["stage_grad_norm"][0]
    # The last stage feeds no other stage: its gradient is the same either way.
    assert off["stage_grad_norm"][-1] == pytest.approx(on["stage_grad_norm"][-1], rel=1e-6)
