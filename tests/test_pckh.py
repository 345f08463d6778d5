"""MPII is scored with PCKh@0.5 end to end: the head-size normaliser, `pckh` metric names in every
row, the --json report and its table, the sweep's objective, the report's captions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cpm_model.config import load_config
from pipeline import evaluate
from pipeline.reporting.runs import ConfigGroup, config_of
from pipeline.reporting.tables import receptive_field_table
from pipeline.train import metric_names as names
from pipeline.train.context import LocalContext
from pipeline.train.loop import train_worker
from pipeline.train.scoring import protocol_for
from preprocessing.build import build_cache
from preprocessing.cache import PoseCache
from preprocessing.datasets.splits import split_of_name
from test_training import TINY

pytestmark = pytest.mark.integration


def person(image: str, rng: np.random.Generator) -> dict:
    """An MPII JSON entry (1-based pixels) with 16 joints around the image centre and a head box."""
    centre = np.array([150.0, 120.0]) + rng.uniform(-20, 20, 2)
    joints = centre + rng.uniform(-60, 60, (16, 2))
    vis = (rng.uniform(size=16) > 0.15).astype(int)
    head = centre + [rng.uniform(-10, 10), -70.0]
    side = rng.uniform(14, 30)
    return {"image": image, "center": centre.tolist(), "scale": 1.2, "joints": joints.tolist(),
            "joints_vis": vis.tolist(), "headbox": [*(head - side / 2), *(head + side / 2)]}


@pytest.fixture(scope="module")
def mpii_root(tmp_path_factory, lspet_dir) -> Path:
    """MMPose layout (annotations/mpii_train.json, mpii_val.json, images/), head boxes in the entries."""
    root = tmp_path_factory.mktemp("pckh") / "mpii"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    names_by_split = {"train": [], "val": [], "test": []}
    for i in range(1, 3000):
        name = f"{i:09d}.jpg"
        split = split_of_name(name)
        if len(names_by_split[split]) < {"train": 6, "val": 2, "test": 2}[split]:
            names_by_split[split].append(name)
    for k, name in enumerate(n for names_ in names_by_split.values() for n in names_):
        shutil.copyfile(lspet_dir / "images" / f"im{k + 1:05d}.jpg", root / "images" / name)
    train = [person(name, rng) for name in names_by_split["train"] + names_by_split["val"] for _ in range(4)]
    test = [person(name, rng) for name in names_by_split["test"] for _ in range(4)]
    (root / "annotations" / "mpii_train.json").write_text(json.dumps(train))
    (root / "annotations" / "mpii_val.json").write_text(json.dumps(test))
    return root


def test_mpii_is_scored_with_pckh_and_lsp_with_the_torso_pck():
    assert protocol_for(load_config(None, ["data.spec=mpii:/data/mpii"])) is names.PCKH
    assert protocol_for(load_config(None, ["data.spec=lspet:/data/lspet"])) is names.PCK
    assert (names.PCKH.normaliser, names.PCKH.alpha) == ("head_size", 0.5)


def test_mean_pose_pckh_equals_a_pckh_computed_by_hand(mpii_root, tmp_path):
    settings = ["preprocess.input_size=64", f"data.cache_dir={tmp_path / 'cache'}"]
    out = tmp_path / "report.json"
    assert evaluate.main(["--baseline", "mean-pose", "--data", f"mpii:{mpii_root}", "--split", "test",
                          "--json", str(out), "--quiet", *[a for s in settings for a in ("--set", s)]]) == 0
    report = json.loads(out.read_text())
    assert report["metric"] == "pckh" and "pck" not in report and len(report["pckh_per_joint"]) == 16

    # By hand: the mean TRAIN crop position of each joint (crops made like evaluation crops), taken
    # into each test sample's original pixels, is correct when within 0.5 x its head size.
    config = load_config(None, settings + [f"data.spec=mpii:{mpii_root}", "preprocess.train_crop=image"])
    train = PoseCache(build_cache(config.data.spec, "train", config.preprocess, config.data.cache_dir, progress=False))
    test = PoseCache(build_cache(config.data.spec, "test", config.preprocess, config.data.cache_dir, progress=False))
    crop_joints = train.read(np.arange(len(train)), keys=["joints"])["joints"]
    seen = crop_joints[..., 2] > 0
    mean_xy = np.stack([crop_joints[seen[:, j], j, :2].mean(0) for j in range(16)])
    data = test.read(np.arange(len(test)), keys=["affine", "joints_original", "head_size"])
    assert np.isfinite(data["head_size"]).all()
    correct, total = np.zeros(16), np.zeros(16)
    for affine, joints, head in zip(data["affine"], data["joints_original"], data["head_size"]):
        predicted = mean_xy @ affine[:, :2].T + affine[:, 2]
        visible = joints[:, 2] > 0
        hit = np.linalg.norm(predicted - joints[:, :2], axis=1) <= 0.5 * head
        correct += hit & visible
        total += visible
    by_hand = np.mean(correct[total > 0] / total[total > 0])
    assert report["pckh"] == pytest.approx(by_hand, abs=1e-9)
    assert report["num_samples"] == len(test) == 8
    from pipeline.train.scoring import format_table

    table = format_table(report)
    assert table.startswith("PCKh@0.5, 8 samples") and f"PCKh@0.5 {100 * by_hand:.1f} (last stage)" in table


def test_training_on_mpii_reports_pckh_in_every_row(mpii_root, tmp_path):
    config = load_config(None, TINY + [f"data.spec=mpii:{mpii_root}", f"data.cache_dir={tmp_path / 'cache'}",
                                       "train.epochs=1", "train.batch_size=4"])
    result = train_worker(config, LocalContext(device="cpu", quiet=True), progress=False)
    row = result["history"][0]
    assert {"pckh", "pckh_stage1", "pckh_stage2", "pckh@0.1", "pckh_head_top"} <= set(row)
    assert not any(key == "pck" or key.startswith("pck_") for key in row)
    assert row["pckh"] == row["pckh_stage2"] and result["best_score"] == row["pckh"]
    assert "test_pckh" in result["test"] and "test_pckh_curve_a0.50" in result["test"]


def test_report_tables_of_mpii_runs_say_pckh():
    runs = [{"params": {"stages": "3", "receptive_field_px": "143", "intermediate_supervision": "True",
                        "training_scheme": "joint", "receptive_field_rel_person": "2.9", "kernel_size": "5",
                        "metric": "pckh"},
             "metrics": {"best_pckh": 0.4 + 0.1 * seed, "test_pckh": 0.3, "test_auc": 0.2}} for seed in range(2)]
    group = ConfigGroup(config_of(runs[0]), runs)
    table = receptive_field_table([group], group.protocol)
    assert table.title.startswith("PCKh@0.5 (%)") and "val PCKh@0.5" in table.columns
    assert group.val().mean == pytest.approx(0.45) and table.rows[0][-2].mean == pytest.approx(0.3)
