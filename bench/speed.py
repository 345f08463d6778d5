"""Speed figures of one training worker, as same-run ratios (used by bench/run.py and bench/gpu_check.sh).

- model alone: the model/loss/optimizer step on random tensors already on the device;
- pipeline: the worker loop's own `train_one_epoch` (cache reads, augmentation, target rendering,
  model, loss, optimizer, scheduler) over a cache, warm-up excluded;
- FLOPs per image (torch.utils.flop_counter) and achieved TFLOP/s;
- gradient sampling: an epoch with and without `pipeline.train.gradients.GradientSampler`, and the
  time of one sampled step's measurement;
- peak RSS of a worker process training on a cache (one subprocess per measurement).

Needs only torch, numpy, h5py and this repository (no Ray, no MLflow), so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cpm_model.config import ExperimentConfig, load_config  # noqa: E402
from cpm_model.loss import belief_map_loss  # noqa: E402
from cpm_model.joints import flip_permutation as flip_permutation_of  # noqa: E402
from pipeline.train.batches import derived_seed, epoch_batches, train_batches  # noqa: E402
from pipeline.train.gradients import GradientSampler  # noqa: E402
from pipeline.train.inference import autocast, build_model  # noqa: E402
from pipeline.train.loop import compiled_for_training, train_one_epoch  # noqa: E402
from pipeline.train.schedule import PhaseSchedule, make_optimizer, training_phases  # noqa: E402

NUM_PARTS = 14  # LSP / LSPET / synthetic joint sets


@dataclass(frozen=True)
class StepSetup:
    """What a timed training step runs: precision, memory format, compilation."""

    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    channels_last: bool = False
    compile: bool = False

    @property
    def label(self) -> str:
        parts = [self.precision] + (["channels_last"] if self.channels_last else []) + \
            (["compile"] if self.compile else [])
        return "+".join(parts)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config_with(config: ExperimentConfig, setup: StepSetup) -> ExperimentConfig:
    train = replace(config.train, precision=setup.precision, compile=setup.compile)
    return replace(config, train=train)


def build_training_state(config: ExperimentConfig, device: torch.device, setup: StepSetup, steps_per_epoch: int):
    """(model, step model, optimizer, scheduler), built as train_worker builds them."""
    torch.manual_seed(derived_seed(config.train.seed))
    model = build_model(config, NUM_PARTS).to(device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = make_optimizer(model, config.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, PhaseSchedule(training_phases(config), steps_per_epoch, config.train))
    return model, compiled_for_training(model, config.train.compile), optimizer, scheduler


def random_batch(config: ExperimentConfig, device: torch.device, generator: torch.Generator):
    """Images, targets and joints of the worker loop's shapes, on the device."""
    b, s = config.train.batch_size, config.preprocess.input_size
    m = s // 8
    images = torch.rand(b, 3, s, s, generator=generator).to(device)
    targets = torch.rand(b, NUM_PARTS + 1, m, m, generator=generator).to(device)
    joints = torch.cat([torch.rand(b, NUM_PARTS, 2, generator=generator) * s, torch.ones(b, NUM_PARTS, 1)], -1)
    return images, targets, joints.to(device)


def model_step(model, optimizer, scheduler, images, targets, joints, config: ExperimentConfig, device,
               channels_last: bool) -> torch.Tensor:
    """One plain step: forward under the config's precision, every-stage L2 loss, backward, step."""
    t = config.train
    part_mask = joints[..., 2] > 0
    with autocast(t.precision, device):
        pred = model(images.contiguous(memory_format=torch.channels_last) if channels_last else images)
    per_stage = belief_map_loss(pred, targets, part_mask, t.loss_reduction)
    loss = per_stage.sum() if t.intermediate_supervision else per_stage[-1]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


def time_model_alone(config: ExperimentConfig, device: torch.device, setup: StepSetup, steps: int,
                     warmup: int, state=None) -> float:
    """images/s of the model/loss/optimizer step on random tensors already on the device."""
    config = config_with(config, setup)
    _, step_model, optimizer, scheduler = state or build_training_state(config, device, setup, steps + warmup)
    images, targets, joints = random_batch(config, device, torch.Generator().manual_seed(0))
    for _ in range(warmup):
        model_step(step_model, optimizer, scheduler, images, targets, joints, config, device, setup.channels_last)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        model_step(step_model, optimizer, scheduler, images, targets, joints, config, device, setup.channels_last)
    sync(device)
    return steps * config.train.batch_size / (time.perf_counter() - start)


