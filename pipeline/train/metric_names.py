"""The names of the metrics a training run reports: one home for every key the loop writes and
the tracking, printing and reporting code reads.

An epoch row carries `train_loss`; summary rows (the test split, the artifacts) do not.
"""

from __future__ import annotations

import re

EPOCH = "epoch"
TRAIN_LOSS = "train_loss"  # the key that marks an epoch row
PCK = "pck"  # last stage, PCK@0.2: the sweep's objective and the checkpoint score
BEST_EPOCH = "best_epoch"
BEST_PREFIX = "best_"  # best_{key}: the value of {key} at the best epoch
TEST_PREFIX = "test_"
TEST_CURVE_PREFIX = "test_pck_curve_a"  # test_pck_curve_a0.20 = test PCK at alpha 0.20

RESENT = "resent"  # on a row a restored worker sends again (1): its epoch was reported before

# The row a trial driver adds after its Train run: where its artifacts and best checkpoint are.
ARTIFACTS_DIR = "artifacts_dir"
BEST_CHECKPOINT_DIR = "best_checkpoint_dir"

_STAGE_KEY = re.compile(r"^(?P<prefix>.*)pck_stage(?P<stage>\d+)$")


def is_epoch_row(metrics: dict) -> bool:
    return TRAIN_LOSS in metrics


def pck_stage_key(stage: int, prefix: str = "") -> str:
    """The key of stage `stage`'s (1-based) PCK@0.2, e.g. 'pck_stage2' or 'test_pck_stage2'."""
    return f"{prefix}pck_stage{stage}"


def stage_of_key(key: str) -> int | None:
    """2 for 'pck_stage2' (or 'test_pck_stage2'), None for any other key."""
    match = _STAGE_KEY.match(key)
    return int(match["stage"]) if match else None


def stage_keys(metrics: dict, prefix: str = "") -> list[str]:
    """The pck_stage{t} keys of a row (with `prefix`), in stage order."""
    found = [k for k in metrics if k.startswith(f"{prefix}pck_stage") and stage_of_key(k) is not None
             and _STAGE_KEY.match(k)["prefix"] == prefix]
    return sorted(found, key=stage_of_key)


def train_loss_stage_key(stage: int) -> str:
    return f"train_loss_stage{stage}"


def test_curve_key(alpha: float) -> str:
    return f"{TEST_CURVE_PREFIX}{alpha:.2f}"


def is_best_tracked(key: str) -> bool:
    """Keys whose value at the best epoch is kept as best_{key}."""
    return key.startswith(("pck", "auc", TRAIN_LOSS))
