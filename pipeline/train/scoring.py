"""Scoring a model's predictions: PCK counts over batches, the flat metrics every row reports, the
`--json` report and its text table, and the mean-pose baseline.

The protocol (shared by validation, the test split and `pipeline.evaluate`): every stage's belief
maps are decoded (arg-max with sub-pixel refinement), mapped back to ORIGINAL image pixels through
the cache's crop -> original affine, and scored against the original annotation under the dataset's
protocol (its entry in `preprocessing.datasets.registry`): LSP's PCK@0.2 with the torso normaliser (left shoulder -
right hip, else the other diagonal), or MPII's PCKh@0.5 with the head size (0.6 x the head box's
diagonal); samples without the normaliser are left out and counted. Evaluation crops use no ground
truth (see preprocessing.crops).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from cpm_model.metrics import PCKCounts
from pipeline.formatting import percent
from pipeline.train import metric_names as names
from pipeline.train.inference import decode_all_stages, predict_crops

TEST_CURVE_ALPHAS = [round(0.05 * i, 2) for i in range(11)]  # 0 to 0.5, a subset of PCK_CURVE_ALPHAS


def protocol_for(config) -> names.Protocol:
    """The scoring protocol of a config's dataset (its first, for a '+' spec; its registry entry's)."""
    from preprocessing.spec import first_kind

    return first_kind(config.data.spec).protocol


def summarize(counts: PCKCounts, joint_names: Sequence[str], protocol: names.Protocol = names.PCK,
              prefix: str = "") -> dict:
    """Flat metrics, with the protocol's name (pck or pckh) and `prefix`: {name} (last stage at the
    protocol's alpha), {name}_stage{t}, {name}_{joint}, {name}@{strict alpha}, auc."""
    metric, alpha = protocol.name, protocol.alpha
    out = {f"{prefix}{metric}": counts.mean(-1, alpha)}
    for t in range(counts.correct.shape[0]):
        out[names.pck_stage_key(t + 1, prefix, metric)] = counts.mean(t, alpha)
    for name, value in zip(joint_names, counts.per_joint(-1, alpha)):
        out[f"{prefix}{metric}_{name}"] = float(value)
    out[f"{prefix}{metric}@{protocol.strict_alpha}"] = counts.mean(-1, protocol.strict_alpha)
    out[f"{prefix}auc"] = counts.auc(-1)
    return out


def report_dict(counts: PCKCounts, joint_names: Sequence[str], protocol: names.Protocol = names.PCK) -> dict:
    """The --json report, keys named by the protocol (pck or pckh): {name}, {name}_per_joint,
    {name}_per_stage, {name}@{strict}, auc, counts; "metric" is the protocol's name."""
    stages, m, alpha, strict = counts.correct.shape[0], protocol.name, protocol.alpha, protocol.strict_alpha
    return {
        "metric": m,
        m: counts.mean(-1, alpha),
        f"{m}_per_joint": {name: _nan_to_none(v) for name, v in zip(joint_names, counts.per_joint(-1, alpha))},
        f"{m}_per_stage": [counts.mean(t, alpha) for t in range(stages)],
        f"{m}@{strict}": counts.mean(-1, strict),
        f"{m}@{strict}_per_stage": [counts.mean(t, strict) for t in range(stages)],
        "auc": counts.auc(-1),
        f"{m}_per_joint_per_stage": [[_nan_to_none(v) for v in counts.per_joint(t, alpha)] for t in range(stages)],
        "num_samples": counts.num_samples,
        "num_without_norm": counts.num_without_norm,
        "joint_names": list(joint_names),
    }


def _nan_to_none(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def format_table(report: dict) -> str:
    """Per-joint PCK (or PCKh) by stage (rows = joints), then the means, the strict threshold and AUC."""
    protocol = names.PROTOCOLS[report.get("metric", names.PCK.name)]
    m, strict = protocol.name, protocol.strict_alpha
    stages = len(report[f"{m}_per_stage"])
    header = f"{'joint':<16}" + "".join(f"{'stage ' + str(t + 1):>9}" for t in range(stages))
    without = "a torso normaliser" if protocol.normaliser == "torso" else "a head box"
    lines = [f"{protocol.label}, {report['num_samples']} samples ({report['num_without_norm']} without {without}, "
             f"not scored)", header]
    for j, name in enumerate(report["joint_names"]):
        cells = "".join(f"{percent(report[f'{m}_per_joint_per_stage'][t][j]):>9}" for t in range(stages))
        lines.append(f"{name:<16}{cells}")
    lines.append(f"{'mean':<16}" + "".join(f"{percent(v):>9}" for v in report[f"{m}_per_stage"]))
    label = protocol.label.split(" ")[0]
    lines.append(f"{label.split('@')[0]}@{strict} {percent(report[f'{m}@{strict}'])}   AUC(0-0.5) {percent(report['auc'])}   "
                 f"{label} {percent(report[m])} (last stage)")
    return "\n".join(lines)


def curve_metrics(counts: PCKCounts, protocol: names.Protocol = names.PCK) -> dict:
    """A coarse PCK curve of the last stage as metrics, so a report can draw it from MLflow alone."""
    return {names.test_curve_key(alpha, protocol.name): counts.mean(-1, alpha) for alpha in TEST_CURVE_ALPHAS}


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable[dict], num_stages: int, num_parts: int,
                     precision: str = "fp32", flip_permutation=None, scales=None,
                     keep_maps_of: int | None = None, normaliser: str = "torso",
                     refine_context: float | None = None) -> tuple[PCKCounts, dict]:
    """PCK counts of this rank's batches (not yet reduced over ranks); with `refine_context`, of
    the second pass (re-crops around the first pass's predictions, `inference.predict_two_pass`).

    Returns (counts, extras) with extras["predictions"] (N, T, P, 2) original pixels and, when
    keep_maps_of is a cache row index, extras["example"] holding that sample's image and maps.
    """
    was_training = model.training
    model.eval()
    counts = PCKCounts(num_stages, num_parts)
    predictions, rows, example = [], [], None
    try:
        for batch in batches:
            maps, to_original, seen = predict_crops(model, batch["images"], batch["affine"].numpy(), precision,
                                                    flip_permutation, scales, refine_context)
            maps_np = maps.cpu().numpy()
            coords = decode_all_stages(maps_np, to_original)
            counts.add(coords, batch["joints_original"].numpy(), batch[normaliser].numpy())
            predictions.append(coords)
            rows.append(batch["index"].numpy())
            if keep_maps_of is not None and example is None:
                hit = np.flatnonzero(batch["index"].numpy() == keep_maps_of)
                if hit.size:
                    i = int(hit[0])
                    example = {"image": seen[i].permute(1, 2, 0).cpu().numpy(),
                               "belief_maps": maps_np[i], "index": keep_maps_of}
    finally:
        model.train(was_training)
    extras = {"predictions": np.concatenate(predictions) if predictions else np.zeros((0, num_stages, num_parts, 2)),
              "rows": np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64), "example": example}
    return counts, extras


def mean_pose_counts(train_cache, eval_cache, rows: np.ndarray | None = None, batch_size: int = 256,
                     normaliser: str = "torso") -> tuple[PCKCounts, np.ndarray]:
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
        data = eval_cache.read(rows[start:start + batch_size], keys=["affine", "joints_original", normaliser])
        affine = data["affine"]
        original = np.einsum("nij,pj->npi", affine[..., :2], mean_xy) + affine[:, None, :, 2]
        counts.add(original[:, None], data["joints_original"], data[normaliser])
    return counts, mean_xy
