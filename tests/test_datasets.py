"""Dataset readers and splits: the real LSPET copy, and small LSPET/LSP/MPII directories made here."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from cpm_model.joints import LSP, MPII
from preprocessing.datasets import (ALL_SPLITS, SPLITS, DatasetError, LSPDataset, LSPETDataset, MPIIDataset,
                                    SampleSkipped, hash_bucket, hashed_split_indices, split_of_name)
from preprocessing.datasets.lsp import lsp_split_indices
from preprocessing.datasets.mpii import HEAD_SIZE_FACTOR


# --- small dataset directories built from the real LSPET files ---------------------------


def lspet_source_joints(lspet_dir: Path) -> np.ndarray:
    """The real `joints` matrix, (14, 3, N), read straight from joints.mat."""
    return scipy.io.loadmat(str(lspet_dir / "joints.mat"))["joints"]


def make_lspet_dir(root: Path, lspet_dir: Path, count: int) -> Path:
    """An LSPET-format directory with the first `count` real images and their joints."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(1, count + 1):
        shutil.copyfile(lspet_dir / "images" / f"im{i:05d}.jpg", root / "images" / f"im{i:05d}.jpg")
    scipy.io.savemat(str(root / "joints.mat"), {"joints": lspet_source_joints(lspet_dir)[:, :, :count]})
    return root


