"""What one epoch of training adds up, on each rank and then over all ranks.

`EpochSums` packs itself into one float64 vector for a single all-reduce and unpacks the summed
vector by field name, so no caller indexes a vector by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

_SCALARS = ("loss", "steps", "images", "train_seconds")


@dataclass
class EpochSums:
    """Summed over an epoch's steps (and, once all-reduced, over ranks)."""

    loss: float  # the optimised loss (every stage's, or the last one's without intermediate supervision)
    steps: int
    images: int
    stage_losses: np.ndarray  # (T,) each stage's loss, whether optimised or not
    train_seconds: float = 0.0  # wall time of the training pass (summed over ranks: their mean x world size)

    def packed(self) -> np.ndarray:
        return np.concatenate([[float(getattr(self, name)) for name in _SCALARS],
                               np.asarray(self.stage_losses, dtype=np.float64)])

    @classmethod
    def unpacked(cls, vector: np.ndarray) -> "EpochSums":
        values = dict(zip(_SCALARS, (float(v) for v in vector[:len(_SCALARS)])))
        return cls(loss=values["loss"], steps=int(round(values["steps"])), images=int(round(values["images"])),
                   train_seconds=values["train_seconds"],
                   stage_losses=np.asarray(vector[len(_SCALARS):], dtype=np.float64))

    def all_reduced(self, all_reduce_sum: Callable[[np.ndarray], np.ndarray]) -> "EpochSums":
        """Every rank's sums added up (one collective; every rank must call it)."""
        return EpochSums.unpacked(all_reduce_sum(self.packed()))


@dataclass
class TrainedEpoch:
    """One rank's training pass over an epoch: its sums, where its loss first stopped being finite,
    and the gradient magnitudes sampled on the way."""

    sums: EpochSums
    # The first step (1-based; 0 = none) whose loss was not finite, and whether it was NaN, kept as
    # device tensors: reading them every step would wait for the device every step.
    first_bad_step: torch.Tensor
    first_bad_is_nan: torch.Tensor
    gradients: dict = field(default_factory=dict)  # GradientSampler.epoch_summary(), {} when not sampled
