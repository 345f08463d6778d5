"""A trained CPM applied to images: the model of a config, the precision policy, test-time flip
and scale averaging, decoding to original pixels, and one image end to end.

Used by validation inside training, by `pipeline.evaluate` / `pipeline.predict`, and by the figures
drawn after a run, so every path predicts the same way.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cpm_model.metrics import decode_predictions
from cpm_model.augment import invert_affines, scale_about_centre_affines, warp
from cpm_model.config import ExperimentConfig
from cpm_model.geometry import apply_affine, crop_affine, invert_affine
from cpm_model.heatmaps import decode_belief_maps
from cpm_model.model import CPM
from cpm_model.recrop import compose, recrop_affines


def build_model(config: ExperimentConfig, num_parts: int) -> CPM:
    """The CPM of a config (input size from the preprocessing section)."""
    return CPM.from_config(config.model, num_parts=num_parts, input_size=config.preprocess.input_size)


def use_bf16(precision: str, device: torch.device) -> bool:
    """'auto': bf16 autocast on CUDA devices that support it and on CPUs with bf16 instructions.

    A CPU without them emulates bf16 in software: a training step of the `lspet_cpu` network ran 8x
    slower under bf16 than in fp32 on an AVX2-only CPU (bench/RESULTS.md, "Precision"), while bf16
    with channels_last made the default network's step 3x faster on the CPU of the "Speed" figures."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16_instructions()


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags, as Linux names them in /proc/cpuinfo


@functools.cache
def cpu_has_bf16_instructions(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16); False where the flags
    cannot be read (another OS): fp32 is never the emulated choice."""
    try:
        with open(cpuinfo) as lines:
            flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def autocast(precision: str, device: torch.device):
    if use_bf16(precision, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def image_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images (N, S, S, 3) -> float (N, 3, S, S) in [0, 1] on `device` (the model's input)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0


def _forward(model: torch.nn.Module, images: torch.Tensor, precision: str) -> torch.Tensor:
    with autocast(precision, images.device):
        maps = model(images.contiguous(memory_format=torch.channels_last))
    return maps.float()


@torch.no_grad()
def predict_belief_maps(model: torch.nn.Module, images: torch.Tensor, precision: str = "fp32",
                        flip_permutation: Sequence[int] | None = None,
                        scales: Sequence[float] | None = None) -> torch.Tensor:
    """Belief maps (B, T, P+1, M, M) of float images (B, 3, S, S) in [0, 1].

    flip_permutation: also run the mirrored images and average (maps flipped back, parts swapped).
    scales: zoom each crop about its centre by each factor, resample the maps back to the
    unzoomed grid, and average over scales.
    """
    scales = list(scales) if scales else [1.0]
    size = images.shape[-1]
    total = None
    for scale in scales:
        if scale == 1.0:
            zoomed = images
        else:
            zoom = scale_about_centre_affines([scale] * images.shape[0], size)
            zoomed = warp(images, zoom, size)
        maps = _forward(model, zoomed, precision)
        if flip_permutation is not None:
            mirrored = _forward(model, zoomed.flip(-1), precision).flip(-1)
            order = list(flip_permutation) + [maps.shape[2] - 1]  # background stays last
            maps = 0.5 * (maps + mirrored[:, :, order])
        if scale != 1.0:
            # The zoom about the crop centre is the same zoom about the map centre in cell units.
            batch, stages, channels, cells, _ = maps.shape
            back = scale_about_centre_affines([1.0 / scale] * batch, cells)
            maps = warp(maps.reshape(batch, stages * channels, cells, cells), back, cells)
            maps = maps.reshape(batch, stages, channels, cells, cells)
        total = maps if total is None else total + maps
    return total / len(scales)


def refine_context(config: ExperimentConfig) -> float | None:
    """The second pass's crop context (the training crop's), or None when the config predicts in
    one pass (`train.eval_refine`)."""
    return config.preprocess.crop_context if config.train.eval_refine else None


@torch.no_grad()
def predict_two_pass(model: torch.nn.Module, images: torch.Tensor, crop_context: float, precision: str = "fp32",
                     flip_permutation: Sequence[int] | None = None,
                     scales: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predict, re-crop each crop around its own last-stage prediction (cpm_model.recrop), and
    predict again: (belief maps of the second pass (B, T, P+1, M, M), the CROP -> RE-CROP affines
    (B, 2, 3) float64 on the CPU, the re-crops). No ground truth is involved."""
    first = predict_belief_maps(model, images, precision, flip_permutation, scales)
    crop_xy, _ = decode_belief_maps(first[:, -1, :-1].cpu().numpy())
    crop_xy = torch.from_numpy(crop_xy)
    recrop = recrop_affines(crop_xy, torch.ones(crop_xy.shape[:2], dtype=torch.bool), images.shape[-1], crop_context)
    recropped = warp(images, recrop, images.shape[-1])
    return predict_belief_maps(model, recropped, precision, flip_permutation, scales), recrop, recropped


