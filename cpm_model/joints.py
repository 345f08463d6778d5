"""Joint sets: names, left/right flip pairs and the joints that define the PCK normaliser."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


def flip_permutation(num_parts: int, flip_pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Part order after a horizontal mirror: flipped_joints = joints[p] once x is mirrored.

    Each (a, b) pair swaps places (left <-> right); parts in no pair stay where they are.
    """
    pairs = [(int(a), int(b)) for a, b in flip_pairs]
    permutation = list(range(num_parts))
    seen: set[int] = set()
    for a, b in pairs:
        for part in (a, b):
            if not 0 <= part < num_parts or part in seen:
                raise ValueError(f"flip pairs {pairs} must name each of the {num_parts} parts "
                                 f"at most once; part {part} is out of range or repeated")
            seen.add(part)
        permutation[a], permutation[b] = b, a
    return permutation


@dataclass(frozen=True)
class JointSet:
    name: str
    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    # Torso diagonal (LSP convention: left shoulder - right hip) and its fallback (right shoulder - left hip).
    torso_pair: tuple[int, int] | None = None
    torso_fallback_pair: tuple[int, int] | None = None

    @property
    def num_parts(self) -> int:
        return len(self.names)

    def flip_permutation(self) -> np.ndarray:
        """Index array p such that flipped_joints = joints[p] after mirroring x."""
        return np.array(flip_permutation(self.num_parts, self.flip_pairs))


LSP = JointSet(
    name="lsp",
    names=(
        "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
        "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
        "neck", "head_top",
    ),
    flip_pairs=((0, 5), (1, 4), (2, 3), (6, 11), (7, 10), (8, 9)),
    torso_pair=(9, 2),
    torso_fallback_pair=(8, 3),
)

MPII = JointSet(
    name="mpii",
    names=(
        "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
        "pelvis", "thorax", "upper_neck", "head_top",
        "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
    ),
    flip_pairs=((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)),
    torso_pair=(13, 2),
    torso_fallback_pair=(12, 3),
)


def torso_size(joints: np.ndarray, joint_set: JointSet) -> np.ndarray:
    """Torso diameter per sample from joints (N, P, 3) (x, y, flag), NaN where undefined.

    Left shoulder to right hip; where either is unannotated, right shoulder to left hip; NaN where
    neither pair is annotated (or the distance is 0).
    """
    joints = np.asarray(joints, dtype=np.float64)
    out = np.full(joints.shape[0], np.nan)
    for pair in (joint_set.torso_fallback_pair, joint_set.torso_pair):  # primary written last wins
        if pair is None:
            continue
        a, b = pair
        ok = (joints[:, a, 2] > 0) & (joints[:, b, 2] > 0)
        dist = np.linalg.norm(joints[:, a, :2] - joints[:, b, :2], axis=-1)
        ok &= dist > 0
        out[ok] = dist[ok]
    return out
