"""Bad input on the command line: one `error:` line naming the value and what is expected, exit
status 2, no traceback, and nothing written (no cache, no MLflow store, no storage directory).
Each case runs the real CLI in a subprocess; a case that got past the checks would start a sweep."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TINY = "synthetic_tiny"


def run_cli(tmp: Path, ray_tmpdir: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmpdir,
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    return subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def sweep_args(tmp: Path, *extra: str) -> list[str]:
    return [str(REPO / "pipeline" / "sweep.py"), "--config", TINY, "--storage-path", str(tmp / "ray"),
            "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "data.spec=synthetic:300", *extra]


def assert_refused(result: subprocess.CompletedProcess, tmp: Path, *expected: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert sorted(p.name for p in tmp.iterdir()) == [], "the refused command wrote files"


SWEEP_CASES = {
    "negative max_train_samples": (["--set", "data.max_train_samples=-5"],
                                   ["'data.max_train_samples'", "an integer >= 1", "got -5"]),
    "negative max_val_samples": (["--set", "data.max_val_samples=-5"], ["'data.max_val_samples'", "got -5"]),
    "zero max_steps_per_epoch": (["--set", "train.max_steps_per_epoch=0"],
                                 ["'train.max_steps_per_epoch'", "an integer >= 1", "got 0"]),
    "negative max_failures": (["--set", "sweep.max_failures=-1"], ["'sweep.max_failures'", ">= 0", "got -1"]),
    "loguniform from zero": (["--set", "sweep.search={train.lr: {loguniform: [0, 1.0e-2]}}"],
                             ["sweep.search['train.lr']", "loguniform needs bounds > 0", "[0, 0.01]"]),
    "uniform upside down": (["--set", "sweep.search={train.lr: {uniform: [1.0e-2, 1.0e-3]}}"],
                            ["sweep.search['train.lr']", "lo < hi"]),
    "empty choice": (["--set", "sweep.search={train.seed: {choice: []}}"],
                     ["sweep.search['train.seed']", "non-empty list"]),
    "search bound out of range": (["--set", "sweep.search={train.rotation_deg: {uniform: [0, 270]}}"],
                                  ["sweep.search['train.rotation_deg']", "[0, 180]", "270"]),
    "float stages in the grid": (["--set", "sweep.grid={model.stages: [2, 2.5]}"],
                                 ["sweep.grid['model.stages'][1]", "must be an integer", "2.5"]),
    "unknown distribution": (["--set", "sweep.search={train.lr: {normal: [0, 1]}}"],
                             ["sweep.search['train.lr']", "loguniform", "choice"]),
    "cloud storage path": (["--storage-path", "s3://bucket/ray"],  # the last --storage-path wins
                           ["s3://bucket/ray", "cloud storage paths are not supported", "shared file system"]),
    "quote in the sweep id": (["--sweep-id", "bob's"], ["--sweep-id", "\"bob's\"", "letters, digits"]),
    "sweep id climbing out of the storage path": (["--sweep-id", "../../x"], ["--sweep-id", "'../../x'"]),
    "resume id climbing out": (["--resume", "../x"], ["--resume", "'../x'"]),
    "retry without resume": (["--retry-failed"], ["--retry-failed needs --resume"]),
    # The data spec is opened (annotations, not images) before anything starts, in --dry-run too.
    "unknown dataset kind": (["--data", "coco:/x", "--dry-run"],
                             ["data spec 'coco:/x'", "unknown dataset 'coco'", "'lspet', 'lsp', 'mpii', 'synthetic'"]),
    "missing dataset directory": (["--data", "lspet:/nonexistent", "--dry-run"],
                                  ["data spec 'lspet:/nonexistent'", "directory /nonexistent does not exist"]),
}


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
@pytest.mark.parametrize("case", sorted(SWEEP_CASES))
def test_sweep_refuses_bad_input_before_writing(case, tmp_path, ray_tmpdir):
    extra, expected = SWEEP_CASES[case]
    assert_refused(run_cli(tmp_path, ray_tmpdir, *sweep_args(tmp_path, *extra)), tmp_path, *expected)


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
@pytest.mark.parametrize("args, expected", [
    (["--max-samples", "-3"], ["--max-samples", "got -3"]),
    (["--batch-size", "0"], ["--batch-size must be an integer >= 1", "got 0"]),
    (["--batch-size", "-1"], ["--batch-size", "got -1"]),
])
def test_evaluate_refuses_bad_counts(args, expected, tmp_path, ray_tmpdir):
    result = run_cli(tmp_path, ray_tmpdir, "-m", "pipeline.evaluate", "--baseline", "mean-pose",
                     "--data", "synthetic:300", "--config", TINY, "--cache-dir", str(tmp_path / "cache"),
                     "--json", str(tmp_path / "scores.json"), *args)
    assert_refused(result, tmp_path, *expected)


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_a_single_run_refuses_a_bad_value_like_the_sweep(tmp_path, ray_tmpdir):
    result = run_cli(tmp_path, ray_tmpdir, str(REPO / "pipeline" / "sweep.py"), "--single", *sweep_args(tmp_path)[1:],
                     "--set", "train.max_steps_per_epoch=0")
    assert_refused(result, tmp_path, "'train.max_steps_per_epoch'", "got 0")


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_fit_refuses_a_data_spec_it_cannot_read_before_writing(tmp_path, ray_tmpdir):
    result = run_cli(tmp_path, ray_tmpdir, "-m", "pipeline.fit", "--config", TINY, "--data", f"lsp:{tmp_path}",
                     "--out", str(tmp_path / "out"))
    assert_refused(result, tmp_path, f"data spec 'lsp:{tmp_path}'", f"{tmp_path / 'joints.mat'} does not exist")


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_commands_that_read_mlflow_give_up_on_a_silent_store(tmp_path, ray_tmpdir):
    """A server that takes the connection and never answers (MLflow's client would retry for
    minutes), then a SQLite store that does not exist (a look-up must not create it)."""
    image = tmp_path / "in" / "person.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), np.full((64, 48, 3), 128, np.uint8))
    reads = {"report": ["-m", "pipeline.report", "--experiment", "x", "--out", str(tmp_path / "report")],
             "evaluate": ["-m", "pipeline.evaluate", "--run-id", "abc", "--data", "synthetic:50"],
             "predict": ["-m", "pipeline.predict", "--model", "models:/nope/1", str(image)]}
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nothing ever answers
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for name, args in reads.items():
            result = run_cli(tmp_path, ray_tmpdir, *args, "--tracking-uri", uri)
            lines = result.stderr.strip().splitlines()
            assert result.returncode != 0 and "Traceback" not in result.stderr, (name, result.stderr)
            assert len(lines) == 1 and f"MLflow tracking server {uri} cannot be reached" in lines[0], (name, lines)
    missing = tmp_path / "new.db"
    for name, args in reads.items():
        result = run_cli(tmp_path, ray_tmpdir, *args, "--tracking-uri", f"sqlite:///{missing}")
        assert result.returncode != 0 and result.stderr.strip().endswith("set MLFLOW_TRACKING_URI)"), result.stderr
        assert f"no MLflow store at {missing}" in result.stderr and not missing.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
@pytest.mark.parametrize("cli", ["pipeline/sweep.py", "pipeline/sweep.py --single", "-m pipeline.fit"])
def test_data_spec_and_uri_are_taken_verbatim(cli, tmp_path, ray_tmpdir):
    """A path with '#' and a space: YAML would cut the spec at ' #' (a comment)."""
    spec = "lspet:/data/run #2: final"
    uri = f"sqlite:///{tmp_path}/my store #1.db"
    command, *options = cli.split()
    head = cli.split() if cli.startswith("-m") else [str(REPO / command), *options]
    extra = ["--out", str(tmp_path / "out")] if "fit" in cli else ["--tracking-uri", uri]
    result = run_cli(tmp_path, ray_tmpdir, *head, "--config", TINY, "--data", spec, *extra, "--print-config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["data"]["spec"] == spec
    if "fit" not in cli:
        assert printed["tracking"]["tracking_uri"] == uri


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_a_data_path_with_hash_and_space_reaches_the_reader(tmp_path, ray_tmpdir):
    """The whole path reaches the dataset reader: its error names the directory, '#' and all."""
    missing = tmp_path / "run #2 data"
    result = run_cli(tmp_path, ray_tmpdir, "-m", "pipeline.evaluate", "--baseline", "mean-pose",
                     "--config", TINY, "--data", f"lspet:{missing}", "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert str(missing) in result.stderr


def test_run_lookup_finds_a_tag_value_with_a_quote(tmp_path):
    """MLflow's filter strings have no escapes; a value with a quote is quoted with the other kind."""
    from pipeline.tracking import store as tracking

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("quotes")
    identity = {tracking.SWEEP_TAG: "bob's sweep", tracking.TRIAL_TAG: 'say "hi"'}
    first, created = tracking.get_or_create_run(client, experiment, identity, run_name="a")
    again, created_again = tracking.get_or_create_run(client, experiment, identity, run_name="a")
    assert created and not created_again and again == first
    other, created_other = tracking.get_or_create_run(client, experiment, {tracking.SWEEP_TAG: "bob"}, run_name="b")
    assert created_other and other != first
    with pytest.raises(tracking.TrackingError, match="both kinds of quote"):
        tracking.find_run(client, experiment, {tracking.SWEEP_TAG: "it's \"x\""})