def predict_crops(model: torch.nn.Module, images: torch.Tensor, to_original: np.ndarray, precision: str = "fp32",
                  flip_permutation: Sequence[int] | None = None, scales: Sequence[float] | None = None,
                  crop_context: float | None = None) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """Belief maps of crops and the affines that take their cells' pixels to ORIGINAL pixels: one
    pass, or two when `crop_context` is given (`refine_context`). to_original (B, 2, 3) is each
    crop's CROP -> ORIGINAL affine. Returns (maps, map-input -> original affines (B, 2, 3), the
    images the maps were predicted on)."""
    if crop_context is None:
        return predict_belief_maps(model, images, precision, flip_permutation, scales), to_original, images
    maps, recrop, recropped = predict_two_pass(model, images, crop_context, precision, flip_permutation, scales)
    affines = compose(torch.as_tensor(to_original, dtype=torch.float64), invert_affines(recrop)).numpy()
    return maps, affines, recropped


def decode_all_stages(belief_maps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Belief maps (N, T, P+1, M, M) -> part locations (N, T, P, 2) in ORIGINAL image pixels."""
    belief_maps = np.asarray(belief_maps, dtype=np.float32)
    return np.stack([decode_predictions(belief_maps[:, t], affine)
                     for t in range(belief_maps.shape[1])], axis=1)


def confusion_example(model: torch.nn.Module, cache, precision: str = "fp32", search: int = 64) -> dict:
    """The first `search` crops of a cache with their maps, and the one that best shows a stage-1
    left/right confusion fixed by a later stage (for the belief-map figure).

    Returns {"rows", "images", "joints" (crop pixels), "belief_maps" (N, T, P+1, M, M),
    "crop_xy" (N, T, P, 2) crop pixels, "pick" (an index into them)}; empty rows for an empty cache.
    """
    from pipeline.figures import pick_confusion_example  # drawing helpers, matplotlib only

    rows = np.arange(min(search, len(cache)))
    if len(rows) == 0:
        return {"rows": rows}
    data = cache.read(rows, keys=["images", "joints"])
    was_training = model.training
    model.eval()
    try:
        images = image_tensor(data["images"], next(model.parameters()).device)
        maps = predict_belief_maps(model, images, precision).cpu().numpy()
    finally:
        model.train(was_training)
    crop_xy, _ = decode_belief_maps(maps[:, :, :-1])
    pick = pick_confusion_example(crop_xy, data["joints"], cache.joint_names, flip_pairs=cache.flip_pairs)
    return {"rows": rows, "images": data["images"], "joints": data["joints"], "belief_maps": maps,
            "crop_xy": crop_xy, "pick": pick}


def load_trained_model(checkpoint_path: str | Path):
    """(model in eval mode on the CPU, config, joint names, flip pairs) of a checkpoint file."""
    from cpm_model.joints import LSP
    from pipeline.train.checkpoint import load_checkpoint, load_model_state

    checkpoint = load_checkpoint(checkpoint_path)
    config = checkpoint["config"]
    joint_names = checkpoint.get("joint_names") or list(LSP.names)
    model = build_model(config, len(joint_names))
    load_model_state(model, checkpoint["model"], f"checkpoint {checkpoint_path}")
    return model.eval(), config, joint_names, checkpoint.get("flip_pairs")


def decode_image(data: bytes, source: str) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> RGB uint8 (H, W, 3), decoded as OpenCV reads a file;
    ValueError naming `source` when they are not an image."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if len(data) else None
    if image is None:
        raise ValueError(f"{source} could not be decoded as an image ({len(data)} bytes)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def joint_records(joint_names: Sequence[str], joints: np.ndarray, confidence: np.ndarray) -> list[dict]:
    """Per joint its name, x and y in original pixels and its confidence (the belief-map peak):
    what `pipeline.predict` prints and the served model returns."""
    return [{"name": name, "x": round(float(x), 2), "y": round(float(y), 2), "confidence": round(float(c), 4)}
            for name, (x, y), c in zip(joint_names, joints, confidence)]


def dataset_kind(spec: str) -> str:
    """'lspet' from 'lspet:/data/lspet' (the first dataset of a '+' spec; unchecked)."""
    from preprocessing.spec import kind_names

    return kind_names(spec)[0]


def evaluation_crop(config: ExperimentConfig, image: np.ndarray,
                    center: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation crop of one RGB image (no ground truth): around the image centre (or
    `center`) with a side derived from the image size. Returns (crop (S, S, 3) uint8, the
    crop -> original affine (2, 3))."""
    from preprocessing import crops

    size = config.preprocess.input_size
    image_hw = image.shape[:2]
    side = crops.image_crop_side(image_hw, config.preprocess.crop_context,
                                 crops.person_to_image_ratio(dataset_kind(config.data.spec)))
    centre = crops.image_center(image_hw) if center is None else center
    to_crop = crop_affine(centre, side, size)
    return crops.warp_image(image, to_crop, size), invert_affine(to_crop)


def predict_images(model, config: ExperimentConfig, images: Sequence[np.ndarray],
                   centers: Sequence[np.ndarray | None] | None = None, flip_permutation=None,
                   device=None) -> list[dict]:
    """One person in each RGB image, in one forward pass over the batch: each image's evaluation
    crop (`evaluation_crop`), then re-cropped around its own prediction and predicted again when
    the config says so (`train.eval_refine`).

    Returns per image {'joints': (P, 2) original pixels, 'confidence': (P,), 'belief_maps':
    (T, P+1, M, M), 'crop': (S, S, 3) the input of the last pass, 'affine': that crop -> original}."""
    centers = list(centers) if centers is not None else [None] * len(images)
    pairs = [evaluation_crop(config, image, center) for image, center in zip(images, centers)]
    tensor = image_tensor(np.stack([crop for crop, _ in pairs]), device or next(model.parameters()).device)
    maps, to_original, seen = predict_crops(model, tensor, np.stack([affine for _, affine in pairs]),
                                            config.train.precision, flip_permutation,
                                            crop_context=refine_context(config))
    maps = maps.cpu().numpy()
    crop_xy, peaks = decode_belief_maps(maps[:, -1, :-1])
    seen = np.rint(seen.permute(0, 2, 3, 1).cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
    return [{"joints": apply_affine(crop_xy[i], to_original[i]), "confidence": peaks[i], "belief_maps": maps[i],
             "crop": seen[i], "affine": to_original[i]} for i in range(len(pairs))]


def predict_image(model, config: ExperimentConfig, image: np.ndarray, center: np.ndarray | None = None,
                  flip_permutation=None, device=None) -> dict:
    """`predict_images` of one image."""
    return predict_images(model, config, [image], [center], flip_permutation, device)[0]
