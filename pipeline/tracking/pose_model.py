"""A trial's best weights as an MLflow model: a pyfunc that takes images and returns joints.

    model = mlflow.pyfunc.load_model("models:/cpm-lspet/1")
    model.predict(pd.DataFrame({"image": [Path("photo.jpg").read_bytes()]}), params={"flip": True})

Input: a DataFrame, one row per image. Its `image` column holds encoded image bytes (JPEG, PNG),
the same bytes base64-encoded (what a REST client sends), or an RGB uint8 array (H, W, 3);
optional `center_x` / `center_y` give the person's centre in original pixels (default: the image
centre). Param `flip` averages with the mirrored crop. Output: one row per image with `joints`
(per joint its name, x and y in original pixels, confidence) and `image_size` [H, W]: the JSON of
`python -m pipeline.predict` for the same image.

The model holds the checkpoint (`artifacts/best_model.pt`) and loads it with the project's own
code, so it is served from an environment where this project is installed
(`mlflow models serve -m models:/NAME/VERSION --env-manager local`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

from pipeline.tracking import store
from pipeline.tracking.errors import TrackingError

MODEL_NAME = "model"  # runs:/RUN_ID/model
CHECKPOINT_ARTIFACT = "checkpoint"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(AnyType(), "image"), ColSpec("double", "center_x", required=False),
                   ColSpec("double", "center_y", required=False)]),
    outputs=Schema([ColSpec(AnyType(), "joints"), ColSpec(AnyType(), "image_size")]),
    params=ParamSchema([ParamSpec("flip", "boolean", False)]),
)
EXAMPLE_IMAGE_SIDE = 96


class PoseModel(mlflow.pyfunc.PythonModel):
    """One person per image, cropped as evaluation crops are (no ground truth)."""

    def load_context(self, context) -> None:
        import torch

        from pipeline.train.inference import load_trained_model

        self.model, self.config, self.joint_names, self.flip_pairs = load_trained_model(
            context.artifacts[CHECKPOINT_ARTIFACT])
        if torch.cuda.is_available():  # served on a GPU machine: predict there
            self.model.to("cuda")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from cpm_model.joints import flip_permutation
        from pipeline.train.inference import joint_records, predict_image

        flip = bool((params or {}).get("flip", False))
        if flip and not self.flip_pairs:
            raise MlflowException("flip=true needs the joints' left/right pairs, which this model's checkpoint lacks",
                                  INVALID_PARAMETER_VALUE)
        permutation = flip_permutation(len(self.joint_names), self.flip_pairs) if flip else None
        rows = []
        for image, center in zip(images_of(model_input), centers_of(model_input)):
            result = predict_image(self.model, self.config, image, center, permutation)
            rows.append({"joints": joint_records(self.joint_names, result["joints"], result["confidence"]),
                         "image_size": list(image.shape[:2])})
        return pd.DataFrame(rows, columns=["joints", "image_size"])


def images_of(frame: pd.DataFrame) -> list[np.ndarray]:
    """RGB uint8 images of the `image` column; a row that holds no image is an error naming it."""
    from pipeline.train.inference import decode_image

    images = []
    for row, value in enumerate(frame["image"]):
        if isinstance(value, str):
            try:
                value = base64.b64decode(value, validate=True)
            except binascii.Error:
                raise MlflowException(f"image of row {row}: a string must be base64-encoded image bytes",
                                      INVALID_PARAMETER_VALUE) from None
        try:
            if isinstance(value, (bytes, bytearray, memoryview)):
                images.append(decode_image(bytes(value), f"image of row {row}"))
            else:
                images.append(rgb_array(value, row))
        except ValueError as exc:
            raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None
    return images


def rgb_array(value, row: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ValueError(f"image of row {row}: expected encoded bytes, base64 text or an RGB array (H, W, 3), "
                         f"got {type(value).__name__} of shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or array.min() < 0 or array.max() > 255:
            raise ValueError(f"image of row {row}: an array must hold uint8 values (0-255), got {array.dtype}")
        array = array.astype(np.uint8)
    return array


def centers_of(frame: pd.DataFrame) -> list[np.ndarray | None]:
    """Per row (center_x, center_y) when both are given, else None (the image centre)."""
    if "center_x" not in frame or "center_y" not in frame:
        return [None] * len(frame)
    return [None if pd.isna(x) or pd.isna(y) else np.array([float(x), float(y)])
            for x, y in zip(frame["center_x"], frame["center_y"])]


def model_metadata(checkpoint: dict) -> dict:
    """What a user of the model needs to know: the joints, the input and how crops are made."""
    from cpm_model.receptive_field import receptive_field_px
    from pipeline.train.inference import dataset_kind
    from pipeline.train.scoring import protocol_for
    from preprocessing import crops

    config = checkpoint["config"]
    kind = dataset_kind(config.data.spec)
    best = next((m for m in checkpoint.get("metrics") or [] if m.get("epoch") == checkpoint.get("best_epoch")), {})
    protocol = protocol_for(config)
    return {
        "joint_names": list(checkpoint["joint_names"]), "input_size": config.preprocess.input_size,
        "crop_rule": "evaluation crop, no ground truth: a square around the image centre (or center_x, center_y) "
                     "with side crop_context x person_to_image_ratio x max(H, W), resized to input_size"
                     + ("; then a second pass on a re-crop of it around the first prediction (box of the "
                        "predicted joints x crop_context)" if config.train.eval_refine else ""),
        "second_pass": bool(config.train.eval_refine),
        "crop_context": config.preprocess.crop_context, "person_to_image_ratio": crops.person_to_image_ratio(kind),
        "dataset": kind, "stages": config.model.stages, "receptive_field_px": receptive_field_px(config.model)[-1],
        "best_epoch": checkpoint.get("best_epoch"), "metric": protocol.label,
        f"val_{protocol.name}": best.get(protocol.name), "project_version": metadata.version("cpm-pipeline"),
    }


def example_input() -> pd.DataFrame:
    """A small encoded image, as a REST client sends it (base64)."""
    import cv2

    ramp = np.linspace(0, 255, EXAMPLE_IMAGE_SIDE, dtype=np.uint8)
    image = np.stack([np.tile(ramp, (EXAMPLE_IMAGE_SIDE, 1))] * 3, axis=-1)
    encoded = cv2.imencode(".png", image)[1].tobytes()
    return pd.DataFrame({"image": [base64.b64encode(encoded).decode("ascii")]})


def project_requirements() -> list[str]:
    """The project's own runtime requirements (it is not on a package index: it is installed beside)."""
    return [r for r in metadata.requires("cpm-pipeline") or [] if "extra ==" not in r]


