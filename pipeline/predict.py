"""Joints of one person in one image, with a trained checkpoint.

    python -m pipeline.predict --checkpoint runs/lspet/best.pt photo.jpg [--center X,Y] [--out skeleton.png]

The crop is the evaluation crop (no ground truth): centred on the image centre (or --center) with
a side derived from the image size, as in preprocessing.crops. Prints JSON: per joint its name,
x and y in ORIGINAL image pixels, and a confidence (the peak of its belief map).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cpm_model.geometry import apply_affine, crop_affine, invert_affine
from cpm_model.heatmaps import decode_belief_maps


def dataset_kind(spec: str) -> str:
    """'lspet' from 'lspet:/data/lspet' (the first dataset of a '+' spec)."""
    return spec.split("+")[0].split(":")[0].strip().lower()


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); FileNotFoundError naming the file when it is missing or unreadable."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"image {path} could not be decoded as an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def parse_center(text: str | None) -> np.ndarray | None:
    if text is None:
        return None
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        from pipeline.evaluate import UsageError

        raise UsageError(f"--center must look like X,Y (original pixels), got {text!r}") from None
    return np.array([x, y])


def predict_image(model, config, image: np.ndarray, joint_names, center: np.ndarray | None = None,
                  flip_permutation=None, device=None) -> dict:
    """{'joints': (P, 2) original pixels, 'confidence': (P,), 'belief_maps': (T, P+1, M, M),
    'crop': (S, S, 3), 'affine': crop -> original}."""
    import cv2

    from preprocessing import crops
    from pipeline.evaluate import predict_belief_maps

    size = config.preprocess.input_size
    image_hw = image.shape[:2]
    side = crops.image_crop_side(image_hw, config.preprocess.crop_context,
                                 crops.person_to_image_ratio(dataset_kind(config.data.spec)))
    centre = crops.image_center(image_hw) if center is None else center
    to_crop = crop_affine(centre, side, size)
    crop = cv2.warpAffine(image, to_crop, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))
    device = device or next(model.parameters()).device
    tensor = torch.from_numpy(crop).to(device).permute(2, 0, 1)[None].float() / 255.0
    maps = predict_belief_maps(model, tensor, config.train.precision, flip_permutation)[0].cpu().numpy()
    crop_xy, peaks = decode_belief_maps(maps[-1, :-1])
    to_original = invert_affine(to_crop)
    return {"joints": apply_affine(crop_xy, to_original), "confidence": peaks, "belief_maps": maps,
            "crop": crop, "affine": to_original}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="an image file (one person, roughly centred unless --center)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (best.pt) or its directory")
    parser.add_argument("--center", default=None, help="person centre X,Y in original pixels")
    parser.add_argument("--flip", action="store_true", help="average with the mirrored crop")
    parser.add_argument("--out", default=None, help="draw the skeleton on the image into this PNG")
    parser.add_argument("--maps", default=None, help="save the belief maps of every stage into this PNG")
    args = parser.parse_args(argv)

    from pipeline.checkpoint import load_checkpoint, load_model_state
    from pipeline.evaluate import build_model, is_input_error

    try:
        center = parse_center(args.center)
        checkpoint = load_checkpoint(args.checkpoint)
        config = checkpoint["config"]
        joint_names = checkpoint.get("joint_names")
        if not joint_names:
            from cpm_model.joints import LSP

            joint_names = list(LSP.names)
        model = build_model(config, len(joint_names))
        load_model_state(model, checkpoint["model"], f"checkpoint {args.checkpoint}")
        model.eval()
        image = read_image(args.image)
    except Exception as exc:  # noqa: BLE001 - bad input: one line, exit status 2
        if is_input_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    permutation = None
    if args.flip and checkpoint.get("flip_pairs"):
        permutation = list(range(len(joint_names)))
        for a, b in checkpoint["flip_pairs"]:
            permutation[a], permutation[b] = b, a
    result = predict_image(model, config, image, joint_names, center, permutation)
    output = {"image": str(args.image), "image_size": list(image.shape[:2]),
              "joints": [{"name": name, "x": round(float(x), 2), "y": round(float(y), 2),
                          "confidence": round(float(c), 4)}
                         for name, (x, y), c in zip(joint_names, result["joints"], result["confidence"])]}
    print(json.dumps(output, indent=1))
    if args.out:
        from pipeline.figures import skeleton_figure

        skeleton_figure([image], [result["joints"]], joint_names, args.out, titles=[Path(args.image).name], columns=1)
    if args.maps:
        from pipeline.figures import belief_maps_figure

        belief_maps_figure(result["crop"], result["belief_maps"], joint_names, args.maps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
