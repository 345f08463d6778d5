"""Person-centred square crops: which part of the original image becomes the network input.

All functions are pure: they take joints / image sizes and return a 2x3 ORIGINAL -> CROP affine
(`cpm_model.geometry.crop_affine`) for an out_size x out_size crop, or apply one: `crop_joints`
to the annotation, `warp_image` to the pixels (every crop of this project is cut by it).

Training crops ("train" split with `train_crop == "bbox"`):
    centre = centre of the annotated joints' bounding box,
    side   = crop_context x max(bbox width, bbox height), at least MIN_CROP_SIDE_PX.

Evaluation crops (val / test, and train with `train_crop == "image"`) never look at the joints:
    - a sample with a rough centre and scale (MPII): centre = that centre,
      side = crop_context x MPII_PERSON_PX_PER_SCALE x scale (crop_context 1.25 gives the
      200 x scale x 1.25 box of HRNet / MMPose);
    - otherwise (LSP / LSPET / synthetic, person-centred images): centre = image centre,
      side = crop_context x r x max(H, W), r = the dataset kind's person_to_image_ratio
      (preprocessing.datasets.registry).

r is measured so that a person has, in the median, the same size in an evaluation crop as in a
training crop (both then show the person at about 1 / crop_context of the crop side).
Measured on all 9,000 LSPET images (each has at least four annotated joints):

    ratio r = max(joint-bbox w, h) / size      median   mean   std of log r
    size = max(H, W)                            0.392   0.415   0.41
    size = min(H, W)                            0.565   0.597   0.41
    size = sqrt(H W)                            0.471   0.497   0.41
    size = H                                    0.483   0.510   0.40
    size = W                                    0.452   0.502   0.49

All image-size measures predict the person's size equally badly (std of log r about 0.41, i.e.
persons are +-50% of the median size); max(H, W) is kept because it is simple and a crop of
side >= max(H, W) holds the whole image. The train split (the deterministic split of the LSPET
reader, 7,139 images) gives 0.393 (mean 0.415, std of log r 0.41).
The embedded synthetic figures are larger in their images: r = 0.669 on the train split of the
default set (generator version 2; 1,583 of 2,000 images, std of log r 0.11). LSP (the original
2,000 images, scaled so that the person is about 150 px long, like LSPET) is not at hand here and
takes LSPET's value, as does an MPII person without a rough centre and scale
(DEFAULT_PERSON_TO_IMAGE_RATIO). A kind of unknown name is an error.

The price of matching scale: LSPET images leave the person off-centre (5-95% of the box centre's
offset from the image centre: +-0.16 x max(H, W) in x, -0.20..+0.10 in y), so a tight evaluation
crop cuts some joints off. Fraction of annotated LSPET joints inside the evaluation crop, by
side / max(H, W): 0.40 -> 65%, 0.51 (crop_context 1.3) -> 82%, 0.60 -> 90%, 0.70 -> 96%,
0.80 (crop_context about 2.0) -> 99%, 1.0 -> 100%. A larger crop_context (about 1.8-2.0 for
LSPET) keeps the scale match and loses far fewer joints; the stored crop->original affine lets
evaluation score every joint in original coordinates either way.

A training sample whose annotated joints span less than MIN_PERSON_SIDE_PX, or a sample with no
annotated joint inside the image, raises SampleSkipped (no crop can show that person).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cpm_model.geometry import apply_affine, crop_affine

from .datasets import registry
from .datasets.base import PoseSample, SampleSkipped

# For a kind whose entry has no ratio of its own (MPII: its people carry a rough centre and scale).
DEFAULT_PERSON_TO_IMAGE_RATIO = registry.LSPET_PERSON_TO_IMAGE_RATIO
# MPII's scale is the person's height / 200 px.
MPII_PERSON_PX_PER_SCALE = 200.0
# A person whose annotated joints span less than this is too small to learn from.
MIN_PERSON_SIDE_PX = 8.0
# Floor on a training crop's side so that a tiny box (few annotated joints) is not blown up.
MIN_CROP_SIDE_PX = 32.0

TRAIN_CROP_CHOICES = ("bbox", "image")


def annotated_joints(joints: np.ndarray) -> np.ndarray:
    """The (K, 2) x, y of the joints whose flag is > 0."""
    joints = np.asarray(joints, dtype=np.float64)
    return joints[joints[:, 2] > 0, :2]


def joints_inside_image(joints: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Boolean (P,): annotated and inside the image (pixel centres at integers, so [-0.5, W - 0.5))."""
    joints = np.asarray(joints, dtype=np.float64)
    height, width = image_hw
    x, y = joints[:, 0], joints[:, 1]
    return (joints[:, 2] > 0) & (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)