@contextlib.contextmanager
def using_tracking_uri(uri: str):
    """MLflow's model logging and its runs:/ and models:/ lookups use the global tracking URI: point
    it at `uri` meanwhile. MLflow also exports it as MLFLOW_TRACKING_URI (for subprocesses), so
    that variable is put back as it was too."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with store.env_set(MLFLOW_TRACKING_URI=uri), _use_tracking_uri(uri):
        yield


@contextlib.contextmanager
def quiet_model_logging():
    """MLflow's lines while logging a pose model, which the user cannot act on: the warning that a
    Python object is pickled (PoseModel is this project's own class, loaded by this project), the
    note that the input example is validated, and the artifact download bar of that validation."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with store.quiet_artifact_downloads():
            yield
    finally:
        logger.setLevel(level)


def _models_of_run(client: MlflowClient, experiment_id: str, run_id: str) -> list:
    # Filtered by run in the store: an experiment that many sweeps share holds more models than a page.
    models = client.search_logged_models(
        [experiment_id], filter_string=f"name = '{MODEL_NAME}' AND source_run_id = '{run_id}'")
    return [m for m in models if m.source_run_id == run_id]


def _is_ready(model) -> bool:
    return getattr(model.status, "name", str(model.status)) == "READY"


def logged_model_of_run(client: MlflowClient, experiment_id: str, run_id: str):
    """The run's READY pose model, or None."""
    return next((m for m in _models_of_run(client, experiment_id, run_id) if _is_ready(m)), None)


def log_pose_model(tracking_uri: str, experiment_id: str, run_id: str, checkpoint_path: str | Path) -> str:
    """Log the checkpoint as the run's pose model, once: a replayed write finds the READY model, or
    completes the one a failed attempt left pending. Returns the model id."""
    from pipeline.train.checkpoint import load_checkpoint

    client = MlflowClient(tracking_uri)
    models = _models_of_run(client, experiment_id, run_id)
    ready = next((m for m in models if _is_ready(m)), None)
    if ready is not None:
        return ready.model_id
    checkpoint = load_checkpoint(checkpoint_path)
    # Created here, in the run's experiment: Model.log without an active run would put it in the default one.
    logged = models[0] if models else client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id)
    with using_tracking_uri(tracking_uri), quiet_model_logging():
        Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
                  python_model=PoseModel(), artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_path)},
                  signature=SIGNATURE, input_example=example_input(), metadata=model_metadata(checkpoint),
                  pip_requirements=project_requirements())
    return logged.model_id


