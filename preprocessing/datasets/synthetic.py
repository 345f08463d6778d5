"""Embedded synthetic pose dataset: stick-and-blob people whose left and right sides look alike.

What it contains
----------------
Each sample is one articulated, human-like figure in the LSP joint order (14 joints: ankles, knees,
hips, wrists, elbows, shoulders, neck, head top), person-centred in a square RGB uint8 image of
``image_size`` pixels, like the person-centred LSP images. Everything is generated from
``(seed, index)``, so the whole project runs with no download.

- Figure: a trapezoid torso, a round head on a short neck, two arms (upper arm + forearm + hand)
  and two legs (thigh + shin + foot). The standing height is 60-85% of the image height; the
  proportions vary by about 10%, the upper body leans up to 10 degrees, the whole figure is
  rotated up to 15 degrees and shifted a little from the image centre.
- Pose: each limb is sampled independently from the same distribution (so the pose distribution is
  left/right symmetric). Arms range from hanging down to raised above the head with bent elbows;
  about a quarter of the arms cross the body (the hand ends on the other side of the midline, so
  naming that wrist requires following the limb chain from the shoulder). Legs stand, straddle,
  cross a little or kick.
- Background: colour gradient, low-frequency colour noise, random blobs, polygons and lines, pixel
  noise, and 0-3 distractor limbs: loose two-segment "arms" and "legs" drawn with exactly the
  person's limb colours, widths, hands and feet, attached to no body.
- Joints: the true endpoints of the drawn segments, in image pixels (integer coordinates are pixel
  centres, see ``cpm_model.geometry``), all 14 annotated (flag 1) and inside the image.

Why: the ambiguity and the global cue
-------------------------------------
The left and right limbs of a figure have the same colours, widths and shapes, so a part detector
that sees a small window (a wrist and part of its forearm) cannot tell a left wrist from a right
wrist. Joints are labelled from the person's point of view (LSP: "right" is the person's right).
Each figure is seen either from the FRONT or from the BACK (50/50): from the front, the person's
right side is on the image's left; from the back, on the image's right. Only the head and torso
show which: from the front the head is a skin-coloured face (hair on top, two eyes, a mouth) and
the shirt has a contrasting band down its middle, a V-neck and buttons; from the back the head is
all hair and the torso carries a dark backpack with straps to the shoulders. For every front-view
image with a given pose there is an equally likely back-view image with the mirrored pose and the
same limbs, so without the head/torso cue the left/right labels of the limbs are at chance.
Both cues are mirror-symmetric: a horizontally flipped image with its left/right labels swapped is
again a valid sample, so flip augmentation stays consistent (a marking on one side of the body
would not survive it, which is why the cue is front/back and not a one-sided badge).

The expected effect is that of the CPM paper's Fig. 1 and 3: a network (or a CPM stage) whose
receptive field covers only a part of the body localises limbs but confuses left and right (about
half of the wrists, elbows, ankles and knees are given the other side's name), and one whose
receptive field spans the whole figure, seeing the face/back cue together with the limb chain,
resolves them. ``bench/synthetic_check.py`` trains a small- and a large-receptive-field network
on this data (96 px input, 3 minutes each on one CPU core) and reports PCK@0.2 and the left/right
swap rate. Measured with generator version 2, seed 0, on 417 held-out samples: receptive field
18 px (0.26 x person height): PCK@0.2 31%, swap rate 44% (wrists and ankles 50%, chance);
142 px (2 x person height): PCK@0.2 74%, swap rate 10% (wrists and ankles 24%), the swap rate
falling from 44% to 16% to 10% over its training as it learns to use the cue.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cpm_model.joints import LSP

from .base import DatasetError, PoseSample, check_index
from .splits import hashed_split_indices

# Bump whenever the images or joints produced for a given (seed, index, image_size) change: the
# version is part of identity(), hence of the preprocessing cache key.
GENERATOR_VERSION = 2

# LSP joint indices (cpm_model.joints.LSP order).
R_ANKLE, R_KNEE, R_HIP, L_HIP, L_KNEE, L_ANKLE = 0, 1, 2, 3, 4, 5
R_WRIST, R_ELBOW, R_SHOULDER, L_SHOULDER, L_ELBOW, L_WRIST = 6, 7, 8, 9, 10, 11
NECK, HEAD_TOP = 12, 13

_SHIFT = 4  # fractional bits for OpenCV drawing (sub-pixel accurate, anti-aliased)
_ONE = 1 << _SHIFT

_SKIN_TONES = np.array(
    [[255, 219, 172], [241, 194, 125], [224, 172, 105], [198, 134, 66], [160, 110, 70], [230, 190, 160]],
    dtype=np.float64,
)


@dataclass
class _Figure:
    """Pose of one figure in image pixels (everything sample() needs, no appearance)."""

    joints: np.ndarray  # (14, 2) float64, image pixels
    facing_front: bool
    head_center: np.ndarray  # (2,)
    head_radius: float
    up: np.ndarray  # unit vector from neck towards head top (image coordinates)
    height_px: float  # standing height of the figure in pixels
    arm_crossed: tuple[bool, bool]  # (right, left)


def _rot(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


@dataclass
class _Pose:
    """A sampled pose in person units (height 1, pelvis at the origin), before placing."""

    joints: np.ndarray  # (14, 2)
    head_center: np.ndarray
    head_radius: float
    up: np.ndarray  # the head's up direction
    facing_front: bool
    arm_crossed: tuple[bool, bool]


def _sample_figure(rng: np.random.Generator, image_size: int) -> _Figure:
    """Sample a pose and place it in the image. Units: person height = 1 until scaled."""
    return _place(rng, _sample_pose(rng), image_size)


def _sample_pose(rng: np.random.Generator) -> _Pose:
    facing_front = bool(rng.random() < 0.5)
    # Image-x sign of the person's right side: front view -> right side on the image left.
    side_sign = {"right": -1.0 if facing_front else 1.0}
    side_sign["left"] = -side_sign["right"]

    jitter = lambda v: v * rng.uniform(0.9, 1.1)  # noqa: E731 - proportions vary by ~10%
    torso_len = jitter(0.30)
    neck_len = jitter(0.03)
    head_r = jitter(0.072)
    shoulder_w = jitter(0.11)
    hip_w = jitter(0.07)
    arm = (jitter(0.17), jitter(0.15))  # upper arm, forearm
    leg = (jitter(0.24), jitter(0.23))  # thigh, shin

    lean = rng.uniform(-10, 10)
    head_tilt = rng.uniform(-15, 15)
    r_lean = _rot(lean)
    j = np.zeros((14, 2))
    neck = r_lean @ np.array([0.0, -torso_len])  # the pelvis is the origin
    j[NECK] = neck
    up = _rot(lean + head_tilt) @ np.array([0.0, -1.0])
    head_center = neck + up * (neck_len + head_r)
    j[HEAD_TOP] = head_center + up * head_r
    crossed = tuple(_sample_arm(rng, j, neck, r_lean, side_sign[side], shoulder_w, arm, limb)
                    for side, limb in (("right", (R_SHOULDER, R_ELBOW, R_WRIST)),
                                       ("left", (L_SHOULDER, L_ELBOW, L_WRIST))))
    for side, limb in (("right", (R_HIP, R_KNEE, R_ANKLE)), ("left", (L_HIP, L_KNEE, L_ANKLE))):
        _sample_leg(rng, j, side_sign[side], hip_w, leg, limb)
    return _Pose(j, head_center, head_r, up, facing_front, crossed)


def _sample_arm(rng, j: np.ndarray, neck: np.ndarray, r_lean: np.ndarray, s: float, shoulder_w: float,
                lengths: tuple[float, float], limb: tuple[int, int, int]) -> bool:
    """Sets one arm's joints in `j`; returns whether it crosses the body."""
    sh, el, wr = limb
    shoulder_drop = 0.03
    j[sh] = neck + r_lean @ np.array([s * shoulder_w, shoulder_drop])
    # Angles from straight down, positive = away from the body's midline.
    crossed = bool(rng.random() < 0.25)
    if crossed:  # arm across the body: the hand ends beyond the midline
        alpha = rng.uniform(-25, 15)
        beta = rng.uniform(-125, -75)
    else:
        alpha = rng.uniform(-15, 170)
        beta = alpha - rng.uniform(-20, 140)
    a, b = np.deg2rad(alpha), np.deg2rad(beta)
    j[el] = j[sh] + r_lean @ (lengths[0] * np.array([s * np.sin(a), np.cos(a)]))
    j[wr] = j[el] + r_lean @ (lengths[1] * np.array([s * np.sin(b), np.cos(b)]))
    return crossed


