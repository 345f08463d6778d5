"""A trial's best weights as an MLflow pyfunc model: logged with its signature, input example and
metadata, loaded by URI, registered, served by `mlflow models serve`, and used by
`pipeline.predict` / `pipeline.evaluate --model`; every path gives `pipeline.predict`'s joints."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from services import NO_PROXY, model_server

from cpm_model.config import load_config
from cpm_model.joints import LSP
from pipeline.tracking.pose_model import (
    best_checkpoint_of_run,
    checkpoint_of_model,
    log_pose_model,
    logged_model_of_run,
    model_metadata,
    using_tracking_uri,
)
from pipeline.train.checkpoint import build_checkpoint, save_checkpoint
from pipeline.train.inference import build_model
from preprocessing.datasets.synthetic import SyntheticDataset

REPO = Path(__file__).resolve().parents[1]


# One worker runs the module under `pytest -n 2`: its tests share the logged model (a module fixture).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("pose-model")]  # MLflow models: logged, loaded, served


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A 3-stage synthetic_tiny CPM (seeded weights) logged as the pose model of a trial run."""
    tmp = tmp_path_factory.mktemp("pose-model")
    torch.manual_seed(0)
    config = load_config("synthetic_tiny", [])
    model = build_model(config, LSP.num_parts)
    checkpoint = tmp / "best_model.pt"
    save_checkpoint(build_checkpoint(model, config, epoch=2, best_epoch=2, joint_names=list(LSP.names),
                                     flip_pairs=LSP.flip_pairs, metrics=[{"epoch": 1, "pck": 0.1},
                                                                          {"epoch": 2, "pck": 0.25}]), checkpoint)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("pose", artifact_location=(tmp / "artifacts").as_uri())
    run = client.create_run(experiment_id, run_name="T=3 trial")
    (tmp / "config.yaml").write_text(config.to_yaml())
    client.log_artifact(run.info.run_id, str(tmp / "config.yaml"))  # a trial's run has artifacts of its own
    model_id = log_pose_model(uri, experiment_id, run.info.run_id, checkpoint)
    image = SyntheticDataset(num_samples=2).load_image(1)
    image_path = tmp / "person.png"
    cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    with using_tracking_uri(uri):  # for mlflow.pyfunc.load_model and get_model_info in the tests
        yield {"tmp": tmp, "uri": uri, "client": client, "experiment_id": experiment_id, "run_id": run.info.run_id,
               "model_id": model_id, "checkpoint": checkpoint, "image": image, "image_path": image_path}
    assert "MLFLOW_TRACKING_URI" not in os.environ or os.environ["MLFLOW_TRACKING_URI"] != uri


def cli(*args: str, uri: str) -> subprocess.CompletedProcess:
    """A command in an empty directory and with an empty temp directory, which it must leave empty
    (no stray ./mlflow.db: every MLflow call goes to --tracking-uri; a downloaded model is removed)."""
    workdir, tmpdir = (Path(uri[len("sqlite:///"):]).parent / name for name in ("cwd", "tmp"))
    workdir.mkdir(exist_ok=True)
    tmpdir.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", *args, "--tracking-uri", uri], cwd=workdir, capture_output=True,
                          text=True, timeout=300, env=dict(without_tracking_uri(), TMPDIR=str(tmpdir)))
    assert not list(workdir.iterdir()), f"{args[0]} wrote {list(workdir.iterdir())} into its working directory"
    assert not list(tmpdir.iterdir()), f"{args[0]} left {list(tmpdir.iterdir())} in its temp directory"
    return done


def without_tracking_uri() -> dict:
    """This process's environment without MLFLOW_TRACKING_URI (using_tracking_uri exports it)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(REPO)}


def predicted_joints(*args: str, uri: str) -> list[dict]:
    done = cli("pipeline.predict", *args, uri=uri)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)["joints"]


@pytest.fixture(scope="module")
def expected(logged):
    """pipeline.predict's joints for the image, from the checkpoint file itself."""
    return {flip: predicted_joints("--checkpoint", str(logged["checkpoint"]), str(logged["image_path"]),
                                   *(["--flip"] if flip else []), uri=logged["uri"]) for flip in (False, True)}


