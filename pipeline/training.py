"""The training loop: `train_worker(config, ctx)`, one worker's view of a CPM training run.

It reads like a plain PyTorch loop and talks to its surroundings only through a WorkerContext
(pipeline.context), so the same function runs in one process (LocalContext) or as a Ray Train
worker. Per epoch: augmented batches from the HDF5 cache -> forward (bf16 autocast where it pays)
-> L2 loss at every stage -> backward -> step; then validation PCK per stage and per joint in
original image coordinates; then a checkpoint through ctx.report. After the last epoch the best
epoch's weights (by validation PCK@0.2) are scored once on the test split.

Randomness: model init from train.seed; the shuffle from (seed, epoch); augmentation from
(seed, rank, epoch). Every epoch re-seeds from those, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpm_model.augment import AugmentSettings, random_augment
from cpm_model.config import ConfigError, ExperimentConfig, from_dict
from cpm_model.loss import belief_map_loss
from pipeline.checkpoint import (build_checkpoint, load_init_weights, load_model_state, load_newest_usable,
                                 restore_rng_state, save_checkpoint)
from pipeline.context import CHECKPOINT_FILE, WorkerContext
from pipeline.data import CacheBatches, eval_batches, train_batches
from pipeline.evaluate import PCKCounts, autocast, build_model, evaluate_batches, summarize

TRAIN_KEYS = ("images", "belief_maps", "joints")


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite: training on would only give NaN weights."""
EVAL_KEYS = ("images", "affine", "joints_original", "torso")


# --- pure helpers -------------------------------------------------------------------------------

def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. seed, rank, epoch): independent streams per tuple."""
    high, low = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) & ((1 << 63) - 1)


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


def as_config(config: ExperimentConfig | dict) -> ExperimentConfig:
    return config if isinstance(config, ExperimentConfig) else from_dict(config)


# --- data ---------------------------------------------------------------------------------------

def open_caches(config: ExperimentConfig, ctx: WorkerContext, splits=("train", "val"), progress: bool = True,
                cache_paths: dict | None = None) -> dict:
    """{split: PoseCache}: the given `cache_paths` ({split: file}, e.g. copied to this node), else
    built from the config; the chief builds missing caches first, the others then find them."""
    from preprocessing.build import build_cache
    from preprocessing.cache import PoseCache

    cache_paths = cache_paths or {}
    if all(split in cache_paths for split in splits):
        return {split: PoseCache(cache_paths[split]) for split in splits}

    caps = {"train": config.data.max_train_samples, "val": config.data.max_val_samples, "test": None}

    def build(split: str):  # a damaged cache stops training with the command that rebuilds it
        return build_cache(config.data.spec, split, config.preprocess, config.data.cache_dir,
                           progress=progress and ctx.is_chief, max_samples=caps[split], rebuild_damaged=False)

    missing = [split for split in splits if split not in cache_paths]
    if ctx.world_size > 1:
        if ctx.is_chief:
            for split in missing:
                build(split)
        ctx.barrier()
    return {split: PoseCache(cache_paths[split] if split in cache_paths else build(split)) for split in splits}


def flip_permutation_of(cache) -> list[int]:
    permutation = list(range(len(cache.joint_names)))
    for a, b in cache.flip_pairs:
        permutation[a], permutation[b] = b, a
    return permutation


def training_augmenter(config: ExperimentConfig, generator: torch.Generator, flip_permutation):
    """The per-batch `prepare` step of training: augment, render targets from the warped joints.
    Batches must go through it in order (the generator's stream is the epoch's augmentation)."""
    settings = AugmentSettings.from_train_config(config.train)

    def prepare(batch: dict) -> dict:
        images, targets, joints = random_augment(batch["images"], batch["joints"], settings, generator,
                                                 flip_permutation, config.preprocess.sigma)
        return {**batch, "images": images, "targets": targets, "joints": joints}

    return prepare


def epoch_batches(cache, config: ExperimentConfig, rank: int, world_size: int, epoch: int, flip_permutation,
                  device) -> CacheBatches:
    """This rank's training batches of one epoch, augmented (when configured) by the loader."""
    t = config.train
    positions = train_batches(len(cache), t.batch_size, rank, world_size, t.seed, epoch, t.max_steps_per_epoch)
    generator = torch.Generator().manual_seed(derived_seed(t.seed, rank, epoch))
    prepare = training_augmenter(config, generator, flip_permutation) if t.augment else None
    return CacheBatches(cache, np.arange(len(cache)), positions, device,
                        keys=TRAIN_KEYS if not t.augment else ("images", "joints"), prepare=prepare)


