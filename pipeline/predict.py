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

from pipeline.cli import UsageError, report_input_errors


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
        raise UsageError(f"--center must look like X,Y (original pixels), got {text!r}") from None
    return np.array([x, y])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="an image file (one person, roughly centred unless --center)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (best.pt) or its directory")
    parser.add_argument("--center", default=None, help="person centre X,Y in original pixels")
    parser.add_argument("--flip", action="store_true", help="average with the mirrored crop")
    parser.add_argument("--out", default=None, help="draw the skeleton on the image into this PNG")
    parser.add_argument("--maps", default=None, help="save the belief maps of every stage into this PNG")
    args = parser.parse_args(argv)

    return report_input_errors(lambda: predict_to_outputs(args))


def load_model(checkpoint_path: str):
    """(model in eval mode, config, joint names, flip pairs) of a checkpoint file."""
    from cpm_model.joints import LSP
    from pipeline.train.checkpoint import load_checkpoint, load_model_state
    from pipeline.train.inference import build_model

    checkpoint = load_checkpoint(checkpoint_path)
    config = checkpoint["config"]
    joint_names = checkpoint.get("joint_names") or list(LSP.names)
    model = build_model(config, len(joint_names))
    load_model_state(model, checkpoint["model"], f"checkpoint {checkpoint_path}")
    return model.eval(), config, joint_names, checkpoint.get("flip_pairs")


def predict_to_outputs(args) -> int:
    from cpm_model.joints import flip_permutation
    from pipeline.train.inference import predict_image

    center = parse_center(args.center)
    model, config, joint_names, flip_pairs = load_model(args.checkpoint)
    image = read_image(args.image)
    permutation = flip_permutation(len(joint_names), flip_pairs) if args.flip and flip_pairs else None
    result = predict_image(model, config, image, center, permutation)
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
