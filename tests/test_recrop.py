"""The second pass: re-crop affines, the training re-crop, and two-pass prediction mapped back to
original pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpm_model.augment import AugmentSettings, random_augment
from cpm_model.geometry import apply_affine, crop_affine, invert_affine
from cpm_model.joints import LSP
from cpm_model.recrop import MIN_SIDE_FRACTION, compose, recrop_affines
from pipeline.train.inference import decode_all_stages, predict_crops, predict_two_pass
from pipeline.train.scoring import evaluate_batches

S = 128


def _points(*xy):
    return torch.tensor([xy], dtype=torch.float64)


def test_recrop_frames_the_box_at_the_training_crop_scale():
    # Box (20, 30)-(60, 90): centre (40, 60), longer side 60 -> re-crop side 1.3 x 60 = 78 px.
    affine = recrop_affines(_points((20, 30), (60, 90), (35, 50)), torch.ones(1, 3, dtype=torch.bool), S, 1.3)[0]
    expected = crop_affine((40.0, 60.0), 78.0, S)
    np.testing.assert_allclose(affine.numpy(), expected, atol=1e-12)
    mapped = apply_affine(np.array([[40.0, 60.0], [40.0, 90.0]]), affine.numpy())
    np.testing.assert_allclose(mapped[0], [63.5, 63.5])  # the box centre lands on the crop centre
    np.testing.assert_allclose(mapped[1, 1] - mapped[0, 1], S / 1.3 / 2)  # half the person is 49.2 px


def test_recrop_ignores_invalid_points_and_keeps_crops_it_cannot_frame():
    points = _points((20, 30), (60, 90), (500, -400))
    valid = torch.tensor([[True, True, False]])
    np.testing.assert_allclose(recrop_affines(points, valid, S, 1.3)[0].numpy(), crop_affine((40, 60), 78, S))
    one_point = torch.tensor([[True, False, False]])
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(recrop_affines(points, one_point, S, 1.3)[0].numpy(), identity, atol=1e-12)


def test_recrop_side_is_clamped_when_the_joints_collapse():
    affine = recrop_affines(_points((50, 50), (51, 50)), torch.ones(1, 2, dtype=torch.bool), S, 1.3)[0]
    assert affine[0, 0].item() == pytest.approx(1 / MIN_SIDE_FRACTION)  # a 32 px re-crop, not 1.3 px


def test_compose_is_outer_after_inner():
    gen = np.random.default_rng(0)
    outer, inner = gen.normal(size=(2, 3)), gen.normal(size=(2, 3))
    points = gen.normal(size=(5, 2))
    composed = compose(torch.from_numpy(outer)[None], torch.from_numpy(inner)[None])[0].numpy()
    np.testing.assert_allclose(apply_affine(points, composed), apply_affine(apply_affine(points, inner), outer))


def test_training_recrop_puts_the_annotated_box_at_the_centre_at_crop_scale():
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, S, S)
    joints = torch.zeros(2, LSP.num_parts, 3)
    joints[:, :, 0] = torch.linspace(30, 70, LSP.num_parts)
    joints[:, :, 1] = torch.linspace(20, 60, LSP.num_parts)
    joints[:, :, 2] = 1
    no_jitter = AugmentSettings(scale_min=1.0, scale_max=1.0, rotation_deg=0.0, flip=False, max_shift=0.0)
    _, _, moved = random_augment(images, joints, no_jitter, gen, LSP.flip_permutation(), 1.0,
                                 recrop_prob=1.0, crop_context=1.3)
    lo, hi = moved[..., :2].amin(dim=1), moved[..., :2].amax(dim=1)
    torch.testing.assert_close((lo + hi) / 2, torch.full((2, 2), 63.5, dtype=lo.dtype), atol=1e-4, rtol=0)
    torch.testing.assert_close(hi - lo, torch.full((2, 2), S / 1.3, dtype=lo.dtype), atol=1e-4, rtol=0)
    # recrop_prob 0 draws nothing extra: the augmentation stream is the one-pass training's.
    a = random_augment(images, joints, AugmentSettings(), torch.Generator().manual_seed(3), LSP.flip_permutation(), 1.0)
    b = random_augment(images, joints, AugmentSettings(), torch.Generator().manual_seed(3), LSP.flip_permutation(), 1.0,
                       recrop_prob=0.0, crop_context=1.3)
    torch.testing.assert_close(a[2], b[2], atol=0, rtol=0)


class ColourDotFinder(torch.nn.Module):
    """A fixed (untrained) network: part 0's belief is the red channel, part 1's the green one,
    pooled to stride-8 cells; it finds a red and a green dot wherever they are."""

    stages, num_parts = 1, 2

    def forward(self, images):
        pooled = torch.nn.functional.avg_pool2d(images, 8)  # (B, 3, M, M)
        red, green = pooled[:, 0] - pooled[:, 2], pooled[:, 1] - pooled[:, 2]
        background = torch.zeros_like(red)
        return torch.stack([red, green, background], dim=1)[:, None]  # (B, T=1, P+1, M, M)


def _dots_image(red_xy, green_xy, size=S):
    image = torch.zeros(1, 3, size, size)
    for channel, (x, y) in ((0, red_xy), (1, green_xy)):
        image[0, channel, y - 4:y + 4, x - 4:x + 4] = 1.0  # an 8 x 8 square centred at (x - 0.5, y - 0.5)
    return image


def test_two_pass_maps_predictions_back_to_original_pixels():
    model = ColourDotFinder()
    red, green = (44, 36), (84, 76)  # squares centred at (43.5, 35.5) and (83.5, 75.5) crop px
    images = _dots_image(red, green)
    maps, recrop, _ = predict_two_pass(model, images, crop_context=1.3)
    # The first pass finds both dots; the re-crop frames them (centre of the pair at the crop centre).
    centre = apply_affine(np.array([[63.5, 55.5]]), recrop[0].numpy())[0]
    np.testing.assert_allclose(centre, [63.5, 63.5], atol=2.0)
    assert recrop[0, 0, 0].item() == pytest.approx(S / (1.3 * 40.0), rel=0.1)  # zoomed in ~2.5x

    # The crop came from an original image through a known affine: predictions land on the dots there.
    to_original = invert_affine(crop_affine((300.0, 200.0), 256.0, S))[None]  # crop px -> original px
    maps, affines, seen = predict_crops(model, images, to_original, crop_context=1.3)
    original = decode_all_stages(maps.numpy(), affines)[0, -1]
    expected = apply_affine(np.array([[43.5, 35.5], [83.5, 75.5]]), to_original[0])
    np.testing.assert_allclose(original, expected, atol=2.0)  # 2 original px = 1 crop px
    assert seen.shape == images.shape and not torch.equal(seen, images)  # the second pass saw the re-crop


def test_scoring_with_refine_uses_the_second_pass():
    model = ColourDotFinder()
    images = _dots_image((44, 36), (84, 76))
    to_original = invert_affine(crop_affine((300.0, 200.0), 256.0, S))
    truth = apply_affine(np.array([[43.5, 35.5], [83.5, 75.5]]), to_original)
    batch = {"images": images, "affine": torch.from_numpy(to_original[None]),
             "joints_original": torch.from_numpy(np.concatenate([truth, np.ones((2, 1))], 1)[None]),
             "torso": torch.tensor([20.0]), "index": torch.tensor([0])}
    for context in (None, 1.3):
        counts, extras = evaluate_batches(model, [batch], 1, 2, refine_context=context)
        np.testing.assert_allclose(extras["predictions"][0, -1], truth, atol=2.0)
        assert counts.mean(-1, 0.2) == 1.0  # within 0.2 x 20 px = 4 px


def test_predict_image_follows_the_config_and_returns_original_pixels():
    from cpm_model.config import ExperimentConfig
    from pipeline.train.inference import predict_image
    from preprocessing import crops

    # A 300 x 400 image; the evaluation crop (image centre, side 1.3 x 0.669 x 400 = 348 px for the
    # synthetic kind) becomes 128 px. Dots at known original pixels inside it.
    config = ExperimentConfig().with_overrides({"preprocess.input_size": S, "train.precision": "fp32"})
    side = crops.image_crop_side((300, 400), config.preprocess.crop_context, crops.person_to_image_ratio("synthetic"))
    to_original = invert_affine(crop_affine(crops.image_center((300, 400)), side, S))
    red, green = apply_affine(np.array([[43.5, 35.5], [83.5, 75.5]]), to_original)
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    for channel, (x, y) in ((0, red), (1, green)):
        image[int(y) - 5:int(y) + 6, int(x) - 5:int(x) + 6, channel] = 255
    for refine in (False, True):
        result = predict_image(ColourDotFinder(), config.with_overrides({"train.eval_refine": refine}), image,
                               device=torch.device("cpu"))
        np.testing.assert_allclose(result["joints"], [red, green], atol=3.0)
        zoom = 1.0 / np.abs(np.linalg.det(result["affine"][:, :2])) ** 0.5  # crop px per original px
        assert zoom == pytest.approx(S / side, rel=1e-6) if not refine else zoom > 2 * S / side