# --- one epoch ----------------------------------------------------------------------------------

def train_one_epoch(model, optimizer, scheduler, batches, config: ExperimentConfig, stage: int | None,
                    generator: torch.Generator, flip_permutation, device) -> dict:
    """One pass over this rank's batches; returns summed losses and counts (not yet reduced).

    Batches that carry "targets" were augmented by the loader (epoch_batches); others are
    augmented here with `generator` (or use the cached maps without augmentation)."""
    t = config.train
    settings = AugmentSettings.from_train_config(t)
    num_stages = config.model.stages
    # Sums stay on the device in float64 (what float() summed on the host): no sync per step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    stage_loss_sum = torch.zeros(num_stages, dtype=torch.float64, device=device)
    # The first step (1-based) whose loss is not finite, and whether it was NaN, also kept on the
    # device: a per-step .item() would wait for the device every step. Read once, at the epoch's
    # end, when the sum is not finite (every rank decides on the same all-reduced sum: an early
    # stop on one rank alone would leave the others waiting in the gradient all-reduce).
    first_bad_step = torch.zeros((), dtype=torch.int64, device=device)
    first_bad_is_nan = torch.zeros((), dtype=torch.bool, device=device)
    steps, images_seen = 0, 0
    for batch in batches:
        images, joints = batch["images"], batch["joints"]
        if "targets" in batch:
            targets = batch["targets"]
        elif t.augment:
            images, targets, joints = random_augment(images, joints, settings, generator, flip_permutation,
                                                     config.preprocess.sigma)
        else:
            targets = batch["belief_maps"]
        part_mask = joints[..., 2] > 0
        with autocast(t.precision, device):
            pred = model(images.contiguous(memory_format=torch.channels_last))
        loss, per_stage = belief_map_loss(pred, targets, part_mask, t.intermediate_supervision, t.loss_reduction)
        if stage is not None:  # stage-wise: only stage t's output is supervised
            loss = belief_map_loss(pred[:, stage - 1:stage], targets, part_mask, True, t.loss_reduction)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().double()
        stage_loss_sum += per_stage.double()
        steps += 1
        new_bad = (first_bad_step == 0) & ~torch.isfinite(loss.detach())
        first_bad_step = torch.where(new_bad, steps, first_bad_step)
        first_bad_is_nan = torch.where(new_bad, torch.isnan(loss.detach()), first_bad_is_nan)
        images_seen += images.shape[0]
    return {"loss_sum": float(loss_sum), "stage_loss_sum": stage_loss_sum.cpu().numpy(), "steps": steps,
            "images": images_seen, "first_bad_step": first_bad_step, "first_bad_is_nan": first_bad_is_nan}


def check_finite_loss(loss_sum: float, sums: dict, ctx: WorkerContext, epoch: int) -> None:
    """Raise TrainingDivergedError naming the epoch and the first step (over all ranks) whose loss was
    NaN or infinite. `loss_sum` is the all-reduced sum, the same on every rank."""
    if math.isfinite(loss_sum):
        return
    per_rank = np.zeros(2 * ctx.world_size)  # [first bad step per rank..., is NaN per rank...]
    per_rank[ctx.rank] = int(sums["first_bad_step"])
    per_rank[ctx.world_size + ctx.rank] = float(bool(sums["first_bad_is_nan"]))
    per_rank = ctx.all_reduce_sum(per_rank)
    bad = [(int(step), bool(per_rank[ctx.world_size + rank])) for rank, step in enumerate(per_rank[:ctx.world_size])
           if step > 0]
    step, is_nan = min(bad) if bad else (0, math.isnan(loss_sum))
    where = f"step {step}" if step else "a step"
    raise TrainingDivergedError(f"loss became {'NaN' if is_nan else 'inf'} at epoch {epoch}, {where} "
                           f"(of {int(sums['steps'])} on this worker); lower train.lr or check the data")


