"""The belief-map loss: hand-computed per-stage values, masking, the sum/mean ratio, precision."""

from __future__ import annotations

import pytest
import torch

from cpm_model import belief_map_loss


def _hand_example():
    """One sample, two stages, one part (+ background), 2x2 maps.

    target: part [[1, 0], [0, 0]], background [[0, 1], [1, 1]].
    stage 1 predicts all zeros: squared error 1 (part) + 3 (background) = 4.
    stage 2 predicts the target + 0.5 on the part map: squared error 4 * 0.25 = 1.
    """
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]]])  # (1, 2, 2, 2)
    stage2 = target.clone()
    stage2[:, 0] += 0.5
    pred = torch.stack([torch.zeros_like(target), stage2], dim=1)  # (1, 2, 2, 2, 2)
    return pred, target, torch.ones(1, 1, dtype=torch.bool)


def test_sum_reduction_is_caffe_euclidean():
    pred, target, mask = _hand_example()
    per_stage = belief_map_loss(pred, target, mask, reduction="sum")
    assert per_stage.tolist() == [2.0, 0.5]  # 4 / (2 * 1), 1 / (2 * 1)
    assert per_stage.sum().item() == 2.5


def test_mean_reduction_over_valid_map_pixels():
    pred, target, mask = _hand_example()
    per_stage = belief_map_loss(pred, target, mask, reduction="mean")
    assert per_stage.tolist() == [0.5, 0.125]  # 4 / 8 pixels, 1 / 8
    assert per_stage.sum().item() == 0.625


def test_each_stage_term_carries_only_its_own_gradient():
    pred, target, mask = _hand_example()
    pred.requires_grad_(True)
    per_stage = belief_map_loss(pred, target, mask, reduction="sum")
    per_stage[-1].backward()  # last stage only: stage 1 gets no gradient
    assert torch.all(pred.grad[:, 0] == 0)
    # d/dp of sum (p - t)^2 / 2 is p - t: 0.5 on each of the part's 4 pixels, 0 on the background
    assert pred.grad[:, 1, 0].flatten().tolist() == [0.5] * 4 and torch.all(pred.grad[:, 1, 1] == 0)
    # one stage alone gives the same term as that stage within the stack (stage-wise training)
    alone = belief_map_loss(pred[:, :1], target, mask, reduction="mean")
    assert alone.tolist() == [belief_map_loss(pred, target, mask, reduction="mean")[0].item()] == [0.5]


def test_unannotated_part_is_masked_out_background_kept():
    pred, target, _ = _hand_example()
    mask = torch.zeros(1, 1, dtype=torch.bool)
    per_stage = belief_map_loss(pred, target, mask, reduction="sum")
    assert per_stage.tolist() == [1.5, 0.0]  # background only: 3 / 2, then 0
    per_stage_mean = belief_map_loss(pred, target, mask, reduction="mean")
    assert per_stage_mean.tolist() == [0.75, 0.0]  # 3 / 4 background pixels
    # anything predicted for the masked part leaves the loss unchanged, and gets no gradient
    moved = pred.clone()
    moved[:, :, 0] = 7.0
    moved.requires_grad_(True)
    moved_total = belief_map_loss(moved, target, mask, reduction="sum").sum()
    assert moved_total.item() == per_stage.sum().item()
    moved_total.backward()
    assert torch.all(moved.grad[:, :, 0] == 0) and torch.any(moved.grad[:, :, 1] != 0)


def test_float_mask_and_batch_division():
    torch.manual_seed(0)
    pred = torch.rand(2, 1, 3, 4, 4)
    target = torch.rand(2, 3, 4, 4)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    (total,) = belief_map_loss(pred, target, mask, reduction="sum")
    squared = (pred[:, 0] - target) ** 2
    by_hand = (squared[0, 0].sum() + squared[0, 2].sum() + squared[1].sum()) / (2 * 2)
    assert total.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_sum_over_mean_ratio():
    torch.manual_seed(0)
    pred = torch.rand(2, 3, 15, 46, 46)
    target = torch.rand(2, 15, 46, 46)
    all_parts = torch.ones(2, 14, dtype=torch.bool)
    by_sum = belief_map_loss(pred, target, all_parts, reduction="sum")
    by_mean = belief_map_loss(pred, target, all_parts, reduction="mean")
    # (valid maps per sample) * h * w / 2 = 15 * 46 * 46 / 2
    assert torch.allclose(by_sum / by_mean, torch.full((3,), 15870.0), rtol=1e-5)
    some_parts = all_parts.clone()
    some_parts[0, :4] = False  # 11 + 15 = 26 valid maps over 2 samples
    by_sum = belief_map_loss(pred, target, some_parts, reduction="sum")
    by_mean = belief_map_loss(pred, target, some_parts, reduction="mean")
    assert torch.allclose(by_sum / by_mean, torch.full((3,), 13 * 46 * 46 / 2), rtol=1e-5)


def test_fp32_under_autocast_with_gradient():
    pred, target, mask = _hand_example()
    pred = pred.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_stage = belief_map_loss(pred, target.to(torch.bfloat16), mask, reduction="sum")
    assert per_stage.shape == (2,) and per_stage.dtype == torch.float32
    assert per_stage.tolist() == [2.0, 0.5]  # these values are exact in bf16
    assert per_stage.requires_grad
    per_stage.sum().backward()
    assert pred.grad.dtype == torch.bfloat16


def test_rejects_bad_arguments():
    pred, target, mask = _hand_example()
    with pytest.raises(ValueError, match="reduction"):
        belief_map_loss(pred, target, mask, reduction="max")
    with pytest.raises(ValueError, match="part_mask"):
        belief_map_loss(pred, target, torch.ones(1, 2))
    with pytest.raises(ValueError, match="target"):
        belief_map_loss(pred, target[:, :1], mask)
