"""Original Leeds Sports Pose (LSP) reader.

Layout: ROOT/images/im%04d.jpg (im0001.jpg ... im2000.jpg) and ROOT/joints.mat holding `joints`,
shape (3, 14, N): x, y and an occlusion bit per joint. The third row is the other way round from
LSPET: 1 = occluded, 0 = visible; every joint is labelled either way, so every flag here is 1 and
the occlusion bit is kept in PoseSample.extras["occluded"] (bool, (14,)). Coordinates as stored
(see lspet.py).

Splits: the standard one, images 1-1000 'train' and 1001-N 'test' (1001-2000 in the real set).
'val' is a deterministic ~10% held out of images 1-1000, those whose file-name hash falls in the
val buckets of preprocessing.datasets.splits; 'train' is the rest of 1-1000, so 'test' stays the
standard test set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cpm_model.joints import LSP

from .base import (DatasetError, NumberedImageDataset, check_binary, check_joints, check_numeric_3d,
                   read_mat_variable)
from .splits import official_split_indices

NUM_OFFICIAL_TRAIN = 1000  # images 1-1000 are LSP's training set


def lsp_split_indices(image_names: list[str] | tuple[str, ...], split: str) -> np.ndarray:
    """LSP split of samples named `image_names` (in file order): see the module docstring."""
    is_train = np.arange(len(image_names)) < NUM_OFFICIAL_TRAIN
    return official_split_indices(image_names, is_train, split)


class LSPDataset(NumberedImageDataset):
    """Original LSP: images/im%04d.jpg + joints.mat `joints` (3, 14, N), row 3 = occluded."""

    kind = "lsp"
    joint_set = LSP
    name_pattern = "im%04d.jpg"

    def _convert_joints(self, raw, path):
        return convert_lsp_joints(raw, path)

    def split_indices(self, split: str) -> np.ndarray:
        return lsp_split_indices(self._image_names, split)


def convert_lsp_joints(raw: np.ndarray, path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """joints.mat's (3, 14, N) matrix -> ((N, 14, 3) x, y, flag 1, {"occluded": (N, 14) bool})."""
    if raw.ndim == 3 and raw.shape[:2] == (14, 3):
        raise DatasetError(f"{path}: 'joints' has shape {raw.shape}, the LSPET layout (14, 3, N); "
                           f"the LSP reader expects (3, 14, N): use 'lspet:PATH' for LSPET")
    check_numeric_3d(raw, path, "joints", (3, 14), "rows x, y, occluded per joint")
    joints = np.ascontiguousarray(raw.transpose(2, 1, 0), dtype=np.float64)  # (N, 14, 3)
    occlusion_bits = joints[:, :, 2]
    check_binary(occlusion_bits, path, "occlusion bit")
    occluded = occlusion_bits == 1
    joints[:, :, 2] = 1.0  # all 14 joints are labelled in LSP, occluded or not
    check_joints(joints, path)  # now checks every joint's x, y are finite
    return joints, {"occluded": occluded}


def read_lsp_split_annotations(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(joints (n, 14, 3), occluded (n, 14), image names) of one split from ROOT/joints.mat alone.

    For scoring predictions made elsewhere: the images are not read (nor required). ROOT may also
    be the joints.mat file itself.
    """
    path = Path(os.path.expanduser(os.fspath(root)))
    path = path / "joints.mat" if path.is_dir() else path
    joints, extras = convert_lsp_joints(read_mat_variable(path, "joints"), path)
    names = [LSPDataset.name_pattern % (i + 1) for i in range(len(joints))]
    chosen = lsp_split_indices(names, split)
    return joints[chosen], extras["occluded"][chosen], [names[i] for i in chosen]
