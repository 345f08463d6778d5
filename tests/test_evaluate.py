"""Evaluation: JSON report, flip and scale search, the mean-pose baseline, predict, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cpm_model.heatmaps import render_belief_maps_torch
from cpm_model.joints import LSP
from pipeline import evaluate, fit, predict
from cpm_model.metrics import PCKCounts
from pipeline.train import inference
from pipeline.train.inference import predict_belief_maps
from pipeline.train.scoring import mean_pose_counts, summarize

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.spec=synthetic:160", "preprocess.input_size=64", "model.stages=2", "model.width=0.125",
        "model.stage1_kernel=3", "model.later_kernel=3", "model.later_convs=1", "model.batch_norm=true",
        "model.center_sigma=8", "train.batch_size=8", "train.max_steps_per_epoch=3", "train.epochs=1",
        "train.lr=0.003"]


def _sets(cache_dir: Path) -> list[str]:
    args = []
    for item in TINY + [f"data.cache_dir={cache_dir}"]:
        args += ["--set", item]
    return args


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "cpm_tiny_caches"


@pytest.fixture(scope="session")
def trained(cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit")
    assert fit.main(_sets(cache_dir) + ["--out", str(out), "--quiet"]) == 0
    return out


def test_fit_writes_checkpoints_metrics_and_figures(trained):
    for name in ("best.pt", "metrics.jsonl", "config.yaml", "summary.json", "learning_curve.png",
                 "belief_maps.png", "skeletons.png"):
        assert (trained / name).is_file(), name
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["epoch"] == 1 and "test_pck" in rows[-1]
    torch.load(trained / "best.pt", weights_only=True)


def test_evaluate_json_keys_and_ranges(trained, cache_dir, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert evaluate.main(["--checkpoint", str(trained / "best.pt"), "--data", "synthetic:160", "--split", "val",
                          "--cache-dir", str(cache_dir), "--json", str(report_path), "--quiet"]) == 0
    report = json.loads(report_path.read_text())
    for key in ("pck", "pck_per_joint", "pck_per_stage", "pck@0.1", "auc", "num_samples", "num_without_norm"):
        assert key in report, key
    assert len(report["pck_per_joint"]) == 14 and len(report["pck_per_stage"]) == 2
    values = [report["pck"], report["pck@0.1"], report["auc"], *report["pck_per_stage"],
              *(v for v in report["pck_per_joint"].values() if v is not None)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert report["pck"] == report["pck_per_stage"][-1]
    assert report["num_samples"] > 0 and report["num_without_norm"] == 0
    # The validation PCK that training logged for this epoch is the same number.
    logged = json.loads((trained / "metrics.jsonl").read_text().splitlines()[0])
    assert report["pck"] == pytest.approx(logged["pck"])


def test_evaluate_flip_and_scale_search_run_and_print_a_table(trained, cache_dir, capsys):
    assert evaluate.main(["--checkpoint", str(trained / "best.pt"), "--data", "synthetic:160", "--split", "test",
                          "--cache-dir", str(cache_dir), "--flip", "--scales", "0.8,1.0,1.2"]) == 0
    table = capsys.readouterr().out
    assert "right_wrist" in table and "stage 2" in table and "PCK@0.1" in table


def test_scale_one_and_flip_of_a_symmetric_model_change_nothing():
    class Echo(torch.nn.Module):  # maps = the mean image at stride 8, the same for every map
        stages = 1

        def forward(self, images):
            pooled = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 8)
            return pooled[:, None].expand(-1, 1, 15, -1, -1)

    images = torch.rand(2, 3, 64, 64)
    plain = predict_belief_maps(Echo(), images)
    assert torch.equal(predict_belief_maps(Echo(), images, scales=[1.0]), plain)
    flipped = predict_belief_maps(Echo(), images, flip_permutation=list(LSP.flip_permutation()))
    assert torch.allclose(flipped, plain, atol=1e-6)


def test_scale_search_resamples_maps_back_to_the_crop_grid():
    # A "model" that renders a peak at the image's brightest pixel: zooming the crop and resampling
    # the maps back must bring the peak home.
    class PeakAtBrightest(torch.nn.Module):
        stages = 1

        def forward(self, images):
            gray = images.mean(1)
            flat = gray.flatten(1).argmax(1)
            y, x = (flat // images.shape[-1]).float(), (flat % images.shape[-1]).float()
            joints = torch.stack([x, y, torch.ones_like(x)], -1)[:, None].expand(-1, 14, -1)
            return render_belief_maps_torch(joints, images.shape[-1] // 8, 1.0)[:, None]

    images = torch.zeros(1, 3, 64, 64)
    images[0, :, 19:22, 43:46] = 1.0  # bright 3x3 block around (44, 20)
    maps = predict_belief_maps(PeakAtBrightest(), images, scales=[0.8, 1.25])
    coords = inference.decode_all_stages(maps.numpy(), np.array([[[1.0, 0, 0], [0, 1.0, 0]]]))
    assert np.abs(coords[0, 0, 0] - [44, 20]).max() < 2.0


def test_counts_combine_exactly_across_shards():
    rng = np.random.default_rng(0)
    n, p = 40, 14
    gt = np.concatenate([rng.uniform(0, 100, (n, p, 2)), (rng.uniform(size=(n, p, 1)) > 0.2)], -1)
    pred = gt[:, None, :, :2] + rng.normal(0, 8, (n, 1, p, 2))
    norm = rng.uniform(20, 40, n)
    norm[3] = np.nan
    whole = PCKCounts(1, p)
    whole.add(pred, gt, norm)
    halves = [PCKCounts(1, p), PCKCounts(1, p)]
    halves[0].add(pred[:17], gt[:17], norm[:17])
    halves[1].add(pred[17:], gt[17:], norm[17:])
    combined = halves[0].reduced(lambda a: a + halves[1].to_array())
    assert summarize(combined, LSP.names) == summarize(whole, LSP.names)
    assert combined.num_without_norm == 1 and combined.num_samples == n


class _FakeCache:
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(next(iter(self.data.values())))

    def read(self, indices, keys=None):
        return {k: self.data[k][np.asarray(indices)] for k in (keys or self.data)}


def test_mean_pose_baseline_is_perfect_when_every_pose_is_the_mean():
    rng = np.random.default_rng(1)
    pose = np.concatenate([rng.uniform(10, 54, (14, 2)), np.ones((14, 1))], -1)
    train = _FakeCache({"joints": np.repeat(pose[None], 5, 0)})
    affine = np.array([[2.0, 0.0, 7.0], [0.0, 2.0, -3.0]])  # crop -> original
    original = pose.copy()
    original[:, :2] = pose[:, :2] @ affine[:, :2].T + affine[:, 2]
    evaluation = _FakeCache({"affine": np.repeat(affine[None], 3, 0), "joints_original": np.repeat(original[None], 3, 0),
                             "torso": np.full(3, 30.0)})
    counts, mean_xy = mean_pose_counts(train, evaluation)
    assert np.allclose(mean_xy, pose[:, :2])
    assert counts.mean(-1, 0.2) == 1.0 and counts.mean(-1, 0.01) == 1.0 and counts.auc() > 0.97


def test_mean_pose_baseline_cli(cache_dir, tmp_path):
    out = tmp_path / "baseline.json"
    assert evaluate.main(["--baseline", "mean-pose", "--data", "synthetic:160", "--split", "val",
                          "--cache-dir", str(cache_dir), "--set", "preprocess.input_size=64",
                          "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert 0.0 <= report["pck"] <= 1.0 and len(report["pck_per_stage"]) == 1 and report["num_samples"] > 0


def test_predict_prints_14_joints_and_writes_a_png(trained, tmp_path, capsys):
    from preprocessing.datasets.synthetic import SyntheticDataset

    image = SyntheticDataset(num_samples=3).load_image(0)
    image_path = tmp_path / "person.png"
    cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert predict.main(["--checkpoint", str(trained / "best.pt"), str(image_path)]) == 0
    output = json.loads(capsys.readouterr().out)
    assert [j["name"] for j in output["joints"]] == list(LSP.names)
    h, w = image.shape[:2]
    assert all(-w <= j["x"] <= 2 * w and -h <= j["y"] <= 2 * h for j in output["joints"])
    out = tmp_path / "predictions"
    assert predict.main(["--checkpoint", str(trained / "best.pt"), str(image_path), "--out", str(out), "--draw"]) == 0
    assert json.loads((out / "person.json").read_text()) == output
    drawn = cv2.imread(str(out / "person.png"))
    assert drawn.shape == image.shape and np.abs(drawn.astype(int) - image[..., ::-1]).max() > 0  # limbs drawn
    assert predict.main(["--checkpoint", str(trained / "best.pt"), str(image_path), "--center", "80,80"]) == 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_bad_input_errors_name_the_file(trained, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00garbage")
    for args, needle in [
        (["pipeline.evaluate", "--checkpoint", str(tmp_path / "absent.pt"), "--data", "synthetic:10"], "absent.pt"),
        (["pipeline.evaluate", "--checkpoint", str(broken), "--data", "synthetic:10"], "broken.pt"),
        (["pipeline.predict", "--checkpoint", str(broken), "image.jpg"], "broken.pt"),
        (["pipeline.predict", "--checkpoint", str(trained / "best.pt"), str(tmp_path / "no_image.jpg")], "no_image.jpg"),
        (["pipeline.evaluate", "--checkpoint", str(trained / "best.pt"), "--data", f"lspet:{tmp_path}/nowhere"], "nowhere"),
    ]:
        done = _cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_evaluate_any_lspet_format_directory(trained, lspet_dir, tmp_path):
    """A handful of LSPET images in the LSPET layout: every split that has samples is scored."""
    import shutil

    from scipy.io import loadmat, savemat

    count = 7
    root = tmp_path / "mini_lspet"
    (root / "images").mkdir(parents=True)
    for i in range(1, count + 1):
        shutil.copy(lspet_dir / "images" / f"im{i:05d}.jpg", root / "images" / f"im{i:05d}.jpg")
    savemat(root / "joints.mat", {"joints": loadmat(lspet_dir / "joints.mat")["joints"][:, :, :count]})
    out = tmp_path / "mini.json"
    assert evaluate.main(["--checkpoint", str(trained / "best.pt"), "--data", f"lspet:{root}", "--split", "all",
                          "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["num_samples"] == count and len(report["pck_per_joint"]) == 14
