"""PCK, PCKh, the PCK curve, AUC and decoding, with numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpm_model import (
    auc,
    auc_from_curve,
    decode_predictions,
    pck,
    pck_counts,
    pck_curve,
    pck_curve_counts,
    pck_curve_from_counts,
    pck_from_counts,
    pckh,
)
from cpm_model.geometry import apply_affine, crop_affine, invert_affine
from cpm_model.heatmaps import render_belief_maps
from cpm_model.metrics import PCK_CURVE_ALPHAS, PCKCounts


def _offsets(errors_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gt at the origin, pred displaced along x by the given errors (N, P)."""
    errors_px = np.asarray(errors_px, dtype=np.float64)
    gt = np.zeros(errors_px.shape + (2,))
    pred = gt.copy()
    pred[..., 0] = errors_px
    return pred, gt


def test_threshold_edge_counts_as_correct():
    gt = np.zeros((1, 1, 2))
    pred = np.array([[[3.0, 4.0]]])  # 5 px away
    visible = np.ones((1, 1), bool)
    norm = np.array([10.0])
    assert pck(pred, gt, visible, norm, alpha=0.5)[1] == 1.0  # 5 <= 0.5 * 10
    assert pck(pred, gt, visible, norm, alpha=0.49)[1] == 0.0


def test_per_joint_values_and_mean_of_joints():
    # 2 samples x 3 joints, norm 10, alpha 0.2 -> correct within 2 px
    pred, gt = _offsets([[1.0, 3.0, 2.0],
                         [0.0, 1.0, 5.0]])
    visible = np.array([[True, True, True],
                        [True, True, False]])
    per_joint, mean = pck(pred, gt, visible, np.array([10.0, 10.0]), alpha=0.2)
    np.testing.assert_array_equal(per_joint, [1.0, 0.5, 1.0])  # joint 2: only sample 0 is scored
    assert mean == pytest.approx(2.5 / 3)  # average of the per-joint PCKs, not 4 of 5 instances
    correct, total = pck_counts(pred, gt, visible, np.array([10.0, 10.0]), alpha=0.2)
    np.testing.assert_array_equal(correct, [2, 1, 1])
    np.testing.assert_array_equal(total, [2, 2, 1])
    assert correct.dtype == np.int64 and total.dtype == np.int64


def test_samples_with_zero_or_nan_norm_are_left_out():
    pred, gt = _offsets([[0.0, 0.0], [9.0, 9.0], [9.0, 9.0], [9.0, 0.0]])
    visible = np.ones((4, 2), bool)
    norm = np.array([10.0, 0.0, np.nan, 10.0])
    correct, total = pck_counts(pred, gt, visible, norm, alpha=0.2)
    np.testing.assert_array_equal(total, [2, 2])  # samples 1 and 2 dropped
    np.testing.assert_array_equal(correct, [1, 2])
    per_joint, mean = pck(pred, gt, visible, norm, alpha=0.2)
    np.testing.assert_array_equal(per_joint, [0.5, 1.0])
    assert mean == 0.75


def test_joint_never_visible_is_nan_and_left_out_of_the_mean():
    pred, gt = _offsets([[0.0, 0.0, 9.0], [0.0, 0.0, 9.0]])
    visible = np.array([[True, False, True], [True, False, False]])
    per_joint, mean = pck(pred, gt, visible, np.array([10.0, 10.0]), alpha=0.5)
    assert per_joint[0] == 1.0 and np.isnan(per_joint[1]) and per_joint[2] == 0.0
    assert mean == 0.5
    none_visible = pck(pred, gt, np.zeros((2, 3), bool), np.array([10.0, 10.0]), alpha=0.5)
    assert np.all(np.isnan(none_visible[0])) and np.isnan(none_visible[1])


def test_nan_prediction_counts_as_wrong():
    pred, gt = _offsets([[np.nan, 0.0]])
    correct, total = pck_counts(pred, gt, np.ones((1, 2), bool), np.array([10.0]), alpha=0.5)
    np.testing.assert_array_equal(correct, [0, 1])
    np.testing.assert_array_equal(total, [1, 1])


