"""Data-spec parsing: names, paths, '+' joins (ConcatDataset) and errors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from cpm_model.joints import LSP
from preprocessing.datasets import DatasetError, LSPDataset, LSPETDataset, MPIIDataset
from preprocessing.datasets.registry import known_names
from preprocessing.spec import ConcatDataset, parse_data_spec


def make_lspet_dir(root: Path, lspet_dir: Path, count: int) -> Path:
    (root / "images").mkdir(parents=True)
    for i in range(1, count + 1):
        shutil.copyfile(lspet_dir / "images" / f"im{i:05d}.jpg", root / "images" / f"im{i:05d}.jpg")
    joints = scipy.io.loadmat(str(lspet_dir / "joints.mat"))["joints"][:, :, :count]
    scipy.io.savemat(str(root / "joints.mat"), {"joints": joints})
    return root


def make_lsp_dir(root: Path, lspet_dir: Path, count: int) -> Path:
    (root / "images").mkdir(parents=True)
    for i in range(1, count + 1):
        shutil.copyfile(lspet_dir / "images" / f"im{i:05d}.jpg", root / "images" / f"im{i:04d}.jpg")
    joints = scipy.io.loadmat(str(lspet_dir / "joints.mat"))["joints"][:, :, :count].transpose(1, 0, 2).copy()
    joints[2] = 1 - joints[2]
    scipy.io.savemat(str(root / "joints.mat"), {"joints": joints})
    return root


def make_mpii_dir(root: Path, lspet_dir: Path) -> Path:
    (root / "images").mkdir(parents=True)
    shutil.copyfile(lspet_dir / "images" / "im00001.jpg", root / "images" / "000000001.jpg")
    person = {"image": "000000001.jpg", "center": [50, 60], "scale": 1.0,
              "joints": [[10 + j, 20 + j] for j in range(16)], "joints_vis": [1] * 16}
    (root / "mpii_val.json").write_text(json.dumps([person]))
    return root


def test_lspet_spec_on_real_data(lspet_dir):
    dataset = parse_data_spec(f"lspet:{lspet_dir}")
    assert isinstance(dataset, LSPETDataset)
    assert len(dataset) == 9000 and dataset.root == lspet_dir.resolve()


def test_name_is_case_and_space_tolerant(tmp_path, lspet_dir):
    root = make_lspet_dir(tmp_path / "lspet", lspet_dir, 5)
    dataset = parse_data_spec(f"  LSPET:{root} ")
    assert isinstance(dataset, LSPETDataset) and len(dataset) == 5


def test_each_reader_by_name(tmp_path, lspet_dir):
    lsp = parse_data_spec(f"lsp:{make_lsp_dir(tmp_path / 'lsp', lspet_dir, 4)}")
    mpii = parse_data_spec(f"mpii:{make_mpii_dir(tmp_path / 'mpii', lspet_dir)}")
    assert isinstance(lsp, LSPDataset) and len(lsp) == 4
    assert isinstance(mpii, MPIIDataset) and len(mpii) == 1
    np.testing.assert_allclose(mpii.sample(0).center, [49.0, 59.0])


def test_relative_and_tilde_paths_become_absolute(tmp_path, lspet_dir, monkeypatch):
    make_lspet_dir(tmp_path / "data" / "lspet", lspet_dir, 3)
    monkeypatch.chdir(tmp_path / "data")
    assert parse_data_spec("lspet:lspet").root == (tmp_path / "data" / "lspet").resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_data_spec("lspet:~/data/lspet").root == (tmp_path / "data" / "lspet").resolve()


def test_path_may_contain_colons(tmp_path, lspet_dir):
    root = make_lspet_dir(tmp_path / "odd:name:here", lspet_dir, 3)
    dataset = parse_data_spec(f"lspet:{root}")
    assert dataset.root == root.resolve() and len(dataset) == 3


def test_plus_joins_datasets_of_one_joint_set(tmp_path, lspet_dir):
    lsp_root = make_lsp_dir(tmp_path / "lsp", lspet_dir, 6)
    lspet_root = make_lspet_dir(tmp_path / "lspet", lspet_dir, 20)
    joined = parse_data_spec(f"lsp:{lsp_root}+lspet:{lspet_root}")
    assert isinstance(joined, ConcatDataset)
    assert len(joined) == 26 and joined.joint_set is LSP
    lsp, lspet = joined.members
    # Global index 6 is LSPET sample 0, whose joints equal LSP sample 0's x, y (same source image).
    sample = joined.sample(6)
    assert sample.index == 6 and sample.extras["member"] == 1 and sample.extras["member_index"] == 0
    np.testing.assert_array_equal(sample.joints, lspet.sample(0).joints)
    np.testing.assert_array_equal(joined.sample(0).joints[:, :2], sample.joints[:, :2])
    np.testing.assert_array_equal(joined.load_image(6), lspet.load_image(0))
    with pytest.raises(IndexError):
        joined.sample(26)
    # Splits: each member's own split, shifted by the member's offset.
    for split in ("train", "val", "test", "all"):
        expected = np.concatenate([lsp.split_indices(split), lspet.split_indices(split) + 6])
        np.testing.assert_array_equal(joined.split_indices(split), expected)
    parts = np.concatenate([joined.split_indices(s) for s in ("train", "val", "test")])
    np.testing.assert_array_equal(np.sort(parts), np.arange(26))
    identity = joined.identity()
    assert identity["members"] == [lsp.identity(), lspet.identity()]
    assert json.loads(json.dumps(identity)) == identity
    assert pickle.loads(pickle.dumps(joined)).identity() == identity


def test_plus_rejects_different_joint_sets(tmp_path, lspet_dir):
    lspet_root = make_lspet_dir(tmp_path / "lspet", lspet_dir, 3)
    mpii_root = make_mpii_dir(tmp_path / "mpii", lspet_dir)
    with pytest.raises(DatasetError, match="cannot join") as info:
        parse_data_spec(f"lspet:{lspet_root}+mpii:{mpii_root}")
    message = str(info.value)
    assert f"lspet:{lspet_root}" in message and f"mpii:{mpii_root}" in message
    assert "'lsp'" in message and "'mpii'" in message


def test_plus_rejects_the_same_dataset_twice(tmp_path, lspet_dir):
    root = make_lspet_dir(tmp_path / "lspet", lspet_dir, 3)
    with pytest.raises(DatasetError, match="twice"):
        parse_data_spec(f"lspet:{root}+lspet:{root}")


@pytest.mark.parametrize("spec, expected", [
    ("coco:/data/coco", r"unknown dataset 'coco' .* known: \['lspet', 'lsp', 'mpii', 'synthetic'\]"),
    ("lspet", r"needs a path: 'lspet:PATH'"),
    ("lsp:", r"needs a path: 'lsp:PATH'"),
    ("", "empty data spec"),
    ("synthetic+", r"empty item around '\+'"),
    ("synthetic:abc", "'synthetic:N' with N a positive integer"),
    ("synthetic:0", "'synthetic:N' with N a positive integer"),
])
def test_bad_specs(spec, expected):
    with pytest.raises(DatasetError, match=expected):
        parse_data_spec(spec)


def test_known_names():
    assert known_names() == ("lspet", "lsp", "mpii", "synthetic")


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as info:
        parse_data_spec(f"lspet:{tmp_path / 'missing'}")
    assert str(tmp_path / "missing") in str(info.value)


def test_synthetic_specs():
    synthetic = pytest.importorskip("preprocessing.datasets.synthetic")
    default = parse_data_spec("synthetic")
    assert isinstance(default, synthetic.SyntheticDataset)
    assert len(default) == 2000 and default.joint_set is LSP
    small = parse_data_spec("synthetic:50")
    assert len(small) == 50
    joined = parse_data_spec("synthetic:30+synthetic:50")
    assert isinstance(joined, ConcatDataset) and len(joined) == 80
