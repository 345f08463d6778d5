"""What test-time choices are worth on one trained checkpoint, scored on one split in one run:

- one pass, arg-max cell only (no sub-pixel refinement of the peak);
- one pass, sub-pixel peak (the project's decoding: log-parabola through the arg-max);
- two passes (re-crop around the first prediction, cpm_model.recrop);
- two passes with the mirrored crop averaged in.

    python bench/inference_levers.py --checkpoint runs/lspet_cpu/best.pt --data lspet:/path/to/lspet \
        [--split val] [--json FILE]

Prints PCK (the dataset's protocol, last stage) and the seconds each variant took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cpm_model.geometry import STRIDE, apply_affine, heatmap_to_input  # noqa: E402
from cpm_model.joints import flip_permutation  # noqa: E402
from cpm_model.metrics import PCKCounts  # noqa: E402
from pipeline.cli import with_overrides  # noqa: E402
from pipeline.train.batches import scoring_batches  # noqa: E402
from pipeline.train.caches import open_split_caches  # noqa: E402
from pipeline.train.inference import decode_all_stages, load_trained_model, predict_crops  # noqa: E402
from pipeline.train.scoring import protocol_for  # noqa: E402


def argmax_only(maps: np.ndarray, to_original: np.ndarray) -> np.ndarray:
    """Last-stage parts (N, 1, P, 2) in original pixels at the centre of each map's arg-max cell."""
    parts = maps[:, -1, :-1]
    n, p, h, w = parts.shape
    rows, cols = np.divmod(parts.reshape(n, p, -1).argmax(-1), w)
    crop_xy = heatmap_to_input(np.stack([cols, rows], -1).astype(np.float64), STRIDE)
    return apply_affine(crop_xy, to_original)[:, None]


def score(model, cache, protocol, precision: str, flip, crop_context, subpixel: bool) -> tuple[float, float]:
    counts = PCKCounts(1, model.num_parts)
    start = time.perf_counter()
    for batch in scoring_batches(cache, 32, 0, 1, torch.device("cpu")):
        maps, to_original, _ = predict_crops(model, batch["images"], batch["affine"].numpy(), precision, flip,
                                             crop_context=crop_context)
        maps = maps.numpy()
        coords = decode_all_stages(maps, to_original)[:, -1:] if subpixel else argmax_only(maps, to_original)
        counts.add(coords, batch["joints_original"].numpy(), batch[protocol.normaliser].numpy())
    return counts.mean(-1, protocol.alpha), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=None, help="data spec (default: the checkpoint's)")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, config, joint_names, flip_pairs = load_trained_model(args.checkpoint)
    config = with_overrides(config, [], data__spec=args.data)
    cache = open_split_caches(config, args.split, progress=False)[0]
    protocol = protocol_for(config)
    context = config.preprocess.crop_context
    permutation = flip_permutation(len(joint_names), flip_pairs or cache.flip_pairs)
    variants = [("one pass, arg-max cell", None, None, False),
                ("one pass, sub-pixel peak", None, None, True),
                ("two passes", None, context, True),
                ("two passes + flip", permutation, context, True)]
    rows = []
    print(f"{protocol.label} on {len(cache)} {args.split} samples of {config.data.spec}")
    for name, flip, crop_context, subpixel in variants:
        pck, seconds = score(model, cache, protocol, config.train.precision, flip, crop_context, subpixel)
        rows.append({"variant": name, protocol.name: pck, "seconds": seconds})
        print(f"{name:<28} {100 * pck:5.1f}   {seconds:6.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "split": args.split, "rows": rows},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