def test_counts_of_two_halves_sum_to_the_whole():
    rng = np.random.default_rng(0)
    pred = rng.normal(scale=20, size=(50, 14, 2))
    gt = rng.normal(scale=20, size=(50, 14, 2))
    visible = rng.random((50, 14)) > 0.2
    visible[:, 13] = False
    norm = rng.uniform(20, 60, size=50)
    norm[[3, 30]] = [np.nan, 0.0]
    whole = pck_counts(pred, gt, visible, norm, 0.2)
    first = pck_counts(pred[:20], gt[:20], visible[:20], norm[:20], 0.2)
    second = pck_counts(pred[20:], gt[20:], visible[20:], norm[20:], 0.2)
    np.testing.assert_array_equal(first[0] + second[0], whole[0])
    np.testing.assert_array_equal(first[1] + second[1], whole[1])
    merged = pck_from_counts(first[0] + second[0], first[1] + second[1])
    direct = pck(pred, gt, visible, norm, 0.2)
    np.testing.assert_array_equal(merged[0], direct[0])  # NaN for joint 13 in both
    assert merged[1] == direct[1]
    curve_a, total_a = pck_curve_counts(pred[:20], gt[:20], visible[:20], norm[:20])
    curve_b, total_b = pck_curve_counts(pred[20:], gt[20:], visible[20:], norm[20:])
    _, per_joint, mean = pck_curve(pred, gt, visible, norm)
    merged_per_joint, merged_mean = pck_curve_from_counts(curve_a + curve_b, total_a + total_b)
    np.testing.assert_array_equal(merged_per_joint, per_joint)
    np.testing.assert_array_equal(merged_mean, mean)


def test_pckh_is_pck_normalised_by_head_size():
    pred, gt = _offsets([[3.0, 6.0]])
    per_joint, mean = pckh(pred, gt, np.ones((1, 2), bool), head_size=np.array([10.0]))
    np.testing.assert_array_equal(per_joint, [1.0, 0.0])  # within 0.5 * 10 = 5 px
    assert mean == 0.5


def test_pck_curve_and_auc_of_known_curves():
    visible = np.ones((1, 2), bool)
    norm = np.array([100.0])
    perfect = _offsets([[0.0, 0.0]])
    alphas, per_joint, mean = pck_curve(*perfect, visible, norm)
    assert alphas.shape == (51,) and alphas[0] == 0.0 and alphas[-1] == 0.5
    assert per_joint.shape == (51, 2) and np.all(mean == 1.0)  # error 0 <= 0 * norm
    assert auc(*perfect, visible, norm) == 1.0
    # every error exactly 0.25 * norm: PCK 0 for alpha < 0.25, 1 from 0.25 on. Trapezoid:
    # 0.25 (from 0.25 to 0.5) + 0.005 (the ramp between 0.24 and 0.25), over the range 0.5 -> 0.51
    quarter = _offsets([[25.0, 25.0]])
    assert auc(*quarter, visible, norm) == pytest.approx(0.51)
    # one joint perfect, one never within 0.5: the mean curve is 0.5 everywhere
    half = _offsets([[0.0, 80.0]])
    assert auc(*half, visible, norm) == pytest.approx(0.5)
    # a linear curve PCK(a) = 2a on [0, 0.5] has normalised area 0.5
    grid = np.linspace(0.0, 0.5, 11)
    assert auc_from_curve(grid, 2 * grid) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        auc_from_curve([0.1], [1.0])


def test_decode_predictions_maps_back_to_the_original_image():
    # Two samples with different crops; joints placed in ORIGINAL image coordinates.
    rng = np.random.default_rng(1)
    input_size, map_size, num_parts = 64, 8, 3
    originals, maps, to_original = [], [], []
    for center, side, rotation in (((200.0, 150.0), 120.0, 0.0), ((80.0, 300.0), 90.0, 30.0)):
        to_crop = crop_affine(center, side, input_size, rotation)
        crop_xy = rng.uniform(12, 52, size=(num_parts, 2))
        originals.append(apply_affine(crop_xy, invert_affine(to_crop)))
        joints = np.concatenate([crop_xy, np.ones((num_parts, 1))], axis=1)
        maps.append(render_belief_maps(joints, map_size, sigma=1.0))
        to_original.append(invert_affine(to_crop))
    maps, to_original, originals = np.stack(maps), np.stack(to_original), np.stack(originals)
    decoded = decode_predictions(maps, to_original)  # (N, P+1, h, w): background dropped
    assert decoded.shape == (2, num_parts, 2)
    np.testing.assert_allclose(decoded, originals, atol=1e-3)
    from_tensor = decode_predictions(torch.from_numpy(maps[:, :num_parts]), to_original, num_parts=num_parts)
    np.testing.assert_allclose(from_tensor, originals, atol=1e-3)
    with pytest.raises(ValueError):
        decode_predictions(maps, to_original[:1])


