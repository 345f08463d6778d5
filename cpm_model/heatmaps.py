"""Ideal belief maps and their decoding (see `cpm_model.geometry` for the coordinate convention).

A part's ideal belief map is exp(-d^2 / (2 sigma^2)) with d the distance, in heatmap cells, from
the cell centre to the part's location; unannotated parts get an all-zero map. The background map
is 1 - max over parts. Decoding takes the arg-max cell and refines it by fitting a parabola to the
log of the map along x and y through the arg-max and its two neighbours, which is exact for a
Gaussian, so rendering then decoding round-trips to float precision (float16 storage: < 0.05 cell).
"""

from __future__ import annotations

import numpy as np
import torch

from .geometry import STRIDE, heatmap_to_input, input_to_heatmap


def render_belief_maps(joints: np.ndarray, map_size: int, sigma: float, stride: int = STRIDE) -> np.ndarray:
    """Ideal belief maps (P+1, H, H) float32 from joints (P, 3): x, y in input pixels, visibility flag.

    `sigma` is in heatmap cells. Parts with flag <= 0 get an all-zero map. The last map is the
    background, 1 - max over parts.
    """
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim != 2 or joints.shape[1] != 3:
        raise ValueError(f"joints must have shape (P, 3), got {joints.shape}")
    maps = render_belief_maps_torch(torch.from_numpy(joints)[None], map_size, sigma, stride)[0]
    return maps.numpy().astype(np.float32)


def render_belief_maps_torch(joints: torch.Tensor, map_size: int, sigma: float, stride: int = STRIDE) -> torch.Tensor:
    """Batched, device-agnostic version of `render_belief_maps`: joints (B, P, 3) -> (B, P+1, H, H)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    offset = (stride - 1) / 2.0
    centres = (joints[..., :2] - offset) / stride  # (B, P, 2) in heatmap cells
    grid = torch.arange(map_size, device=joints.device, dtype=joints.dtype)
    dx2 = (grid[None, None, :] - centres[..., 0:1]) ** 2  # (B, P, W)
    dy2 = (grid[None, None, :] - centres[..., 1:2]) ** 2  # (B, P, H)
    parts = torch.exp(-(dy2[..., :, None] + dx2[..., None, :]) / (2.0 * sigma * sigma))
    parts = parts * (joints[..., 2] > 0).to(parts.dtype)[..., None, None]
    background = 1.0 - parts.amax(dim=1, keepdim=True)
    return torch.cat([parts, background], dim=1)


def _parabola_offset(left: np.ndarray, centre: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Sub-cell offset of the vertex of the parabola through log-values at -1, 0, +1, in [-0.5, 0.5]."""
    eps = 1e-10
    l, c, r = (np.log(np.maximum(v, eps)) for v in (left, centre, right))
    curvature = l - 2.0 * c + r
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < 0, 0.5 * (l - r) / curvature, 0.0)
    return np.clip(np.nan_to_num(offset), -0.5, 0.5)


def decode_belief_maps(maps: np.ndarray, stride: int = STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """Part locations in input pixels from part belief maps (..., P, H, W).

    Returns (coords (..., P, 2) as x, y in input pixels, peak values (..., P)). Pass part maps
    only (drop the background). Sub-cell refinement uses the log-parabola through the arg-max
    and its neighbours (no refinement along an axis where the peak lies on the border).
    """
    maps = np.asarray(maps, dtype=np.float64)
    *lead, height, width = maps.shape
    flat = maps.reshape(-1, height, width)
    arg = flat.reshape(flat.shape[0], -1).argmax(axis=1)
    rows, cols = np.divmod(arg, width)
    idx = np.arange(flat.shape[0])
    peak = flat[idx, rows, cols]

    x = cols.astype(np.float64)
    inner_x = (cols > 0) & (cols < width - 1)
    if inner_x.any():
        i, r, c = idx[inner_x], rows[inner_x], cols[inner_x]
        x[inner_x] += _parabola_offset(flat[i, r, c - 1], flat[i, r, c], flat[i, r, c + 1])
    y = rows.astype(np.float64)
    inner_y = (rows > 0) & (rows < height - 1)
    if inner_y.any():
        i, r, c = idx[inner_y], rows[inner_y], cols[inner_y]
        y[inner_y] += _parabola_offset(flat[i, r - 1, c], flat[i, r, c], flat[i, r + 1, c])

    coords = heatmap_to_input(np.stack([x, y], axis=-1), stride)
    return coords.reshape(*lead, 2), peak.reshape(*lead)


__all__ = [
    "STRIDE",
    "render_belief_maps",
    "render_belief_maps_torch",
    "decode_belief_maps",
    "input_to_heatmap",
    "heatmap_to_input",
]