def make_lsp_dir(root: Path, lspet_dir: Path, count: int) -> Path:
    """An original-LSP-format directory (im%04d.jpg, (3, 14, N), row 3 = occluded) from LSPET data."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(1, count + 1):
        shutil.copyfile(lspet_dir / "images" / f"im{i:05d}.jpg", root / "images" / f"im{i:04d}.jpg")
    lsp = lspet_source_joints(lspet_dir)[:, :, :count].transpose(1, 0, 2).copy()  # (3, 14, N)
    lsp[2] = 1 - lsp[2]  # LSP marks occluded joints, LSPET annotated ones
    scipy.io.savemat(str(root / "joints.mat"), {"joints": lsp})
    return root


def split_labels(dataset) -> np.ndarray:
    labels = np.full(len(dataset), "", dtype=object)
    for split in ("train", "val", "test"):
        labels[dataset.split_indices(split)] = split
    return labels


@pytest.fixture(scope="module")
def lspet(lspet_dir) -> LSPETDataset:
    return LSPETDataset(lspet_dir)


@pytest.fixture()
def small_lspet(tmp_path, lspet_dir) -> Path:
    return make_lspet_dir(tmp_path / "lspet_small", lspet_dir, 30)


# --- LSPET on the real data ------------------------------------------------------------------------


def test_lspet_real_count_and_sample_shapes(lspet, lspet_dir):
    assert len(lspet) == 9000
    assert lspet.joint_set is LSP
    assert lspet.missing_images == ()
    sample = lspet.sample(4499)
    assert sample.index == 4499
    assert sample.joints.shape == (14, 3) and sample.joints.dtype == np.float64
    assert Path(sample.image_path) == (lspet_dir / "images" / "im04500.jpg").resolve()
    assert sample.center is None and sample.scale is None and np.isnan(sample.head_size)


def test_lspet_joints_equal_the_mat_file(lspet, lspet_dir):
    raw = lspet_source_joints(lspet_dir)
    # First image, right knee, as stored in joints.mat (original pixels, no shift).
    np.testing.assert_allclose(lspet.sample(0).joints[1], [26.03094352, 86.41022512, 1.0], atol=1e-8)
    np.testing.assert_allclose(lspet.sample(8999).joints[13], [281.49284229, 93.51395099, 1.0], atol=1e-8)
    for index in (0, 1234, 8999):
        np.testing.assert_array_equal(lspet.sample(index).joints, raw[:, :, index])


def test_lspet_flags(lspet):
    flags = np.stack([lspet.sample(i).joints[:, 2] for i in range(len(lspet))])
    assert set(np.unique(flags)) == {0.0, 1.0}
    assert int((flags == 1).sum()) == 110819 and int((flags == 0).sum()) == 15181
    # An unannotated joint's coordinates lie outside the image: the flag is the truth.
    first = lspet.sample(0)
    assert first.joints[0, 2] == 0 and first.joints[0, 1] < 0


def test_lspet_load_image_is_rgb_uint8(lspet, lspet_dir):
    image = lspet.load_image(0)
    assert image.shape == (105, 157, 3) and image.dtype == np.uint8
    bgr = cv2.imread(str(lspet_dir / "images" / "im00001.jpg"))
    np.testing.assert_array_equal(image, bgr[:, :, ::-1])


def test_lspet_identity_is_json_and_pickle_round_trips(lspet, lspet_dir):
    identity = lspet.identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity["type"] == "lspet" and identity["count"] == 9000
    assert identity["root"] == str(lspet_dir.resolve())
    stat = (lspet_dir / "joints.mat").stat()
    assert identity["annotation"]["size"] == stat.st_size
    assert identity["annotation"]["mtime_ns"] == stat.st_mtime_ns
    clone = pickle.loads(pickle.dumps(lspet))
    assert clone.identity() == identity
    np.testing.assert_array_equal(clone.sample(77).joints, lspet.sample(77).joints)


def test_sample_index_out_of_range(lspet):
    with pytest.raises(IndexError):
        lspet.sample(9000)
    with pytest.raises(IndexError):
        lspet.sample(-1)
    assert lspet.sample(np.int64(3)).index == 3


# --- splits ----------------------------------------------------------------------------------------


def test_hash_bucket_rule():
    assert [hash_bucket(f"im{i:05d}.jpg") for i in range(1, 6)] == [21, 23, 55, 71, 83]
    digest = hashlib.sha1(b"im00005.jpg").digest()
    assert hash_bucket("im00005.jpg") == int.from_bytes(digest[:8], "big") % 100
    assert split_of_name("im00001.jpg") == "train"  # bucket 21
    assert split_of_name("im00005.jpg") == "val"  # bucket 83
    names = [f"n{i}" for i in range(200)]
    for name in names:
        bucket = hash_bucket(name)
        assert split_of_name(name) == ("train" if bucket < 80 else "val" if bucket < 90 else "test")


def test_lspet_real_splits_disjoint_cover_80_10_10(lspet):
    parts = {split: lspet.split_indices(split) for split in ("train", "val", "test")}
    assert {k: len(v) for k, v in parts.items()} == {"train": 7139, "val": 1001, "test": 860}
    joined = np.concatenate(list(parts.values()))
    assert len(np.unique(joined)) == len(joined) == 9000  # disjoint and covering
    np.testing.assert_array_equal(lspet.split_indices("all"), np.arange(9000))
    for indices in parts.values():
        assert indices.dtype == np.int64 and np.all(np.diff(indices) > 0)
    with pytest.raises(DatasetError, match="unknown split 'validation'"):
        lspet.split_indices("validation")


def test_lspet_split_is_stable_when_images_are_appended(tmp_path, lspet_dir):
    before = LSPETDataset(make_lspet_dir(tmp_path / "v1", lspet_dir, 30))
    after = LSPETDataset(make_lspet_dir(tmp_path / "v2", lspet_dir, 40))
    assert len(before) == 30 and len(after) == 40
    labels_before, labels_after = split_labels(before), split_labels(after)
    assert "" not in labels_after
    np.testing.assert_array_equal(labels_after[:30], labels_before)
    np.testing.assert_array_equal(after.sample(29).joints, before.sample(29).joints)


def test_hashed_split_indices_of_ids():
    ids = [f"synthetic-{i:06d}" for i in range(2000)]
    parts = {split: hashed_split_indices(ids, split) for split in SPLITS}
    counts = {split: len(indices) for split, indices in parts.items()}
    assert sum(counts.values()) == 2000
    assert 0.76 < counts["train"] / 2000 < 0.84 and 0.07 < counts["val"] / 2000 < 0.13
    assert 0.07 < counts["test"] / 2000 < 0.13
    # ALL_SPLITS is the union of the three, and the only other name accepted
    np.testing.assert_array_equal(np.sort(np.concatenate(list(parts.values()))), hashed_split_indices(ids, ALL_SPLITS))
    with pytest.raises(DatasetError, match=r"unknown split 'dev'; expected one of \['train', 'val', 'test', 'all'\]"):
        hashed_split_indices(ids, "dev")


# --- LSPET bad input -------------------------------------------------------------------------------


def test_lspet_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as info:
        LSPETDataset(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_lspet_root_is_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        LSPETDataset(tmp_path / "file.txt")


def test_lspet_missing_joints_mat(small_lspet):
    (small_lspet / "joints.mat").unlink()
    with pytest.raises(DatasetError, match="does not exist") as info:
        LSPETDataset(small_lspet)
    assert str(small_lspet / "joints.mat") in str(info.value)


def test_lspet_missing_joints_variable(small_lspet):
    scipy.io.savemat(str(small_lspet / "joints.mat"), {"pose": np.zeros((14, 3, 30))})
    with pytest.raises(DatasetError, match=r"no variable 'joints'; it holds \['pose'\]") as info:
        LSPETDataset(small_lspet)
    assert "joints.mat" in str(info.value)


def test_lspet_corrupt_mat_file(small_lspet):
    (small_lspet / "joints.mat").write_bytes(b"this is not a MATLAB file at all" * 10)
    with pytest.raises(DatasetError, match="not a readable MATLAB") as info:
        LSPETDataset(small_lspet)
    assert str(small_lspet / "joints.mat") in str(info.value)


@pytest.mark.parametrize("bad, expected", [
    (np.zeros((14, 2, 30)), r"shape \(14, 2, 30\); expected \(14, 3, N\)"),
    (np.zeros((3, 14, 30)), r"original LSP layout .* use 'lsp:PATH'"),
    (np.zeros((14, 3)), r"shape \(14, 3\); expected \(14, 3, N\)"),
    (np.zeros((14, 3, 30), dtype=np.complex128), r"dtype complex128; expected real numbers"),
])
def test_lspet_bad_joint_matrix(small_lspet, bad, expected):
    scipy.io.savemat(str(small_lspet / "joints.mat"), {"joints": bad})
    with pytest.raises(DatasetError, match=expected) as info:
        LSPETDataset(small_lspet)
    assert str(small_lspet / "joints.mat") in str(info.value)


def test_lspet_bad_flag_value(small_lspet, lspet_dir):
    joints = lspet_source_joints(lspet_dir)[:, :, :30].copy()
    joints[4, 2, 6] = 2.0
    scipy.io.savemat(str(small_lspet / "joints.mat"), {"joints": joints})
    with pytest.raises(DatasetError, match="sample 7, joint 4 has flag 2.0; expected 0 or 1"):
        LSPETDataset(small_lspet)


def test_lspet_no_images_dir(small_lspet):
    shutil.rmtree(small_lspet / "images")
    with pytest.raises(DatasetError, match="does not exist") as info:
        LSPETDataset(small_lspet)
    assert str(small_lspet / "images") in str(info.value)


def test_lspet_empty_images_dir(small_lspet):
    shutil.rmtree(small_lspet / "images")
    (small_lspet / "images").mkdir()
    with pytest.raises(DatasetError, match="contains no images"):
        LSPETDataset(small_lspet)


def test_lspet_images_named_otherwise(small_lspet):
    for path in (small_lspet / "images").iterdir():
        path.rename(path.with_name(path.name.replace("im000", "im0")))  # im00001.jpg -> im001.jpg
    with pytest.raises(DatasetError, match=r"none of the 30 images .*im00001.jpg"):
        LSPETDataset(small_lspet)


def test_lspet_missing_image_is_a_per_sample_skip(small_lspet):
    (small_lspet / "images" / "im00027.jpg").unlink()
    dataset = LSPETDataset(small_lspet)
    assert len(dataset) == 30
    assert dataset.missing_images == ("im00027.jpg",)
    assert dataset.identity()["images_found"] == 29
    assert dataset.sample(26).joints.shape == (14, 3)  # annotations stay readable
    with pytest.raises(SampleSkipped) as info:
        dataset.load_image(26)
    assert info.value.reason == "unreadable_image"
    assert str(small_lspet / "images" / "im00027.jpg") in str(info.value)
    assert "not found" in str(info.value)
    assert dataset.load_image(25).shape[2] == 3


@pytest.mark.parametrize("content", [b"not a jpeg", b""])
def test_lspet_undecodable_image_is_skipped(small_lspet, content):
    (small_lspet / "images" / "im00002.jpg").write_bytes(content)
    dataset = LSPETDataset(small_lspet)
    with pytest.raises(SampleSkipped, match="not a decodable image") as info:
        dataset.load_image(1)
    assert info.value.reason == "unreadable_image"
    assert str(small_lspet / "images" / "im00002.jpg") in str(info.value)


def test_lspet_accepts_tilde_path(tmp_path, lspet_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_lspet_dir(tmp_path / "data", lspet_dir, 5)
    dataset = LSPETDataset("~/data")
    assert len(dataset) == 5 and dataset.root == (tmp_path / "data").resolve()


# --- LSP -------------------------------------------------------------------------------------------


def test_lsp_reader_matches_lspet_source(tmp_path, lspet_dir):
    count = 12
    lsp = LSPDataset(make_lsp_dir(tmp_path / "lsp", lspet_dir, count))
    raw = lspet_source_joints(lspet_dir)
    assert len(lsp) == count and lsp.joint_set is LSP
    for index in range(count):
        sample = lsp.sample(index)
        np.testing.assert_array_equal(sample.joints[:, :2], raw[:, :2, index])
        np.testing.assert_array_equal(sample.joints[:, 2], np.ones(14))  # all joints labelled in LSP
        np.testing.assert_array_equal(sample.extras["occluded"], raw[:, 2, index] == 0)
    assert Path(lsp.sample(3).image_path).name == "im0004.jpg"
    np.testing.assert_array_equal(lsp.load_image(0), LSPETDataset(lspet_dir).load_image(0))
    # Fewer than 1,000 images: all in the official training part, about 10% held out for val.
    np.testing.assert_array_equal(np.sort(np.concatenate([lsp.split_indices("train"), lsp.split_indices("val")])),
                                  np.arange(count))
    assert len(lsp.split_indices("test")) == 0
    assert lsp.identity()["type"] == "lsp"


def test_lsp_standard_split():
    names = [f"im{i:04d}.jpg" for i in range(1, 2001)]
    train, val, test = (lsp_split_indices(names, split) for split in ("train", "val", "test"))
    np.testing.assert_array_equal(test, np.arange(1000, 2000))  # images 1001-2000
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    assert len(val) == 106 and len(train) == 894
    assert all(split_of_name(names[i]) == "val" for i in val)
    np.testing.assert_array_equal(lsp_split_indices(names, "all"), np.arange(2000))


def test_lsp_reader_rejects_lspet_layout(small_lspet):
    for path in (small_lspet / "images").iterdir():
        path.rename(path.with_name(path.name.replace("im0", "im", 1)))  # im%05d -> im%04d
    with pytest.raises(DatasetError, match=r"shape \(14, 3, 30\), the LSPET layout .* use 'lspet:PATH'") as info:
        LSPDataset(small_lspet)
    assert str(small_lspet / "joints.mat") in str(info.value)


def test_lsp_bad_occlusion_bit(tmp_path, lspet_dir):
    root = make_lsp_dir(tmp_path / "lsp", lspet_dir, 4)
    lsp = scipy.io.loadmat(str(root / "joints.mat"))["joints"]
    lsp[2, 5, 1] = 0.5
    scipy.io.savemat(str(root / "joints.mat"), {"joints": lsp})
    with pytest.raises(DatasetError, match="sample 2, joint 5 has occlusion bit 0.5"):
        LSPDataset(root)


# --- MPII ------------------------------------------------------------------------------------------


def names_in_split(split: str, count: int) -> list[str]:
    """The first `count` MPII-style image names (%09d.jpg) that hash into `split`."""
    names = (f"{i:09d}.jpg" for i in range(1, 10_000))
    return [name for name in names if split_of_name(name) == split][:count]


def mpii_person(image: str, offset: float, headbox=None) -> dict:
    joints = [[10.0 + j + offset, 20.0 + 2 * j] for j in range(16)]
    vis = [1] * 16
    vis[3] = 0
    person = {"image": image, "center": [50.0 + offset, 60.0], "scale": 1.5, "joints": joints, "joints_vis": vis}
    if headbox is not None:
        person["headbox"] = headbox
    return person


@pytest.fixture()
def mpii_root(tmp_path, lspet_dir) -> Path:
    """HRNet layout: annot/train.json, annot/valid.json, annot/gt_valid.mat, images/."""
    root = tmp_path / "mpii"
    (root / "images").mkdir(parents=True)
    (root / "annot").mkdir()
    train_image, val_image = names_in_split("train", 1)[0], names_in_split("val", 1)[0]
    test_image = names_in_split("test", 1)[0]
    for k, name in enumerate((train_image, val_image, test_image)):
        shutil.copyfile(lspet_dir / "images" / f"im{k + 1:05d}.jpg", root / "images" / name)
    train = [mpii_person(train_image, 0.0), mpii_person(train_image, 100.0), mpii_person(val_image, 5.0)]
    valid = [mpii_person(test_image, 7.0), mpii_person(test_image, 9.0)]
    (root / "annot" / "train.json").write_text(json.dumps(train))
    (root / "annot" / "valid.json").write_text(json.dumps(valid))
    # headboxes_src (2 corners, x/y, M people), 1-based: boxes 30x40 and 6x8 px.
    boxes = np.array([[[11.0, 21.0], [41.0, 61.0]], [[1.0, 1.0], [7.0, 9.0]]]).transpose(1, 2, 0)
    scipy.io.savemat(str(root / "annot" / "gt_valid.mat"), {"headboxes_src": boxes})
    return root


def test_mpii_reader_hrnet_layout(mpii_root):
    dataset = MPIIDataset(mpii_root)
    assert len(dataset) == 5 and dataset.joint_set is MPII
    first = dataset.sample(0)
    assert first.joints.shape == (16, 3)
    # 1-based MATLAB coordinates -> 0-based: joint j was (10 + j, 20 + 2j).
    np.testing.assert_allclose(first.joints[0], [9.0, 19.0, 1.0])
    np.testing.assert_allclose(first.joints[15], [24.0, 49.0, 1.0])
    assert first.joints[3, 2] == 0.0  # joints_vis 0 -> not annotated
    np.testing.assert_allclose(first.center, [49.0, 59.0])
    assert first.scale == 1.5
    assert np.isnan(first.head_size)  # training file has no head boxes
    np.testing.assert_allclose(dataset.sample(1).joints[0, :2], [109.0, 19.0])
    # Validation people get head boxes from gt_valid.mat: 0.6 x diagonal (50 and 10 px).
    assert dataset.sample(3).head_size == pytest.approx(HEAD_SIZE_FACTOR * 50.0)
    assert dataset.sample(4).head_size == pytest.approx(HEAD_SIZE_FACTOR * 10.0)
    np.testing.assert_allclose(dataset.sample(3).extras["headbox"], [10.0, 20.0, 40.0, 60.0])
    # Splits: train file -> train/val by image-name hash (whole images), valid file -> test.
    np.testing.assert_array_equal(dataset.split_indices("train"), [0, 1])
    np.testing.assert_array_equal(dataset.split_indices("val"), [2])
    np.testing.assert_array_equal(dataset.split_indices("test"), [3, 4])
    assert dataset.load_image(3).dtype == np.uint8
    identity = dataset.identity()
    assert json.loads(json.dumps(identity)) == identity
    assert [stamp["file"] for stamp in identity["annotation"]] == ["train.json", "valid.json", "gt_valid.mat"]
    assert pickle.loads(pickle.dumps(dataset)).identity() == identity


def test_mpii_reader_mmpose_layout_with_headbox_key(tmp_path, lspet_dir):
    root = tmp_path / "mpii"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    shutil.copyfile(lspet_dir / "images" / "im00001.jpg", root / "images" / "000000001.jpg")
    val = [mpii_person("000000001.jpg", 0.0, headbox=[1.0, 1.0, 31.0, 41.0]),
           {**mpii_person("000000001.jpg", 0.0), "center": [-1, -1], "scale": -1}]
    (root / "annotations" / "mpii_val.json").write_text(json.dumps(val))
    dataset = MPIIDataset(root)
    assert len(dataset) == 2
    assert dataset.sample(0).head_size == pytest.approx(0.6 * 50.0)
    assert dataset.sample(1).center is None and dataset.sample(1).scale is None
    np.testing.assert_array_equal(dataset.split_indices("test"), [0, 1])
    assert len(dataset.split_indices("train")) == 0


def test_mpii_missing_image_is_a_per_sample_skip(mpii_root):
    name = json.loads((mpii_root / "annot" / "valid.json").read_text())[0]["image"]
    (mpii_root / "images" / name).unlink()
    dataset = MPIIDataset(mpii_root)
    assert dataset.missing_images == (name,)
    assert dataset.identity()["images_found"] == 3
    with pytest.raises(SampleSkipped, match=name) as info:
        dataset.load_image(4)
    assert info.value.reason == "unreadable_image"


def test_mpii_no_annotation_file(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"no annotation file .*mpii_train\.json.*valid\.json"):
        MPIIDataset(tmp_path)


@pytest.mark.parametrize("text, expected", [
    ("[{not json", "is not a readable JSON file"),
    ('{"image": "a.jpg"}', "expected a non-empty JSON list of people, got dict"),
    ("[]", r"expected a non-empty JSON list of people, got list \(empty\)"),
    ('[{"image": "a.jpg", "center": [1, 2], "scale": 1}]', r"entry 0 lacks key\(s\) \['joints', 'joints_vis'\]"),
    ('[["a.jpg"]]', "entry 0 is list; expected an object"),
])
def test_mpii_bad_json(mpii_root, text, expected):
    path = mpii_root / "annot" / "train.json"
    path.write_text(text)
    with pytest.raises(DatasetError, match=expected) as info:
        MPIIDataset(mpii_root)
    assert str(path) in str(info.value)


def test_mpii_bad_entry_values(mpii_root):
    path = mpii_root / "annot" / "train.json"
    people = json.loads(path.read_text())
    people[1]["joints"] = people[1]["joints"][:15]
    path.write_text(json.dumps(people))
    with pytest.raises(DatasetError, match=r"entry 1 key 'joints' .* expected numbers of shape \(16, 2\)"):
        MPIIDataset(mpii_root)
    people[1] = {**mpii_person("x.jpg", 0.0), "scale": 0}
    path.write_text(json.dumps(people))
    with pytest.raises(DatasetError, match=r"entry 1 has centre .* scale 0.0; expected .* scale > 0"):
        MPIIDataset(mpii_root)


def test_mpii_headbox_count_mismatch(mpii_root):
    scipy.io.savemat(str(mpii_root / "annot" / "gt_valid.mat"), {"headboxes_src": np.zeros((2, 2, 3))})
    with pytest.raises(DatasetError, match=r"gt_valid.mat: 'headboxes_src' has shape \(2, 2, 3\); expected \(2, 2, 2\)"):
        MPIIDataset(mpii_root)
