"""Batch augmentation: identity, flip with part swap, image/joint agreement, fresh targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpm_model.augment import (AugmentParams, AugmentSettings, affine_sampling_grid, augment_batch,
                               augmentation_affines, random_augment, sample_params, scale_about_centre_affines, warp)
from cpm_model.heatmaps import decode_belief_maps, render_belief_maps_torch
from cpm_model.joints import LSP, MPII, flip_permutation

S = 64
SIGMA = 1.0


def _random_batch(batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, S, S), generator=gen, dtype=torch.uint8)
    xy = 12 + 40 * torch.rand(batch, LSP.num_parts, 2, generator=gen)
    joints = torch.cat([xy, torch.ones(batch, LSP.num_parts, 1)], dim=-1)
    joints[0, 3, 2] = 0  # one unannotated joint
    return images, joints


def _params(batch, scale=1.0, rotation=0.0, flip=False, shift=(0.0, 0.0)):
    return AugmentParams(scale=torch.full((batch,), scale, dtype=torch.float64),
                         rotation_deg=torch.full((batch,), rotation, dtype=torch.float64),
                         flip=torch.full((batch,), flip, dtype=torch.bool),
                         shift=torch.tensor([shift] * batch, dtype=torch.float64))


def test_identity_reproduces_images_and_maps_exactly():
    images, joints = _random_batch()
    out_images, targets, out_joints = augment_batch(images, joints, _params(4), LSP.flip_permutation(), SIGMA)
    assert torch.equal(out_images, images.float() / 255.0)
    assert torch.equal(out_joints, joints)
    assert torch.equal(targets, render_belief_maps_torch(joints, S // 8, SIGMA))
    assert targets[0, 3].abs().max() == 0  # the unannotated joint has an empty map


def test_near_identity_warp_path_matches_input():
    # A tiny shift goes through grid_sample: the bilinear resampling must land on pixel centres.
    images, _ = _random_batch()
    affines = augmentation_affines(_params(4, shift=(1e-9, 0.0)), S, S)
    out = warp(images.float(), affines, S)
    assert torch.allclose(out, images.float(), atol=1e-3)


def test_flip_maps_x_to_s_minus_1_minus_x_and_swaps_pairs():
    images, joints = _random_batch()
    out_images, targets, out_joints = augment_batch(images, joints, _params(4, flip=True), LSP.flip_permutation(), SIGMA)
    # A pure mirror of an image is a column reversal (the pixel-centre convention).
    assert torch.allclose(out_images, images.float().flip(-1) / 255.0, atol=1e-5)
    right_wrist, left_wrist = LSP.names.index("right_wrist"), LSP.names.index("left_wrist")
    for b in range(4):
        assert torch.allclose(out_joints[b, left_wrist, 0], S - 1 - joints[b, right_wrist, 0], atol=1e-4)
        assert torch.allclose(out_joints[b, left_wrist, 1], joints[b, right_wrist, 1], atol=1e-4)
        assert torch.allclose(out_joints[b, right_wrist, 0], S - 1 - joints[b, left_wrist, 0], atol=1e-4)
    # The flipped targets equal the original maps with columns reversed and parts swapped.
    original = render_belief_maps_torch(joints, S // 8, SIGMA)
    perm = list(LSP.flip_permutation()) + [LSP.num_parts]
    assert torch.allclose(targets, original.flip(-1)[:, perm], atol=1e-5)
    # The unannotated left hip (3) becomes the unannotated right hip (2) of the mirrored sample.
    assert out_joints[0, 2, 2] == 0 and out_joints[0, 3, 2] == 1


def test_warped_bright_dot_lands_where_the_joint_goes():
    gen = torch.Generator().manual_seed(3)
    for trial in range(6):
        x, y = (20 + 24 * torch.rand(2, generator=gen)).round().tolist()
        image = torch.zeros(1, 3, S, S)
        image[0, :, int(y), int(x)] = 1.0
        joints = torch.zeros(1, LSP.num_parts, 3)
        joints[0, 0] = torch.tensor([x, y, 1.0])
        params = sample_params(1, AugmentSettings(scale_min=1.5, scale_max=2.0, rotation_deg=40, flip=True),
                               S, gen)
        out_images, _, out_joints = augment_batch(image, joints, params, LSP.flip_permutation(), SIGMA)
        joint = out_joints[0, 5] if params.flip[0] else out_joints[0, 0]  # right ankle <-> left ankle
        plane = out_images[0, 0]
        rows, cols = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
        weight = plane / plane.sum()
        centroid = torch.stack([(weight * cols).sum(), (weight * rows).sum()])
        assert torch.linalg.norm(centroid - joint[:2]) < 1.0, (trial, centroid, joint)


def test_targets_decode_to_warped_joints_within_a_tenth_of_a_cell():
    images, joints = _random_batch(batch=8, seed=1)
    gen = torch.Generator().manual_seed(0)
    _, targets, out_joints = random_augment(images, joints, AugmentSettings(), gen, LSP.flip_permutation(), SIGMA)
    coords, _ = decode_belief_maps(targets[:, :-1].numpy())
    visible = out_joints[..., 2].numpy() > 0
    # Joints near the border have a clipped Gaussian; score the ones well inside.
    inner = visible & (out_joints[..., :2].numpy() > 8).all(-1) & (out_joints[..., :2].numpy() < S - 9).all(-1)
    assert inner.sum() > 40
    error_cells = np.linalg.norm(coords - out_joints[..., :2].numpy(), axis=-1)[inner] / 8
    assert error_cells.max() < 0.1


def test_joints_that_leave_the_crop_are_unannotated():
    joints = torch.tensor([[[2.0, 30.0, 1.0]] + [[32.0, 32.0, 1.0]] * (LSP.num_parts - 1)])
    images = torch.zeros(1, 3, S, S)
    _, targets, out = augment_batch(images, joints, _params(1, scale=2.0), LSP.flip_permutation(), SIGMA)
    assert out[0, 0, 2] == 0 and targets[0, 0].abs().max() == 0  # 2 -> 2*(2-31.5)+31.5 < 0
    assert out[0, 1, 2] == 1


def test_same_generator_seed_same_augmentation():
    images, joints = _random_batch()
    a = random_augment(images, joints, AugmentSettings(), torch.Generator().manual_seed(5), LSP.flip_permutation(), SIGMA)
    b = random_augment(images, joints, AugmentSettings(), torch.Generator().manual_seed(5), LSP.flip_permutation(), SIGMA)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_scale_about_centre_keeps_centre_fixed():
    affines = scale_about_centre_affines([0.8, 1.2], S)
    centre = torch.tensor([(S - 1) / 2, (S - 1) / 2, 1.0], dtype=torch.float64)
    assert torch.allclose(affines @ centre, centre[:2].expand(2, 2))


def test_sampling_grid_matches_torch_affine_grid():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(3))
    for size in (8, 46, 64):
        expected = torch.nn.functional.affine_grid(theta, [5, 3, size, size], align_corners=False)
        # The same sample positions to float32 rounding (values up to ~3 in normalised units).
        torch.testing.assert_close(affine_sampling_grid(theta, size), expected, rtol=0, atol=1e-6)


def test_flip_permutation_swaps_each_pair_and_keeps_the_rest():
    assert flip_permutation(5, [(0, 4), (1, 3)]) == [4, 3, 2, 1, 0]
    assert flip_permutation(3, []) == [0, 1, 2]
    # LSP: right/left ankle, knee, hip, wrist, elbow, shoulder swap; neck (12) and head top (13) stay
    assert LSP.flip_permutation().tolist() == [5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 12, 13]
    assert MPII.flip_permutation().tolist() == [5, 4, 3, 2, 1, 0, 6, 7, 8, 9, 15, 14, 13, 12, 11, 10]
    for joint_set in (LSP, MPII):
        perm = joint_set.flip_permutation()
        assert (perm[perm] == np.arange(joint_set.num_parts)).all()  # mirroring twice is the identity
        mirrored = [name.replace("left", "#").replace("right", "left").replace("#", "right")
                    for name in joint_set.names]
        assert [joint_set.names[i] for i in perm] == mirrored  # each part takes its mirror's place
    with pytest.raises(ValueError, match="part 5"):
        flip_permutation(5, [(0, 5)])
    with pytest.raises(ValueError, match="part 1"):
        flip_permutation(5, [(0, 1), (1, 2)])
