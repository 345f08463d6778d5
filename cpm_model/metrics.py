"""PCK, PCKh, the PCK curve and its area, and decoding predictions to original-image pixels.

Pure NumPy, after MMPose's `keypoint_pck_accuracy` / `keypoint_auc`, with these conventions:
- a joint is correct when ||pred - gt|| <= alpha * norm (LSP's `<=`; MMPose uses `<`), so an
  error of exactly alpha * norm counts as correct;
- only visible (annotated) joints are scored; samples whose norm is NaN, infinite or <= 0 are
  left out entirely (count them with `np.sum(~(norm > 0))` for the report);
- a joint with no scored instance gets PCK NaN (MMPose: -1), never 0;
- the mean is the average of the per-joint PCKs over joints with data (nanmean), as in the LSP
  tables -- not the fraction of all scored joint instances, which weights frequent joints more;
- a NaN prediction counts as wrong.
Work in counts (`pck_counts`, `pck_curve_counts`, or `PCKCounts` per stage) to combine evaluation
shards exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import STRIDE, apply_affine
from .heatmaps import decode_belief_maps

# PCK curve for the AUC: alpha = 0, 0.01, ..., 0.5 (51 points, exactly the decimals k / 100),
# integrated with the trapezoid rule.
PCK_CURVE_ALPHAS = np.round(np.linspace(0.0, 0.5, 51), 4)


@dataclass(frozen=True)
class Protocol:
    """How a dataset's predictions are scored: the metric's key, the cache array that normalises
    the distances, its threshold (and a stricter one), and how tables name it."""

    name: str  # the metric's key: "pck" (LSP's torso convention) or "pckh" (MPII's head convention)
    normaliser: str  # the cache array: "torso" or "head_size" (0.6 x the head box's diagonal)
    alpha: float
    strict_alpha: float
    label: str


PCK = Protocol("pck", "torso", 0.2, 0.1, "PCK@0.2 (torso)")
PCKH = Protocol("pckh", "head_size", 0.5, 0.1, "PCKh@0.5")
PROTOCOLS = {p.name: p for p in (PCK, PCKH)}


def _scored(pred, gt, visible, norm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distances (N, P), scored mask (N, P), norm (N,)) after validating shapes."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    visible = np.asarray(visible).astype(bool)
    norm = np.asarray(norm, dtype=np.float64).reshape(-1)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"pred and gt must both have shape (N, P, 2), got {pred.shape} and {gt.shape}")
    if visible.shape != pred.shape[:2] or norm.shape != pred.shape[:1]:
        raise ValueError(f"visible must be (N, P) and norm (N,), got {visible.shape} and {norm.shape} "
                         f"for pred {pred.shape}")
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(norm) & (norm > 0)
    scored = visible & usable[:, None]
    distances = np.linalg.norm(pred - gt, axis=-1)
    return distances, scored, norm


def pck_counts(pred, gt, visible, norm, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(correct (P,), total (P,)) int64 counts of scored joints within alpha * norm."""
    distances, scored, norm = _scored(pred, gt, visible, norm)
    with np.errstate(invalid="ignore"):
        correct = scored & (distances <= alpha * norm[:, None])
    return correct.sum(axis=0).astype(np.int64), scored.sum(axis=0).astype(np.int64)


def pck_from_counts(correct, total) -> tuple[np.ndarray, float]:
    """(per-joint PCK (P,), NaN where total is 0; mean over joints with data, NaN if none)."""
    correct = np.asarray(correct, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_joint = np.where(total > 0, correct / total, np.nan)
    has_data = ~np.isnan(per_joint)
    mean = float(per_joint[has_data].mean(axis=-1)) if per_joint.ndim == 1 and has_data.any() else np.nan
    return per_joint, mean


def pck(pred, gt, visible, norm, alpha: float) -> tuple[np.ndarray, float]:
    """PCK@alpha: (per joint (P,), mean of the per-joint values over joints with data)."""
    return pck_from_counts(*pck_counts(pred, gt, visible, norm, alpha))


def pckh(pred, gt, visible, head_size, alpha: float = 0.5) -> tuple[np.ndarray, float]:
    """PCKh@alpha (MPII): normalised by the head size (already 0.6 x the head-box diagonal)."""
    return pck(pred, gt, visible, head_size, alpha)


def pck_curve_counts(pred, gt, visible, norm, alphas=PCK_CURVE_ALPHAS) -> tuple[np.ndarray, np.ndarray]:
    """(correct (A, P), total (P,)) counts for every alpha, to sum across evaluation shards."""
    distances, scored, norm = _scored(pred, gt, visible, norm)
    alphas = np.asarray(alphas, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        within = distances[None] <= alphas[:, None, None] * norm[None, :, None]  # (A, N, P)
    correct = (within & scored[None]).sum(axis=1).astype(np.int64)
    return correct, scored.sum(axis=0).astype(np.int64)


def pck_curve_from_counts(correct, total) -> tuple[np.ndarray, np.ndarray]:
    """(per joint (A, P) with NaN for joints without data, mean over joints with data (A,))."""
    rows = [pck_from_counts(c, total) for c in np.asarray(correct)]
    return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])


