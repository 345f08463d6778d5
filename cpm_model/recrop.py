"""The second pass's crop: a square around a set of joints, cut from the first crop.

A first pass runs on the evaluation crop (image centre, image-derived scale: no ground truth), so
the person can be off-centre and at the wrong size. The second pass re-crops that first crop
around the first pass's own predictions, with the training crop's rule (bounding box of the
joints, side = crop_context x its longer edge), and predicts again. Training teaches the model
both crops by re-cropping some training samples around their annotated joints the same way.

The re-crop is cut from the first crop's pixels, not from the original image: the cache holds
only the first crop, and validation, `pipeline.evaluate` and `pipeline.predict` must all predict
the same way. What lies outside the first crop stays black.

Pure PyTorch on float64 (B, 2, 3) pixel affines in the convention of `cpm_model.geometry`
(integer coordinates are pixel centres); `cpm_model.augment.warp` applies them.
"""

from __future__ import annotations

import torch

# Bounds on the re-crop's side, as fractions of the crop side: a collapsed prediction (all joints
# on one spot) must not blow a few pixels up to the whole input, nor a scattered one shrink it away.
MIN_SIDE_FRACTION = 0.25
MAX_SIDE_FRACTION = 2.0


def recrop_affines(points_xy: torch.Tensor, valid: torch.Tensor, size: int, crop_context: float) -> torch.Tensor:
    """Affines (B, 2, 3) float64 taking CROP pixels to RE-CROP pixels (both size x size).

    points_xy (B, P, 2) crop pixels; valid (B, P) bool, the points to frame. The re-crop is centred
    on the valid points' bounding box with side crop_context x max(box width, height), clamped to
    [MIN_SIDE_FRACTION, MAX_SIDE_FRACTION] x size. A sample with fewer than two valid points keeps
    its crop (the identity). Per sample, `geometry.crop_affine(centre, side, size)` (no rotation),
    batched in torch.
    """
    points = points_xy.to(torch.float64)
    valid = valid.to(torch.bool)
    big = torch.finfo(torch.float64).max
    lo = torch.where(valid[..., None], points, torch.full_like(points, big)).amin(dim=1)
    hi = torch.where(valid[..., None], points, torch.full_like(points, -big)).amax(dim=1)
    usable = valid.sum(dim=1) >= 2
    centre = torch.where(usable[:, None], (lo + hi) / 2.0, torch.full_like(lo, (size - 1) / 2.0))
    side = (crop_context * (hi - lo).amax(dim=1)).clamp(MIN_SIDE_FRACTION * size, MAX_SIDE_FRACTION * size)
    side = torch.where(usable, side, torch.full_like(side, float(size)))
    scale = size / side
    half = (size - 1) / 2.0
    affines = torch.zeros(points.shape[0], 2, 3, dtype=torch.float64)
    affines[:, 0, 0] = scale
    affines[:, 1, 1] = scale
    affines[:, :, 2] = half - scale[:, None] * centre
    return affines


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The affines (B, 2, 3) of `outer` after `inner`: p -> outer(inner(p))."""
    linear = outer[..., :2] @ inner[..., :2]
    translation = outer[..., :2] @ inner[..., 2:] + outer[..., 2:]
    return torch.cat([linear, translation], dim=-1)


__all__ = ["MIN_SIDE_FRACTION", "MAX_SIDE_FRACTION", "recrop_affines", "compose"]
