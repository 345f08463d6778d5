"""A dataset kind is one registry entry: a kind defined in this file alone (its reader, its five
joints, its flip pairs, PCKh with a head-size normaliser, its own person-to-image ratio) is read
from a data spec, cached, trained, scored and reported by the project's own commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cpm_model.config import load_config
from cpm_model.joints import JointSet
from cpm_model.metrics import PCKH
from pipeline import evaluate, fit
from pipeline.train import metric_names as names
from pipeline.train.inference import decode_all_stages, image_tensor, load_trained_model, predict_crops
from pipeline.train.scoring import protocol_for
from preprocessing import crops
from preprocessing.build import build_cache, cache_path_for
from preprocessing.cache import PoseCache
from preprocessing.datasets import registry
from preprocessing.datasets.base import DatasetError, PoseSample, check_index, read_rgb_image
from preprocessing.datasets.splits import ALL_SPLITS, check_split
from preprocessing.spec import parse_data_spec

# --- the toy kind: everything the project needs to know of it is below ------------------------------

TOY_JOINTS = JointSet(name="toy", names=("head", "left_hand", "right_hand", "left_foot", "right_foot"),
                      flip_pairs=((1, 2), (3, 4)))  # no torso joints: only the head size can normalise
TOY_RATIO = 0.55
TOY_COUNT = 40
TOY_HW = (72, 96)  # height, width: the evaluation crop's side follows the longer one
COLOURS = ((255, 255, 255), (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0))


class ToyDataset:
    """ROOT/{i}.png and ROOT/poses.npz (joints (N, 5, 3), head_size (N,)); split by index mod 5."""

    joint_set = TOY_JOINTS

    def __init__(self, root: str):
        self.root = Path(root)
        if not (self.root / "poses.npz").is_file():
            raise DatasetError(f"toy: {self.root / 'poses.npz'} does not exist")
        with np.load(self.root / "poses.npz") as poses:
            self.joints, self.head_size = poses["joints"], poses["head_size"]

    def identity(self) -> dict:
        return {"type": "toy", "root": str(self.root), "count": len(self)}

    def __len__(self) -> int:
        return len(self.joints)

    def split_indices(self, split: str) -> np.ndarray:
        if check_split(split) == ALL_SPLITS:
            return np.arange(len(self), dtype=np.int64)
        fold = np.arange(len(self)) % 5
        return np.flatnonzero({"train": fold < 3, "val": fold == 3, "test": fold == 4}[split]).astype(np.int64)

    def sample(self, index: int) -> PoseSample:
        index = check_index(index, len(self))
        return PoseSample(index=index, image_path=str(self.root / f"{index}.png"), joints=self.joints[index].copy(),
                          head_size=float(self.head_size[index]))

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb_image(self.root / f"{check_index(index, len(self))}.png")


TOY = registry.DatasetKind("toy", ToyDataset, TOY_JOINTS, PCKH, TOY_RATIO)


def write_toy_dataset(root: Path) -> Path:
    """TOY_COUNT images: a coloured disk on each joint of a small figure; a few joints unannotated."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    joints = np.ones((TOY_COUNT, 5, 3))
    for i in range(TOY_COUNT):
        centre = np.array([48.0, 36.0]) + rng.uniform(-6, 6, 2)
        offsets = np.array([[0, -22], [-18, -4], [18, -4], [-10, 22], [10, 22]]) + rng.uniform(-3, 3, (5, 2))
        joints[i, :, :2] = centre + offsets
        joints[i, rng.integers(1, 5), 2] = 0.0 if i % 4 == 0 else 1.0
        image = rng.integers(40, 90, (*TOY_HW, 3), dtype=np.uint8)
        for (x, y), colour in zip(np.rint(joints[i, :, :2]).astype(int).tolist(), COLOURS):
            cv2.circle(image, (x, y), 3, colour, -1)
        cv2.imwrite(str(root / f"{i}.png"), image[:, :, ::-1])
    np.savez(root / "poses.npz", joints=joints, head_size=rng.uniform(8.0, 24.0, TOY_COUNT))
    return root