def _write_jpeg(path: Path, pixels: np.ndarray, orientation: int | None) -> None:
    from PIL import Image

    image = Image.fromarray(pixels)
    exif = image.getexif()
    if orientation is not None:
        exif[0x0112] = orientation  # 6 = "rotate 90 degrees clockwise to display"
    image.save(path, quality=95, exif=exif.tobytes())


def test_exif_orientation_is_ignored_so_joints_stay_on_their_pixels(tmp_path):
    """Annotations are in the stored pixel grid; a decoder that honoured the EXIF tag would rotate
    the image under them."""
    from PIL import Image

    from preprocessing.datasets.lspet import read_rgb_image

    pixels = np.zeros((40, 64, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)   # red left band
    pixels[:8, :, 1] = 200         # green top band
    _write_jpeg(tmp_path / "tagged.jpg", pixels, orientation=6)
    _write_jpeg(tmp_path / "plain.jpg", pixels, orientation=None)
    assert Image.open(tmp_path / "tagged.jpg").getexif()[0x0112] == 6
    tagged, plain = read_rgb_image(tmp_path / "tagged.jpg"), read_rgb_image(tmp_path / "plain.jpg")
    assert tagged.shape == plain.shape == (40, 64, 3)
    np.testing.assert_array_equal(tagged, plain)
    assert np.abs(tagged.astype(int) - pixels).mean() < 3  # the stored pixels, up to JPEG loss
    assert tagged[20, 5, 0] > 200 and tagged[20, 40, 0] < 50  # red stays on the left, as stored