def test_metadata_says_when_the_model_predicts_in_two_passes():
    from cpm_model.config import ExperimentConfig

    two_pass = ExperimentConfig().with_overrides({"train.eval_refine": True})
    meta = model_metadata({"config": two_pass, "joint_names": list(LSP.names), "metrics": [], "best_epoch": None})
    assert meta["second_pass"] is True and "second pass on a re-crop" in meta["crop_rule"]


def test_the_model_is_logged_once_with_its_signature_example_and_metadata(logged):
    client = logged["client"]
    model = logged_model_of_run(client, logged["experiment_id"], logged["run_id"])
    assert model.model_id == logged["model_id"] and model.experiment_id == logged["experiment_id"]
    # A replayed write (the tracking writer retries after an outage) finds the model: no second one.
    again = log_pose_model(logged["uri"], logged["experiment_id"], logged["run_id"], logged["checkpoint"])
    assert again == model.model_id
    assert len(client.search_logged_models([logged["experiment_id"]])) == 1

    info = mlflow.models.get_model_info(f"models:/{model.model_id}")
    assert info.signature.inputs.input_names() == ["image", "center_x", "center_y"]
    assert [p.name for p in info.signature.params] == ["flip"]
    assert info.saved_input_example_info is not None
    meta = info.metadata
    assert meta["joint_names"] == list(LSP.names) and meta["input_size"] == 64
    assert meta["stages"] == 3 and meta["receptive_field_px"] == 173 and meta["best_epoch"] == 2
    assert meta["val_pck"] == 0.25 and meta["metric"] == "PCK@0.2 (torso)" and "no ground truth" in meta["crop_rule"]
    assert meta["second_pass"] is False and "second pass" not in meta["crop_rule"]


def test_loaded_model_returns_the_joints_of_pipeline_predict(logged, expected):
    model = mlflow.pyfunc.load_model(f"runs:/{logged['run_id']}/model")
    image = logged["image"]
    encoded = logged["image_path"].read_bytes()
    frame = pd.DataFrame({"image": [encoded, base64.b64encode(encoded).decode(), image]})
    out = model.predict(frame)
    assert len(out) == 3
    for row in range(3):
        assert out.iloc[row]["joints"] == expected[False]
        assert list(out.iloc[row]["image_size"]) == list(image.shape[:2])
    assert model.predict(frame.iloc[:1], params={"flip": True}).iloc[0]["joints"] == expected[True]

    # A given centre moves the crop: the same joints as pipeline.predict --center.
    centred = predicted_joints("--checkpoint", str(logged["checkpoint"]), str(logged["image_path"]),
                               "--center", "50,40", uri=logged["uri"])
    moved = model.predict(pd.DataFrame({"image": [encoded], "center_x": [50.0], "center_y": [40.0]}))
    assert moved.iloc[0]["joints"] == centred != expected[False]


def test_a_row_that_holds_no_image_is_refused_by_name(logged):
    model = mlflow.pyfunc.load_model(f"models:/{logged['model_id']}")
    for value, needle in [(b"not an image", "image of row 1 could not be decoded"),
                          ("%%%", "image of row 1: a string must be base64"),
                          (np.zeros((4, 4)), "image of row 1: expected encoded bytes")]:
        with pytest.raises(mlflow.exceptions.MlflowException, match=needle):
            model.predict(pd.DataFrame({"image": [logged["image_path"].read_bytes(), value]}))