# --- tests ----------------------------------------------------------------------------------------------


@pytest.fixture
def toy_kind():
    registry.register(TOY)
    yield TOY
    registry.unregister(TOY.name)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "toy")


def test_an_unregistered_kind_is_an_error_naming_the_known_ones(toy_root):
    with pytest.raises(DatasetError, match=r"unknown dataset 'toy' in data spec 'toy:.*'; "
                                           r"known: \['lspet', 'lsp', 'mpii', 'synthetic'\]"):
        parse_data_spec(f"toy:{toy_root}")
    with pytest.raises(DatasetError, match="unknown dataset 'toy'"):
        names.protocol_of("toy")


def test_a_registered_kind_is_read_and_known_everywhere(toy_kind, toy_root):
    assert registry.known_names() == ("lspet", "lsp", "mpii", "synthetic", "toy")
    dataset = parse_data_spec(f"toy:{toy_root}")
    assert isinstance(dataset, ToyDataset) and len(dataset) == TOY_COUNT
    assert names.protocol_of("toy") is PCKH and crops.person_to_image_ratio("toy") == TOY_RATIO
    with pytest.raises(DatasetError, match=r"needs a path: 'toy:PATH'"):
        parse_data_spec("toy")
    with pytest.raises(DatasetError, match=r"known: \['lspet', 'lsp', 'mpii', 'synthetic', 'toy'\]"):
        parse_data_spec("coco:/x")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.DatasetKind("toy", ToyDataset, TOY_JOINTS, PCKH, 0.3))


def test_the_cache_holds_the_kinds_joints_and_its_evaluation_crop(toy_kind, toy_root, tmp_path):
    config = load_config(None, [f"data.spec=toy:{toy_root}", "preprocess.input_size=64", "preprocess.workers=2",
                                "preprocess.crop_context=1.5"])
    cache = PoseCache(build_cache(config.data.spec, "val", config.preprocess, tmp_path, progress=False))
    assert len(cache) == TOY_COUNT // 5 and cache.path.name.startswith("toy-val-64px-")
    assert cache.joint_names == list(TOY_JOINTS.names) and cache.flip_pairs == [(1, 2), (3, 4)]
    data = cache.read(np.arange(len(cache)), keys=["affine", "head_size", "torso"])
    # Crop -> original: side 1.5 x 0.55 x 96 = 79.2 px over 64 px, centred on the image centre (47.5, 35.5).
    side = 1.5 * TOY_RATIO * 96
    expected = np.array([[side / 64, 0.0, 47.5 - side / 64 * 31.5], [0.0, side / 64, 35.5 - side / 64 * 31.5]])
    np.testing.assert_allclose(data["affine"], np.broadcast_to(expected, data["affine"].shape), atol=1e-9)
    with np.load(toy_root / "poses.npz") as poses:
        np.testing.assert_allclose(data["head_size"], poses["head_size"][3::5], rtol=1e-6)
    assert np.isnan(data["torso"]).all()  # no torso joints: a torso PCK would score nothing


def by_hand_pckh(checkpoint: Path, cache: PoseCache) -> tuple[float, list[float]]:
    """The last stage's predictions of every test crop in original pixels; a joint is correct when
    within 0.5 x its sample's head size; the mean is over joints of the per-joint fractions."""
    model, _, _, _ = load_trained_model(checkpoint)
    data = cache.read(np.arange(len(cache)), keys=["images", "affine", "joints_original", "head_size"])
    maps, to_original, _ = predict_crops(model, image_tensor(data["images"], "cpu"), data["affine"], "fp32")
    predicted = decode_all_stages(maps.numpy(), to_original)[:, -1]
    joints = data["joints_original"].astype(np.float64)
    visible = joints[:, :, 2] > 0
    hit = np.linalg.norm(predicted - joints[:, :, :2], axis=-1) <= 0.5 * data["head_size"][:, None]
    per_joint = [(hit[:, j] & visible[:, j]).sum() / visible[:, j].sum() for j in range(5)]
    return float(np.mean(per_joint)), per_joint


