"""Person crops: the training rule, the ground-truth-free evaluation rule and its measured scale."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cpm_model.geometry import apply_affine, crop_affine
from preprocessing import crops
from preprocessing.datasets.base import DatasetError, PoseSample, SampleSkipped


def make_joints(points, flags=None) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    flags = np.ones(len(points)) if flags is None else np.asarray(flags, dtype=np.float64)
    return np.column_stack([points, flags])


def crop_side(affine: np.ndarray, out_size: int) -> float:
    """Original pixels covered by the crop (the affine has no rotation here)."""
    return out_size / affine[0, 0]


def test_training_crop_centres_the_joint_box_and_adds_context():
    joints = make_joints([[100, 50], [140, 150], [120, 100], [0, 0]], flags=[1, 1, 1, 0])  # box 40 x 100
    affine = crops.training_crop(joints, (300, 400), crop_context=1.3, out_size=128)
    assert crop_side(affine, 128) == pytest.approx(130.0)  # 1.3 x max(40, 100)
    centre = apply_affine(np.array([[120.0, 100.0]]), affine)[0]
    np.testing.assert_allclose(centre, [63.5, 63.5])  # box centre -> crop centre (pixel centres)


def test_training_crop_has_a_floor_for_tiny_boxes():
    joints = make_joints([[100, 100], [110, 105]])  # spans 10 px: 1.3 x 10 = 13 < the floor
    affine = crops.training_crop(joints, (300, 300), crop_context=1.3, out_size=64)
    assert crop_side(affine, 64) == pytest.approx(crops.MIN_CROP_SIDE_PX)


@pytest.mark.parametrize("joints, reason", [
    (make_joints([[100, 100], [103, 102]]), "person_too_small"),  # spans 3 px
    (make_joints([[100, 100], [50, 50]], flags=[0, 0]), "no_annotated_joints"),
    (make_joints([[-40, 10], [500, 20]]), "joints_outside_image"),
])
def test_uncroppable_samples_are_skipped_with_a_reason_and_the_name(joints, reason):
    with pytest.raises(SampleSkipped, match="im00042.jpg") as info:
        crops.training_crop(joints, (200, 300), 1.3, 64, image_name="im00042.jpg")
    assert info.value.reason == reason


def test_evaluation_crop_of_a_person_centred_image_uses_image_centre_and_size():
    affine = crops.evaluation_crop((200, 300), crop_context=1.3, out_size=128, person_ratio=0.392)
    assert crop_side(affine, 128) == pytest.approx(1.3 * 0.392 * 300)
    np.testing.assert_allclose(apply_affine(np.array([[149.5, 99.5]]), affine)[0], [63.5, 63.5])


def test_evaluation_crop_with_rough_centre_and_scale_is_the_mmpose_box():
    affine = crops.evaluation_crop((480, 640), crop_context=1.25, out_size=256, center=np.array([300.0, 200.0]),
                                   scale=2.0)
    assert crop_side(affine, 256) == pytest.approx(200 * 2.0 * 1.25)
    np.testing.assert_allclose(apply_affine(np.array([[300.0, 200.0]]), affine)[0], [127.5, 127.5])


@pytest.mark.parametrize("split, train_crop", [("val", "bbox"), ("test", "bbox"), ("train", "image")])
def test_evaluation_protocol_never_looks_at_the_joints(split, train_crop):
    rng = np.random.default_rng(0)
    affines = []
    for _ in range(3):
        joints = make_joints(rng.uniform(20, 180, size=(14, 2)))
        sample = PoseSample(index=0, image_path="im.jpg", joints=joints)
        affines.append(crops.person_crop(sample, (200, 240), split, train_crop, 1.3, 128, 0.392))
    np.testing.assert_array_equal(affines[0], affines[1])
    np.testing.assert_array_equal(affines[0], affines[2])
    assert crop_side(affines[0], 128) == pytest.approx(1.3 * 0.392 * 240)


def test_training_split_with_bbox_crops_follows_the_joints():
    joints = make_joints([[50, 60], [90, 160]])
    sample = PoseSample(index=0, image_path="im.jpg", joints=joints)
    affine = crops.person_crop(sample, (200, 240), "train", "bbox", 1.3, 128, 0.392)
    assert crop_side(affine, 128) == pytest.approx(130.0)


def test_each_kind_has_its_ratio_and_an_unknown_kind_is_an_error():
    assert crops.person_to_image_ratio("lspet") == crops.person_to_image_ratio("lsp") == 0.392
    assert crops.person_to_image_ratio("synthetic") == 0.669
    # MPII crops around each person's rough centre and scale; one without them takes LSPET's ratio.
    assert crops.person_to_image_ratio("mpii") == crops.DEFAULT_PERSON_TO_IMAGE_RATIO == 0.392
    with pytest.raises(DatasetError, match=r"unknown dataset 'somethingelse'; known: \['lspet', 'lsp', 'mpii'"):
        crops.person_to_image_ratio("somethingelse")


def test_the_crop_rule_in_cache_keys_is_unchanged_for_the_builtin_kinds():
    """These constants are hashed into every cache's file name: the built-in kinds' caches keep
    their names whichever kinds are cached (an added kind adds its own ratio to its own caches)."""
    expected = {"person_to_image_ratio": {"lspet": 0.392, "lsp": 0.392, "synthetic": 0.669},
                "default_person_to_image_ratio": 0.392, "mpii_person_px_per_scale": 200.0,
                "min_person_side_px": 8.0, "min_crop_side_px": 32.0}
    for kinds in ([], ["lspet"], ["lsp", "lspet"], ["mpii"], ["synthetic"]):
        assert crops.crop_rule_constants(kinds) == expected


def median_person_to_image_ratio(dataset, indices, image_hw_of) -> float:
    ratios = []
    for index in indices:
        joints = dataset.sample(int(index)).joints
        annotated = joints[joints[:, 2] > 0, :2]
        ratios.append(np.ptp(annotated, axis=0).max() / max(image_hw_of(int(index))))
    return float(np.median(ratios))


@pytest.mark.integration
def test_lspet_ratio_is_the_median_over_the_train_split(lspet_dir):
    """The evaluation scale rule: persons in evaluation crops have the training crops' median size."""
    from preprocessing.datasets.lspet import LSPETDataset

    dataset = LSPETDataset(lspet_dir)
    train = dataset.split_indices("train")

    def image_hw(index):
        with Image.open(dataset.image_path(index)) as image:  # header only, no decoding
            return image.size[::-1]

    median = median_person_to_image_ratio(dataset, train, image_hw)
    assert len(train) > 7000
    assert median == pytest.approx(crops.person_to_image_ratio("lspet"), abs=0.005), \
        "the LSPET train split changed: re-measure the lspet entry's person_to_image_ratio"


