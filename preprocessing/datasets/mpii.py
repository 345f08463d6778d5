"""MPII Human Pose reader for the JSON annotations common in public pose code (HRNet, MMPose).

Layout accepted:
- images: ROOT/images/<image>
- annotations, looked up in ROOT/annot/, ROOT/annotations/ and ROOT/ (first hit wins):
  training file  mpii_train.json or train.json;  validation file  mpii_val.json, valid.json or
  val.json. At least one must exist. Each holds a list of people:
      {"image": "015601864.jpg", "center": [x, y], "scale": s,
       "joints": [[x, y] x 16], "joints_vis": [16 x 0/1], "headbox": [x1, y1, x2, y2] (optional)}
  joints_vis > 0 means the joint is annotated (flag 1); the coordinates of the others are ignored.
- head boxes for PCKh: an entry's "headbox" key, else, for the validation file, `headboxes_src`
  (2, 2, M) from gt_valid.mat (HRNet) or mpii_gt_val.mat (MMPose) beside it, M = number of
  validation entries in the same order ([0] = top-left, [1] = bottom-right corner).
  head_size = 0.6 x the box diagonal (NaN where no box is known).

Coordinate convention: the JSON files hold MATLAB 1-based pixel coordinates. Like HRNet and MMPose,
this reader subtracts 1 from joints, centre and head box, giving this project's 0-based pixel
centres. It does NOT apply their crop heuristics (centre y + 15 x scale, scale x 1.25): scale is
returned as annotated (person height / 200 px) and the crop stage decides on the margin.
A centre of [-1, -1] (no rough position known) gives center = scale = None.

Joint order: cpm_model.joints.MPII. Samples: the training file's people, then the validation
file's. Splits: 'test' = the validation file (the labelled set PCKh is reported on; MPII's test
labels are not public); 'val' = people of the training file whose image name hashes into the val
buckets of preprocessing.datasets.splits (~10%, whole images); 'train' = the rest of the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cpm_model.joints import MPII

from .base import (READER_VERSION, DatasetError, PoseSample, check_index, file_stamp, list_image_files,
                   read_mat_variable, read_rgb_image, resolve_dataset_root)
from .splits import official_split_indices

ANNOTATION_DIRS = ("annot", "annotations", ".")
TRAIN_FILES = ("mpii_train.json", "train.json")
VAL_FILES = ("mpii_val.json", "valid.json", "val.json")
HEADBOX_FILES = ("gt_valid.mat", "mpii_gt_val.mat")
REQUIRED_KEYS = ("image", "center", "scale", "joints", "joints_vis")
HEAD_SIZE_FACTOR = 0.6  # PCKh normaliser: 0.6 x head-box diagonal (MPII's evaluation code)
NUM_JOINTS = MPII.num_parts


def find_annotation_file(root: Path, candidates: tuple[str, ...]) -> Path | None:
    for folder in ANNOTATION_DIRS:
        for name in candidates:
            path = (root / folder / name).resolve()
            if path.is_file():
                return path
    return None


def read_json_list(path: Path) -> list:
    try:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is not a readable JSON file: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path}: expected a non-empty JSON list of people, got "
                           f"{type(entries).__name__}{'' if entries else ' (empty)'}")
    return entries


def _numbers(value, shape: tuple, path: Path, position: int, key: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != shape:
        raise DatasetError(f"{path}: entry {position} key '{key}' is {value!r}; expected numbers of shape {shape}")
    return array


def parse_entry(entry, path: Path, position: int) -> dict:
    """One JSON person -> 0-based arrays; DatasetError naming file, entry and key if malformed."""
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: entry {position} is {type(entry).__name__}; expected an object "
                           f"with keys {list(REQUIRED_KEYS)}")
    missing = [key for key in REQUIRED_KEYS if key not in entry]
    if missing:
        raise DatasetError(f"{path}: entry {position} lacks key(s) {missing}; expected {list(REQUIRED_KEYS)}")
    if not isinstance(entry["image"], str) or not entry["image"]:
        raise DatasetError(f"{path}: entry {position} key 'image' is {entry['image']!r}; expected a file name")
    xy = _numbers(entry["joints"], (NUM_JOINTS, 2), path, position, "joints")
    visible = _numbers(entry["joints_vis"], (NUM_JOINTS,), path, position, "joints_vis")
    center = _numbers(entry["center"], (2,), path, position, "center")
    scale = float(_numbers(entry["scale"], (), path, position, "scale"))
    flags = (visible > 0).astype(np.float64)
    if not np.isfinite(xy[flags == 1]).all():
        raise DatasetError(f"{path}: entry {position} has an annotated joint with non-finite x, y")
    if np.all(center == -1):  # MPII's marker for "no rough position"
        center, scale = np.full(2, np.nan), np.nan
    elif not (np.isfinite(center).all() and np.isfinite(scale) and scale > 0):
        raise DatasetError(f"{path}: entry {position} has centre {center.tolist()} and scale {scale}; "
                           f"expected finite numbers and scale > 0")
    else:
        center = center - 1.0
    headbox = np.full(4, np.nan)
    if entry.get("headbox") is not None:
        headbox = _numbers(entry["headbox"], (4,), path, position, "headbox") - 1.0
    return {"image": entry["image"], "joints": np.column_stack([xy - 1.0, flags]),
            "center": center, "scale": scale, "headbox": headbox}


def read_headboxes_mat(annotation_file: Path, count: int) -> tuple[np.ndarray | None, Path | None]:
    """(count, 4) 1-based head boxes from a gt_valid.mat-style file beside the JSON, if any."""
    for name in HEADBOX_FILES:
        path = annotation_file.parent / name
        if path.is_file():
            boxes = read_mat_variable(path, "headboxes_src")
            if boxes.shape != (2, 2, count):
                raise DatasetError(f"{path}: 'headboxes_src' has shape {boxes.shape}; expected (2, 2, {count}) "
                                   f"to match the {count} entries of {annotation_file}")
            return boxes.transpose(2, 0, 1).reshape(count, 4).astype(np.float64), path
    return None, None


def head_sizes(headboxes: np.ndarray) -> np.ndarray:
    """0.6 x diagonal of (N, 4) boxes x1, y1, x2, y2; NaN for unknown or empty boxes."""
    diagonal = np.hypot(headboxes[:, 2] - headboxes[:, 0], headboxes[:, 3] - headboxes[:, 1])
    return np.where(diagonal > 0, HEAD_SIZE_FACTOR * diagonal, np.nan)


class MPIIDataset:
    """MPII people from HRNet/MMPose-style JSON (see the module docstring for layout and conventions)."""

    kind = "mpii"
    joint_set = MPII

    def __init__(self, root: str | os.PathLike):
        self.root = resolve_dataset_root(root, self.kind)
        train_file = find_annotation_file(self.root, TRAIN_FILES)
        val_file = find_annotation_file(self.root, VAL_FILES)
        if train_file is None and val_file is None:
            raise DatasetError(f"mpii: no annotation file in {self.root}: looked for {list(TRAIN_FILES + VAL_FILES)} "
                               f"in {[str(self.root / d) for d in ANNOTATION_DIRS]}")
        self._stamps = []
        people, official_train = [], []
        for path, is_train in ((train_file, True), (val_file, False)):
            if path is None:
                continue
            self._stamps.append(file_stamp(path))
            parsed = [parse_entry(entry, path, i) for i, entry in enumerate(read_json_list(path))]
            if not is_train and np.isnan([p["headbox"] for p in parsed]).all():
                boxes, box_file = read_headboxes_mat(path, len(parsed))
                if boxes is not None:
                    self._stamps.append(file_stamp(box_file))
                    for person, box in zip(parsed, boxes - 1.0):
                        person["headbox"] = box
            people += parsed
            official_train += [is_train] * len(parsed)
        self._image_names = tuple(p["image"] for p in people)
        self._joints = np.stack([p["joints"] for p in people])
        self._centers = np.stack([p["center"] for p in people])
        self._scales = np.array([p["scale"] for p in people], dtype=np.float64)
        self._headboxes = np.stack([p["headbox"] for p in people])
        self._head_sizes = head_sizes(self._headboxes)
        self._official_train = np.array(official_train, dtype=bool)
        present = list_image_files(self.root / "images", self.kind)
        self.missing_images = tuple(sorted(set(self._image_names) - present))
        if len(self.missing_images) == len(set(self._image_names)):
            raise DatasetError(f"mpii: none of the {len(self.missing_images)} annotated images "
                               f"({self.missing_images[0]} ...) is in {self.root / 'images'}")

    def identity(self) -> dict:
        missing = set(self.missing_images)
        return {
            "type": self.kind,
            "reader_version": READER_VERSION,
            "root": str(self.root),
            "count": len(self),
            "images_found": sum(name not in missing for name in self._image_names),
            "annotation": list(self._stamps),
        }

    def __len__(self) -> int:
        return len(self._joints)

    def split_indices(self, split: str) -> np.ndarray:
        return official_split_indices(self._image_names, self._official_train, split)

    def image_path(self, index: int) -> Path:
        return self.root / "images" / self._image_names[check_index(index, len(self))]

    def sample(self, index: int) -> PoseSample:
        index = check_index(index, len(self))
        center = self._centers[index]
        has_center = bool(np.isfinite(center).all())
        extras = {"headbox": self._headboxes[index].copy()} if np.isfinite(self._headboxes[index]).all() else {}
        return PoseSample(
            index=index,
            image_path=str(self.image_path(index)),
            joints=self._joints[index].copy(),
            center=center.copy() if has_center else None,
            scale=float(self._scales[index]) if has_center else None,
            head_size=float(self._head_sizes[index]),
            extras=extras,
        )

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb_image(self.image_path(index))

    def __repr__(self) -> str:
        return f"MPIIDataset({str(self.root)!r}, {len(self)} people)"
