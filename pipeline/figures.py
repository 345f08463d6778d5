"""Figures (matplotlib, Agg, PNG) of one run: arrays in, PNG out. Belief maps per stage, predicted
skeletons on images, the learning curve.

`belief_maps_figure`: the paper's Fig. 1 view -- rows are stages, columns a few parts (by default
the right/left wrists and elbows, where stage 1 confuses left and right), each map drawn over the
image, so one sees a stage-1 confusion resolved by later stages.
`skeleton_figure`: predicted (and optionally ground-truth) joints joined by limbs on the images.
Both return the saved path; callers may log it elsewhere. `skeleton_overlay` draws the same limbs
into the image's own pixels with OpenCV (one call per image or video frame, no figure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cpm_model.geometry import heatmap_to_input  # noqa: E402
from pipeline.train import metric_names as names  # noqa: E402

DEFAULT_PARTS = ("right_wrist", "left_wrist", "right_elbow", "left_elbow")
# Limbs by joint name (LSP and MPII names); pairs whose names are missing are skipped.
LIMBS = (
    ("right_ankle", "right_knee"), ("right_knee", "right_hip"), ("left_ankle", "left_knee"), ("left_knee", "left_hip"),
    ("right_wrist", "right_elbow"), ("right_elbow", "right_shoulder"), ("left_wrist", "left_elbow"),
    ("left_elbow", "left_shoulder"), ("right_hip", "left_hip"), ("right_shoulder", "left_shoulder"),
    ("right_shoulder", "right_hip"), ("left_shoulder", "left_hip"), ("neck", "head_top"),
    ("right_hip", "pelvis"), ("left_hip", "pelvis"), ("pelvis", "thorax"), ("thorax", "upper_neck"),
    ("upper_neck", "head_top"), ("right_shoulder", "thorax"), ("left_shoulder", "thorax"),
)


def _side_colour(a: str, b: str) -> str:
    if a.startswith("right") or b.startswith("right"):
        return "tab:red"
    if a.startswith("left") or b.startswith("left"):
        return "tab:blue"
    return "gold"


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    if image.dtype != np.uint8:
        image = np.clip(image, 0.0, 1.0)
    return image


def belief_maps_figure(image: np.ndarray, belief_maps: np.ndarray, joint_names: Sequence[str],
                       path: str | Path, parts: Sequence[str] = DEFAULT_PARTS, title: str | None = None) -> Path:
    """Save a stages x parts grid of belief maps over the crop.

    image: (S, S, 3) crop (uint8 or float in [0, 1]); belief_maps: (T, P+1, M, M). The arg-max of
    each map is marked with a cross.
    """
    belief_maps = np.asarray(belief_maps, dtype=np.float32)
    image = _as_rgb(image)
    size = image.shape[0]
    stride = size // belief_maps.shape[-1]  # the network's output stride, from the two sizes
    columns = [joint_names.index(p) for p in parts if p in joint_names] or list(range(min(4, len(joint_names))))
    stages = belief_maps.shape[0]
    fig, axes = plt.subplots(stages, len(columns), figsize=(2.2 * len(columns), 2.2 * stages), squeeze=False)
    # Maps are drawn so that cell i covers input pixels stride*i .. stride*i + stride - 1.
    extent = (-0.5, belief_maps.shape[-1] * stride - 0.5, belief_maps.shape[-2] * stride - 0.5, -0.5)
    for t in range(stages):
        for c, joint in enumerate(columns):
            ax = axes[t, c]
            ax.imshow(image, extent=(-0.5, size - 0.5, size - 0.5, -0.5))
            heat = belief_maps[t, joint]
            ax.imshow(np.clip(heat, 0, None), cmap="jet", alpha=0.55, extent=extent, interpolation="bilinear",
                      vmin=0.0, vmax=max(float(heat.max()), 1e-6))
            row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
            x, y = heatmap_to_input(np.array([col, row], dtype=np.float64), stride)
            ax.plot([x], [y], marker="x", color="white", markersize=8, mew=2)
            ax.set_xticks([])
            ax.set_yticks([])
            if t == 0:
                ax.set_title(joint_names[joint].replace("_", " "), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"stage {t + 1}", fontsize=9)
            ax.text(1, 6, f"max {heat.max():.2f}", color="white", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def draw_skeleton(ax, joints_xy: np.ndarray, joint_names: Sequence[str], visible: np.ndarray | None = None,
                  style: str = "-", label_points: bool = False, alpha: float = 1.0) -> None:
    """Limbs (right red, left blue, centre yellow) and joints on an axis."""
    joints_xy = np.asarray(joints_xy, dtype=np.float64)
    visible = np.ones(len(joints_xy), dtype=bool) if visible is None else np.asarray(visible, dtype=bool)
    index = {name: i for i, name in enumerate(joint_names)}
    for a, b in LIMBS:
        if a in index and b in index and visible[index[a]] and visible[index[b]]:
            pa, pb = joints_xy[index[a]], joints_xy[index[b]]
            ax.plot([pa[0], pb[0]], [pa[1], pb[1]], style, color=_side_colour(a, b), linewidth=2, alpha=alpha)
    shown = joints_xy[visible]
    ax.scatter(shown[:, 0], shown[:, 1], s=12, c="white", edgecolors="black", linewidths=0.5, zorder=3, alpha=alpha)
    if label_points:
        for i in np.flatnonzero(visible):
            ax.text(joints_xy[i, 0] + 2, joints_xy[i, 1], joint_names[i].replace("_", " "), fontsize=6, color="white")


# The colours of _side_colour as RGB: right red, left blue, centre gold.
OVERLAY_COLOURS = {"tab:red": (214, 39, 40), "tab:blue": (31, 119, 180), "gold": (255, 215, 0)}


def skeleton_overlay(image: np.ndarray, joints_xy: np.ndarray, joint_names: Sequence[str]) -> np.ndarray:
    """A copy of an RGB uint8 image with the limbs and joints drawn at the image's own resolution."""
    import cv2

    canvas = np.ascontiguousarray(image).copy()
    thickness = max(1, round(max(image.shape[:2]) / 200))
    index = {name: i for i, name in enumerate(joint_names)}
    points = [tuple(int(round(v)) for v in xy) for xy in np.asarray(joints_xy, dtype=np.float64)]
    for a, b in LIMBS:
        if a in index and b in index:
            cv2.line(canvas, points[index[a]], points[index[b]], OVERLAY_COLOURS[_side_colour(a, b)], thickness,
                     cv2.LINE_AA)
    for point in points:
        cv2.circle(canvas, point, thickness + 1, (255, 255, 255), -1, cv2.LINE_AA)
    return canvas