def test_synthetic_ratio_is_the_median_over_the_train_split():
    from preprocessing.datasets.synthetic import SyntheticDataset

    dataset = SyntheticDataset(num_samples=2000, seed=0)
    median = median_person_to_image_ratio(dataset, dataset.split_indices("train"),
                                          lambda index: (dataset.image_size, dataset.image_size))
    assert median == pytest.approx(crops.person_to_image_ratio("synthetic"), abs=0.005), \
        "the synthetic generator changed the person size: re-measure the synthetic entry's person_to_image_ratio"


def test_crop_joints_and_warp_image_apply_the_same_affine():
    # A 2x zoom about original pixel (20, 10): original pixel (x, y) lands at 2 (x - 20) + 15.5.
    to_crop = crop_affine((20.0, 10.0), side=16.0, out_size=32)
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[12, 23] = (255, 128, 0)  # one coloured pixel at x 23, y 12
    crop = crops.warp_image(image, to_crop, 32)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    joints = crops.crop_joints(make_joints([[23, 12], [40, 10], [0, 0]], flags=[1, 1, 0]), to_crop, 32)
    np.testing.assert_allclose(joints[:, :2], [[21.5, 19.5], [55.5, 15.5], [-24.5, -4.5]])
    np.testing.assert_array_equal(joints[:, 2], [1, 0, 0])  # joint 1 lies outside the crop, 2 unannotated
    # bilinear 2x upsampling: the dot's centre falls between crop pixels 21 and 22 (x), 19 and 20 (y)
    x, y = 21.5, 19.5
    patch = crop[int(y):int(y) + 2, int(x):int(x) + 2].astype(int)
    assert (patch[..., 0] > 0).all() and patch[..., 0].max() == patch[..., 0].min()  # symmetric around it
    assert crop[..., 0].sum() == pytest.approx(255 * 4, rel=0.05)  # the dot's energy, scaled by the 2x2 zoom
    # outside the original image the crop is black
    border = crops.warp_image(np.full((40, 60, 3), 200, np.uint8), crop_affine((0.0, 0.0), 16.0, 32), 32)
    assert (border[:8, :8] == 0).all() and (border[-8:, -8:] == 200).all()
