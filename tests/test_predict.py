"""Prediction at scale and the Python API: `cpm-predict` over a folder, a glob and a video, in
batches, with unreadable files skipped and counted; `cpm_model.load` returns the CLI's records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import cpm_model
from cpm_model.config import load_config
from cpm_model.joints import LSP
from pipeline.train.checkpoint import build_checkpoint, save_checkpoint
from pipeline.train.inference import build_model
from preprocessing.datasets.synthetic import SyntheticDataset

REPO = Path(__file__).resolve().parents[1]
FPS = 10


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A seeded synthetic_tiny checkpoint, a folder of 5 images (plus a broken JPEG and a text
    file), and a 7-frame MP4 of the same figures."""
    tmp = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    config = load_config("synthetic_tiny", ["train.precision=fp32"])
    model = build_model(config, LSP.num_parts)
    checkpoint = tmp / "best.pt"
    save_checkpoint(build_checkpoint(model, config, epoch=1, best_epoch=1, joint_names=list(LSP.names),
                                     flip_pairs=LSP.flip_pairs, metrics=[]), checkpoint)
    data = SyntheticDataset(num_samples=5)
    folder = tmp / "photos"
    folder.mkdir()
    images = [data.load_image(i) for i in range(5)]
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"p{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (folder / "broken.jpg").write_bytes(b"not a JPEG")
    (folder / "notes.txt").write_text("not an image: ignored")
    height, width = images[0].shape[:2]
    writer = cv2.VideoWriter(str(tmp / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (width, height))
    for i in range(7):
        writer.write(cv2.cvtColor(images[i % 5], cv2.COLOR_RGB2BGR))
    writer.release()
    return {"tmp": tmp, "checkpoint": checkpoint, "folder": folder, "images": images, "video": tmp / "clip.mp4"}


def cpm_predict(media, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline.predict", "--checkpoint", str(media["checkpoint"]),
                           "--device", "cpu", *args], cwd=media["tmp"], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_a_folder_gives_a_record_per_image_and_names_the_file_it_skipped(media):
    out = media["tmp"] / "folder_out"
    done = cpm_predict(media, str(media["folder"]), "--out", str(out), "--batch-size", "2", "--draw")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([f"p{i}.{ext}" for i in range(5) for ext in ("json", "png")])
    record = json.loads((out / "p3.json").read_text())
    assert record["image"] == str(media["folder"] / "p3.png") and record["image_size"] == [160, 160]
    assert [j["name"] for j in record["joints"]] == list(LSP.names)
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith("predicted 5 image(s) and 0 video frame(s)") and "images/s" in summary
    assert "skipped 1 unreadable file(s)" in summary and "broken.jpg" in summary and "notes.txt" not in summary

    # The Python API: the same records, batch for batch (same batch size, same forward passes).
    predictor = cpm_model.load(media["checkpoint"], device="cpu", batch_size=2)
    paths = [media["folder"] / f"p{i}.png" for i in range(5)]
    assert predictor.predict_batch(paths) == [json.loads((out / f"p{i}.json").read_text()) for i in range(5)]


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_the_api_on_an_array_returns_the_record_the_cli_prints(media):
    path = media["folder"] / "p1.png"
    done = cpm_predict(media, str(path), "--center", "70,90")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    predictor = cpm_model.load(str(media["checkpoint"]), device="cpu")
    assert predictor.predict(path, center=(70, 90)) == printed
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert predictor.predict(rgb, center=(70, 90)) == {k: v for k, v in printed.items() if k != "image"}


def test_batches_predict_what_single_images_do(media):
    """Batching is a speed-up only: each image's joints are those of a forward pass on it alone
    (fp32, so the convolutions' batch-size-dependent paths agree to float rounding)."""
    predictor = cpm_model.load(media["checkpoint"], device="cpu", batch_size=5)
    batched = predictor.predict_batch(media["images"])
    for image, record in zip(media["images"], batched):
        alone = predictor.predict(image)
        assert np.allclose([[j["x"], j["y"]] for j in alone["joints"]],
                           [[j["x"], j["y"]] for j in record["joints"]], atol=0.02)


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_a_video_gives_a_json_line_per_frame_and_an_mp4(media):
    out = media["tmp"] / "video_out"
    done = cpm_predict(media, str(media["video"]), "--out", str(out), "--draw", "--batch-size", "3")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in rows] == list(range(7)) and [r["time_s"] for r in rows] == [i / FPS for i in range(7)]
    assert {r["video"] for r in rows} == {str(media["video"])} and rows[0]["image_size"] == [160, 160]
    drawn = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(drawn.get(cv2.CAP_PROP_FRAME_COUNT)) == 7
    assert "and 7 video frame(s)" in done.stderr


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_a_glob_takes_the_images_it_matches(media):
    done = cpm_predict(media, str(media["folder"] / "p[0-2].png"))
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["image"] for line in done.stdout.splitlines()] == [
        str(media["folder"] / f"p{i}.png") for i in range(3)]


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
@pytest.mark.parametrize("make, needle", [
    (lambda tmp: tmp / "broken.mp4", "video"),
    (lambda tmp: tmp / "only_broken", "nothing could be read"),
    (lambda tmp: tmp / "empty_folder", "holds no image or video files"),
])
def test_bad_input_is_one_line_and_exit_2(media, make, needle):
    tmp = media["tmp"]
    (tmp / "broken.mp4").write_bytes(b"not a video")
    (tmp / "only_broken").mkdir(exist_ok=True)
    (tmp / "only_broken" / "x.jpg").write_bytes(b"")
    (tmp / "empty_folder").mkdir(exist_ok=True)
    target = make(tmp)
    done = cpm_predict(media, str(media["folder"] / "p0.png"), str(target)) if needle == "video" else \
        cpm_predict(media, str(target))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert needle in lines[0] and target.name in lines[0]


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_loading_a_checkpoint_imports_neither_ray_nor_mlflow(media):
    code = ("import sys, cpm_model; p = cpm_model.load(sys.argv[1], device='cpu'); p.predict(sys.argv[2]); "
            "print(sorted(m for m in ('ray', 'mlflow', 'h5py') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(media["checkpoint"]), str(media["folder"] / "p0.png")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
