"""What changes over a run's epochs: the training phases (joint, or stage by stage then fine-tuning),
the learning-rate schedule within each phase, the optimizer, and which parameters train.

Pure bookkeeping on the config and the model: no data, no Ray, no MLflow. `total_epochs` is the
one count of a run's epochs (the sweep's scheduler and the MLflow logger read it from here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cpm_model.config import ConfigError, ExperimentConfig


@dataclass(frozen=True)
class Phase:
    """A run of epochs with one training target: `stage` None = all stages jointly."""

    first_epoch: int  # 0-based
    epochs: int
    stage: int | None


def training_phases(config: ExperimentConfig) -> list[Phase]:
    """joint: one phase. stagewise: epochs split evenly over stages (earlier stages get the
    remainder). stagewise_finetune: then train.finetune_epochs joint epochs."""
    t, stages = config.train, config.model.stages
    if t.training_scheme == "joint":
        return [Phase(0, t.epochs, None)]
    if t.epochs < stages:
        raise ConfigError(f"train.training_scheme={t.training_scheme!r} needs train.epochs >= model.stages "
                          f"(one epoch per stage at least), got {t.epochs} epochs for {stages} stages")
    base, extra = divmod(t.epochs, stages)
    phases, start = [], 0
    for stage in range(1, stages + 1):
        count = base + (1 if stage <= extra else 0)
        phases.append(Phase(start, count, stage))
        start += count
    if t.training_scheme == "stagewise_finetune" and t.finetune_epochs > 0:
        phases.append(Phase(start, t.finetune_epochs, None))
    return phases


def total_epochs(config: ExperimentConfig) -> int:
    return sum(p.epochs for p in training_phases(config))


def phase_of_epoch(phases: list[Phase], epoch: int) -> Phase:
    for phase in phases:
        if phase.first_epoch <= epoch < phase.first_epoch + phase.epochs:
            return phase
    return phases[-1]


def lr_factor(epoch_in_phase: float, phase_epochs: int, train) -> float:
    """Multiplier on train.lr at a (fractional) epoch within a phase: linear warm-up, then
    step (x lr_gamma every lr_step_epochs), cosine (to 0 at the phase end) or constant."""
    if train.warmup_epochs > 0 and epoch_in_phase < train.warmup_epochs:
        return max(epoch_in_phase / train.warmup_epochs, 1e-3)
    if train.lr_schedule == "step":
        return train.lr_gamma ** int(math.floor(epoch_in_phase + 1e-9) // train.lr_step_epochs)
    if train.lr_schedule == "cosine":
        span = max(phase_epochs - train.warmup_epochs, 1e-9)
        progress = min(max((epoch_in_phase - train.warmup_epochs) / span, 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


class PhaseSchedule:
    """LambdaLR multiplier for a global step: each phase restarts warm-up and schedule."""

    def __init__(self, phases: list[Phase], steps_per_epoch: int, train):
        self.phases, self.steps_per_epoch, self.train = phases, steps_per_epoch, train

    def __call__(self, step: int) -> float:
        epoch = step / self.steps_per_epoch
        phase = phase_of_epoch(self.phases, int(epoch))
        return lr_factor(epoch - phase.first_epoch, phase.epochs, self.train)


def make_optimizer(model: torch.nn.Module, train) -> torch.optim.Optimizer:
    """SGD (the paper: lr 8e-5 with the Caffe 'sum' loss, momentum 0.9, wd 5e-4) or Adam (MMPose:
    lr 5e-4, 'mean' loss); the config's values are used as given."""
    params = [p for p in model.parameters()]
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)


def set_trainable_stage(model, stage: int | None) -> None:
    """Phase setup: stage None trains everything; stage t trains only stage t's parameters (earlier
    stages frozen: no gradient, BatchNorm statistics fixed; later stages unused by the loss)."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(stage is None)
    if stage is None:
        return
    for p in model.stage_parameters(stage):
        p.requires_grad_(True)
    trained = {id(m) for m in model.stage_modules(stage)}
    for s in range(1, model.stages + 1):
        for module in model.stage_modules(s):
            if id(module) not in trained:
                module.eval()
