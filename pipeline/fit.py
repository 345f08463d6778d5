"""Train one CPM in this process.

    python -m pipeline.fit --config configs/synthetic_tiny.yaml --out runs/tiny
    python -m pipeline.fit --config configs/lspet_cpu.yaml --data lspet:/data/lspet --out runs/lspet [--resume]

Prints one row per epoch. Writes into --out: config.yaml, metrics.jsonl (one JSON row per epoch,
then the test row), checkpoints/epoch_NNNN/checkpoint.pt (the two newest and the best), best.pt (the
best epoch by validation PCK@0.2), summary.json, and the figures learning_curve.png,
belief_maps.png (a validation crop's maps at every stage) and skeletons.png. Checkpoints and
best.pt are written through temp names, fsynced, then renamed; --resume takes the newest
checkpoint that loads (a corrupt newest one falls back to the previous kept one, with a warning).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cpm_model.config import ConfigError, add_config_arguments, load_config
from cpm_model.heatmaps import decode_belief_maps
from pipeline.checkpoint import copy_durably
from pipeline.context import CHECKPOINT_FILE, LocalContext
from pipeline.evaluate import is_input_error, predict_belief_maps
from pipeline.training import TrainingDivergedError, open_caches, train_worker


def make_figures(model, val_cache, config, out_dir: Path, history: list[dict], count: int = 8,
                 search: int = 64) -> dict[str, Path]:
    """Learning curve; belief maps of one validation crop (a stage-1 left/right confusion fixed
    later, when one occurs among the first `search` crops); skeletons on `count` crops."""
    from pipeline.figures import (belief_maps_figure, learning_curve_figure, pick_confusion_example,
                                  skeleton_figure)

    paths = {"learning_curve": learning_curve_figure(history, out_dir / "learning_curve.png")}
    rows = np.arange(min(search, len(val_cache)))
    if len(rows) == 0:
        return paths
    data = val_cache.read(rows, keys=["images", "joints"])
    device = next(model.parameters()).device
    images = torch.from_numpy(data["images"]).to(device).permute(0, 3, 1, 2).float() / 255.0
    model.eval()
    maps = predict_belief_maps(model, images, config.train.precision).cpu().numpy()  # (N, T, P+1, M, M)
    crop_xy, _ = decode_belief_maps(maps[:, :, :-1])  # (N, T, P, 2) crop pixels
    names = val_cache.joint_names
    pick = pick_confusion_example(crop_xy, data["joints"], names, flip_pairs=val_cache.flip_pairs)
    paths["belief_maps"] = belief_maps_figure(data["images"][pick], maps[pick], names, out_dir / "belief_maps.png",
                                              title=f"validation crop {int(rows[pick])}: belief maps per stage")
    shown = list(range(min(count, len(rows))))
    paths["skeletons"] = skeleton_figure([data["images"][i] for i in shown], [crop_xy[i, -1] for i in shown], names,
                                         out_dir / "skeletons.png", ground_truth=[data["joints"][i] for i in shown],
                                         titles=[f"val {int(rows[i])}" for i in shown])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.fit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--data", default=None, help="data spec (overrides data.spec), e.g. lspet:/data/lspet")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, data=args.data)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml())
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:  # a fresh run: do not mix with an earlier run's rows or checkpoints
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "config.yaml").write_text(config.to_yaml())
    # Two newest (plus the best) as Ray's num_to_keep=2: a corrupt newest one leaves one to resume from.
    ctx = LocalContext(out, device=args.device, resume=args.resume, keep_checkpoints=2)
    print(f"{config.name}: data {config.data.spec}, {config.model.stages} stages, input "
          f"{config.preprocess.input_size} px, device {ctx.device}, torch threads {torch.get_num_threads()}", flush=True)
    start = time.perf_counter()
    try:
        result = train_worker(config, ctx, progress=not args.quiet)
    except TrainingDivergedError as exc:  # not bad input, and no traceback would say more
        print(f"error: {exc}; the checkpoints in {out} hold the epochs before it", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - bad input becomes one line and exit status 2
        if is_input_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    elapsed = time.perf_counter() - start

    best_dir = ctx.best_checkpoint_dir()
    if best_dir is not None:  # through a temp file: an earlier best.pt stays whole until replaced
        copy_durably(best_dir / CHECKPOINT_FILE, out / "best.pt")
    summary = {"name": config.name, "best_epoch": result["best_epoch"], "best_val_pck": result["best_pck"],
               "wall_time_s": elapsed, **(result.get("test") or {})}
    if not args.no_figures and result["history"]:
        caches = open_caches(config, ctx, ("val",), progress=False)
        paths = make_figures(result["model"], caches["val"], config, out, result["history"])
        summary["figures"] = {k: str(v) for k, v in paths.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"best epoch {result['best_epoch']}: val PCK@0.2 {100 * result['best_pck']:.1f}%"
          + (f", test PCK@0.2 {100 * result['test']['test_pck']:.1f}%" if result.get("test") else "")
          + f"; {elapsed / 60:.1f} min; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
