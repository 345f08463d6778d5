"""What every dataset reader provides (samples with joints in ORIGINAL image pixels), and the code
the readers share: file checks, .mat and image reading, and the numbered-image dataset (LSP, LSPET).

A reader is cheap to construct (it reads the annotation file and lists images, it does not decode
images), picklable (it is sent to preprocessing worker processes), and deterministic.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import scipy.io

from cpm_model.joints import LSP, JointSet


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


# Bumped when a reader's conversion of the same files changes, so that caches keyed on
# identity() are rebuilt.
READER_VERSION = 1


# --- utilities shared by the readers -------------------------------------------------------------


def resolve_dataset_root(root: str | os.PathLike, kind: str) -> Path:
    """Absolute, resolved directory path (with ~ expanded), or DatasetError naming it."""
    path = Path(os.path.expanduser(os.fspath(root))).resolve()
    if not path.exists():
        raise DatasetError(f"{kind} dataset directory {path} does not exist")
    if not path.is_dir():
        raise DatasetError(f"{kind} dataset path {path} is not a directory")
    return path


def file_stamp(path: Path) -> dict:
    """Size and modification time of a file: cheap evidence that its contents changed."""
    stat = path.stat()
    return {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def list_image_files(images_dir: Path, kind: str) -> frozenset[str]:
    """Names of the files in the images directory, or DatasetError if it is missing or empty."""
    if not images_dir.is_dir():
        raise DatasetError(f"{kind}: image directory {images_dir} does not exist")
    names = frozenset(entry.name for entry in os.scandir(images_dir) if entry.is_file())
    if not names:
        raise DatasetError(f"{kind}: image directory {images_dir} contains no images")
    return names


def read_mat_variable(path: Path, variable: str) -> np.ndarray:
    """One variable of a MATLAB (v5/v7) .mat file, or DatasetError naming the file and what is wrong."""
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist")
    try:
        contents = scipy.io.loadmat(str(path), variable_names=[variable])
    except NotImplementedError as exc:  # scipy reads v7.3 (HDF5) files only through h5py
        raise DatasetError(f"{path}: MATLAB v7.3 files are not supported; re-save it with "
                           f"save(..., '-v7') ({exc})") from exc
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError... on a corrupt file
        raise DatasetError(f"{path} is not a readable MATLAB .mat file: {exc}") from exc
    if variable not in contents:
        try:
            present = sorted(name for name, _, _ in scipy.io.whosmat(str(path)))
        except Exception:
            present = []
        raise DatasetError(f"{path} has no variable '{variable}'; it holds {present}")
    return np.asarray(contents[variable])


def check_numeric_3d(matrix: np.ndarray, path: Path, variable: str, expected: tuple, layout: str) -> None:
    """DatasetError unless `matrix` is a real-valued 3-D array whose first two dims are `expected`."""
    if not (np.issubdtype(matrix.dtype, np.integer) or np.issubdtype(matrix.dtype, np.floating)):
        raise DatasetError(f"{path}: '{variable}' has dtype {matrix.dtype}; expected real numbers ({layout})")
    if matrix.ndim != 3 or matrix.shape[:2] != expected or matrix.shape[2] < 1:
        raise DatasetError(f"{path}: '{variable}' has shape {matrix.shape}; expected "
                           f"({expected[0]}, {expected[1]}, N) with N >= 1 ({layout})")


def check_binary(values: np.ndarray, path: Path, what: str) -> None:
    """DatasetError naming the first (sample, joint) of `values` (N, P) that is neither 0 nor 1."""
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        sample, joint = np.argwhere(bad)[0]
        raise DatasetError(f"{path}: sample {sample + 1}, joint {joint} has {what} {float(values[sample, joint])}; "
                           f"expected 0 or 1")


def check_joints(joints: np.ndarray, path: Path) -> None:
    """DatasetError unless flags are 0/1 and annotated joints have finite coordinates."""
    flags = joints[:, :, 2]
    check_binary(flags, path, "flag")
    bad_xy = (flags == 1) & ~np.isfinite(joints[:, :, :2]).all(axis=-1)
    if bad_xy.any():
        sample, joint = np.argwhere(bad_xy)[0]
        raise DatasetError(f"{path}: sample {sample + 1}, joint {joint} is annotated but its x, y "
                           f"{joints[sample, joint, :2].tolist()} are not finite")


def read_rgb_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); SampleSkipped('unreadable_image', ...) naming the file otherwise.

    OpenCV decodes LSPET JPEGs about 1.7x faster than Pillow; decoding from bytes separates a
    missing file from an undecodable one and copes with non-ASCII paths. An EXIF orientation tag
    is ignored: the annotations are in the stored pixel grid, and OpenCV would otherwise rotate
    the image but not its joints.
    """
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        reason = "file not found" if not path.exists() else f"cannot read ({exc})"
        raise SampleSkipped("unreadable_image", f"{path}: {reason}") from exc
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if bgr is None:
        raise SampleSkipped("unreadable_image", f"{path}: not a decodable image ({data.size} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def check_index(index, length: int) -> int:
    """`index` as a plain int in [0, length), or IndexError."""
    index = operator.index(index)
    if not 0 <= index < length:
        raise IndexError(f"sample index {index} out of range for a dataset of {length} samples")
    return index


# --- numbered-image datasets (LSPET, LSP) -------------------------------------------------------


class NumberedImageDataset:
    """ROOT/images/<name_pattern % (i + 1)> + ROOT/joints.mat; subclasses convert the matrix."""

    kind: str = ""
    joint_set: JointSet = LSP
    name_pattern: str = ""

    def __init__(self, root: str | os.PathLike):
        self.root = resolve_dataset_root(root, self.kind)
        self.annotation_path = self.root / "joints.mat"
        self._annotation_stamp = file_stamp(self.annotation_path) if self.annotation_path.is_file() else None
        raw = read_mat_variable(self.annotation_path, "joints")
        self._joints, self._extras = self._convert_joints(raw, self.annotation_path)
        self._image_names = tuple(self.name_pattern % (i + 1) for i in range(len(self._joints)))
        present = list_image_files(self.root / "images", self.kind)
        self.missing_images = tuple(name for name in self._image_names if name not in present)
        if len(self.missing_images) == len(self._image_names):
            raise DatasetError(f"{self.kind}: none of the {len(self._image_names)} images annotated in "
                               f"{self.annotation_path} ({self._image_names[0]} ...) is in {self.root / 'images'}")

    def _convert_joints(self, raw: np.ndarray, path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(N, P, 3) float64 x, y, flag, plus per-sample extra arrays keyed by name."""
        raise NotImplementedError

    def identity(self) -> dict:
        return {
            "type": self.kind,
            "reader_version": READER_VERSION,
            "root": str(self.root),
            "count": len(self),
            "images_found": len(self) - len(self.missing_images),
            "annotation": self._annotation_stamp,
        }

    def __len__(self) -> int:
        return len(self._joints)

    def image_name(self, index: int) -> str:
        return self._image_names[check_index(index, len(self))]

    def image_path(self, index: int) -> Path:
        return self.root / "images" / self.image_name(index)

    def sample(self, index: int) -> PoseSample:
        index = check_index(index, len(self))
        extras = {key: values[index].copy() for key, values in self._extras.items()}
        return PoseSample(index=index, image_path=str(self.image_path(index)),
                          joints=self._joints[index].copy(), extras=extras)

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb_image(self.image_path(index))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} samples)"