def time_pipeline(config: ExperimentConfig, cache, device: torch.device, setup: StepSetup, steps: int,
                  warmup: int, state=None, epoch: int = 0, augment_in_loader: bool = True,
                  gradient_samples: int = 0) -> float:
    """images/s of the worker loop's own epoch (epoch_batches + train_one_epoch: cache reads,
    augmentation, target rendering, model, loss, optimizer, scheduler) over `steps` batches, after
    a warm-up pass of `warmup` batches; the same setup as time_model_alone.
    augment_in_loader=False: augmentation in the consuming thread (what an accelerator device does).
    gradient_samples > 0: with a GradientSampler measuring that many steps, as train_worker does."""
    config = config_with(config, setup)
    model, step_model, optimizer, scheduler = state or build_training_state(config, device, setup, steps + warmup)
    flip_permutation = flip_permutation_of(len(cache.joint_names), cache.flip_pairs)

    def run(count: int, index: int) -> float:
        capped = replace(config, train=replace(config.train, max_steps_per_epoch=count))
        batches = epoch_batches(cache, capped, 0, 1, index, flip_permutation, device)
        if not augment_in_loader:  # the same batches and draws, augmented in the training thread
            batches.prepare_in_reader = False
        sync(device)
        start = time.perf_counter()
        sampler = GradientSampler(model, len(batches), device, gradient_samples) if gradient_samples else None
        sums = train_one_epoch(step_model, optimizer, scheduler, batches, capped, None, device, gradients=sampler).sums
        sync(device)
        return sums.images / (time.perf_counter() - start)

    if warmup:
        run(warmup, epoch + 1000)
    return run(steps, epoch)


def time_gradient_sample(config: ExperimentConfig, device: torch.device, calls: int = 7) -> float:
    """Median seconds of one sampled step's measurement (GradientSampler.after_backward, device
    synced) on the config's model, with a gradient on every parameter."""
    torch.manual_seed(0)
    model = build_model(config, NUM_PARTS).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    sampler = GradientSampler(model, steps=1, device=device, samples=1)
    times = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        sampler.after_backward(1)
        sync(device)
        times.append(time.perf_counter() - start)
    sampler.epoch_summary()
    return statistics.median(times)


@dataclass(frozen=True)
class Paired:
    """Alternating measurements of a baseline and a candidate: medians of each, and the median and
    quartiles of the per-pair ratios candidate / baseline (a pair is measured back to back, so its
    ratio shares the load of that moment; the median ratio is what figures report)."""

    baseline: float
    value: float
    ratio: float
    ratio_quartiles: tuple[float, float]


def interleaved_ratio(measure_baseline, measure_candidate, repeats: int) -> Paired:
    """On a shared machine, load drifts between runs (2x seen here), so the two are alternated and
    compared pair by pair; the order within a pair alternates too (ABBA), because the second of two
    back-to-back runs measured ~2% slower here even when both ran the same thing."""
    base, cand = [], []
    for repeat in range(repeats):
        if repeat % 2:
            cand.append(measure_candidate())
            base.append(measure_baseline())
        else:
            base.append(measure_baseline())
            cand.append(measure_candidate())
    ratios = np.array(cand) / np.array(base)
    low, high = np.quantile(ratios, [0.25, 0.75])
    return Paired(statistics.median(base), statistics.median(cand), float(np.median(ratios)),
                  (float(low), float(high)))


def flops_per_image(config: ExperimentConfig, device: torch.device, batch: int = 2) -> float:
    """Forward + backward FLOPs of one image (torch.utils.flop_counter; loss and optimizer excluded)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = replace(config, train=replace(config.train, batch_size=batch))
    model = build_model(config, NUM_PARTS).to(device)
    images, targets, joints = random_batch(config, device, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        pred = model(images)
        loss = belief_map_loss(pred, targets, joints[..., 2] > 0).sum()
        loss.backward()
    return counter.get_total_flops() / batch


# --- peak memory of a worker ---------------------------------------------------------------------

def memory_worker(config_path: str, overrides: list[str], cache_path: str, max_steps: int | None) -> dict:
    """Train one epoch over the cache in this process (the worker loop); return its peak RSS."""
    from preprocessing.cache import PoseCache

    config = load_config(config_path, overrides)
    cache = PoseCache(cache_path)
    device = torch.device("cpu")
    if max_steps is not None:
        config = replace(config, train=replace(config.train, max_steps_per_epoch=max_steps))
    t = config.train
    steps = len(train_batches(len(cache), t.batch_size, 0, 1, t.seed, 0, t.max_steps_per_epoch))
    _, step_model, optimizer, scheduler = build_training_state(
        config, device, StepSetup(t.precision, True, t.compile), steps)
    flip_permutation = flip_permutation_of(len(cache.joint_names), cache.flip_pairs)
    batches = epoch_batches(cache, config, 0, 1, 0, flip_permutation, device)
    sums = train_one_epoch(step_model, optimizer, scheduler, batches, config, None, device).sums
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"samples": len(cache), "steps": sums.steps, "images": sums.images, "peak_rss_mib": peak_kib / 1024}


def peak_rss_of_worker(config_path: str, overrides: list[str], cache_path: Path, max_steps: int | None) -> dict:
    """Run memory_worker in a fresh subprocess (so nothing else inflates its peak)."""
    command = [sys.executable, str(Path(__file__).resolve()), "memory-worker", "--config", config_path,
               "--cache", str(cache_path), "--json-out", "-"]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    for item in overrides:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="internal: the memory-measuring worker process")
    parser.add_argument("part", choices=["memory-worker"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--json-out", default="-")
    args = parser.parse_args()
    print(json.dumps(memory_worker(args.config, args.set, args.cache, args.max_steps)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
