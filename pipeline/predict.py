"""Joints of one person in one image, with a trained checkpoint.

    python -m pipeline.predict --checkpoint runs/lspet/best.pt photo.jpg [--center X,Y] [--out skeleton.png]
    python -m pipeline.predict --model models:/cpm-lspet/1 photo.jpg    # a model logged by a sweep

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
    from pipeline.train.inference import decode_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        return decode_image(path.read_bytes(), f"image {path}")
    except ValueError as exc:
        raise FileNotFoundError(str(exc)) from None


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
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="checkpoint file (best.pt) or its directory")
    weights.add_argument("--model", help="an MLflow model a sweep logged: models:/NAME/VERSION or runs:/RUN_ID/model")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for --model "
                        "(default: MLFLOW_TRACKING_URI or the embedded SQLite store)")
    parser.add_argument("--center", default=None, help="person centre X,Y in original pixels")
    parser.add_argument("--flip", action="store_true", help="average with the mirrored crop")
    parser.add_argument("--out", default=None, help="draw the skeleton on the image into this PNG")
    parser.add_argument("--maps", default=None, help="save the belief maps of every stage into this PNG")
    args = parser.parse_args(argv)

    return report_input_errors(lambda: predict_to_outputs(args))


def checkpoint_path(args) -> str:
    """--checkpoint as given, or the checkpoint inside the MLflow model of --model."""
    if args.model is None:
        return args.checkpoint
    from pipeline.tracking.pose_model import checkpoint_of_model

    return str(checkpoint_of_model(args.model, args.tracking_uri))


def predict_to_outputs(args) -> int:
    from cpm_model.joints import flip_permutation
    from pipeline.train.inference import joint_records, load_trained_model, predict_image

    center = parse_center(args.center)
    model, config, joint_names, flip_pairs = load_trained_model(checkpoint_path(args))
    image = read_image(args.image)
    permutation = flip_permutation(len(joint_names), flip_pairs) if args.flip and flip_pairs else None
    result = predict_image(model, config, image, center, permutation)
    output = {"image": str(args.image), "image_size": list(image.shape[:2]),
              "joints": joint_records(joint_names, result["joints"], result["confidence"])}
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