def _sample_leg(rng, j: np.ndarray, s: float, hip_w: float, lengths: tuple[float, float],
                limb: tuple[int, int, int]) -> None:
    hp, kn, an = limb
    j[hp] = np.array([s * hip_w, 0.0])
    gamma = rng.uniform(45, 85) if rng.random() < 0.1 else rng.uniform(-15, 35)
    delta = gamma + rng.uniform(-35, 35)
    g, d = np.deg2rad(gamma), np.deg2rad(delta)
    j[kn] = j[hp] + lengths[0] * np.array([s * np.sin(g), np.cos(g)])
    j[an] = j[kn] + lengths[1] * np.array([s * np.sin(d), np.cos(d)])


def _place(rng: np.random.Generator, pose: _Pose, image_size: int) -> _Figure:
    """Scale, rotate and place: person-centred, all joints (and the head) inside with a margin."""
    height = rng.uniform(0.60, 0.85) * image_size
    rotation = rng.uniform(-15, 15)
    shift = rng.uniform(-0.04, 0.04, size=2) * image_size
    r_glob = _rot(rotation)
    pts = np.vstack([pose.joints, pose.head_center[None]])
    pts = (pts @ r_glob.T) * height
    head_box = pts[14] + np.array([[-1, 0], [1, 0], [0, -1], [0, 1]]) * pose.head_radius * height
    extent_pts = np.vstack([pts[:14], head_box])
    lo, hi = extent_pts.min(0), extent_pts.max(0)
    margin = 0.05 * image_size
    usable = image_size - 1 - 2 * margin
    fit = min(1.0, usable / max(hi[0] - lo[0], hi[1] - lo[1]))
    center = (lo + hi) / 2.0
    target = (image_size - 1) / 2.0 + shift
    pts = (pts - center) * fit
    lo, hi = (lo - center) * fit, (hi - center) * fit
    target = np.clip(target, margin - lo, image_size - 1 - margin - hi)
    pts = pts + target
    return _Figure(
        joints=pts[:14],
        facing_front=pose.facing_front,
        head_center=pts[14],
        head_radius=pose.head_radius * height * fit,
        up=r_glob @ pose.up,
        height_px=height * fit,
        arm_crossed=pose.arm_crossed,
    )