def pck_curve(pred, gt, visible, norm, alphas=PCK_CURVE_ALPHAS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alphas (A,), per-joint PCK (A, P), mean PCK (A,)) for each alpha (default 0..0.5 step 0.01)."""
    per_joint, mean = pck_curve_from_counts(*pck_curve_counts(pred, gt, visible, norm, alphas))
    return np.asarray(alphas, dtype=np.float64), per_joint, mean


def auc_from_curve(alphas, mean_pck) -> float:
    """Trapezoid area under the mean PCK curve divided by the alpha range: in [0, 1]."""
    alphas = np.asarray(alphas, dtype=np.float64)
    mean_pck = np.asarray(mean_pck, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size < 2 or np.any(np.diff(alphas) <= 0):
        raise ValueError("alphas must be an increasing 1-D grid of at least two values")
    widths = np.diff(alphas)
    area = float(np.sum(widths * (mean_pck[1:] + mean_pck[:-1]) / 2.0))
    return area / float(alphas[-1] - alphas[0])


def auc(pred, gt, visible, norm, alphas=PCK_CURVE_ALPHAS) -> float:
    """Area under the mean-PCK curve over alphas (default 0..0.5 step 0.01, trapezoid), in [0, 1].

    (MMPose's keypoint_auc uses a left rectangle rule on 20 thresholds instead.)
    """
    alphas, _, mean = pck_curve(pred, gt, visible, norm, alphas)
    return auc_from_curve(alphas, mean)


class PCKCounts:
    """Correct / total counts per stage, threshold and joint; summed over batches, shards and ranks.

    Packed into one flat float64 array (`to_array` / `from_array`) for an all-reduce sum.
    """

    def __init__(self, num_stages: int, num_parts: int, alphas: np.ndarray = PCK_CURVE_ALPHAS):
        self.alphas = np.asarray(alphas, dtype=np.float64)
        self.correct = np.zeros((num_stages, len(self.alphas), num_parts))
        self.total = np.zeros((num_stages, len(self.alphas), num_parts))
        self.num_samples = 0
        self.num_without_norm = 0

    def add(self, predictions: np.ndarray, joints_original: np.ndarray, norm: np.ndarray) -> None:
        """predictions (N, T, P, 2) original pixels; joints_original (N, P, 3); norm (N,) (NaN = none)."""
        predictions = np.asarray(predictions, dtype=np.float64)
        joints_original = np.asarray(joints_original, dtype=np.float64)
        norm = np.asarray(norm, dtype=np.float64)
        has_norm = np.isfinite(norm) & (norm > 0)
        self.num_samples += len(norm)
        self.num_without_norm += int((~has_norm).sum())
        if not has_norm.any():
            return
        gt = joints_original[has_norm, :, :2]
        visible = joints_original[has_norm, :, 2] > 0
        for t in range(predictions.shape[1]):
            correct, total = pck_curve_counts(predictions[has_norm, t], gt, visible, norm[has_norm], self.alphas)
            self.correct[t] += correct
            self.total[t] += total[None, :]

    def __add__(self, other: "PCKCounts") -> "PCKCounts":
        """New counts: the sum of both (same stages, parts and thresholds, else ValueError)."""
        if not isinstance(other, PCKCounts):
            return NotImplemented
        if self.correct.shape != other.correct.shape:
            raise ValueError(f"cannot add PCK counts of shape (stages, alphas, parts) {self.correct.shape} "
                             f"and {other.correct.shape}")
        if not np.array_equal(self.alphas, other.alphas):
            raise ValueError("cannot add PCK counts over different alpha thresholds")
        out = PCKCounts(self.correct.shape[0], self.correct.shape[2], self.alphas)
        return out.from_array(self.to_array() + other.to_array())

    def to_array(self) -> np.ndarray:
        return np.concatenate([self.correct.ravel(), self.total.ravel(),
                               [self.num_samples, self.num_without_norm]])

    def from_array(self, values: np.ndarray) -> "PCKCounts":
        values = np.asarray(values, dtype=np.float64)
        n = self.correct.size
        self.correct = values[:n].reshape(self.correct.shape)
        self.total = values[n:2 * n].reshape(self.total.shape)
        self.num_samples = int(round(values[2 * n]))
        self.num_without_norm = int(round(values[2 * n + 1]))
        return self

    def reduced(self, all_reduce_sum) -> "PCKCounts":
        """These counts summed over ranks (every rank must call this)."""
        out = PCKCounts(self.correct.shape[0], self.correct.shape[2], self.alphas)
        return out.from_array(all_reduce_sum(self.to_array()))

    def _alpha_index(self, alpha: float) -> int:
        index = int(np.argmin(np.abs(self.alphas - alpha)))
        if abs(self.alphas[index] - alpha) > 1e-9:
            raise ValueError(f"alpha {alpha} is not among the counted thresholds")
        return index

    def per_joint(self, stage: int, alpha: float) -> np.ndarray:
        """PCK per joint (P,) of stage `stage` (0-based; -1 = last); NaN for a joint never scored."""
        a = self._alpha_index(alpha)
        return pck_from_counts(self.correct[stage, a], self.total[stage, a])[0]

    def mean(self, stage: int, alpha: float) -> float:
        """Mean over joints of the per-joint PCK (the LSP tables' mean), NaN when nothing was scored."""
        a = self._alpha_index(alpha)
        return float(pck_from_counts(self.correct[stage, a], self.total[stage, a])[1])

    def curve(self, stage: int = -1) -> np.ndarray:
        """Mean PCK at every counted alpha."""
        return pck_curve_from_counts(self.correct[stage], self.total[stage, 0])[1]

    def auc(self, stage: int = -1) -> float:
        """Area under the mean PCK curve over alpha in [0, 0.5], normalised to [0, 1]."""
        curve = self.curve(stage)
        if np.isnan(curve).all():
            return float("nan")
        return float(auc_from_curve(self.alphas, curve))


def decode_predictions(belief_maps, affine_crop_to_original, num_parts: int | None = None,
                       stride: int = STRIDE) -> np.ndarray:
    """Part locations (N, P, 2) in ORIGINAL image pixels from belief maps on the crop.

    belief_maps: (N, P+1, h, w) as the model outputs them (the last map, the background, is
    dropped) or (N, P, h, w) with num_parts=P; NumPy or a torch tensor. affine_crop_to_original:
    (N, 2, 3), the inverse of the crop affine (what the cache stores). Each part is the arg-max
    of its map with sub-cell refinement (`cpm_model.heatmaps.decode_belief_maps`).
    """
    if hasattr(belief_maps, "detach"):  # a torch tensor, possibly bf16 on a GPU
        belief_maps = belief_maps.detach().float().cpu().numpy()
    belief_maps = np.asarray(belief_maps)
    if belief_maps.ndim != 4:
        raise ValueError(f"belief_maps must have shape (N, P(+1), h, w), got {belief_maps.shape}")
    parts = belief_maps[:, :-1] if num_parts is None else belief_maps[:, :num_parts]
    affine = np.asarray(affine_crop_to_original, dtype=np.float64)
    if affine.shape != (belief_maps.shape[0], 2, 3):
        raise ValueError(f"affine_crop_to_original must have shape {(belief_maps.shape[0], 2, 3)}, got {affine.shape}")
    crop_xy, _ = decode_belief_maps(parts, stride)
    return apply_affine(crop_xy, affine)


__all__ = [
    "PCK_CURVE_ALPHAS",
    "PCKCounts",
    "pck",
    "pck_counts",
    "pck_from_counts",
    "pckh",
    "pck_curve",
    "pck_curve_counts",
    "pck_curve_from_counts",
    "auc",
    "auc_from_curve",
    "decode_predictions",
]