def checkpoint_of_model(model_uri: str, tracking_uri: str | None, download_dir: str) -> Path:
    """The checkpoint file inside a pose model (models:/NAME/VERSION, runs:/RUN_ID/model, ...),
    downloaded into `download_dir` (the caller's to remove)."""
    from pipeline.train.checkpoint import BEST_MODEL_FILE

    uri = store.reading_uri(tracking_uri)
    try:
        with using_tracking_uri(uri), store.bounded_requests():
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{model_uri.rstrip('/')}/artifacts/{BEST_MODEL_FILE}", dst_path=download_dir, tracking_uri=uri))
    except Exception as exc:  # MLflow raises its own types for unknown names, versions and paths
        raise TrackingError(f"model {model_uri!r} in {store.redact_uri(uri)}: no pose model with a "
                            f"{BEST_MODEL_FILE} there ({store.scrub(str(exc), uri).splitlines()[0][:300]})") from None


def best_checkpoint_of_run(run_id: str, tracking_uri: str | None, download_dir: str) -> Path:
    """A local file holding a trial run's best checkpoint: the one in its pose model, else (runs
    logged before models were) its `best_model.pt` artifact, else the checkpoint directory its
    `cpm.best_checkpoint` tag points to. Downloads go into `download_dir` (the caller's to remove)."""
    with store.bounded_requests():
        return _best_checkpoint_of_run(run_id, tracking_uri, download_dir)


def _best_checkpoint_of_run(run_id: str, tracking_uri: str | None, download_dir: str) -> Path:
    from pipeline.train.checkpoint import BEST_MODEL_FILE, CHECKPOINT_FILE  # imports torch: only here

    uri = store.reading_uri(tracking_uri)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # MLflow raises its own exception types for unknown ids
        raise TrackingError(f"MLflow run {run_id!r} not found in {store.redact_uri(uri)}: "
                            f"{store.scrub(str(exc), uri)}") from None
    if logged_model_of_run(client, run.info.experiment_id, run_id) is not None:
        return checkpoint_of_model(f"runs:/{run_id}/{MODEL_NAME}", uri, download_dir)
    if BEST_MODEL_FILE in {a.path for a in client.list_artifacts(run_id)}:
        return Path(client.download_artifacts(run_id, BEST_MODEL_FILE, download_dir))
    pointer = run.data.tags.get("cpm.best_checkpoint")
    if pointer and (Path(pointer) / CHECKPOINT_FILE).is_file():
        return Path(pointer) / CHECKPOINT_FILE
    raise TrackingError(f"MLflow run {run_id} ({run.info.run_name!r}, {run.info.status}) has no best checkpoint: "
                        f"no pose model, no best_model.pt artifact and no readable cpm.best_checkpoint tag")


def check_model_name(name: str) -> None:
    """A registered model's name as MLflow's registry takes it (checked before a sweep starts)."""
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise TrackingError(f"--register {name!r}: {exc.message}") from None


def register_best_model(tracking_uri: str, experiment_id: str, parent_run_id: str, name: str):
    """Register the pose model of the sweep's best finished trial (its validation score at its best
    epoch) as a new version of `name`; returns (model version, trial run, score, protocol)."""
    from pipeline.train import metric_names as names
    from pipeline.train.inference import dataset_kind

    client = MlflowClient(tracking_uri)
    query = (f"tags.`{store.KIND_TAG}` = 'trial' and tags.`mlflow.parentRunId` = '{parent_run_id}' "
             f"and attributes.status = 'FINISHED'")
    scored = []
    for run in client.search_runs([experiment_id], filter_string=query, max_results=10000):
        protocol = names.protocol_of(dataset_kind(run.data.params.get("dataset", "")))
        score = run.data.metrics.get(names.BEST_PREFIX + protocol.name)
        model = logged_model_of_run(client, experiment_id, run.info.run_id)
        if score is not None and np.isfinite(score) and model is not None:
            scored.append((score, run, model, protocol))
    if not scored:
        raise TrackingError(f"--register {name}: no finished trial of sweep run {parent_run_id} has a logged model")
    score, run, model, protocol = max(scored, key=lambda item: item[0])
    try:
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(name, description="CPM pose models, registered by sweep.py --register")
        with using_tracking_uri(tracking_uri):
            version = client.create_model_version(
                name, source=model.model_uri, run_id=run.info.run_id, model_id=model.model_id,
                tags={"cpm.sweep_run_id": parent_run_id, f"val_{protocol.name}": f"{score:.6f}"},
                description=f"{run.info.run_name}: best of its sweep, validation {protocol.label} {100 * score:.1f}%")
    except MlflowException as exc:
        raise TrackingError(f"--register {name}: the model registry refused it: {exc.message}") from None
    return version, run, score, protocol