@pytest.mark.integration  # a real `mlflow models serve`
def test_registered_model_is_served_and_used_by_predict_and_evaluate(logged, expected):
    client = logged["client"]
    client.create_registered_model("cpm-test")
    model = logged_model_of_run(client, logged["experiment_id"], logged["run_id"])
    version = client.create_model_version("cpm-test", source=model.model_uri, run_id=logged["run_id"],
                                          model_id=model.model_id)
    assert int(version.version) == 1
    uri = logged["uri"]

    # pipeline.predict --model: the same joints as --checkpoint.
    assert predicted_joints("--model", "models:/cpm-test/1", str(logged["image_path"]), uri=uri) == expected[False]
    # The model's checkpoint is the trial's checkpoint, by either URI and by run id.
    original = logged["checkpoint"].read_bytes()
    for path in (checkpoint_of_model("models:/cpm-test/1", uri, str(logged["tmp"] / "a")),
                 checkpoint_of_model(f"runs:/{logged['run_id']}/model", uri, str(logged["tmp"] / "b")),
                 best_checkpoint_of_run(logged["run_id"], uri, str(logged["tmp"] / "c"))):
        assert path.read_bytes() == original

    # A real server: POST the image base64-encoded, get pipeline.predict's joints back.
    with model_server("models:/cpm-test/1", uri, logged["tmp"]) as base:
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(logged["image_path"].read_bytes()).decode()]]}}
        answer = post(base + "/invocations", body)
        assert answer["predictions"][0]["joints"] == expected[False]
        assert answer["predictions"][0]["image_size"] == list(logged["image"].shape[:2])
        flipped = post(base + "/invocations", {**body, "params": {"flip": True}})
        assert flipped["predictions"][0]["joints"] == expected[True]
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(base + "/invocations", {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}})
        assert refused.value.code == 400 and b"image of row 0 could not be decoded" in refused.value.read()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with NO_PROXY.open(request, timeout=120) as response:
        return json.loads(response.read())


def test_evaluate_scores_a_registered_model_like_its_checkpoint(logged, tmp_path):
    uri = logged["uri"]
    reports = {}
    for name, source in [("checkpoint", ["--checkpoint", str(logged["checkpoint"])]),
                         ("model", ["--model", f"runs:/{logged['run_id']}/model"]),
                         ("run", ["--run-id", logged["run_id"]])]:
        out = tmp_path / f"{name}.json"
        done = cli("pipeline.evaluate", *source, "--data", "synthetic:40", "--split", "val", "--quiet",
                   "--cache-dir", str(tmp_path / "cache"), "--json", str(out), uri=uri)
        assert done.returncode == 0, done.stderr[-2000:]
        reports[name] = json.loads(out.read_text())
    for name in ("model", "run"):
        assert reports[name]["pck"] == reports["checkpoint"]["pck"]
        assert reports[name]["pck_per_joint"] == reports["checkpoint"]["pck_per_joint"]
    # The report names what was scored as the user named it, not a removed download's path.
    assert reports["model"]["checkpoint"] == f"runs:/{logged['run_id']}/model"
    assert reports["run"]["checkpoint"] == f"best of run {logged['run_id']}"


def test_an_unknown_model_is_one_line_and_exit_2(logged):
    for command in (["pipeline.predict", "--model", "models:/no-such-model/1", str(logged["image_path"])],
                    ["pipeline.evaluate", "--model", "models:/no-such-model/1", "--data", "synthetic:10"]):
        done = cli(*command, uri=logged["uri"])
        assert done.returncode == 2, done.stderr[-2000:]
        assert "no-such-model" in done.stderr and "Traceback" not in done.stderr


def test_a_run_finds_its_model_in_an_experiment_that_many_sweeps_share(tmp_path):
    """More models than one page of MLflow's search (100): the run's own is found, not logged twice."""
    config = load_config("synthetic_tiny", ["model.stages=1"])
    checkpoint = tmp_path / "best_model.pt"
    save_checkpoint(build_checkpoint(build_model(config, LSP.num_parts), config, epoch=1, best_epoch=1,
                                     joint_names=list(LSP.names), flip_pairs=LSP.flip_pairs), checkpoint)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("shared", artifact_location=(tmp_path / "artifacts").as_uri())
    ours = client.create_run(experiment_id).info.run_id
    model_id = log_pose_model(uri, experiment_id, ours, checkpoint)
    others = client.create_run(experiment_id).info.run_id
    for _ in range(120):  # later sweeps' models, newer than ours
        other = client.create_logged_model(experiment_id, name="model", source_run_id=others)
        client.finalize_logged_model(other.model_id, "READY")
    assert logged_model_of_run(client, experiment_id, ours).model_id == model_id
    assert log_pose_model(uri, experiment_id, ours, checkpoint) == model_id
