"""PCK@0.2 on LSP as the CPM authors' released LSP benchmark scores it (their published figures).

Pure NumPy on (N, 14, 2) arrays in LSP joint order (cpm_model.joints.LSP). The conventions, each
the behaviour of the authors' benchmark script:
- every joint of every test image counts: joints.mat's occlusion bit is not read, so occluded
  joints are scored like visible ones;
- the normaliser is one per image: the distance between the ground-truth left shoulder and right
  hip (LSP joints 10 and 3, counting from 1), with no fallback pair and no image left out; a
  zero-length torso makes a joint correct only at zero error;
- left and right as annotated in joints.mat (LSP's labels are person-centric: "left" is the
  person's left): each prediction is compared with the ground truth of the same joint only, no
  left/right swap is forgiven;
- the threshold is inclusive: correct when the error is <= 0.2 x torso;
- coordinates are compared as given: the benchmark compares its predictions (MATLAB pixel indices)
  with joints.mat's values without any offset, and so does this module;
- the total is the correct joints over all scored joints (14 x N), which is the mean of the 14
  per-joint figures because every joint is scored in every image;
- the paper's table groups joints in pairs: head = neck and head top, and each limb joint's right
  and left; a group's figure is the fraction correct over its two joints;
- a missing prediction (NaN or infinite coordinate) is a miss (the benchmark's `<=` is false
  for a NaN distance); missing ones are counted separately for the report.

This project's standard PCK (cpm_model.metrics with cpm_model.joints.torso_size) differs only
where the torso is degenerate: it falls back to the right shoulder - left hip diagonal and leaves
out an image with no usable torso, where the benchmark scores it with a zero normaliser.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .joints import LSP

BENCHMARK_ALPHA = 0.2
LEFT_SHOULDER, RIGHT_HIP = LSP.torso_pair  # (9, 2): LSP joints 10 and 3 counting from 1

# The paper's LSP table: (column, joint names) in its column order.
PAPER_GROUPS = (
    ("head", ("neck", "head_top")),
    ("shoulder", ("right_shoulder", "left_shoulder")),
    ("elbow", ("right_elbow", "left_elbow")),
    ("wrist", ("right_wrist", "left_wrist")),
    ("hip", ("right_hip", "left_hip")),
    ("knee", ("right_knee", "left_knee")),
    ("ankle", ("right_ankle", "left_ankle")),
)


@dataclass(frozen=True)
class BenchmarkScore:
    """Correct / scored counts per joint, and how many predicted joints were missing (NaN/inf)."""

    correct: np.ndarray  # (14,) int64
    scored: np.ndarray  # (14,) int64: the number of images, for every joint
    missing: np.ndarray  # (14,) int64

    @property
    def per_joint(self) -> np.ndarray:
        return self.correct / self.scored

    @property
    def total(self) -> float:
        return float(self.correct.sum() / self.scored.sum())

    def groups(self, names=LSP.names) -> dict[str, float]:
        """The paper's grouped columns (head, shoulder, ..., ankle): pooled over each group's joints."""
        out = {}
        for group, members in PAPER_GROUPS:
            index = [list(names).index(member) for member in members]
            out[group] = float(self.correct[index].sum() / self.scored[index].sum())
        return out


def check_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    """pred and gt as float64 (N, 14, 2) arrays, or ValueError naming both shapes."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if gt.ndim != 3 or gt.shape[1:] != (LSP.num_parts, 2) or gt.shape[0] < 1:
        raise ValueError(f"ground truth must have shape (N, {LSP.num_parts}, 2) with N >= 1, got {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"predictions have shape {pred.shape}, the ground truth {gt.shape}")
    return pred, gt


def benchmark_torso(gt) -> np.ndarray:
    """(N,) left shoulder - right hip distance of each image's ground truth (0 allowed, no fallback)."""
    gt = np.asarray(gt, dtype=np.float64)
    return np.linalg.norm(gt[:, LEFT_SHOULDER] - gt[:, RIGHT_HIP], axis=-1)


def benchmark_hits(pred, gt, alpha: float = BENCHMARK_ALPHA) -> np.ndarray:
    """(N, 14) bool: error <= alpha x the image's torso; False for a NaN/inf prediction."""
    pred, gt = check_pair(pred, gt)
    errors = np.linalg.norm(pred - gt, axis=-1)
    with np.errstate(invalid="ignore"):
        return errors <= alpha * benchmark_torso(gt)[:, None]


def score_benchmark(pred, gt, alpha: float = BENCHMARK_ALPHA) -> BenchmarkScore:
    """The benchmark's counts for predictions and ground truth, both (N, 14, 2)."""
    pred, gt = check_pair(pred, gt)
    hits = benchmark_hits(pred, gt, alpha)
    missing = ~np.isfinite(pred).all(axis=-1)
    n = np.full(LSP.num_parts, len(gt), dtype=np.int64)
    return BenchmarkScore(correct=hits.sum(axis=0).astype(np.int64), scored=n,
                          missing=missing.sum(axis=0).astype(np.int64))


__all__ = ["BENCHMARK_ALPHA", "PAPER_GROUPS", "BenchmarkScore", "benchmark_hits", "benchmark_torso",
           "check_pair", "score_benchmark"]
