"""Images/s of `cpm-predict` over a folder against the model alone (bench/RESULTS.md, "Prediction").

    python bench/predict_speed.py --images DATA/lspet/images --count 1000 [--preset lspet_cpu]
        [--checkpoint best.pt] [--batch-size 32] [--device cpu] [--single 100]

- model alone: `predict_crops` (the forward pass(es) the preset predicts with: two when it
  re-crops, `train.eval_refine`) on random crops already on the device, batch after batch;
- cpm-predict: the command itself on a folder of the first COUNT images (symbolic links in a temp
  folder; the data are not copied), writing a JSON per image; its own images/s (decoding, crops,
  model, decoding the maps, writing) from its summary line, and the command's wall time;
- --single N: cpm-predict with --batch-size 1 on N of the images (one image per forward pass).

Without --checkpoint the weights are the preset's network with seeded random weights (the speed
does not depend on the weights). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cpm_model.config import load_config  # noqa: E402
from cpm_model.joints import LSP  # noqa: E402
from pipeline.train.checkpoint import build_checkpoint, save_checkpoint  # noqa: E402
from pipeline.train.inference import build_model, image_tensor, predict_crops, refine_context  # noqa: E402


def random_checkpoint(preset: str, path: Path) -> Path:
    torch.manual_seed(0)
    config = load_config(preset)
    model = build_model(config, LSP.num_parts)
    save_checkpoint(build_checkpoint(model, config, epoch=0, best_epoch=0, joint_names=list(LSP.names),
                                     flip_pairs=LSP.flip_pairs, metrics=[]), path)
    return path


def model_alone(checkpoint: Path, count: int, batch_size: int, device: str) -> dict:
    """Images/s of the forward pass(es) on uint8 crops made once, one warm-up batch excluded."""
    from pipeline.train.inference import load_trained_model

    model, config, _, _ = load_trained_model(checkpoint)
    model = model.to(device)
    size = config.preprocess.input_size
    crops = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    affines = np.repeat(np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]), batch_size, 0)
    batches = -(-count // batch_size)
    for index in range(batches + 1):
        if index == 1:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
        maps, _, _ = predict_crops(model, image_tensor(crops, torch.device(device)), affines, config.train.precision,
                                   crop_context=refine_context(config))
        maps.cpu()
    seconds = time.perf_counter() - start
    return {"images": batches * batch_size, "seconds": round(seconds, 2),
            "images_per_s": round(batches * batch_size / seconds, 1), "input_px": size,
            "passes": 2 if refine_context(config) else 1, "precision": config.train.precision}


def cpm_predict(checkpoint: Path, folder: Path, out: Path, batch_size: int, device: str) -> dict:
    command = [sys.executable, "-m", "pipeline.predict", "--checkpoint", str(checkpoint), str(folder),
               "--out", str(out), "--batch-size", str(batch_size), "--device", device, "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    summary = done.stderr.strip().splitlines()[-1]
    rate = float(re.search(r"\(([\d.]+) images/s\)", summary).group(1))
    return {"images_per_s": rate, "command_wall_s": round(wall, 1), "summary": summary}


def linked_folder(images: Path, count: int, tmp: Path, name: str) -> Path:
    folder = tmp / name
    folder.mkdir()
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    if len(files) < count:
        raise SystemExit(f"{images} holds {len(files)} images, fewer than --count {count}")
    for path in files:
        (folder / path.name).symlink_to(path.resolve())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, type=Path, help="a folder of images (e.g. LSPET's images/)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--preset", default="lspet_cpu")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--single", type=int, default=0, help="also run --batch-size 1 on this many images")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or random_checkpoint(args.preset, tmp / "best.pt")
        folder = linked_folder(args.images, args.count, tmp, "images")
        result = {"preset": args.preset if args.checkpoint is None else str(args.checkpoint), "device": args.device,
                  "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(), "count": args.count,
                  "model_alone": model_alone(checkpoint, args.count, args.batch_size, args.device),
                  "cpm_predict": cpm_predict(checkpoint, folder, tmp / "out", args.batch_size, args.device)}
        if args.single:
            small = linked_folder(args.images, args.single, tmp, "single")
            result["cpm_predict_batch_1"] = cpm_predict(checkpoint, small, tmp / "out1", 1, args.device)
        result["ratio_cpm_predict_to_model"] = round(result["cpm_predict"]["images_per_s"]
                                                     / result["model_alone"]["images_per_s"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