def test_the_kind_is_trained_scored_and_reported_by_the_commands(toy_kind, toy_root, tmp_path):
    out, cache_dir = tmp_path / "run", tmp_path / "cache"
    settings = ["preprocess.input_size=64", "preprocess.workers=1", f"data.cache_dir={cache_dir}",
                "model.stages=2", "model.width=0.125", "model.stage1_kernel=3", "model.later_kernel=3",
                "model.later_convs=1", "model.center_sigma=8", "train.batch_size=8", "train.max_steps_per_epoch=2",
                "train.optimizer=adam", "train.lr=0.003", "train.epochs=1", "train.precision=fp32"]
    overrides = [word for setting in settings for word in ("--set", setting)]
    assert fit.main(["--data", f"toy:{toy_root}", "--out", str(out), "--device", "cpu", "--quiet", "--no-figures",
                     *overrides]) == 0
    assert protocol_for(load_config(None, [f"data.spec=toy:{toy_root}"])) is PCKH
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"pckh", "pckh_stage2", "pckh_head", "pckh_left_hand", "pckh@0.1"} <= set(row)
    assert not any(key == "pck" or key.startswith("pck_") for key in row)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "pckh" and summary["best_val_pck"] == row["pckh"]

    report_path = tmp_path / "report.json"
    assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--split", "test", "--json", str(report_path),
                          "--quiet"]) == 0
    report = json.loads(report_path.read_text())
    test_cache = PoseCache(next(cache_dir.glob("toy-test-64px-*.h5")))
    mean, per_joint = by_hand_pckh(out / "best.pt", test_cache)
    assert report["metric"] == "pckh" and report["num_samples"] == len(test_cache) == TOY_COUNT // 5
    assert report["num_without_norm"] == 0  # every sample has a head size (none has a torso)
    assert report["joint_names"] == list(TOY_JOINTS.names)
    assert report["pckh"] == pytest.approx(mean, abs=1e-9)
    assert list(report["pckh_per_joint"].values()) == pytest.approx(per_joint, abs=1e-9)
    assert summary["test_pckh"] == pytest.approx(mean, abs=1e-6)  # the fit's own test row, same weights


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_an_installed_plugin_makes_the_kind_known_to_another_process(toy_kind, toy_root, tmp_path):
    """A subprocess (a command, a sweep's worker) knows only the kinds of installed entry points."""
    plugin = tmp_path / "site" / "toy_poses-0.1.dist-info"
    plugin.mkdir(parents=True)
    (plugin / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-poses\nVersion: 0.1\n")
    (plugin / "entry_points.txt").write_text(f"[{registry.PLUGIN_GROUP}]\ntoy = {__name__}:TOY\n")
    here = Path(__file__).resolve().parent  # this module (the plugin's code) and the project above it
    paths = [str(here.parent), str(here), str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]
    command = [sys.executable, "-m", "preprocessing", "build", "--data", f"toy:{toy_root}", "--split", "test",
               "--size", "64", "--workers", "1", "--out", str(tmp_path / "cache"), "--quiet"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)})
    assert done.returncode == 0, done.stderr
    config = load_config(None, [f"data.spec=toy:{toy_root}", "preprocess.input_size=64"])
    expected = cache_path_for(parse_data_spec(config.data.spec), "test", config.preprocess, tmp_path / "cache")
    assert f"built\ttest\t{expected}" in done.stdout  # the same cache key in both processes
    assert expected.is_file() and PoseCache(expected).joint_names == list(TOY_JOINTS.names)
