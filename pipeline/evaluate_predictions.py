"""`pipeline.evaluate --predictions FILE --data lsp:PATH`: score predictions made anywhere on LSP.

Scored with the CPM authors' LSP benchmark protocol (cpm_model.lsp_benchmark: every joint, left
shoulder - right hip normaliser, inclusive threshold, total over all joints), beside this
project's standard PCK@0.2 (cpm_model.metrics) where the two differ. Only joints.mat is read.
"""

from __future__ import annotations

import math

import numpy as np

from cpm_model.joints import LSP, torso_size
from cpm_model.lsp_benchmark import BENCHMARK_ALPHA, PAPER_GROUPS, score_benchmark
from cpm_model.metrics import pck
from pipeline.cli import UsageError
from pipeline.formatting import percent
from pipeline.prediction_files import read_predictions


def lsp_root(spec: str | None) -> str:
    """PATH of an `lsp:PATH` data spec, or UsageError (the benchmark is LSP's)."""
    if not spec or not spec.startswith("lsp:") or not spec[4:]:
        raise UsageError(f"--predictions is scored on the original LSP: give --data lsp:PATH "
                         f"(the directory holding joints.mat), got {spec!r}")
    return spec[4:]


def check_shape(predictions: np.ndarray, expected: tuple[int, int], path, split: str) -> None:
    """UsageError naming both numbers when the joints per image or the images differ from the split."""
    images, joints = predictions.shape[:2]
    if joints != expected[1]:
        raise UsageError(f"--predictions {path}: {joints} joints per image, the lsp {split} split has "
                         f"{expected[1]} (LSP order)")
    if images != expected[0]:
        raise UsageError(f"--predictions {path}: {images} images, the lsp {split} split has {expected[0]}")


def score_prediction_file(path: str, spec: str, split: str, one_based: bool = False) -> dict:
    """The --json report of a prediction file scored on an LSP split."""
    from preprocessing.datasets.lsp import read_lsp_split_annotations

    joints, _, _ = read_lsp_split_annotations(lsp_root(spec), split)
    predictions, kind = read_predictions(path)
    check_shape(predictions, joints.shape[:2], path, split)
    if one_based:
        predictions = predictions - 1.0
    report = benchmark_report(predictions, joints)
    report.update({"predictions": str(path), "format": kind, "one_based": one_based, "data": spec, "split": split})
    return report


def benchmark_report(predictions: np.ndarray, joints: np.ndarray) -> dict:
    """Benchmark and standard figures for predictions (N, 14, 2) and joints (N, 14, 3)."""
    score = score_benchmark(predictions, joints[:, :, :2])
    norm = torso_size(joints, LSP)
    standard_per_joint, standard = pck(predictions, joints[:, :, :2], joints[:, :, 2] > 0, norm, BENCHMARK_ALPHA)
    per_joint = score.per_joint
    differs = not np.allclose(per_joint, standard_per_joint, rtol=0, atol=1e-12, equal_nan=False)
    return {
        "metric": "pck",
        "protocol": "lsp-benchmark",
        "alpha": BENCHMARK_ALPHA,
        "pck": score.total,
        "pck_per_joint": dict(zip(LSP.names, map(float, per_joint))),
        "pck_per_group": score.groups(),
        "num_samples": int(len(joints)),
        "missing": int(score.missing.sum()),
        "missing_per_joint": dict(zip(LSP.names, map(int, score.missing))),
        "standard_pck": _none_if_nan(standard),
        "standard_pck_per_joint": {n: _none_if_nan(v) for n, v in zip(LSP.names, standard_per_joint)},
        "standard_num_without_norm": int(np.sum(~(norm > 0))),
        "standard_differs": bool(differs),
        "joint_names": list(LSP.names),
    }


def _none_if_nan(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def format_benchmark(report: dict) -> str:
    """Per joint (with the standard protocol's column where it differs), the paper's groups, the total."""
    differs = report["standard_differs"]
    lines = [f"LSP benchmark PCK@{report['alpha']} (the CPM release's protocol), lsp {report.get('split', '')} split: "
             f"{report['num_samples']} images, {report['missing']} predicted joints missing (counted wrong)",
             f"{'joint':<16}{'benchmark':>10}" + (f"{'standard':>10}" if differs else "")]
    for name in report["joint_names"]:
        row = f"{name:<16}{percent(report['pck_per_joint'][name], 2):>10}"
        lines.append(row + (f"{percent(report['standard_pck_per_joint'][name], 2):>10}" if differs else ""))
    groups = "  ".join(f"{group} {percent(report['pck_per_group'][group], 2)}" for group, _ in PAPER_GROUPS)
    lines.append(f"paper's columns: {groups}")
    lines.append(f"total {percent(report['pck'], 2)}")
    if differs:
        lines.append(f"standard PCK@{report['alpha']} {percent(report['standard_pck'], 2)} (torso fallback; "
                     f"{report['standard_num_without_norm']} images without a torso left out)")
    return "\n".join(lines)


def check_alone(args) -> None:
    """--predictions scores a file: a model to score as well is a contradiction."""
    given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--run-id", args.run_id),
                                      ("--model", args.model), ("--baseline", args.baseline)) if value]
    if given:
        raise UsageError(f"give --predictions or {' / '.join(given)}, not both")


__all__ = ["benchmark_report", "check_alone", "check_shape", "format_benchmark", "lsp_root", "score_prediction_file"]
