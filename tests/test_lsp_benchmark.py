"""The CPM authors' LSP benchmark protocol (cpm_model.lsp_benchmark) and `pipeline.evaluate
--predictions`, on a small LSP-layout joints.mat whose answers are computed by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from cpm_model.lsp_benchmark import benchmark_hits, score_benchmark
from pipeline import evaluate
from pipeline.evaluate_predictions import benchmark_report

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN = 1000  # LSP's images 1-1000 are its training set; the test split starts at image 1001
L_SHOULDER, R_HIP, R_ANKLE, R_KNEE, R_WRIST, L_ELBOW, L_WRIST, NECK, HEAD = 9, 2, 0, 1, 6, 10, 11, 12, 13


def hand_ground_truth() -> np.ndarray:
    """(3, 14, 2) ground truth of three test images, torsos 50, 50 and 100 pixels."""
    gt = np.stack([np.array([[20.0 + 5 * j, 30.0 + 7 * j] for j in range(14)]) + 200 * i for i in range(3)])
    gt[0, L_SHOULDER], gt[0, R_HIP] = (10, 10), (10, 60)  # torso 50: threshold 10
    gt[1, L_SHOULDER], gt[1, R_HIP] = (100, 100), (130, 140)  # torso 50: threshold 10
    gt[2, L_SHOULDER], gt[2, R_HIP] = (300, 300), (360, 380)  # torso 100: threshold 20
    return gt


def hand_predictions(gt: np.ndarray) -> np.ndarray:
    """Exact except: three errors exactly AT the threshold (hits), three past it, one NaN."""
    pred = gt.copy()
    pred[0, R_ANKLE] += (6, 8)  # 10.0 = threshold: hit (a strict < would miss it)
    pred[0, R_KNEE] += (10, 0.5)  # 10.01 > 10: miss
    pred[1, NECK] += (0, -10)  # 10.0 = threshold: hit
    pred[1, L_WRIST] += (-8, -7)  # 10.63: miss
    pred[1, HEAD] = np.nan  # missing: miss
    pred[2, R_WRIST] += (12, -16)  # 20.0 = threshold: hit
    pred[2, L_ELBOW] += (16, 12.5)  # 20.30: miss
    return pred


# By hand: 4 misses of 42 joints; per joint 2/3 for right knee, left elbow, left wrist, head top.
EXPECTED_TOTAL = 38 / 42
EXPECTED_PER_JOINT = {R_KNEE: 2 / 3, L_ELBOW: 2 / 3, L_WRIST: 2 / 3, HEAD: 2 / 3}
EXPECTED_GROUPS = {"head": 5 / 6, "shoulder": 1.0, "elbow": 5 / 6, "wrist": 5 / 6, "hip": 1.0, "knee": 5 / 6,
                   "ankle": 1.0}


def write_lsp(root: Path, gt: np.ndarray) -> Path:
    """An LSP-layout joints.mat (3, 14, 1000 + n) whose test split is `gt`; no images."""
    rng = np.random.default_rng(0)
    train = rng.uniform(0, 100, size=(NUM_TRAIN, 14, 2))
    xy = np.concatenate([train, gt])
    occluded = np.zeros(xy.shape[:2])
    occluded[NUM_TRAIN, R_ANKLE] = occluded[NUM_TRAIN, R_KNEE] = 1  # occluded joints are scored too
    joints = np.concatenate([xy, occluded[..., None]], axis=-1).transpose(2, 1, 0)
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(root / "joints.mat"), {"joints": joints})
    return root


def check_report(report: dict) -> None:
    assert report["pck"] == pytest.approx(EXPECTED_TOTAL)
    names = report["joint_names"]
    for j, name in enumerate(names):
        assert report["pck_per_joint"][name] == pytest.approx(EXPECTED_PER_JOINT.get(j, 1.0)), name
    assert report["pck_per_group"] == pytest.approx(EXPECTED_GROUPS)
    assert report["missing"] == 1 and report["missing_per_joint"]["head_top"] == 1
    assert report["num_samples"] == 3 and report["standard_differs"] is False


def test_hand_computed_scores_with_inclusive_threshold_and_nan():
    gt = hand_ground_truth()
    pred = hand_predictions(gt)
    hits = benchmark_hits(pred, gt)
    assert hits[0, R_ANKLE] and hits[1, NECK] and hits[2, R_WRIST]  # exactly at 0.2 x torso
    assert not hits[0, R_KNEE] and not hits[1, HEAD]
    score = score_benchmark(pred, gt)
    assert score.total == pytest.approx(EXPECTED_TOTAL)
    assert score.correct.tolist() == [3, 2, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 3, 2]
    assert score.scored.tolist() == [3] * 14 and score.missing.sum() == 1
    pushed = pred.copy()
    pushed[0, R_ANKLE] = gt[0, R_ANKLE] + (6, 8.001)  # just past the threshold
    assert score_benchmark(pushed, gt).correct[R_ANKLE] == 2


def test_degenerate_torso_differs_from_the_standard_protocol():
    """Left shoulder on the right hip: the benchmark scores the image with a zero normaliser (only
    an exact prediction is right), the standard protocol uses the other diagonal."""
    gt = hand_ground_truth()
    gt[0, R_HIP] = gt[0, L_SHOULDER]
    pred = gt + (1.0, 0.0)  # every joint 1 pixel off
    joints = np.concatenate([gt, np.ones((3, 14, 1))], axis=-1)
    report = benchmark_report(pred, joints)
    assert report["pck"] == pytest.approx(28 / 42)  # image 0: every joint wrong
    assert report["standard_pck"] == pytest.approx(1.0)  # the fallback torso: 1 px is well inside
    assert report["standard_differs"] is True and report["standard_num_without_norm"] == 0


def save_formats(pred: np.ndarray, folder: Path) -> dict[str, Path]:
    """The same predictions in every readable format."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"pred.{kind}" for kind in ("mat", "npz", "npy", "json", "csv")}
    scipy.io.savemat(str(paths["mat"]), {"prediction_all": pred.transpose(1, 2, 0)})  # (14, 2, N)
    np.savez(paths["npz"], predictions=pred)
    np.save(paths["npy"], pred)
    rows = [[None if np.isnan(xy).any() else xy.tolist() for xy in image] for image in pred]
    paths["json"].write_text(json.dumps({"predictions": rows}))
    header = ",".join(f"{n}_{a}" for n in range(14) for a in "xy")
    lines = [",".join("" if np.isnan(v) else repr(float(v)) for v in image.ravel()) for image in pred]
    paths["csv"].write_text("\n".join([header, *lines]) + "\n")
    return paths


