"""Affine maps between original images, crops and belief maps.

Coordinate convention (used everywhere in this project):
- A point (x, y) is in continuous pixel coordinates whose integer values are pixel CENTRES:
  pixel column k covers [k - 0.5, k + 0.5). This is OpenCV's convention for warpAffine.
- Belief maps have a stride s (STRIDE = 8 for the CPM: three stride-2 poolings). Heatmap cell i
  covers input pixels s*i .. s*i + s - 1, so its centre is at input coordinate s*i + (s - 1) / 2
  (8i + 3.5 for s = 8).
  `input_to_heatmap` / `heatmap_to_input` convert between the two.
- Affines are 2x3 float64 matrices A acting on column vectors [x, y, 1]^T. `crop_affine` maps
  ORIGINAL image coordinates to CROP coordinates; the cache stores its inverse (crop -> original).
With this convention a horizontal flip of an image of width W is x -> W - 1 - x, and reversing a
belief map's columns is exactly the same flip (cell i's centre 8i + 3.5 goes to W - 1 - (8i + 3.5)).
"""

from __future__ import annotations

import numpy as np

STRIDE = 8  # input pixels per belief-map cell along each axis


def input_to_heatmap(coords: np.ndarray, stride: int) -> np.ndarray:
    """Input-pixel coordinates -> heatmap-cell coordinates (cell centres at integers)."""
    return (np.asarray(coords, dtype=np.float64) - (stride - 1) / 2.0) / stride


def heatmap_to_input(coords: np.ndarray, stride: int) -> np.ndarray:
    """Heatmap-cell coordinates -> input-pixel coordinates (inverse of `input_to_heatmap`)."""
    return np.asarray(coords, dtype=np.float64) * stride + (stride - 1) / 2.0


def crop_affine(center_xy, side: float, out_size: int, rotation_deg: float = 0.0) -> np.ndarray:
    """Affine (2x3) taking original-image coordinates to an out_size x out_size crop.

    The square of side `side` (original pixels) centred at `center_xy` fills the crop; the crop
    centre ((out_size - 1) / 2) is the image point `center_xy`. A positive rotation turns the
    content counter-clockwise on screen (image y points down).
    """
    if side <= 0:
        raise ValueError(f"crop side must be positive, got {side}")
    scale = out_size / float(side)
    theta = np.deg2rad(rotation_deg)
    cos, sin = np.cos(theta) * scale, np.sin(theta) * scale
    linear = np.array([[cos, sin], [-sin, cos]])
    cx, cy = float(center_xy[0]), float(center_xy[1])
    half = (out_size - 1) / 2.0
    translation = np.array([half, half]) - linear @ np.array([cx, cy])
    return np.hstack([linear, translation[:, None]])


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine (also works on a stack (..., 2, 3))."""
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[..., :2]
    translation = affine[..., 2:]
    inv_linear = np.linalg.inv(linear)
    inv_translation = -inv_linear @ translation
    return np.concatenate([inv_linear, inv_translation], axis=-1)


def apply_affine(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map points (..., 2) through a 2x3 affine (or a stack of them broadcastable to points)."""
    points = np.asarray(points, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    return np.einsum("...ij,...kj->...ki", affine[..., :2], points) + affine[..., None, :, 2]
