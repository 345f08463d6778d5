"""The embedded synthetic dataset: deterministic, well-formed, and the front/back left-right rule holds."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest

from cpm_model.joints import LSP
from preprocessing.datasets import DatasetError, PoseSample
from preprocessing.datasets.synthetic import GENERATOR_VERSION, SyntheticDataset

R_HIP, L_HIP, R_WRIST, R_SHOULDER, L_SHOULDER, L_WRIST = 2, 3, 6, 8, 9, 11


@pytest.fixture(scope="module")
def ds() -> SyntheticDataset:
    return SyntheticDataset(num_samples=300, seed=0, image_size=160)


@pytest.fixture(scope="module")
def all_joints(ds) -> np.ndarray:
    return np.stack([ds.sample(i).joints for i in range(len(ds))])


def test_identity_and_len():
    ds = SyntheticDataset(num_samples=123, seed=7, image_size=96)
    assert len(ds) == 123
    assert ds.joint_set is LSP
    assert ds.identity() == {"type": "synthetic", "num_samples": 123, "seed": 7, "image_size": 96,
                             "version": GENERATOR_VERSION}
    assert SyntheticDataset().identity()["num_samples"] == 2000
    assert SyntheticDataset().identity()["image_size"] == 160


def test_invalid_arguments_and_indices():
    with pytest.raises(DatasetError):
        SyntheticDataset(num_samples=0)
    with pytest.raises(DatasetError):
        SyntheticDataset(image_size=8)
    ds = SyntheticDataset(num_samples=5)
    with pytest.raises(IndexError):
        ds.sample(5)
    with pytest.raises(IndexError):
        ds.load_image(-1)
    with pytest.raises(DatasetError):
        ds.split_indices("training")


def test_sample_and_image_shapes(ds):
    s = ds.sample(3)
    assert isinstance(s, PoseSample)
    assert s.index == 3
    assert s.joints.shape == (14, 3) and s.joints.dtype == np.float64
    assert np.all(s.joints[:, 2] == 1)
    assert s.extras["facing"] in ("front", "back")
    img = ds.load_image(3)
    assert img.shape == (160, 160, 3) and img.dtype == np.uint8
    assert img.std() > 10  # not blank
    small = SyntheticDataset(num_samples=4, image_size=64).load_image(0)
    assert small.shape == (64, 64, 3)


def test_deterministic_for_a_seed():
    a, b = SyntheticDataset(50, seed=3), SyntheticDataset(50, seed=3)
    for i in (0, 17, 49):
        np.testing.assert_array_equal(a.load_image(i), b.load_image(i))
        np.testing.assert_array_equal(a.sample(i).joints, b.sample(i).joints)
        # sample() and load_image() can be called in any order, any number of times.
        np.testing.assert_array_equal(a.load_image(i), a.load_image(i))
    c = SyntheticDataset(50, seed=4)
    assert not np.array_equal(a.load_image(0), c.load_image(0))
    assert not np.allclose(a.sample(0).joints, c.sample(0).joints)
    # Different indices differ too, and a different dataset length does not change a sample.
    assert not np.allclose(a.sample(0).joints, a.sample(1).joints)
    np.testing.assert_array_equal(SyntheticDataset(500, seed=3).load_image(17), a.load_image(17))


def test_picklable(ds):
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.load_image(5), ds.load_image(5))


def test_joints_inside_image_and_person_centred(ds, all_joints):
    xy = all_joints[..., :2]
    assert np.all(xy >= 0) and np.all(xy <= ds.image_size - 1)
    centre = (xy.min(1) + xy.max(1)) / 2.0
    assert np.all(np.abs(centre - (ds.image_size - 1) / 2.0) < 0.15 * ds.image_size)
    height = xy[..., 1].max(1) - xy[..., 1].min(1)
    assert 0.35 * ds.image_size < np.median(height) < 0.9 * ds.image_size


def test_both_sides_present_and_distinct(all_joints):
    xy = all_joints[..., :2]
    for a, b in LSP.flip_pairs:
        apart = np.linalg.norm(xy[:, a] - xy[:, b], axis=-1) > 2.0
        # Hips and shoulders are always apart; wrists or ankles may meet when limbs cross.
        assert apart.all() if a in (2, 3, 8, 9) else apart.mean() > 0.95
    torso = np.linalg.norm(xy[:, L_SHOULDER] - xy[:, R_HIP], axis=-1)
    assert np.all(torso > 10)


def test_front_back_rule(ds, all_joints):
    """Front view: the person's right is on the image left; back view: on the image right."""
    facing = np.array([ds.sample(i).extras["facing"] for i in range(len(ds))])
    front, back = facing == "front", facing == "back"
    assert 0.35 < front.mean() < 0.65  # both views, about equally often
    x = all_joints[..., 0]
    for r, l in ((R_SHOULDER, L_SHOULDER), (R_HIP, L_HIP)):
        assert np.mean(x[front, r] < x[front, l]) > 0.9
        assert np.mean(x[back, r] > x[back, l]) > 0.9
    # Wrists follow the rule less strictly (arms cross the body), but still mostly.
    assert np.mean(x[front, R_WRIST] < x[front, L_WRIST]) > 0.6
    assert np.mean(x[back, R_WRIST] > x[back, L_WRIST]) > 0.6
    crossed = [ds.sample(i).extras["arm_crossed"]["right"] for i in range(len(ds))]
    assert 0.1 < np.mean(crossed) < 0.4  # arms sometimes cross the body


def test_views_differ_only_at_head_and_torso_cue():
    """Front and back views are rendered differently at the head (face vs hair)."""
    ds = SyntheticDataset(200, seed=1)
    samples = [ds.sample(i) for i in range(40)]
    # The head centre lies on the segment neck -> head top; compare the colour there.
    def head_pixel(i):
        j = samples[i].joints
        c = np.round(0.55 * j[13, :2] + 0.45 * j[12, :2]).astype(int)
        return ds.load_image(i)[c[1], c[0]].astype(float)
    front = np.mean([head_pixel(i).mean() for i in range(40) if samples[i].extras["facing"] == "front"])
    back = np.mean([head_pixel(i).mean() for i in range(40) if samples[i].extras["facing"] == "back"])
    assert front > back + 40  # skin-coloured face vs dark hair


def test_splits_are_deterministic_disjoint_and_cover(ds):
    train, val, test = (ds.split_indices(s) for s in ("train", "val", "test"))
    every = ds.split_indices("all")
    np.testing.assert_array_equal(every, np.arange(len(ds)))
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val, test])), every)
    assert 0.7 < len(train) / len(ds) < 0.9
    assert len(val) > 0 and len(test) > 0
    np.testing.assert_array_equal(SyntheticDataset(300, seed=0).split_indices("val"), val)
    # A sample keeps its split when the dataset grows.
    assert set(train) <= set(SyntheticDataset(600, seed=0).split_indices("train"))


def test_generation_is_fast():
    """Not a timed assertion (machines differ): renders a batch and reports the rate."""
    ds = SyntheticDataset(num_samples=100, seed=2)
    start = time.perf_counter()
    images = [ds.load_image(i) for i in range(100)]
    elapsed = time.perf_counter() - start
    assert len(images) == 100
    print(f"synthetic: 100 images of 160 px in {elapsed:.2f} s ({100 / elapsed:.0f} images/s)")