def _p(xy) -> tuple[int, int]:
    return int(round(float(xy[0]) * _ONE)), int(round(float(xy[1]) * _ONE))


def _line(img, a, b, color, width: float) -> None:
    cv2.line(img, _p(a), _p(b), color, max(1, int(round(width))), cv2.LINE_AA, _SHIFT)


def _disk(img, c, r: float, color) -> None:
    cv2.circle(img, _p(c), max(1, int(round(r * _ONE))), color, -1, cv2.LINE_AA, _SHIFT)


def _poly(img, pts, color) -> None:
    arr = np.round(np.asarray(pts, dtype=np.float64) * _ONE).astype(np.int32)
    cv2.fillPoly(img, [arr], color, cv2.LINE_AA, _SHIFT)


def _colour(rng, lo=0, hi=255) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi + 1, size=3))


def _shade(color, factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in color)


@dataclass
class _Look:
    shirt: tuple
    sleeve_lower: tuple  # forearm colour (skin for short sleeves)
    skin: tuple
    pants: tuple
    shoes: tuple
    hair: tuple
    buttons: tuple
    backpack: tuple
    arm_w: float
    leg_w: float
    hand_r: float
    foot_r: float


def _sample_look(rng: np.random.Generator, height_px: float) -> _Look:
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.85, 1.05)
    skin = tuple(int(v) for v in np.clip(skin, 0, 255))
    shirt = _colour(rng, 30, 230)
    hair = tuple(int(v) for v in np.array([40, 28, 18]) * rng.uniform(0.4, 1.8))
    long_sleeves = rng.random() < 0.5
    return _Look(
        shirt=shirt,
        sleeve_lower=_shade(shirt, 0.9) if long_sleeves else skin,
        skin=skin,
        pants=_colour(rng, 20, 200),
        shoes=_colour(rng, 0, 90),
        hair=hair,
        buttons=tuple(255 - c for c in shirt),
        backpack=tuple(int(v) for v in np.array([60, 45, 30]) * rng.uniform(0.3, 1.3)),
        arm_w=0.05 * height_px * rng.uniform(0.9, 1.1),
        leg_w=0.065 * height_px * rng.uniform(0.9, 1.1),
        hand_r=0.028 * height_px,
        foot_r=0.034 * height_px,
    )


def _draw_arm(img, sh, el, wr, look: _Look) -> None:
    _line(img, sh, el, look.shirt, look.arm_w)
    _line(img, el, wr, look.sleeve_lower, look.arm_w * 0.85)
    _disk(img, wr, look.hand_r, look.skin)


def _draw_leg(img, hp, kn, an, look: _Look) -> None:
    _line(img, hp, kn, look.pants, look.leg_w)
    _line(img, kn, an, _shade(look.pants, 0.92), look.leg_w * 0.85)
    _disk(img, an, look.foot_r, look.shoes)