def validate(model, cache, config: ExperimentConfig, ctx: WorkerContext, batch_size: int,
             flip_permutation=None, keep_maps_of: int | None = None) -> tuple[PCKCounts, dict]:
    """PCK counts over a whole split, summed over ranks (each rank scores its own shard)."""
    rows = np.arange(len(cache))
    batches = CacheBatches(cache, rows, eval_batches(len(rows), batch_size, ctx.rank, ctx.world_size),
                           ctx.device, keys=EVAL_KEYS)
    counts, extras = evaluate_batches(model, batches, model.stages, model.num_parts, config.train.precision,
                                      flip_permutation if config.train.eval_flip else None,
                                      keep_maps_of=keep_maps_of)
    return counts.reduced(ctx.all_reduce_sum), extras


# --- the worker ---------------------------------------------------------------------------------

def train_worker(config: ExperimentConfig | dict, ctx: WorkerContext, progress: bool = True,
                 cache_paths: dict | None = None) -> dict:
    """Train, validate every epoch, checkpoint every epoch, then score the best epoch on the test split.

    cache_paths: optional {split: HDF5 cache file} to use instead of building from config.data.

    Returns {"history": [metrics per epoch], "best_epoch", "best_pck", "test": {...}, ...}.
    """
    config = as_config(config)
    t = config.train
    device = ctx.device
    phases = training_phases(config)
    epochs = total_epochs(config)

    caches = open_caches(config, ctx, ("train", "val"), progress, cache_paths)
    train_cache, val_cache = caches["train"], caches["val"]
    joint_names, flip_pairs = train_cache.joint_names, train_cache.flip_pairs
    flip_permutation = flip_permutation_of(train_cache)
    num_train = len(train_cache)
    if num_train < t.batch_size * ctx.world_size:
        raise ConfigError(f"the train split has {num_train} samples, fewer than one batch "
                          f"(train.batch_size {t.batch_size} x {ctx.world_size} workers)")
    steps_per_epoch = len(train_batches(num_train, t.batch_size, ctx.rank, ctx.world_size, t.seed, 0,
                                        t.max_steps_per_epoch))

    torch.manual_seed(derived_seed(t.seed))  # the same initial weights on every rank
    model = build_model(config, len(joint_names))
    init_note = load_init_weights(model, t.init_weights) if t.init_weights else None
    model.to(device).to(memory_format=torch.channels_last)
    model = with_sync_batch_norm(model, device.type, ctx.world_size)  # before DDP wraps it, once
    optimizer = make_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, PhaseSchedule(phases, steps_per_epoch, t))

    history: list[dict] = []
    start_epoch, best_epoch, best_pck, best_state = 0, None, -math.inf, None
    restore_dirs = ctx.restore_checkpoint_dirs()
    if restore_dirs:  # newest first; a corrupt one falls back to the next, with a warning
        restore_path, checkpoint = load_newest_usable([Path(d) / CHECKPOINT_FILE for d in restore_dirs],
                                                      expected_config=config)
        load_model_state(model, checkpoint["model"], f"checkpoint {restore_path}")
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_state(checkpoint["rng"])
        start_epoch = int(checkpoint["epoch"])
        history = list(checkpoint["metrics"])
        best_epoch = checkpoint["best_epoch"]
        if best_epoch is not None:
            best_pck = next(m["pck"] for m in history if m["epoch"] == best_epoch)
            best_state = checkpoint["best_model"] if checkpoint["best_model"] is not None else \
                {k: v.clone() for k, v in checkpoint["model"].items()}

    current_stage = "unset"
    train_model = model
    for epoch in range(start_epoch, epochs):
        phase = phase_of_epoch(phases, epoch)
        if phase.stage != current_stage:  # (re)wrap so DDP sees exactly the trainable parameters
            set_trainable_stage(model, phase.stage)
            train_model = compiled_for_training(ctx.wrap_model(model), t.compile)
            current_stage = phase.stage
        else:
            set_trainable_stage(model, phase.stage)
        epoch_start = time.perf_counter()
        batches = epoch_batches(train_cache, config, ctx.rank, ctx.world_size, epoch, flip_permutation, device)
        sums = train_one_epoch(train_model, optimizer, scheduler, batches, config, phase.stage, None,
                               flip_permutation, device)
        train_time = time.perf_counter() - epoch_start
        reduced = ctx.all_reduce_sum(np.concatenate([[sums["loss_sum"], sums["steps"], sums["images"]],
                                                     sums["stage_loss_sum"]]))
        total_steps = max(reduced[1], 1)
        check_finite_loss(float(reduced[0]), sums, ctx, epoch + 1)

        counts, _ = validate(model, val_cache, config, ctx, t.batch_size, flip_permutation)
        metrics = {"epoch": epoch + 1, "train_loss": float(reduced[0] / total_steps)}
        for s, value in enumerate(reduced[3:]):
            metrics[f"train_loss_stage{s + 1}"] = float(value / total_steps)
        metrics.update(summarize(counts, joint_names))
        metrics["val_num_samples"] = counts.num_samples
        metrics["lr"] = optimizer.param_groups[0]["lr"]  # the rate reached at the end of the epoch
        metrics["trained_stage"] = phase.stage if phase.stage is not None else 0
        metrics["epoch_time_s"] = time.perf_counter() - epoch_start
        metrics["images_per_s"] = float(reduced[2] / max(train_time, 1e-9)) if ctx.world_size == 1 else \
            float(reduced[2] / max(ctx.all_reduce_sum(np.array([train_time]))[0] / ctx.world_size, 1e-9))
        history.append(metrics)

        pck_now = metrics["pck"] if not math.isnan(metrics["pck"]) else -math.inf
        if best_epoch is None or pck_now > best_pck:
            best_epoch, best_pck, best_state = epoch + 1, pck_now, None  # None: the current weights
        metrics["best_epoch"] = best_epoch
        _report_with_checkpoint(ctx, metrics, model, config, epoch + 1, optimizer, scheduler, history,
                                best_epoch, best_state, joint_names, flip_pairs)
        if best_state is None:  # keep the best weights in memory for the final test
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    # Score the test split once, with the best epoch's weights.
    result = {"history": history, "best_epoch": best_epoch, "best_pck": best_pck,
              "joint_names": list(joint_names), "init_weights": init_note, "epochs": epochs}
    if best_state is not None:
        model.load_state_dict(best_state)
    test = score_test_split(model, config, ctx, flip_permutation, progress, cache_paths)
    if test is not None:
        final = {"epoch": epochs, "best_epoch": best_epoch, "best_pck": best_pck, **test}
        ctx.report(final, None)
        result["test"] = test
    result["model"] = model
    result["val_cache"] = val_cache
    return result


