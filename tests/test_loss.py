"""The belief-map loss: hand-computed values, masking, the sum/mean ratio, precision."""

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
    total, per_stage = belief_map_loss(pred, target, mask, reduction="sum")
    assert per_stage.tolist() == [2.0, 0.5]  # 4 / (2 * 1), 1 / (2 * 1)
    assert total.item() == 2.5


def test_mean_reduction_over_valid_map_pixels():
    pred, target, mask = _hand_example()
    total, per_stage = belief_map_loss(pred, target, mask, reduction="mean")
    assert per_stage.tolist() == [0.5, 0.125]  # 4 / 8 pixels, 1 / 8
    assert total.item() == 0.625


def test_without_intermediate_supervision_only_the_last_stage_counts():
    pred, target, mask = _hand_example()
    total, per_stage = belief_map_loss(pred, target, mask, intermediate_supervision=False, reduction="sum")
    assert total.item() == 0.5
    assert per_stage.tolist() == [2.0, 0.5]  # still reported for every stage


def test_unannotated_part_is_masked_out_background_kept():
    pred, target, _ = _hand_example()
    mask = torch.zeros(1, 1, dtype=torch.bool)
    total, per_stage = belief_map_loss(pred, target, mask, reduction="sum")
    assert per_stage.tolist() == [1.5, 0.0]  # background only: 3 / 2, then 0
    _, per_stage_mean = belief_map_loss(pred, target, mask, reduction="mean")
    assert per_stage_mean.tolist() == [0.75, 0.0]  # 3 / 4 background pixels
    # anything predicted for the masked part leaves the loss unchanged, and gets no gradient
    moved = pred.clone()
    moved[:, :, 0] = 7.0
    moved.requires_grad_(True)
    moved_total, _ = belief_map_loss(moved, target, mask, reduction="sum")
    assert moved_total.item() == total.item()
    moved_total.backward()
    assert torch.all(moved.grad[:, :, 0] == 0) and torch.any(moved.grad[:, :, 1] != 0)


def test_float_mask_and_batch_division():
    torch.manual_seed(0)
    pred = torch.rand(2, 1, 3, 4, 4)
    target = torch.rand(2, 3, 4, 4)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    total, _ = belief_map_loss(pred, target, mask, reduction="sum")
    squared = (pred[:, 0] - target) ** 2
    by_hand = (squared[0, 0].sum() + squared[0, 2].sum() + squared[1].sum()) / (2 * 2)
    assert total.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_sum_over_mean_ratio():
    torch.manual_seed(0)
    pred = torch.rand(2, 3, 15, 46, 46)
    target = torch.rand(2, 15, 46, 46)
    all_parts = torch.ones(2, 14, dtype=torch.bool)
    _, by_sum = belief_map_loss(pred, target, all_parts, reduction="sum")
    _, by_mean = belief_map_loss(pred, target, all_parts, reduction="mean")
    # (valid maps per sample) * h * w / 2 = 15 * 46 * 46 / 2
    assert torch.allclose(by_sum / by_mean, torch.full((3,), 15870.0), rtol=1e-5)
    some_parts = all_parts.clone()
    some_parts[0, :4] = False  # 11 + 15 = 26 valid maps over 2 samples
    _, by_sum = belief_map_loss(pred, target, some_parts, reduction="sum")
    _, by_mean = belief_map_loss(pred, target, some_parts, reduction="mean")
    assert torch.allclose(by_sum / by_mean, torch.full((3,), 13 * 46 * 46 / 2), rtol=1e-5)


def test_fp32_under_autocast_and_detached_per_stage():
    pred, target, mask = _hand_example()
    pred = pred.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, per_stage = belief_map_loss(pred, target.to(torch.bfloat16), mask, reduction="sum")
    assert total.dtype == torch.float32 and total.item() == 2.5  # these values are exact in bf16
    assert total.requires_grad and not per_stage.requires_grad
    total.backward()
    assert pred.grad.dtype == torch.bfloat16


def test_rejects_bad_arguments():
    pred, target, mask = _hand_example()
    with pytest.raises(ValueError, match="reduction"):
        belief_map_loss(pred, target, mask, reduction="max")
    with pytest.raises(ValueError, match="part_mask"):
        belief_map_loss(pred, target, torch.ones(1, 2))
    with pytest.raises(ValueError, match="target"):
        belief_map_loss(pred, target[:, :1], mask)
