"""LSP Extended (LSPET) reader.

Layout: ROOT/images/im%05d.jpg (im00001.jpg ...) and ROOT/joints.mat holding `joints`, shape
(14, 3, N): x, y, flag per joint, flag 1 = annotated, 0 = not (its x, y then lie outside the
image: trust the flag, not the coordinates). Any N is accepted; sample i is image im%05d.jpg of i+1.

Coordinates are returned as stored: continuous pixel coordinates, which this project reads with
pixel centres at integers (cpm_model.geometry). The annotations are sub-pixel clicks, not MATLAB
pixel indices, so no 1-based shift is applied.

A single missing or undecodable image is a per-sample skip (SampleSkipped from load_image; the
names of missing files are listed in `missing_images`); no readable image at all is a DatasetError.
Splits: no official split; the hash rule of preprocessing.datasets.splits on the file name.
"""

from __future__ import annotations

import numpy as np

from cpm_model.joints import LSP

from .base import DatasetError, NumberedImageDataset, check_joints, check_numeric_3d
from .base import read_rgb_image  # noqa: F401  (still importable from here)
from .splits import hashed_split_indices


class LSPETDataset(NumberedImageDataset):
    """LSP Extended: images/im%05d.jpg + joints.mat `joints` (14, 3, N), flag 1 = annotated."""

    kind = "lspet"
    joint_set = LSP
    name_pattern = "im%05d.jpg"

    def _convert_joints(self, raw, path):
        if raw.ndim == 3 and raw.shape[:2] == (3, 14):
            raise DatasetError(f"{path}: 'joints' has shape {raw.shape}, the original LSP layout "
                               f"(3, 14, N); the LSPET reader expects (14, 3, N): use 'lsp:PATH' for LSP")
        check_numeric_3d(raw, path, "joints", (14, 3), "x, y, flag per joint, flag 1 = annotated")
        joints = np.ascontiguousarray(raw.transpose(2, 0, 1), dtype=np.float64)  # (N, 14, 3)
        check_joints(joints, path)
        return joints, {}

    def split_indices(self, split: str) -> np.ndarray:
        return hashed_split_indices(self._image_names, split)
