"""A trained CPM as a Python object, what `cpm_model.load` returns and `cpm-predict` runs:

    import cpm_model
    predictor = cpm_model.load("runs/synthetic_tiny/best.pt")    # or "models:/cpm-lspet/1"
    record = predictor.predict("photo.jpg")                       # or an RGB uint8 array (H, W, 3)
    records = predictor.predict_batch(["a.jpg", "b.jpg"])         # one forward pass per batch_size images
    print(record["joints"][0])        # {'name': 'right_ankle', 'x': ..., 'y': ..., 'confidence': ...}

A record is the JSON `cpm-predict` writes: {"image": the path (when given one), "image_size":
[H, W], "joints": per joint its name, x and y in ORIGINAL image pixels and its confidence (the
peak of its belief map)}. One person per image, cropped as evaluation crops are (no ground truth).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

MODEL_URI_SCHEMES = ("models:/", "runs:/", "models:", "runs:")
DEFAULT_BATCH_SIZE = 32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); FileNotFoundError naming the file when it is missing or unreadable."""
    from pipeline.train.inference import decode_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        return decode_image(path.read_bytes(), f"image {path}")
    except ValueError as exc:
        raise FileNotFoundError(str(exc)) from None


def rgb_image(image) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) as given, or the image of a path."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or min(array.shape[:2]) < 1:
        raise ValueError(f"expected an RGB uint8 array (H, W, 3) or an image path, got {array.dtype} {array.shape}")
    return array


class Predictor:
    """A model in eval mode on `device` with its config and joint names; predicts in batches."""

    def __init__(self, model: torch.nn.Module, config, joint_names: Sequence[str], flip_pairs=None,
                 device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, flip: bool = False):
        from cpm_model.joints import flip_permutation

        if flip and not flip_pairs:
            raise ValueError("flip needs the joints' left/right pairs, which this checkpoint lacks")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device or default_device())
        self.model = model.to(self.device).eval()
        self.config, self.joint_names, self.batch_size = config, list(joint_names), batch_size
        self.permutation = flip_permutation(len(joint_names), flip_pairs) if flip else None

    def predict(self, image, center=None) -> dict:
        """The record of one image (a path or an RGB uint8 array); `center` (x, y) in original
        pixels moves the crop (default: the image centre)."""
        return self.predict_batch([image], None if center is None else [center])[0]

    def predict_batch(self, images: Sequence, centers: Sequence | None = None) -> list[dict]:
        """The records of a list of images (paths or arrays), `batch_size` per forward pass."""
        records = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            arrays = [rgb_image(image) for image in chunk]
            chunk_centers = None if centers is None else centers[start:start + self.batch_size]
            for image, array, result in zip(chunk, arrays, self.predict_arrays(arrays, chunk_centers)):
                source = {"image": str(image)} if isinstance(image, (str, Path)) else {}
                records.append({**source, **self.record(array, result)})
        return records

    def predict_arrays(self, arrays: Sequence[np.ndarray], centers: Sequence | None = None) -> list[dict]:
        """`pipeline.train.inference.predict_images` of RGB arrays in one forward pass: joints,
        confidences, belief maps and crops per image."""
        from pipeline.train.inference import predict_images

        centers = None if centers is None else [None if c is None else np.asarray(c, dtype=np.float64)
                                                for c in centers]
        return predict_images(self.model, self.config, arrays, centers, self.permutation, self.device)

    def record(self, image: np.ndarray, result: dict) -> dict:
        from pipeline.train.inference import joint_records

        return {"image_size": list(image.shape[:2]),
                "joints": joint_records(self.joint_names, result["joints"], result["confidence"])}


def is_model_uri(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(MODEL_URI_SCHEMES)


@contextlib.contextmanager
def checkpoint_file(source: str | Path, tracking_uri: str | None = None) -> Iterator[Path]:
    """A checkpoint file or directory as given, or the checkpoint inside an MLflow model URI
    (models:/NAME/VERSION, runs:/RUN_ID/model), downloaded into a temporary directory that is
    removed when the block ends; MLflow is imported for a URI only."""
    if not is_model_uri(source):
        yield Path(source)
        return
    from pipeline.tracking.pose_model import checkpoint_of_model

    with tempfile.TemporaryDirectory(prefix="cpm-model-") as download_dir:
        yield checkpoint_of_model(str(source), tracking_uri, download_dir)


def load(source: str | Path, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
         flip: bool = False, tracking_uri: str | None = None) -> Predictor:
    """A Predictor of a checkpoint (best.pt or its directory) or of an MLflow model URI.
    device: 'cpu', 'cuda', 'cuda:1' ... (default: CUDA when present). flip: average each crop's
    maps with its mirror image's. tracking_uri: the store of a model URI (default:
    MLFLOW_TRACKING_URI, else the project's local store)."""
    from pipeline.train.inference import load_trained_model

    with checkpoint_file(source, tracking_uri) as path:
        model, config, joint_names, flip_pairs = load_trained_model(path)
    return Predictor(model, config, joint_names, flip_pairs, device, batch_size, flip)