def skeleton_figure(images: Sequence[np.ndarray], predictions: Sequence[np.ndarray], joint_names: Sequence[str],
                    path: str | Path, ground_truth: Sequence[np.ndarray] | None = None,
                    titles: Sequence[str] | None = None, columns: int = 4) -> Path:
    """Save predicted skeletons (solid) over images, with ground truth (dashed) when given.

    images: list of (H, W, 3); predictions: list of (P, 2) in that image's pixels;
    ground_truth: list of (P, 3) x, y, flag.
    """
    count = len(images)
    columns = max(1, min(columns, count))
    rows = int(np.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.0 * rows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k >= count:
            continue
        image = _as_rgb(images[k])
        ax.imshow(image)
        if ground_truth is not None:
            gt = np.asarray(ground_truth[k])
            draw_skeleton(ax, gt[:, :2], joint_names, gt[:, 2] > 0, style="--", alpha=0.45)
        draw_skeleton(ax, predictions[k], joint_names)
        ax.set_xlim(-0.5, image.shape[1] - 0.5)
        ax.set_ylim(image.shape[0] - 0.5, -0.5)
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def learning_curve_figure(history: Sequence[dict], path: str | Path) -> Path:
    """Training loss and validation PCK@0.2 per stage against the epoch."""
    rows = [m for m in history if names.is_epoch_row(m)]
    epochs = [m[names.EPOCH] for m in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(epochs, [m[names.TRAIN_LOSS] for m in rows], marker="o")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    left.set_yscale("log")
    stage_keys = names.stage_keys(rows[0]) if rows else []
    for key in stage_keys:
        right.plot(epochs, [100 * m[key] for m in rows], marker="o", label=f"stage {names.stage_of_key(key)}")
    right.set_xlabel("epoch")
    protocol = names.PCKH if rows and names.PCKH.name in rows[0] else names.PCK
    right.set_ylabel(f"val {protocol.label.split(' ')[0]} (%)")
    if stage_keys:
        right.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pick_confusion_example(predictions: np.ndarray, joints: np.ndarray, joint_names: Sequence[str],
                           parts: Sequence[str] = DEFAULT_PARTS, flip_pairs=None) -> int:
    """Index of the sample that best shows a left/right confusion at stage 1 fixed by the last stage.

    predictions (N, T, P, 2) and joints (N, P, 3) in one frame (e.g. crop pixels). Score per
    sample: the number of chosen parts that stage 1 places nearer the other side's joint than its
    own while the last stage places them nearer their own; ties broken by the last stage's error.
    Returns 0 when no sample shows it.
    """
    predictions = np.asarray(predictions, dtype=np.float64)
    joints = np.asarray(joints, dtype=np.float64)
    partner = {a: b for a, b in (flip_pairs or [])}
    partner.update({b: a for a, b in (flip_pairs or [])})
    chosen = [joint_names.index(p) for p in parts if p in joint_names and joint_names.index(p) in partner]
    if not chosen or len(predictions) == 0:
        return 0
    best, best_score = 0, (-1, 0.0)
    for n in range(len(predictions)):
        fixed, error = 0, 0.0
        for j in chosen:
            k = partner[j]
            if joints[n, j, 2] <= 0 or joints[n, k, 2] <= 0:
                continue
            first, last = predictions[n, 0, j], predictions[n, -1, j]
            own, other = joints[n, j, :2], joints[n, k, :2]
            confused = np.linalg.norm(first - other) < np.linalg.norm(first - own)
            resolved = np.linalg.norm(last - own) < np.linalg.norm(last - other)
            fixed += int(confused and resolved)
            error += float(np.linalg.norm(last - own))
        score = (fixed, -error)
        if score > best_score:
            best, best_score = n, score
    return best
