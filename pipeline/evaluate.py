"""Score a checkpoint (or the mean-pose baseline) on a cache split: PCK per joint and per stage.

    python -m pipeline.evaluate --checkpoint CKPT --data SPEC [--split test|val|train|all]
        [--flip] [--scales 0.8,1.0,1.2] [--refine] [--json FILE] [--figure PNG]
    python -m pipeline.evaluate --model models:/NAME/VERSION --data SPEC     # a model a sweep logged
    python -m pipeline.evaluate --baseline mean-pose --data SPEC [--config PRESET] [--json FILE]
    python -m pipeline.evaluate --predictions FILE --data lsp:PATH [--split test] [--json FILE]

--predictions scores joints predicted anywhere (the CPM release's .mat, or .npz/.npy/.json/.csv:
pipeline.prediction_files) with the authors' LSP benchmark protocol (cpm_model.lsp_benchmark),
reading only joints.mat; `pck` in --json is that protocol's total.

The protocol is validation's (pipeline.train.scoring): every stage decoded, mapped back to
original pixels, scored with the torso normaliser; evaluation crops use no ground truth. The
whole split is scored (a run's sample caps do not apply) unless --max-samples.

Test-time options: --flip averages the maps of the crop and of its mirror image (maps flipped
back, left/right parts swapped); --scales runs the crop zoomed about its centre by each factor,
resamples each stage's maps back onto the unzoomed grid and averages them (the paper's scale search);
--refine re-crops each crop around its own first prediction and scores the second pass
(cpm_model.recrop; on by default for a checkpoint trained with train.eval_refine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from cpm_model.config import add_config_arguments
from cpm_model.joints import flip_permutation
from cpm_model.metrics import PCKCounts
from pipeline.cli import UsageError, config_from_args, report_input_errors, with_overrides
from pipeline.evaluate_predictions import check_alone, format_benchmark, score_prediction_file
from pipeline.train.batches import scoring_batches
from pipeline.train.caches import open_split_caches
from pipeline.train.inference import build_model, refine_context
from pipeline.train.scoring import evaluate_batches, format_table, mean_pose_counts, protocol_for, report_dict

SPLIT_CHOICES = ("test", "val", "train", "all")


def parse_scales(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--scales must be comma-separated numbers, e.g. 0.8,1.0,1.2; got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise UsageError(f"--scales must be positive numbers, got {text!r}")
    return scales


def check_counts(args) -> None:
    """--batch-size and --max-samples are counts: 0 or less would score nothing (or drop samples)."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError(f"--max-samples must be an integer >= 1 (or left out for all samples), got {args.max_samples}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cpm-evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint file (checkpoint.pt / best.pt) or its directory")
    parser.add_argument("--run-id", default=None, help="score an MLflow trial run's best checkpoint instead")
    parser.add_argument("--model", default=None, help="score an MLflow model a sweep logged instead: "
                        "models:/NAME/VERSION or runs:/RUN_ID/model")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for --run-id and --model "
                        "(default: MLFLOW_TRACKING_URI or the embedded SQLite store)")
    parser.add_argument("--baseline", choices=["mean-pose"], help="score a baseline instead of a checkpoint")
    parser.add_argument("--predictions", default=None, help="score a prediction file (.mat of the CPM release, "
                        ".npz, .npy, .json, .csv) with the LSP benchmark protocol; needs --data lsp:PATH")
    parser.add_argument("--one-based", action="store_true", help="with --predictions: subtract 1 from every "
                        "predicted coordinate (MATLAB pixel indices -> this project's frame)")
    parser.add_argument("--data", help="data spec, e.g. lspet:/data/lspet (default: the checkpoint's)")
    parser.add_argument("--split", default="test", choices=SPLIT_CHOICES)
    parser.add_argument("--flip", action="store_true", help="average with the mirrored crop (parts swapped)")
    parser.add_argument("--scales", default=None, help="scale search, e.g. 0.8,1.0,1.2")
    parser.add_argument("--refine", action="store_true", help="predict twice: re-crop around the first "
                        "prediction (= --set train.eval_refine=true)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", default=None, help="override data.cache_dir")
    parser.add_argument("--max-samples", type=int, default=None, help="score only the first N samples")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--figure", default=None, help="save the belief maps of the first sample per stage here (PNG)")
    parser.add_argument("--precision", default=None, choices=["auto", "bf16", "fp32"])
    parser.add_argument("--quiet", action="store_true")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_input_errors(lambda: show(run(args), args))