def _draw_background(img: np.ndarray, rng: np.random.Generator, look: _Look, height_px: float) -> None:
    size = img.shape[0]
    # Gradient between two colours plus low-frequency colour noise.
    c0, c1 = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    grad = t[:, None, None] * (c1 - c0) + c0
    grad = np.broadcast_to(grad, (size, size, 3))
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    low = rng.normal(0, 35, size=(6, 6, 3)).astype(np.float32)
    low = cv2.resize(low, (size, size), interpolation=cv2.INTER_LINEAR)
    low += grad
    img[:] = np.clip(low, 0, 255, out=low)
    # Blobs, polygons and lines.
    for _ in range(rng.integers(6, 14)):
        kind = rng.random()
        c = rng.uniform(0, size - 1, size=2)
        colour = _colour(rng)
        if kind < 0.4:
            axes = rng.uniform(0.02, 0.15, size=2) * size
            cv2.ellipse(img, _p(c), (int(axes[0] * _ONE), int(axes[1] * _ONE)), float(rng.uniform(0, 180)),
                        0, 360, colour, -1, cv2.LINE_AA, _SHIFT)
        elif kind < 0.7:
            n = rng.integers(3, 6)
            pts = c + rng.uniform(-0.12, 0.12, size=(n, 2)) * size
            _poly(img, pts, colour)
        else:
            d = rng.uniform(-0.4, 0.4, size=2) * size
            _line(img, c - d, c + d, colour, rng.uniform(1, 0.03 * size))
    # Distractor limbs: same colours, widths, hands and feet as the person's limbs, attached to nothing.
    for _ in range(rng.choice(4, p=[0.2, 0.35, 0.3, 0.15])):
        a = rng.uniform(0.05, 0.95, size=2) * (size - 1)
        ang1 = rng.uniform(0, 2 * np.pi)
        ang2 = ang1 + rng.uniform(-2.2, 2.2)
        if rng.random() < 0.6:
            b = a + 0.17 * height_px * np.array([np.cos(ang1), np.sin(ang1)])
            c = b + 0.15 * height_px * np.array([np.cos(ang2), np.sin(ang2)])
            _draw_arm(img, a, b, c, look)
        else:
            b = a + 0.24 * height_px * np.array([np.cos(ang1), np.sin(ang1)])
            c = b + 0.23 * height_px * np.array([np.cos(ang2), np.sin(ang2)])
            _draw_leg(img, a, b, c, look)


def _draw_figure(img: np.ndarray, fig: _Figure, look: _Look, rng: np.random.Generator) -> None:
    j = fig.joints
    up = fig.up
    across = np.array([-up[1], up[0]])  # perpendicular to the body axis (image-right when upright)
    # Legs, then the torso over the hip ends.
    for hp, kn, an in ((R_HIP, R_KNEE, R_ANKLE), (L_HIP, L_KNEE, L_ANKLE)):
        _draw_leg(img, j[hp], j[kn], j[an], look)
    hip_mid = (j[R_HIP] + j[L_HIP]) / 2.0
    hip_half = np.linalg.norm(j[R_HIP] - j[L_HIP]) / 2.0 + look.leg_w * 0.5
    sh_r, sh_l = j[R_SHOULDER], j[L_SHOULDER]
    sh_dir = (sh_l - sh_r) / max(np.linalg.norm(sh_l - sh_r), 1e-6)
    hip_dir = (j[L_HIP] - j[R_HIP]) / max(np.linalg.norm(j[L_HIP] - j[R_HIP]), 1e-6)
    torso = [sh_r - sh_dir * look.arm_w * 0.4, sh_l + sh_dir * look.arm_w * 0.4,
             hip_mid + hip_dir * hip_half, hip_mid - hip_dir * hip_half]
    _poly(img, torso, look.shirt)
    # Neck.
    _line(img, j[NECK], fig.head_center, look.skin, fig.head_radius * 0.9)
    neck = j[NECK]
    torso_len = np.linalg.norm(neck - hip_mid)
    down = (hip_mid - neck) / max(torso_len, 1e-6)
    if fig.facing_front:
        # Front: a contrasting shirt-front band down the middle, a V-neck and a button line.
        band = 0.28 * np.linalg.norm(sh_l - sh_r) / 2.0
        _poly(img, [neck - across * band, neck + across * band,
                    hip_mid + across * band * 0.8, hip_mid - across * band * 0.8], look.buttons)
        v = 0.22 * torso_len
        _poly(img, [neck - across * 0.35 * v, neck + across * 0.35 * v, neck + down * v], look.skin)
        for k in range(3):
            _disk(img, neck + down * torso_len * (0.38 + 0.18 * k), max(0.9, fig.head_radius * 0.18), look.shirt)
    else:
        # Back: a dark backpack in the middle of the torso, its straps running up to the shoulders.
        pack_top, pack_low = neck + down * 0.2 * torso_len, neck + down * 0.8 * torso_len
        half = 0.55 * np.linalg.norm(sh_l - sh_r) / 2.0
        _poly(img, [pack_top - across * half, pack_top + across * half,
                    pack_low + across * half, pack_low - across * half], look.backpack)
        for sh in (sh_r, sh_l):
            _line(img, pack_top + (sh - neck) * 0.35, (sh + neck) / 2.0, look.backpack, max(1.0, 0.2 * fig.head_radius))
    # Arms over the torso, in random order (so which arm is on top says nothing about its side).
    arms = [(R_SHOULDER, R_ELBOW, R_WRIST), (L_SHOULDER, L_ELBOW, L_WRIST)]
    if rng.random() < 0.5:
        arms = arms[::-1]
    for sh, el, wr in arms:
        _draw_arm(img, j[sh], j[el], j[wr], look)
    # Head: face (front) or all hair (back).
    c, r = fig.head_center, fig.head_radius
    if fig.facing_front:
        _disk(img, c, r, look.skin)
        # Hair cap: the circular segment on the top of the head.
        ang = np.arctan2(up[1], up[0]) + np.deg2rad(np.linspace(-75, 75, 12))
        _poly(img, c + r * np.stack([np.cos(ang), np.sin(ang)], axis=1), look.hair)
        eye_r = max(0.8, 0.16 * r)
        for s in (-1, 1):
            _disk(img, c + across * s * 0.38 * r - up * 0.05 * r, eye_r, (20, 20, 20))
        _line(img, c - up * 0.5 * r - across * 0.3 * r, c - up * 0.5 * r + across * 0.3 * r, (150, 40, 40),
              max(1.0, 0.12 * r))
    else:
        _disk(img, c, r, look.hair)


