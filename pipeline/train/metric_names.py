"""The names of the metrics a training run reports: one home for every key the loop writes and
the tracking, printing and reporting code reads.

An epoch row carries `train_loss`; summary rows (the test split, the artifacts) do not.
"""

from __future__ import annotations

import re

from cpm_model.metrics import PCK, PCKH, PROTOCOLS, Protocol  # noqa: F401  (read from here by the rest)


def protocol_of(dataset_kind: str) -> Protocol:
    """The scoring protocol of a registered dataset kind (PCKh@0.5 for MPII, the torso PCK@0.2 for
    LSP, LSPET and the synthetic set); DatasetError naming the known kinds for any other."""
    from preprocessing.datasets.registry import kind_named  # here: naming metrics needs no reader

    return kind_named(dataset_kind).protocol


EPOCH = "epoch"
TRAIN_LOSS = "train_loss"  # the key that marks an epoch row
BEST_EPOCH = "best_epoch"
BEST_PREFIX = "best_"  # best_{key}: the value of {key} at the best epoch
TEST_PREFIX = "test_"

RESENT = "resent"  # on a row a restored worker sends again (1): its epoch was reported before

# The row a trial driver adds after its Train run: where its artifacts and best checkpoint are.
ARTIFACTS_DIR = "artifacts_dir"
BEST_CHECKPOINT_DIR = "best_checkpoint_dir"

_STAGE_KEY = re.compile(r"^(?P<prefix>.*?)(?P<metric>pckh?)_stage(?P<stage>\d+)$")


def is_epoch_row(metrics: dict) -> bool:
    return TRAIN_LOSS in metrics


def pck_stage_key(stage: int, prefix: str = "", metric: str = PCK.name) -> str:
    """The key of stage `stage`'s (1-based) PCK, e.g. 'pck_stage2', 'test_pck_stage2', 'pckh_stage2'."""
    return f"{prefix}{metric}_stage{stage}"


def stage_of_key(key: str) -> int | None:
    """2 for 'pck_stage2' (or 'test_pck_stage2', 'pckh_stage2'), None for any other key."""
    match = _STAGE_KEY.match(key)
    return int(match["stage"]) if match else None


def stage_keys(metrics: dict, prefix: str = "") -> list[str]:
    """The pck_stage{t} (or pckh_stage{t}) keys of a row, with `prefix`, in stage order."""
    found = [k for k in metrics if (match := _STAGE_KEY.match(k)) and match["prefix"] == prefix]
    return sorted(found, key=stage_of_key)


def train_loss_stage_key(stage: int) -> str:
    return f"train_loss_stage{stage}"


def grad_norm_stage_key(stage: int) -> str:
    """'grad_norm_stage2': the L2 norm of stage 2's gradient, mean over an epoch's sampled steps."""
    return f"grad_norm_stage{stage}"


def test_curve_prefix(metric: str = PCK.name) -> str:
    """'test_pck_curve_a': test_pck_curve_a0.20 is the test PCK at alpha 0.20."""
    return f"{TEST_PREFIX}{metric}_curve_a"


def test_curve_key(alpha: float, metric: str = PCK.name) -> str:
    return f"{test_curve_prefix(metric)}{alpha:.2f}"


def is_best_tracked(key: str) -> bool:
    """Keys whose value at the best epoch is kept as best_{key}."""
    return key.startswith(("pck", "auc", TRAIN_LOSS))