def show(report: dict, args) -> int:
    if not args.quiet:
        print(format_benchmark(report) if report.get("protocol") == "lsp-benchmark" else format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def run(args) -> dict:
    """The report dict of what the arguments ask to score."""
    if args.predictions:
        check_alone(args)
        return score_prediction_file(args.predictions, args.data, args.split, args.one_based)
    scales = parse_scales(args.scales)
    check_counts(args)
    given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--run-id", args.run_id),
                                      ("--model", args.model), ("--baseline", args.baseline)) if value]
    if len(given) > 1:
        raise UsageError(f"give one of --checkpoint, --run-id, --model and --baseline, not {' and '.join(given)}")
    if args.baseline is None and not (args.checkpoint or args.run_id or args.model):
        raise UsageError("give --checkpoint CKPT, --run-id RUN, --model URI or --baseline mean-pose")
    checkpoint = None if args.baseline else load_given_checkpoint(args)
    config = config_from_args(args) if args.baseline else with_overrides(checkpoint["config"], args.overrides)
    config = with_overrides(config, [], data__spec=args.data, data__cache_dir=args.cache_dir,
                            train__eval_refine=True if args.refine else None)
    caches = open_split_caches(config, args.split, not args.quiet, args.max_samples)
    if args.baseline == "mean-pose":
        return score_mean_pose(config, caches, progress=not args.quiet)
    report = score_checkpoint(config, checkpoint, caches, args, scales)
    report.update({"checkpoint": checkpoint_source(args), "data": config.data.spec, "split": args.split,
                   "flip": bool(args.flip), "scales": scales or [1.0], "refine": config.train.eval_refine})
    return report


def checkpoint_source(args) -> str:
    """What the scored checkpoint is, as the user named it (a download's temporary path is not)."""
    return args.checkpoint or args.model or f"best of run {args.run_id}"


def load_given_checkpoint(args) -> dict:
    """The checkpoint --checkpoint, --model or --run-id names; a downloaded one is loaded and its
    temporary directory removed."""
    from pipeline.train.checkpoint import load_checkpoint

    if args.checkpoint:
        return load_checkpoint(args.checkpoint)
    from pipeline.tracking.pose_model import best_checkpoint_of_run, checkpoint_of_model

    with tempfile.TemporaryDirectory(prefix="cpm-model-") as download_dir:
        path = (checkpoint_of_model(args.model, args.tracking_uri, download_dir) if args.model
                else best_checkpoint_of_run(args.run_id, args.tracking_uri, download_dir))
        return load_checkpoint(path)


def score_mean_pose(config, caches: list, progress: bool) -> dict:
    # The mean is taken over TRAIN crops made like evaluation crops (no ground truth), so the
    # baseline sits in the same frame as the crops it is scored on.
    baseline_config = config.with_overrides({"preprocess.train_crop": "image"})
    train_cache = open_split_caches(baseline_config, "train", progress)[0]
    protocol = protocol_for(config)
    total = PCKCounts(1, len(caches[0].joint_names))
    for cache in caches:
        total = total + mean_pose_counts(train_cache, cache, normaliser=protocol.normaliser)[0]
    return report_dict(total, caches[0].joint_names, protocol)


def score_checkpoint(config, checkpoint: dict, caches: list, args, scales) -> dict:
    from pipeline.train.checkpoint import load_model_state

    joint_names = caches[0].joint_names
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config, len(joint_names))
    load_model_state(model, checkpoint["model"], f"checkpoint {checkpoint_source(args)}")
    model.to(device).to(memory_format=torch.channels_last).eval()
    permutation = flip_permutation(len(joint_names), caches[0].flip_pairs) if args.flip else None
    precision = args.precision or config.train.precision
    total, example = PCKCounts(model.stages, len(joint_names)), None
    for cache in caches:
        batches = scoring_batches(cache, args.batch_size, 0, 1, device)
        counts, extras = evaluate_batches(model, batches, model.stages, len(joint_names), precision,
                                          permutation, scales, keep_maps_of=0 if example is None else None,
                                          normaliser=protocol_for(config).normaliser,
                                          refine_context=refine_context(config))
        example = example or extras["example"]
        total = total + counts
    if args.figure and example is not None:
        from pipeline.figures import belief_maps_figure

        belief_maps_figure(example["image"], example["belief_maps"], joint_names, args.figure)
    return report_dict(total, joint_names, protocol_for(config))


if __name__ == "__main__":
    sys.exit(main())