def _joints(xy: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(N, P, 3) annotation: x, y and flag 1 where visible."""
    return np.concatenate([np.asarray(xy, dtype=np.float64), np.asarray(visible, dtype=np.float64)[..., None]],
                          axis=-1)


def test_pck_counts_of_hand_made_predictions():
    # 3 samples x 2 joints, ground truth at the origin, norm 10 (sample 2: no norm), 2 stages.
    errors = np.array([[[1.0, 3.0], [2.0, 0.0], [9.0, 9.0]],     # stage 1: errors (N, P) along x
                       [[0.0, 1.0], [4.0, 0.0], [0.0, 0.0]]])    # stage 2
    predictions = np.zeros((3, 2, 2, 2))
    predictions[..., 0] = errors.transpose(1, 0, 2)  # (N, T, P)
    gt = _joints(np.zeros((3, 2, 2)), [[True, True], [True, False], [True, True]])
    counts = PCKCounts(num_stages=2, num_parts=2)
    counts.add(predictions, gt, np.array([10.0, 10.0, np.nan]))
    assert counts.num_samples == 3 and counts.num_without_norm == 1
    # alpha 0.2 -> within 2 px. Stage 1: joint 0 has errors 1, 2 (both correct), joint 1 only 3 (wrong).
    np.testing.assert_array_equal(counts.per_joint(0, 0.2), [1.0, 0.0])
    assert counts.mean(0, 0.2) == 0.5
    # Stage 2 (also stage -1): joint 0 errors 0, 4 -> 1 of 2; joint 1 error 1 -> correct.
    np.testing.assert_array_equal(counts.per_joint(-1, 0.2), [0.5, 1.0])
    assert counts.mean(1, 0.2) == 0.75
    # alpha 0.1 -> within 1 px: stage 1 joint 0 has only the error 1, joint 1 nothing.
    assert counts.mean(0, 0.1) == 0.25
    assert counts.curve(0).shape == (51,) and counts.curve(0)[0] == 0.0  # no error is 0 in stage 1
    np.testing.assert_array_equal(counts.alphas, [k / 100 for k in range(51)])
    with pytest.raises(ValueError, match="alpha 0.123"):
        counts.mean(0, 0.123)


def test_pck_counts_sum_equals_counts_of_the_concatenated_batches():
    rng = np.random.default_rng(2)
    predictions = rng.normal(scale=15, size=(40, 3, 14, 2))
    gt = _joints(rng.normal(scale=15, size=(40, 14, 2)), rng.random((40, 14)) > 0.3)
    norm = rng.uniform(10, 50, size=40)
    norm[[5, 33]] = [np.nan, 0.0]
    whole, first, second = PCKCounts(3, 14), PCKCounts(3, 14), PCKCounts(3, 14)
    whole.add(predictions, gt, norm)
    first.add(predictions[:25], gt[:25], norm[:25])
    second.add(predictions[25:], gt[25:], norm[25:])
    summed = first + second
    np.testing.assert_array_equal(summed.to_array(), whole.to_array())
    assert summed.num_samples == 40 and summed.num_without_norm == 2
    assert summed.mean(-1, 0.2) == whole.mean(-1, 0.2) and summed.auc(1) == whole.auc(1)
    assert first.num_samples == 25  # the operands are left as they were
    # the all-reduce path gives the same sum
    reduced = first.reduced(lambda values: values + second.to_array())
    np.testing.assert_array_equal(reduced.to_array(), whole.to_array())


def test_adding_mismatched_pck_counts_raises():
    with pytest.raises(ValueError, match="shape"):
        PCKCounts(2, 14) + PCKCounts(2, 16)
    with pytest.raises(ValueError, match="shape"):
        PCKCounts(1, 14) + PCKCounts(2, 14)
    with pytest.raises(ValueError, match="alpha"):
        PCKCounts(1, 14) + PCKCounts(1, 14, alphas=PCK_CURVE_ALPHAS + 0.001)
    with pytest.raises(TypeError):
        PCKCounts(1, 14) + 1