TEST_CURVE_ALPHAS = [round(0.05 * i, 2) for i in range(11)]  # 0 to 0.5, a subset of PCK_CURVE_ALPHAS


def score_test_split(model, config: ExperimentConfig, ctx: WorkerContext, flip_permutation, progress: bool,
                     cache_paths: dict | None = None) -> dict | None:
    """test_pck, test_pck_stage{t}, test_pck_{joint}, ... or None when the data has no test split."""
    from preprocessing.build import EmptySplitError

    try:
        test_cache = open_caches(config, ctx, ("test",), progress, cache_paths)["test"]
    except EmptySplitError:
        return None
    counts, _ = validate(model, test_cache, config, ctx, config.train.batch_size, flip_permutation)
    out = summarize(counts, test_cache.joint_names, prefix="test_")
    out["test_num_samples"] = counts.num_samples
    out["test_num_without_norm"] = counts.num_without_norm
    # A coarse PCK curve as metrics, so a report can draw it from MLflow alone.
    for alpha in TEST_CURVE_ALPHAS:
        out[f"test_pck_curve_a{alpha:.2f}"] = counts.mean(-1, alpha)
    return out


def _report_with_checkpoint(ctx, metrics, model, config, epoch, optimizer, scheduler, history, best_epoch,
                            best_state, joint_names, flip_pairs) -> None:
    """Chief: write the checkpoint to a temp directory and report it; others report metrics only."""
    if not ctx.is_chief:
        ctx.report(metrics, None)
        return
    directory = tempfile.mkdtemp(prefix="cpm-checkpoint-")
    try:
        checkpoint = build_checkpoint(model, config, epoch, optimizer, scheduler, history, best_epoch,
                                      best_state, joint_names, flip_pairs)
        save_checkpoint(checkpoint, Path(directory) / CHECKPOINT_FILE)
        ctx.report(metrics, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
