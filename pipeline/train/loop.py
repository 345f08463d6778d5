"""The training loop: `train_worker(config, ctx)`, one worker's view of a CPM training run.

It reads like a plain PyTorch loop and talks to its surroundings only through a WorkerContext
(pipeline.train.context), so the same function runs in one process (LocalContext) or as a Ray
Train worker. Set-up, then per epoch: augmented batches from the HDF5 cache -> forward (bf16
autocast where it pays) -> L2 loss at every stage -> backward -> step; validation PCK per stage and
per joint in original image coordinates; a checkpoint through ctx.report. After the last epoch the
best epoch's weights (by validation PCK@0.2) are scored once on the test split.

Randomness: model init from train.seed; the shuffle from (seed, epoch); augmentation from
(seed, rank, epoch). Every epoch re-seeds from those, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cpm_model.config import ConfigError, ExperimentConfig, from_dict
from cpm_model.joints import flip_permutation as flip_permutation_of
from cpm_model.loss import belief_map_loss
from pipeline.train import metric_names as names
from pipeline.train.batches import derived_seed, epoch_batches, scoring_batches, train_batches
from pipeline.train.caches import open_caches
from pipeline.train.checkpoint import (
    CHECKPOINT_FILE,
    build_checkpoint,
    load_init_weights,
    load_model_state,
    load_newest_usable,
    restore_rng_state,
    save_checkpoint,
)
from pipeline.train.context import WorkerContext
from pipeline.train.epoch_sums import EpochSums, TrainedEpoch
from pipeline.train.gradients import GradientSampler
from pipeline.train.inference import autocast, build_model, refine_context
from pipeline.train.progress import NoProgress
from pipeline.train.schedule import (
    PhaseSchedule,
    make_optimizer,
    phase_of_epoch,
    set_trainable_stage,
    total_epochs,
    training_phases,
)
from pipeline.train.scoring import curve_metrics, evaluate_batches, protocol_for, summarize
from pipeline.train.system_metrics import SystemSampler


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite: training on would only give NaN weights."""


# --- the model as training wraps it ---------------------------------------------------------------

def compiled_for_training(model: torch.nn.Module, compile_model: bool) -> torch.nn.Module:
    """The module the training step calls: torch.compile'd when asked, else the model itself.
    Callers keep the result for as long as the wrapping stays the same, so compilation happens once
    per phase rather than every epoch (torch.compile's cache is per module object)."""
    return torch.compile(model) if compile_model else model


def uses_sync_batch_norm(device_type: str, world_size: int, has_batch_norm: bool) -> bool:
    """Whether BatchNorm takes its statistics over every worker's batch (SyncBatchNorm) rather than
    each worker's own: for a model with BatchNorm on more than one GPU worker. torch's SyncBatchNorm
    refuses CPU tensors, so CPU workers keep per-worker statistics."""
    return has_batch_norm and world_size > 1 and device_type == "cuda"


def with_sync_batch_norm(model: torch.nn.Module, device_type: str, world_size: int) -> torch.nn.Module:
    """`model` with its BatchNorm layers turned into SyncBatchNorm when `uses_sync_batch_norm` says
    so (in place; the same parameter and running-statistics tensors, the same state-dict keys)."""
    has_batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not uses_sync_batch_norm(device_type, world_size, has_batch_norm):
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


# --- the state a checkpoint holds -----------------------------------------------------------------

@dataclass
class TrainState:
    """Everything an epoch changes, and what saves and restores it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)  # one metrics row per completed epoch
    best_epoch: int | None = None
    best_weights: dict | None = None  # a CPU copy of the best epoch's weights
    gradients: list[dict] = field(default_factory=list)  # per epoch: GradientSampler.epoch_summary + epoch
    objective: str = names.PCK.name  # the validation metric that picks the best epoch (pck or pckh)

    @property
    def best_score(self) -> float:
        """The best epoch's validation value of the objective (PCK, or PCKh on MPII)."""
        return self._score(self.history[self.best_epoch - 1]) if self.best_epoch else -math.inf

    def _score(self, metrics: dict) -> float:
        value = metrics[self.objective]
        return -math.inf if math.isnan(value) else value

    def restore(self, checkpoint: dict, source: str) -> None:
        load_model_state(self.model, checkpoint["model"], source)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_state(checkpoint["rng"])
        self.epoch = int(checkpoint["epoch"])
        self.history = list(checkpoint["metrics"])
        self.gradients = list(checkpoint.get("gradients") or [])  # checkpoints written before it have none
        self.best_epoch = checkpoint["best_epoch"]
        if self.best_epoch is not None:  # None in the file: the best epoch is the saved one
            best = checkpoint["best_model"]
            self.best_weights = best if best is not None else {k: v.clone() for k, v in checkpoint["model"].items()}

    def record(self, metrics: dict) -> dict:
        """Append an epoch's row, marking the best epoch so far (the earliest of equal scores)."""
        self.epoch = metrics[names.EPOCH]
        self.history.append(metrics)
        if self.best_epoch is None or self._score(metrics) > self.best_score:
            self.best_epoch = self.epoch
            self.best_weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        metrics[names.BEST_EPOCH] = self.best_epoch
        return metrics

    def checkpoint(self, config: ExperimentConfig, joint_names, flip_pairs) -> dict:
        # The best weights are stored apart only when they are not this epoch's.
        best = self.best_weights if self.best_epoch != self.epoch else None
        checkpoint = build_checkpoint(self.model, config, self.epoch, self.optimizer, self.scheduler, self.history,
                                      self.best_epoch, best, joint_names, flip_pairs)
        return {**checkpoint, "gradients": self.gradients}


