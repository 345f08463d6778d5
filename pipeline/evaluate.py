"""Score a checkpoint (or the mean-pose baseline) on a cache split: PCK per joint and per stage.

    python -m pipeline.evaluate --checkpoint CKPT --data SPEC [--split test|val|train|all]
        [--flip] [--scales 0.8,1.0,1.2] [--json FILE] [--figure PNG]
    python -m pipeline.evaluate --baseline mean-pose --data SPEC [--config FILE] [--json FILE]

Protocol (shared with the validation inside training): every stage's belief maps are decoded
(arg-max with sub-pixel refinement), mapped back to ORIGINAL image pixels through the cache's
crop -> original affine, and scored against the original annotation with the torso normaliser
(left shoulder - right hip, else the other diagonal; samples with neither are left out and
counted). Evaluation crops use no ground truth (see preprocessing.crops).

Test-time options: --flip averages the maps of the crop and of its mirror image (maps flipped
back, left/right parts swapped); --scales runs the crop zoomed about its centre by each factor,
resamples each stage's maps back onto the unzoomed grid and averages them (the paper's scale search).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from cpm_model import metrics as pck_metrics
from cpm_model.augment import scale_about_centre_affines, warp
from cpm_model.config import ConfigError, ExperimentConfig
from cpm_model.model import CPM

# PCK thresholds for the curve and its area (alpha in [0, 0.5], LSP convention).
PCK_CURVE_ALPHAS = np.round(np.linspace(0.0, 0.5, 51), 4)
PCK_ALPHA = 0.2
PCK_ALPHA_STRICT = 0.1
SPLIT_CHOICES = ("test", "val", "train", "all")


# --- model and precision ----------------------------------------------------------------------

def build_model(config: ExperimentConfig, num_parts: int) -> CPM:
    """The CPM of a config (input size from the preprocessing section)."""
    return CPM.from_config(config.model, num_parts=num_parts, input_size=config.preprocess.input_size)


def use_bf16(precision: str, device: torch.device) -> bool:
    """'auto': bf16 autocast on CPU (faster on these CPUs) and on CUDA devices that support it."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def autocast(precision: str, device: torch.device):
    if use_bf16(precision, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- prediction -----------------------------------------------------------------------------

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


def decode_all_stages(belief_maps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Belief maps (N, T, P+1, M, M) -> part locations (N, T, P, 2) in ORIGINAL image pixels."""
    belief_maps = np.asarray(belief_maps, dtype=np.float32)
    return np.stack([pck_metrics.decode_predictions(belief_maps[:, t], affine)
                     for t in range(belief_maps.shape[1])], axis=1)


# --- scoring ----------------------------------------------------------------------------------

class PCKCounts:
    """Correct / total counts per stage, threshold and joint; summed over batches and ranks.

    Packed into one flat float64 array (`to_array` / `from_array`) for WorkerContext.all_reduce_sum.
    """

    def __init__(self, num_stages: int, num_parts: int, alphas: np.ndarray = PCK_CURVE_ALPHAS):
        self.alphas = np.asarray(alphas, dtype=np.float64)
        self.correct = np.zeros((num_stages, len(self.alphas), num_parts))
        self.total = np.zeros((num_stages, len(self.alphas), num_parts))
        self.num_samples = 0
        self.num_without_norm = 0

    def add(self, predictions: np.ndarray, joints_original: np.ndarray, norm: np.ndarray) -> None:
        """predictions (N, T, P, 2) original pixels; joints_original (N, P, 3); norm (N,) (NaN = none)."""
        predictions = np.asarray(predictions, dtype=np.float64)
        joints_original = np.asarray(joints_original, dtype=np.float64)
        norm = np.asarray(norm, dtype=np.float64)
        has_norm = np.isfinite(norm) & (norm > 0)
        self.num_samples += len(norm)
        self.num_without_norm += int((~has_norm).sum())
        if not has_norm.any():
            return
        gt = joints_original[has_norm, :, :2]
        visible = joints_original[has_norm, :, 2] > 0
        for t in range(predictions.shape[1]):
            correct, total = pck_metrics.pck_curve_counts(predictions[has_norm, t], gt, visible, norm[has_norm],
                                                          self.alphas)
            self.correct[t] += correct
            self.total[t] += total[None, :]

    def to_array(self) -> np.ndarray:
        return np.concatenate([self.correct.ravel(), self.total.ravel(),
                               [self.num_samples, self.num_without_norm]])

    def from_array(self, values: np.ndarray) -> "PCKCounts":
        values = np.asarray(values, dtype=np.float64)
        n = self.correct.size
        self.correct = values[:n].reshape(self.correct.shape)
        self.total = values[n:2 * n].reshape(self.total.shape)
        self.num_samples = int(round(values[2 * n]))
        self.num_without_norm = int(round(values[2 * n + 1]))
        return self

    def reduced(self, all_reduce_sum) -> "PCKCounts":
        """These counts summed over ranks (every rank must call this)."""
        out = PCKCounts(self.correct.shape[0], self.correct.shape[2], self.alphas)
        return out.from_array(all_reduce_sum(self.to_array()))

    def _alpha_index(self, alpha: float) -> int:
        index = int(np.argmin(np.abs(self.alphas - alpha)))
        if abs(self.alphas[index] - alpha) > 1e-9:
            raise ValueError(f"alpha {alpha} is not among the counted thresholds")
        return index

    def per_joint(self, stage: int, alpha: float) -> np.ndarray:
        """PCK per joint (P,) of stage `stage` (0-based; -1 = last); NaN for a joint never scored."""
        a = self._alpha_index(alpha)
        return pck_metrics.pck_from_counts(self.correct[stage, a], self.total[stage, a])[0]

    def mean(self, stage: int, alpha: float) -> float:
        """Mean over joints of the per-joint PCK (the LSP tables' mean), NaN when nothing was scored."""
        a = self._alpha_index(alpha)
        return float(pck_metrics.pck_from_counts(self.correct[stage, a], self.total[stage, a])[1])

    def curve(self, stage: int = -1) -> np.ndarray:
        """Mean PCK at every counted alpha."""
        return pck_metrics.pck_curve_from_counts(self.correct[stage], self.total[stage, 0])[1]

    def auc(self, stage: int = -1) -> float:
        """Area under the mean PCK curve over alpha in [0, 0.5], normalised to [0, 1]."""
        curve = self.curve(stage)
        if np.isnan(curve).all():
            return float("nan")
        return float(pck_metrics.auc_from_curve(self.alphas, curve))


def summarize(counts: PCKCounts, joint_names: Sequence[str], prefix: str = "") -> dict:
    """Flat metrics: pck (last stage @0.2), pck_stage{t}, pck_{joint}, pck@0.1, auc (+ prefix)."""
    stages = counts.correct.shape[0]
    out = {f"{prefix}pck": counts.mean(-1, PCK_ALPHA)}
    for t in range(stages):
        out[f"{prefix}pck_stage{t + 1}"] = counts.mean(t, PCK_ALPHA)
    for name, value in zip(joint_names, counts.per_joint(-1, PCK_ALPHA)):
        out[f"{prefix}pck_{name}"] = float(value)
    out[f"{prefix}pck@0.1"] = counts.mean(-1, PCK_ALPHA_STRICT)
    out[f"{prefix}auc"] = counts.auc(-1)
    return out


def report_dict(counts: PCKCounts, joint_names: Sequence[str]) -> dict:
    """The --json report: pck, pck_per_joint, pck_per_stage, pck@0.1, auc, counts."""
    stages = counts.correct.shape[0]
    return {
        "pck": counts.mean(-1, PCK_ALPHA),
        "pck_per_joint": {name: _nan_to_none(v) for name, v in zip(joint_names, counts.per_joint(-1, PCK_ALPHA))},
        "pck_per_stage": [counts.mean(t, PCK_ALPHA) for t in range(stages)],
        "pck@0.1": counts.mean(-1, PCK_ALPHA_STRICT),
        "pck@0.1_per_stage": [counts.mean(t, PCK_ALPHA_STRICT) for t in range(stages)],
        "auc": counts.auc(-1),
        "pck_per_joint_per_stage": [[_nan_to_none(v) for v in counts.per_joint(t, PCK_ALPHA)] for t in range(stages)],
        "num_samples": counts.num_samples,
        "num_without_norm": counts.num_without_norm,
        "joint_names": list(joint_names),
    }


def _nan_to_none(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def format_table(report: dict) -> str:
    """Per-joint PCK@0.2 by stage (rows = joints), then the means, PCK@0.1 and AUC."""
    stages = len(report["pck_per_stage"])
    header = f"{'joint':<16}" + "".join(f"{'stage ' + str(t + 1):>9}" for t in range(stages))
    lines = [f"PCK@0.2 (torso), {report['num_samples']} samples "
             f"({report['num_without_norm']} without a torso normaliser, not scored)", header]
    for j, name in enumerate(report["joint_names"]):
        cells = "".join(f"{_pct(report['pck_per_joint_per_stage'][t][j]):>9}" for t in range(stages))
        lines.append(f"{name:<16}{cells}")
    lines.append(f"{'mean':<16}" + "".join(f"{_pct(v):>9}" for v in report["pck_per_stage"]))
    lines.append(f"PCK@0.1 {_pct(report['pck@0.1'])}   AUC(0-0.5) {_pct(report['auc'])}   "
                 f"PCK@0.2 {_pct(report['pck'])} (last stage)")
    return "\n".join(lines)


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


# --- evaluating a model over batches -----------------------------------------------------------

@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable[dict], num_stages: int, num_parts: int,
                     precision: str = "fp32", flip_permutation=None, scales=None,
                     keep_maps_of: int | None = None) -> tuple[PCKCounts, dict]:
    """PCK counts of this rank's batches (not yet reduced over ranks).

    Returns (counts, extras) with extras["predictions"] (N, T, P, 2) original pixels and, when
    keep_maps_of is a cache row index, extras["example"] holding that sample's image and maps.
    """
    was_training = model.training
    model.eval()
    counts = PCKCounts(num_stages, num_parts)
    predictions, rows, example = [], [], None
    try:
        for batch in batches:
            maps = predict_belief_maps(model, batch["images"], precision, flip_permutation, scales)
            maps_np = maps.cpu().numpy()
            coords = decode_all_stages(maps_np, batch["affine"].numpy())
            counts.add(coords, batch["joints_original"].numpy(), batch["torso"].numpy())
            predictions.append(coords)
            rows.append(batch["index"].numpy())
            if keep_maps_of is not None and example is None:
                hit = np.flatnonzero(batch["index"].numpy() == keep_maps_of)
                if hit.size:
                    i = int(hit[0])
                    example = {"image": batch["images"][i].permute(1, 2, 0).cpu().numpy(),
                               "belief_maps": maps_np[i], "index": keep_maps_of}
    finally:
        model.train(was_training)
    extras = {"predictions": np.concatenate(predictions) if predictions else np.zeros((0, num_stages, num_parts, 2)),
              "rows": np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64), "example": example}
    return counts, extras


def mean_pose_counts(train_cache, eval_cache, rows: np.ndarray | None = None, batch_size: int = 256) -> tuple[PCKCounts, np.ndarray]:
    """The mean-pose baseline: every joint at its mean TRAIN-split crop position, mapped back
    through each evaluation sample's affine and scored by the same code as the model."""
    train_joints = train_cache.read(np.arange(len(train_cache)), keys=["joints"])["joints"].astype(np.float64)
    visible = train_joints[..., 2] > 0
    weights = visible[..., None].astype(np.float64)
    mean_xy = (train_joints[..., :2] * weights).sum(0) / np.maximum(weights.sum(0), 1)  # (P, 2)
    rows = np.arange(len(eval_cache)) if rows is None else rows
    num_parts = mean_xy.shape[0]
    counts = PCKCounts(1, num_parts)
    for start in range(0, len(rows), batch_size):
        data = eval_cache.read(rows[start:start + batch_size], keys=["affine", "joints_original", "torso"])
        affine = data["affine"]
        original = np.einsum("nij,pj->npi", affine[..., :2], mean_xy) + affine[:, None, :, 2]
        counts.add(original[:, None], data["joints_original"], data["torso"])
    return counts, mean_xy


# --- command line -----------------------------------------------------------------------------

class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


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


def open_split_caches(config: ExperimentConfig, split: str, progress: bool = True,
                      max_samples: int | None = None) -> list:
    """PoseCaches of a split ('all' = train, val and test), built if needed."""
    from preprocessing.build import EmptySplitError, build_cache
    from preprocessing.cache import PoseCache

    from preprocessing.datasets.base import DatasetError

    # A damaged cache stops the evaluation with the command that rebuilds it (not rebuilt here).
    if split != "all":
        return [PoseCache(build_cache(config.data.spec, split, config.preprocess, config.data.cache_dir,
                                      progress=progress, max_samples=max_samples, rebuild_damaged=False))]
    caches = []
    for part in ("train", "val", "test"):  # a small directory may leave a split empty
        try:
            caches.append(PoseCache(build_cache(config.data.spec, part, config.preprocess, config.data.cache_dir,
                                                progress=progress, max_samples=max_samples, rebuild_damaged=False)))
        except EmptySplitError:
            pass
    if not caches:
        raise DatasetError(f"data spec {config.data.spec!r} has no samples to evaluate")
    return caches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint file (checkpoint.pt / best.pt) or its directory")
    parser.add_argument("--run-id", default=None, help="score an MLflow trial run's best checkpoint instead")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for --run-id "
                        "(default: MLFLOW_TRACKING_URI or the embedded SQLite store)")
    parser.add_argument("--baseline", choices=["mean-pose"], help="score a baseline instead of a checkpoint")
    parser.add_argument("--data", help="data spec, e.g. lspet:/data/lspet (default: the checkpoint's)")
    parser.add_argument("--split", default="test", choices=SPLIT_CHOICES)
    parser.add_argument("--flip", action="store_true", help="average with the mirrored crop (parts swapped)")
    parser.add_argument("--scales", default=None, help="scale search, e.g. 0.8,1.0,1.2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", default=None, help="override data.cache_dir")
    parser.add_argument("--max-samples", type=int, default=None, help="score only the first N samples")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--figure", default=None, help="save the belief maps of the first sample per stage here (PNG)")
    parser.add_argument("--precision", default=None, choices=["auto", "bf16", "fp32"])
    parser.add_argument("--quiet", action="store_true")
    from cpm_model.config import add_config_arguments

    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - known bad-input errors become one line, exit 2
        if is_input_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    if not args.quiet:
        print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def is_input_error(exc: BaseException) -> bool:
    """Errors that describe bad input (file, config, data spec), reported as one line."""
    from pipeline.checkpoint import CheckpointError
    from preprocessing.datasets.base import DatasetError

    from pipeline.tracking import TrackingError

    return isinstance(exc, (CheckpointError, ConfigError, DatasetError, FileNotFoundError, UsageError,
                            TrackingError))


def run(args) -> dict:
    from cpm_model.config import load_config
    from pipeline.checkpoint import load_checkpoint, load_model_state
    from pipeline.data import CacheBatches, eval_batches

    scales = parse_scales(args.scales)
    check_counts(args)
    if getattr(args, "run_id", None):
        from pipeline.tracking import best_checkpoint_of_run

        args.checkpoint = str(best_checkpoint_of_run(args.run_id, args.tracking_uri))
    if args.baseline is None and not args.checkpoint:
        raise UsageError("give --checkpoint CKPT, --run-id RUN or --baseline mean-pose")
    if args.baseline:
        config = load_config(args.config, args.overrides)
        checkpoint = None
    else:
        checkpoint = load_checkpoint(args.checkpoint)
        config = checkpoint["config"]
        if args.overrides:
            config = config.with_overrides(dict(_parse(o) for o in args.overrides))
    overrides = {}
    if args.data:
        overrides["data.spec"] = args.data
    if args.cache_dir:
        overrides["data.cache_dir"] = args.cache_dir
    if overrides:
        config = config.with_overrides(overrides)
    progress = not args.quiet
    caches = open_split_caches(config, args.split, progress, args.max_samples)
    joint_names = caches[0].joint_names
    flip_pairs = caches[0].flip_pairs

    if args.baseline == "mean-pose":
        # The mean is taken over TRAIN crops made like evaluation crops (no ground truth), so the
        # baseline sits in the same frame as the crops it is scored on.
        baseline_config = config.with_overrides({"preprocess.train_crop": "image"})
        train_cache = open_split_caches(baseline_config, "train", progress)[0]
        total = PCKCounts(1, len(joint_names))
        for cache in caches:
            counts, _ = mean_pose_counts(train_cache, cache)
            total = total.from_array(total.to_array() + counts.to_array())
        return report_dict(total, joint_names)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config, len(joint_names))
    load_model_state(model, checkpoint["model"], f"checkpoint {args.checkpoint}")
    model.to(device).to(memory_format=torch.channels_last).eval()
    permutation = _flip_permutation(len(joint_names), flip_pairs) if args.flip else None
    precision = args.precision or config.train.precision
    total = PCKCounts(model.stages, len(joint_names))
    example = None
    for cache in caches:
        rows = np.arange(len(cache))
        batches = CacheBatches(cache, rows, eval_batches(len(rows), args.batch_size, 0, 1), device,
                               keys=["images", "affine", "joints_original", "torso"])
        counts, extras = evaluate_batches(model, batches, model.stages, len(joint_names), precision,
                                          permutation, scales, keep_maps_of=0 if example is None else None)
        example = example or extras["example"]
        total = total.from_array(total.to_array() + counts.to_array())
    report = report_dict(total, joint_names)
    report.update({"checkpoint": str(args.checkpoint), "data": config.data.spec, "split": args.split,
                   "flip": bool(args.flip), "scales": scales or [1.0]})
    if args.figure and example is not None:
        from pipeline.figures import belief_maps_figure

        belief_maps_figure(example["image"], example["belief_maps"], joint_names, args.figure)
    return report


def _parse(text: str):
    from cpm_model.config import parse_override

    return parse_override(text)


def _flip_permutation(num_parts: int, flip_pairs) -> list[int]:
    permutation = list(range(num_parts))
    for a, b in flip_pairs:
        permutation[a], permutation[b] = b, a
    return permutation


if __name__ == "__main__":
    sys.exit(main())