def write_matlab_v73(path: Path, prediction_all: np.ndarray) -> None:
    """What MATLAB's save -v7.3 writes: a 512-byte MAT header, then HDF5 with the dims reversed."""
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("prediction_all", data=prediction_all.T)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116) + b"\0" * 8 + b"\x00\x02IM"
    with path.open("r+b") as f:
        f.write(header.ljust(512, b"\0"))


def test_every_format_scores_the_same(tmp_path):
    gt = hand_ground_truth()
    root = write_lsp(tmp_path / "lsp", gt)
    pred = hand_predictions(gt)
    paths = save_formats(pred, tmp_path / "pred")
    write_matlab_v73(tmp_path / "pred" / "v73.mat", pred.transpose(1, 2, 0))
    for path in [*paths.values(), tmp_path / "pred" / "v73.mat"]:
        out = tmp_path / f"{path.name}.json"
        assert evaluate.main(["--predictions", str(path), "--data", f"lsp:{root}", "--json", str(out), "--quiet"]) == 0
        check_report(json.loads(out.read_text()))


def test_one_based_shifts_matlab_indices(tmp_path):
    gt = hand_ground_truth()
    root = write_lsp(tmp_path / "lsp", gt)
    path = tmp_path / "one_based.mat"
    scipy.io.savemat(str(path), {"prediction_all": (hand_predictions(gt) + 1).transpose(1, 2, 0)})
    out = tmp_path / "out.json"
    assert evaluate.main(["--predictions", str(path), "--data", f"lsp:{root}", "--one-based", "--json", str(out),
                          "--quiet"]) == 0
    check_report(json.loads(out.read_text()))
    assert evaluate.main(["--predictions", str(path), "--data", f"lsp:{root}", "--json", str(out), "--quiet"]) == 0
    unshifted = json.loads(out.read_text())["pck_per_joint"]
    # Read as given, each error grows by (1, 1): the right ankle's (6, 8) becomes (7, 9), 11.4 > 10, a
    # miss; the left wrist's (-8, -7) becomes (-7, -6), 9.2 <= 10, a hit.
    assert unshifted["right_ankle"] == pytest.approx(2 / 3) and unshifted["left_wrist"] == pytest.approx(1.0)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipeline.evaluate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_cli_prints_the_paper_columns_and_the_missing_count(tmp_path):
    gt = hand_ground_truth()
    root = write_lsp(tmp_path / "lsp", gt)
    path = save_formats(hand_predictions(gt), tmp_path / "pred")["json"]
    result = run_cli("--predictions", str(path), "--data", f"lsp:{root}", "--split", "test",
                     "--json", str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr
    assert "3 images, 1 predicted joints missing" in result.stdout
    assert "head 83.33" in result.stdout and "total 90.48" in result.stdout
    check_report(json.loads((tmp_path / "out.json").read_text()))


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
@pytest.mark.parametrize("cut, message", [
    (lambda p: p[:, :13], "13 joints per image, the lsp test split has 14"),
    (lambda p: p[:2], "2 images, the lsp test split has 3"),
])
def test_mismatched_predictions_exit_2_naming_both_numbers(tmp_path, cut, message):
    gt = hand_ground_truth()
    root = write_lsp(tmp_path / "lsp", gt)
    path = tmp_path / "bad.mat"
    scipy.io.savemat(str(path), {"prediction_all": cut(hand_predictions(gt)).transpose(1, 2, 0)})
    result = run_cli("--predictions", str(path), "--data", f"lsp:{root}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_bad_prediction_files_exit_2(tmp_path, capsys):
    root = write_lsp(tmp_path / "lsp", hand_ground_truth())
    wrong_layout = tmp_path / "wrong.mat"
    scipy.io.savemat(str(wrong_layout), {"prediction_all": np.zeros((14, 3, 3))})
    other_name = tmp_path / "other.mat"
    scipy.io.savemat(str(other_name), {"preds": np.zeros((14, 2, 3))})
    cases = [(wrong_layout, "expected (P joints, 2, N images)"), (other_name, "no variable 'prediction_all'"),
             (tmp_path / "p.txt", "unknown format"), (tmp_path / "absent.npz", "does not exist")]
    for path, message in cases:
        assert evaluate.main(["--predictions", str(path), "--data", f"lsp:{root}"]) == 2
        assert message in capsys.readouterr().err
    assert evaluate.main(["--predictions", str(wrong_layout), "--data", f"lspet:{root}"]) == 2
    assert "--data lsp:PATH" in capsys.readouterr().err
    assert evaluate.main(["--predictions", str(wrong_layout), "--baseline", "mean-pose", "--data", f"lsp:{root}"]) == 2
    assert "give --predictions or --baseline, not both" in capsys.readouterr().err


RELEASE_LSP = os.environ.get("CPM_LSP_DIR")
RELEASE_PREDICTIONS = os.environ.get("CPM_CPM_RELEASE_PREDICTIONS")


@pytest.mark.skipif(not (RELEASE_LSP and RELEASE_PREDICTIONS),
                    reason="needs the original LSP (CPM_LSP_DIR: the directory holding joints.mat) and the CPM "
                           "release's testing/predicts/LSP_prediction_model_LSP_6s.mat (CPM_CPM_RELEASE_PREDICTIONS)")
def test_the_release_predictions_score_the_papers_figure(tmp_path):
    out = tmp_path / "release.json"
    assert evaluate.main(["--predictions", RELEASE_PREDICTIONS, "--data", f"lsp:{RELEASE_LSP}", "--split", "test",
                          "--json", str(out)]) == 0
    assert round(100 * json.loads(out.read_text())["pck"], 2) == 84.32  # the paper's LSP total (LSP-only model)