def report_with_checkpoint(ctx: WorkerContext, metrics: dict, checkpoint: dict | None) -> None:
    """Chief: write the checkpoint to a temp directory and report it; others report metrics only."""
    if not ctx.is_chief or checkpoint is None:
        ctx.report(metrics, None)
        return
    directory = tempfile.mkdtemp(prefix="cpm-checkpoint-")
    try:
        save_checkpoint(checkpoint, Path(directory) / CHECKPOINT_FILE)
        ctx.report(metrics, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- one epoch ------------------------------------------------------------------------------------

def train_one_epoch(model, optimizer, scheduler, batches, config: ExperimentConfig, stage: int | None,
                    device, progress=NoProgress(), gradients: GradientSampler | None = None) -> TrainedEpoch:
    """One pass over this rank's batches; returns its summed losses and counts (not yet reduced).
    `stage` None trains on every stage's loss (or the last one's without intermediate supervision);
    stage t (stage-wise training) on stage t's alone. `progress.step(images)` follows each step.
    `gradients` measures the gradients at its sampled steps; its summary is returned with the sums."""
    t = config.train
    # Sums stay on the device in float64 (what float() summed on the host): no sync per step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    stage_loss_sum = torch.zeros(config.model.stages, dtype=torch.float64, device=device)
    # The first step (1-based) whose loss is not finite, and whether it was NaN, also kept on the
    # device: a per-step .item() would wait for the device every step. Read once, at the epoch's
    # end, when the sum is not finite (every rank decides on the same all-reduced sum: an early
    # stop on one rank alone would leave the others waiting in the gradient all-reduce).
    first_bad_step = torch.zeros((), dtype=torch.int64, device=device)
    first_bad_is_nan = torch.zeros((), dtype=torch.bool, device=device)
    steps, images_seen = 0, 0
    for batch in batches:
        images, joints = batch["images"], batch["joints"]
        with autocast(t.precision, device):
            pred = model(images.contiguous(memory_format=torch.channels_last))
        per_stage = belief_map_loss(pred, batch["targets"], joints[..., 2] > 0, t.loss_reduction)
        if stage is not None:
            loss = per_stage[stage - 1]
        else:
            loss = per_stage.sum() if t.intermediate_supervision else per_stage[-1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if gradients is not None:
            gradients.after_backward(steps + 1)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().double()
        stage_loss_sum += per_stage.detach().double()
        steps += 1
        new_bad = (first_bad_step == 0) & ~torch.isfinite(loss.detach())
        first_bad_step = torch.where(new_bad, steps, first_bad_step)
        first_bad_is_nan = torch.where(new_bad, torch.isnan(loss.detach()), first_bad_is_nan)
        images_seen += images.shape[0]
        progress.step(images.shape[0])
    progress.close()
    sums = EpochSums(loss=float(loss_sum), steps=steps, images=images_seen, stage_losses=stage_loss_sum.cpu().numpy())
    return TrainedEpoch(sums, first_bad_step, first_bad_is_nan,
                        gradients.epoch_summary() if gradients is not None else {})


def check_finite_loss(loss_sum: float, trained: TrainedEpoch, ctx: WorkerContext, epoch: int) -> None:
    """Raise TrainingDivergedError naming the epoch and the first step (over all ranks) whose loss was
    NaN or infinite. `loss_sum` is the all-reduced sum, the same on every rank."""
    if math.isfinite(loss_sum):
        return
    per_rank = np.zeros(2 * ctx.world_size)  # [first bad step per rank..., is NaN per rank...]
    per_rank[ctx.rank] = int(trained.first_bad_step)
    per_rank[ctx.world_size + ctx.rank] = float(bool(trained.first_bad_is_nan))
    per_rank = ctx.all_reduce_sum(per_rank)
    bad = [(int(step), bool(per_rank[ctx.world_size + rank])) for rank, step in enumerate(per_rank[:ctx.world_size])
           if step > 0]
    step, is_nan = min(bad) if bad else (0, math.isnan(loss_sum))
    where = f"step {step}" if step else "a step"
    raise TrainingDivergedError(f"loss became {'NaN' if is_nan else 'inf'} at epoch {epoch}, {where} "
                           f"(of {trained.sums.steps} on this worker); lower train.lr or check the data")


def validate(model, cache, config: ExperimentConfig, ctx: WorkerContext, flip_permutation=None):
    """PCK counts (with the normaliser of the dataset's protocol) over a whole split, summed over
    ranks (each rank scores its own shard)."""
    batches = scoring_batches(cache, config.train.batch_size, ctx.rank, ctx.world_size, ctx.device)
    counts, _ = evaluate_batches(model, batches, model.stages, model.num_parts, config.train.precision,
                                 flip_permutation if config.train.eval_flip else None,
                                 normaliser=protocol_for(config).normaliser, refine_context=refine_context(config))
    return counts.reduced(ctx.all_reduce_sum)


def epoch_metrics(epoch: int, sums: EpochSums, world_size: int, counts, joint_names, protocol, lr: float,
                  trained_stage: int | None, epoch_time_s: float, grad_norms=()) -> dict:
    """One epoch's row, from the sums over every rank; `grad_norms` per stage, this rank's (DDP
    averages the gradients over ranks before the sampler reads them, so every rank measures the same)."""
    steps = max(sums.steps, 1)
    metrics = {names.EPOCH: epoch, names.TRAIN_LOSS: float(sums.loss / steps)}
    for s, value in enumerate(sums.stage_losses):
        metrics[names.train_loss_stage_key(s + 1)] = float(value / steps)
    for s, value in enumerate(grad_norms):
        metrics[names.grad_norm_stage_key(s + 1)] = float(value)
    metrics.update(summarize(counts, joint_names, protocol))
    metrics["val_num_samples"] = counts.num_samples
    metrics["lr"] = lr  # the rate reached at the end of the epoch
    metrics["trained_stage"] = trained_stage if trained_stage is not None else 0
    metrics["epoch_time_s"] = epoch_time_s
    metrics["images_per_s"] = float(sums.images / max(sums.train_seconds / world_size, 1e-9))  # over the mean rank time
    return metrics


def score_test_split(model, config: ExperimentConfig, ctx: WorkerContext, flip_permutation, progress: bool,
                     cache_paths: dict | None = None) -> dict:
    """test_pck, test_pck_stage{t}, test_pck_{joint}, ..., the curve; {} when the data has no test split."""
    from preprocessing.build import EmptySplitError

    try:
        test_cache = open_caches(config, ctx, ("test",), progress, cache_paths)["test"]
    except EmptySplitError:
        return {}
    counts = validate(model, test_cache, config, ctx, flip_permutation)
    protocol = protocol_for(config)
    out = summarize(counts, test_cache.joint_names, protocol, prefix=names.TEST_PREFIX)
    out["test_num_samples"] = counts.num_samples
    out["test_num_without_norm"] = counts.num_without_norm
    out.update(curve_metrics(counts, protocol))
    return out


def new_or_restored_state(config: ExperimentConfig, ctx: WorkerContext, num_parts: int,
                          steps_per_epoch: int) -> tuple[TrainState, str | None]:
    """The model (initial weights from train.seed, or train.init_weights), optimizer and schedule,
    restored from the newest usable checkpoint when the context has one; and the init note."""
    t = config.train
    torch.manual_seed(derived_seed(t.seed))  # the same initial weights on every rank
    model = build_model(config, num_parts)
    init_note = load_init_weights(model, t.init_weights) if t.init_weights else None
    model.to(ctx.device).to(memory_format=torch.channels_last)
    model = with_sync_batch_norm(model, ctx.device.type, ctx.world_size)  # before DDP wraps it, once
    optimizer = make_optimizer(model, t)
    schedule = PhaseSchedule(training_phases(config), steps_per_epoch, t)
    state = TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
                       objective=protocol_for(config).name)
    restore_dirs = ctx.restore_checkpoint_dirs()
    if restore_dirs:  # newest first; a corrupt one falls back to the next, with a warning
        path, checkpoint = load_newest_usable([Path(d) / CHECKPOINT_FILE for d in restore_dirs], expected_config=config)
        state.restore(checkpoint, f"checkpoint {path}")
        ctx.report_restored(state.history)
    return state, init_note


# --- the worker -----------------------------------------------------------------------------------

def train_worker(config: ExperimentConfig | dict, ctx: WorkerContext, progress: bool = True,
                 cache_paths: dict | None = None, score_test: bool = True) -> dict:
    """Train, validate every epoch, checkpoint every epoch, then score the best epoch on the test split.
    Long because it is the training run read top to bottom, each step once, in the order it happens.

    cache_paths: optional {split: HDF5 cache file} to use instead of building from config.data.
    score_test: False leaves the test split unread (comparisons that choose a recipe must not see it).
    Returns {"history": [metrics per epoch], "best_epoch", "best_score" (its validation value of the
    protocol's metric: PCK, or PCKh on MPII), "protocol", "test": {...}, "model", ...}.
    """
    config = config if isinstance(config, ExperimentConfig) else from_dict(config)
    t, device = config.train, ctx.device
    phases, epochs, protocol = training_phases(config), total_epochs(config), protocol_for(config)
    train_cache, val_cache = open_caches(config, ctx, ("train", "val"), progress, cache_paths).values()
    joint_names, flip_pairs = train_cache.joint_names, train_cache.flip_pairs
    flip_permutation = flip_permutation_of(len(joint_names), flip_pairs)
    if len(train_cache) < t.batch_size * ctx.world_size:
        raise ConfigError(f"the train split has {len(train_cache)} samples, fewer than one batch "
                          f"(train.batch_size {t.batch_size} x {ctx.world_size} workers)")
    steps_per_epoch = len(train_batches(len(train_cache), t.batch_size, ctx.rank, ctx.world_size, t.seed, 0,
                                        t.max_steps_per_epoch))
    state, init_note = new_or_restored_state(config, ctx, len(joint_names), steps_per_epoch)
    model, optimizer = state.model, state.optimizer

    wrapped_for, train_model = "unset", model
    hardware = SystemSampler(device)  # each epoch row: this worker's CPU, memory (and GPU) figures
    for epoch in range(state.epoch, epochs):
        phase = phase_of_epoch(phases, epoch)
        set_trainable_stage(model, phase.stage)
        if phase.stage != wrapped_for:  # (re)wrap so DDP sees exactly the trainable parameters
            train_model, wrapped_for = compiled_for_training(ctx.wrap_model(model), t.compile), phase.stage
        epoch_start = time.perf_counter()
        batches = epoch_batches(train_cache, config, ctx.rank, ctx.world_size, epoch, flip_permutation, device)
        shown = ctx.epoch_progress(epoch + 1, epochs, len(batches), t.batch_size)
        trained = train_one_epoch(train_model, optimizer, state.scheduler, batches, config, phase.stage, device,
                                  shown, GradientSampler(model, len(batches), device))
        if trained.gradients:
            state.gradients.append({names.EPOCH: epoch + 1, **trained.gradients})
        trained.sums.train_seconds = time.perf_counter() - epoch_start
        sums = trained.sums.all_reduced(ctx.all_reduce_sum)
        check_finite_loss(sums.loss, trained, ctx, epoch + 1)
        counts = validate(model, val_cache, config, ctx, flip_permutation)
        metrics = state.record({**epoch_metrics(epoch + 1, sums, ctx.world_size, counts, joint_names, protocol,
                                                optimizer.param_groups[0]["lr"], phase.stage,
                                                time.perf_counter() - epoch_start,
                                                trained.gradients.get("stage_grad_norm", ())),
                                **hardware.epoch_figures()})
        report_with_checkpoint(ctx, metrics, state.checkpoint(config, joint_names, flip_pairs) if ctx.is_chief else None)

    # Score the test split once, with the best epoch's weights.
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    test = score_test_split(model, config, ctx, flip_permutation, progress, cache_paths) if score_test else {}
    if test:
        # best_* metrics come from the best epoch's own row (pipeline.tracking.trial_logger).
        ctx.report({names.EPOCH: epochs, names.BEST_EPOCH: state.best_epoch, **test})
    return {"history": state.history, "best_epoch": state.best_epoch, "best_score": state.best_score, "protocol": protocol,
            "joint_names": list(joint_names), "init_weights": init_note, "epochs": epochs, "test": test or None,
            "model": model, "val_cache": val_cache, "gradients": state.gradients}