class SyntheticDataset:
    """Deterministic synthetic people (see the module docstring); implements the PoseDataset protocol."""

    joint_set = LSP

    def __init__(self, num_samples: int = 2000, seed: int = 0, image_size: int = 160):
        if int(num_samples) <= 0:
            raise DatasetError(f"synthetic dataset needs num_samples > 0, got {num_samples}")
        if int(image_size) < 32:
            raise DatasetError(f"synthetic image_size must be at least 32 px, got {image_size}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return self.num_samples

    def identity(self) -> dict:
        return {
            "type": "synthetic",
            "num_samples": self.num_samples,
            "seed": self.seed,
            "image_size": self.image_size,
            "version": GENERATOR_VERSION,
        }

    def _figure(self, index: int) -> _Figure:
        # Pose and appearance use separate streams, so sample() never needs to draw anything.
        return _sample_figure(np.random.default_rng([self.seed, index, 0]), self.image_size)

    def sample_id(self, index: int) -> str:
        return f"synthetic-{self.seed}-{int(index):06d}"

    def split_indices(self, split: str) -> np.ndarray:
        """About 80/10/10 train/val/test by a hash of the sample id (see preprocessing.datasets.splits)."""
        return hashed_split_indices((self.sample_id(i) for i in range(self.num_samples)), split)

    def sample(self, index: int) -> PoseSample:
        index = check_index(index, self.num_samples)
        fig = self._figure(index)
        joints = np.ones((14, 3), dtype=np.float64)
        joints[:, :2] = fig.joints
        return PoseSample(
            index=index,
            image_path=self.sample_id(index),
            joints=joints,
            extras={
                "facing": "front" if fig.facing_front else "back",
                "arm_crossed": {"right": fig.arm_crossed[0], "left": fig.arm_crossed[1]},
                "person_height_px": float(fig.height_px),
            },
        )

    def load_image(self, index: int) -> np.ndarray:
        index = check_index(index, self.num_samples)
        fig = self._figure(index)
        rng = np.random.default_rng([self.seed, index, 1])
        look = _sample_look(rng, fig.height_px)
        img = np.empty((self.image_size, self.image_size, 3), dtype=np.uint8)
        _draw_background(img, rng, look, fig.height_px)
        _draw_figure(img, fig, look, rng)
        sigma = rng.uniform(2.0, 7.0)
        noise = rng.standard_normal(size=img.shape, dtype=np.float32)
        noise *= sigma
        noise += img
        return np.clip(noise, 0, 255, out=noise).astype(np.uint8)
