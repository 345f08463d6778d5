"""Train one CPM in this process.

    cpm-fit --config synthetic_tiny --out runs/tiny      # or: python -m pipeline.fit ...
    cpm-fit --config lspet_cpu --data lspet:/data/lspet --out runs/lspet [--resume]
    cpm-fit --print-config                                # the resolved `default` preset

Prints one row per epoch. Writes into --out (default: runs/PRESET_NAME in the working
directory, e.g. runs/synthetic_tiny): config.yaml, metrics.jsonl (one JSON row per epoch,
then the test row), checkpoints/epoch_NNNN/checkpoint.pt (the two newest and the best), best.pt (the
best epoch by validation PCK@0.2, or PCKh@0.5 for MPII), summary.json, gradients.json (gradient
magnitudes per stage and per convolution at a few steps of every epoch), and the figures learning_curve.png,
belief_maps.png (a validation crop's maps at every stage) and skeletons.png. Checkpoints and
best.pt are written through temp names, fsynced, then renamed; --resume takes the newest
checkpoint that loads (a corrupt newest one falls back to the previous kept one, with a warning).
--no-test leaves the test split unread, for runs that choose between recipes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from cpm_model.config import add_config_arguments
from cpm_model.durable import copy_durably
from pipeline.cli import check_data_spec, config_from_args, report_input_errors
from pipeline.redaction import public_config
from pipeline.tracking.fit_tracker import FitTracker
from pipeline.train.checkpoint import CHECKPOINT_FILE
from pipeline.train.context import LocalContext
from pipeline.train.gradients import write_gradients_file
from pipeline.train.inference import confusion_example
from pipeline.train.loop import TrainingDivergedError, train_worker

DEFAULT_RUNS_DIR = "runs"  # --out's default parent, in the working directory


def make_figures(model, val_cache, config, out_dir: Path, history: list[dict], count: int = 8) -> dict[str, Path]:
    """Learning curve; belief maps of one validation crop (a stage-1 left/right confusion fixed
    later, when one occurs among the first crops); skeletons on `count` crops."""
    from pipeline.figures import belief_maps_figure, learning_curve_figure, skeleton_figure

    paths = {"learning_curve": learning_curve_figure(history, out_dir / "learning_curve.png")}
    example = confusion_example(model, val_cache, config.train.precision)
    rows = example["rows"]
    if len(rows) == 0:
        return paths
    pick, names = example["pick"], val_cache.joint_names
    paths["belief_maps"] = belief_maps_figure(example["images"][pick], example["belief_maps"][pick], names,
                                              out_dir / "belief_maps.png",
                                              title=f"validation crop {int(rows[pick])}: belief maps per stage")
    shown = list(range(min(count, len(rows))))
    paths["skeletons"] = skeleton_figure([example["images"][i] for i in shown],
                                         [example["crop_xy"][i, -1] for i in shown], names, out_dir / "skeletons.png",
                                         ground_truth=[example["joints"][i] for i in shown],
                                         titles=[f"val {int(rows[i])}" for i in shown])
    return paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cpm-fit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--data", default=None, help="data spec (overrides data.spec), e.g. lspet:/data/lspet")
    parser.add_argument("--out", default=None,
                        help=f"output directory (default: {DEFAULT_RUNS_DIR}/NAME, NAME the config's name)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--no-test", action="store_true",
                        help="do not score the test split (for runs that choose between recipes)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--track", action="store_true",
                        help="log the run to MLflow like a sweep's trial (tracking.tracking_uri, else "
                        "MLFLOW_TRACKING_URI, else the embedded SQLite store)")
    parser.add_argument("--tracking-uri", default=None, help="log the run to this MLflow store (implies --track)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_input_errors(lambda: fit(args))


def fit(args) -> int:
    config = config_from_args(args)
    public = public_config(config)  # what is printed, written and logged; only the tracker connects
    if args.print_config:
        print(public.to_yaml())
        return 0
    check_data_spec(config)
    out = Path(args.out) if args.out else Path(DEFAULT_RUNS_DIR) / config.name
    out.mkdir(parents=True, exist_ok=True)
    # The store is checked before an earlier run's files in `out` are cleared.
    tracker = FitTracker(config.tracking.tracking_uri, public, out, args.resume) \
        if args.track or args.tracking_uri else None
    if not args.resume:  # a fresh run: do not mix with an earlier run's rows or checkpoints
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "config.yaml").write_text(public.to_yaml())
    # Two newest (plus the best) as Ray's num_to_keep=2: a corrupt newest one leaves one to resume from.
    # A bar on a terminal; in a log (no terminal) a line about once a minute, for long epochs only.
    ctx = LocalContext(out, device=args.device, resume=args.resume, keep_checkpoints=2,
                       progress=None if args.quiet else "bar" if sys.stderr.isatty() else "line",
                       on_report=tracker.on_report if tracker else None)
    print(f"{config.name}: data {config.data.spec}, {config.model.stages} stages, input "
          f"{config.preprocess.input_size} px, device {ctx.device}, torch threads {torch.get_num_threads()}", flush=True)
    start = time.perf_counter()
    try:
        result = train_worker(config, ctx, progress=not args.quiet, score_test=not args.no_test)
    except TrainingDivergedError as exc:  # not bad input, and no traceback would say more
        print(f"error: {exc}; the checkpoints in {out} hold the epochs before it", file=sys.stderr)
        if tracker:
            print(tracker.finish("FAILED", [out / "metrics.jsonl"], None), flush=True)
        return 1
    elapsed = time.perf_counter() - start

    best_dir = ctx.best_checkpoint_dir()
    if best_dir is not None:  # through a temp file: an earlier best.pt stays whole until replaced
        copy_durably(best_dir / CHECKPOINT_FILE, out / "best.pt")
    summary = {"name": config.name, "metric": result["protocol"].name, "best_epoch": result["best_epoch"],
               "best_val_pck": result["best_score"],
               "wall_time_s": elapsed, **(result["test"] or {})}
    if not args.no_figures and result["history"]:
        paths = make_figures(result["model"], result["val_cache"], config, out, result["history"])
        summary["figures"] = {k: str(v) for k, v in paths.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    write_gradients_file(result["model"], result["gradients"], out)
    protocol = result["protocol"]
    label = protocol.label.split(" ")[0]
    print(f"best epoch {result['best_epoch']}: val {label} {100 * result['best_score']:.1f}%"
          + (f", test {label} {100 * result['test']['test_' + protocol.name]:.1f}%" if result["test"] else "")
          + f"; {elapsed / 60:.1f} min; wrote {out}", flush=True)
    if tracker:
        files = [out / "summary.json", out / "metrics.jsonl", *map(Path, summary.get("figures", {}).values())]
        print(tracker.finish("FINISHED", files, out / "best.pt"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
