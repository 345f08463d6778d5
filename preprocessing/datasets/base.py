"""What every dataset reader provides: samples with joints in ORIGINAL image pixels.

A reader is cheap to construct (it reads the annotation file and lists images, it does not decode
images), picklable (it is sent to preprocessing worker processes), and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cpm_model.joints import JointSet


class DatasetError(ValueError):
    """Bad dataset input (wrong path, wrong annotation shape, no images, unknown dataset name)."""


class SampleSkipped(Exception):
    """One sample cannot be used (undecodable image, joints outside the image, person too small).

    `reason` is a short key used for counting (e.g. "unreadable_image"), the message names the file.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class PoseSample:
    """One person in one image, in original image coordinates (pixel centres at integers)."""

    index: int  # index of the sample within its dataset (stored in the cache as source index)
    image_path: str  # file name or, for generated data, a descriptive id (used in messages)
    joints: np.ndarray  # (P, 3) float64: x, y, flag (1 = annotated, 0 = not annotated)
    # Evaluation crop hints that do not come from the test ground truth (None = derive from image size):
    center: np.ndarray | None = None  # rough person centre (x, y), e.g. MPII's annotated centre
    scale: float | None = None  # MPII-style scale (person height / 200 px)
    head_size: float = float("nan")  # PCKh normaliser (0.6 x head-box diagonal), NaN where unknown
    extras: dict = field(default_factory=dict)


class PoseDataset(Protocol):
    joint_set: JointSet

    def identity(self) -> dict:
        """Plain data that identifies the dataset contents (type, resolved path, count, annotation
        file size and mtime or hash, seed...): it goes into the cache's file-name hash."""

    def __len__(self) -> int: ...

    def split_indices(self, split: str) -> np.ndarray:
        """Sample indices of 'train', 'val', 'test' or 'all' (deterministic)."""

    def sample(self, index: int) -> PoseSample: ...

    def load_image(self, index: int) -> np.ndarray:
        """RGB uint8 (H, W, 3); raises SampleSkipped('unreadable_image', ...) naming the file."""