def bbox_center_and_side(points_xy: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (x, y) and max(width, height) of the bounding box of (K, 2) points."""
    lo, hi = points_xy.min(axis=0), points_xy.max(axis=0)
    return (lo + hi) / 2.0, float((hi - lo).max())


def training_crop_side(bbox_side: float, crop_context: float) -> float:
    return max(crop_context * bbox_side, MIN_CROP_SIDE_PX)


def person_to_image_ratio(dataset_kind: str) -> float:
    """Median person size / max(H, W) for person-centred images of this kind of dataset (its
    registry entry's); DatasetError naming the known kinds for an unknown one."""
    ratio = registry.kind_named(dataset_kind).person_to_image_ratio
    return DEFAULT_PERSON_TO_IMAGE_RATIO if ratio is None else ratio


def image_crop_side(image_hw: tuple[int, int], crop_context: float, person_ratio: float) -> float:
    """Evaluation crop side for a person-centred image: the person at 1 / crop_context of it."""
    return crop_context * person_ratio * float(max(image_hw))


def image_center(image_hw: tuple[int, int]) -> np.ndarray:
    height, width = image_hw
    return np.array([(width - 1) / 2.0, (height - 1) / 2.0])


def check_croppable(joints: np.ndarray, image_hw: tuple[int, int], image_name: str) -> None:
    """Raise SampleSkipped when no annotated joint lies inside the image."""
    if not (np.asarray(joints)[:, 2] > 0).any():
        raise SampleSkipped("no_annotated_joints", f"{image_name}: no annotated joint")
    if not joints_inside_image(joints, image_hw).any():
        raise SampleSkipped("joints_outside_image",
                            f"{image_name}: all annotated joints lie outside the {image_hw[1]}x{image_hw[0]} image")


def training_crop(joints: np.ndarray, image_hw: tuple[int, int], crop_context: float, out_size: int,
                  image_name: str = "sample") -> np.ndarray:
    """ORIGINAL -> CROP affine centred on the annotated joints' bounding box."""
    check_croppable(joints, image_hw, image_name)
    center, bbox_side = bbox_center_and_side(annotated_joints(joints))
    if bbox_side < MIN_PERSON_SIDE_PX:
        raise SampleSkipped("person_too_small",
                            f"{image_name}: annotated joints span {bbox_side:.1f} px (< {MIN_PERSON_SIDE_PX:g} px)")
    return crop_affine(center, training_crop_side(bbox_side, crop_context), out_size)


def evaluation_crop(image_hw: tuple[int, int], crop_context: float, out_size: int,
                    center: np.ndarray | None = None, scale: float | None = None,
                    person_ratio: float = DEFAULT_PERSON_TO_IMAGE_RATIO) -> np.ndarray:
    """ORIGINAL -> CROP affine that uses no ground-truth joints (rough centre/scale, else the image)."""
    if center is not None and scale is not None and scale > 0:
        side = crop_context * MPII_PERSON_PX_PER_SCALE * float(scale)
        return crop_affine(np.asarray(center, dtype=np.float64), side, out_size)
    return crop_affine(image_center(image_hw), image_crop_side(image_hw, crop_context, person_ratio), out_size)


def uses_training_crop(split: str, train_crop: str) -> bool:
    if train_crop not in TRAIN_CROP_CHOICES:
        raise ValueError(f"train_crop must be one of {list(TRAIN_CROP_CHOICES)}, got {train_crop!r}")
    return split == "train" and train_crop == "bbox"


def person_crop(sample: PoseSample, image_hw: tuple[int, int], split: str, train_crop: str,
                crop_context: float, out_size: int, person_ratio: float) -> np.ndarray:
    """The crop protocol for one sample: ORIGINAL -> CROP affine, or SampleSkipped. `person_ratio`:
    `person_to_image_ratio` of the sample's dataset kind (looked up by the caller, so that a worker
    process needs no registry entry)."""
    if uses_training_crop(split, train_crop):
        return training_crop(sample.joints, image_hw, crop_context, out_size, sample.image_path)
    check_croppable(sample.joints, image_hw, sample.image_path)
    return evaluation_crop(image_hw, crop_context, out_size, sample.center, sample.scale, person_ratio)


def crop_joints(joints_original: np.ndarray, affine: np.ndarray, input_size: int) -> np.ndarray:
    """Joints in crop pixels; flag 1 only where annotated and inside the crop."""
    joints = np.empty_like(joints_original, dtype=np.float64)
    joints[:, :2] = apply_affine(joints_original[:, :2], affine)
    inside = (joints[:, :2] >= -0.5).all(axis=1) & (joints[:, :2] < input_size - 0.5).all(axis=1)
    joints[:, 2] = ((joints_original[:, 2] > 0) & inside).astype(np.float64)
    return joints


def warp_image(image: np.ndarray, affine: np.ndarray, input_size: int) -> np.ndarray:
    """The crop: bilinear, black outside the image (OpenCV uses the same pixel-centre convention)."""
    import cv2  # here, so that importing the crop rules stays cheap

    return cv2.warpAffine(image, affine, (input_size, input_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def crop_rule_constants(dataset_kinds: Sequence[str] = ()) -> dict:
    """The constants that change crop content: part of every cache's identity. The ratios are the
    built-in kinds' (every cache key has held them, so their caches keep their names) and those of
    `dataset_kinds`, the kinds of the cached dataset."""
    ratios = {kind.name: kind.person_to_image_ratio
              for kind in (*registry.BUILTIN, *map(registry.kind_named, dataset_kinds))
              if kind.person_to_image_ratio is not None}
    return {
        "person_to_image_ratio": ratios,
        "default_person_to_image_ratio": DEFAULT_PERSON_TO_IMAGE_RATIO,
        "mpii_person_px_per_scale": MPII_PERSON_PX_PER_SCALE,
        "min_person_side_px": MIN_PERSON_SIDE_PX,
        "min_crop_side_px": MIN_CROP_SIDE_PX,
    }
