"""Epoch iteration straight from the HDF5 pose cache, sharded over ranks, with a prefetch thread.

- Training: a permutation drawn from (seed, epoch), the same on every rank. Global batch s is
  permutation[s*B*W : (s+1)*B*W]; rank r takes its r-th slice of B. So no sample appears twice in
  an epoch and every rank runs the same number of steps (the remainder is dropped).
- Evaluation: contiguous shards without padding (rank r gets np.array_split(..., W)[r]); the
  ranks' metric counts are summed afterwards, so unequal shard sizes are fine.
- A background thread reads the next batch (sorted indices: h5py reads increasing indices
  best) while the model computes on the current one; on CUDA the tensors are pinned and copied
  with non_blocking=True.
- An optional `prepare` step (training: augmentation and target rendering) runs on each batch in
  order. On a CPU device it runs in the reader thread, off the training step's critical path; on
  an accelerator it runs in the consuming thread, where its kernels queue asynchronously anyway.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cpm_model.augment import AugmentSettings, random_augment
from cpm_model.config import ExperimentConfig

# Arrays that go to the compute device; the rest (affines, original joints, normalisers) stay on
# the CPU, where decoding and PCK run.
DEVICE_KEYS = ("images", "belief_maps", "joints")
TRAIN_KEYS = ("images", "belief_maps", "joints")  # without augmentation: the cached targets
AUGMENTED_TRAIN_KEYS = ("images", "joints")  # with it: targets re-rendered from the warped joints
EVAL_KEYS = ("images", "affine", "joints_original", "torso", "head_size")  # both normalisers: PCK and PCKh


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. seed, rank, epoch): independent streams per tuple."""
    high, low = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) & ((1 << 63) - 1)


def train_batches(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                  max_steps: int | None = None) -> list[np.ndarray]:
    """Positions (into 0..num_samples-1) of this rank's training batches for one epoch.

    Deterministic in (seed, epoch); identical step count on every rank; remainder dropped.
    """
    permutation = np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)
    global_batch = batch_size * world_size
    steps = num_samples // global_batch
    if max_steps is not None:
        steps = min(steps, int(max_steps))
    batches = []
    for step in range(steps):
        start = step * global_batch + rank * batch_size
        batches.append(np.sort(permutation[start:start + batch_size]))
    return batches


def eval_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's evaluation batches: a contiguous shard, no padding, no duplicates."""
    shard = np.array_split(np.arange(num_samples, dtype=np.int64), world_size)[rank]
    return [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]


def _to_tensors(arrays: dict[str, np.ndarray], pin: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in arrays.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if pin and key in DEVICE_KEYS:
            tensor = tensor.pin_memory()
        out[key] = tensor
    return out


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move the compute arrays; images become float (B, 3, S, S) in [0, 1], belief maps float32."""
    non_blocking = device.type == "cuda"
    out = dict(batch)
    if "images" in batch:
        images = batch["images"].to(device, non_blocking=non_blocking)
        out["images"] = images.permute(0, 3, 1, 2).float().div_(255.0)
    if "belief_maps" in batch:
        out["belief_maps"] = batch["belief_maps"].to(device, non_blocking=non_blocking).float()
    if "joints" in batch:
        out["joints"] = batch["joints"].to(device, non_blocking=non_blocking).float()
    return out


class CacheBatches:
    """Iterate over batches of cache rows with a background reader thread.

    `cache` needs `read(indices, keys) -> dict of arrays`; `rows` maps batch positions to cache rows
    (e.g. a subset); `batches` are lists of positions. Yields dicts of tensors (DEVICE_KEYS on
    `device`, the rest on the CPU) plus "index" (the cache rows, CPU).
    """

    def __init__(self, cache, rows: np.ndarray, batches: Sequence[np.ndarray], device: torch.device,
                 keys: Sequence[str] | None = None, prefetch: int = 2,
                 prepare: Callable[[dict], dict] | None = None):
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batches = list(batches)
        self.device = torch.device(device)
        self.keys = tuple(keys) if keys is not None else None
        self.prefetch = max(1, prefetch)
        self.prepare = prepare
        # Batches are prepared in order either way, so a seeded `prepare` draws the same numbers.
        self.prepare_in_reader = prepare is not None and self.device.type == "cpu"

    def __len__(self) -> int:
        return len(self.batches)

    def _read(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        indices = self.rows[positions]
        arrays = self.cache.read(indices, keys=self.keys) if self.keys else self.cache.read(indices)
        arrays["index"] = indices
        return _to_tensors(arrays, pin=self.device.type == "cuda")

    def _ready(self, item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = to_device(item, self.device)
        return self.prepare(batch) if self.prepare is not None else batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        done = object()
        slots: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def reader() -> None:
            try:
                for positions in self.batches:
                    if stop.is_set():
                        return
                    item = self._read(positions)
                    slots.put(self._ready(item) if self.prepare_in_reader else item)
                slots.put(done)
            except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
                slots.put(exc)

        thread = threading.Thread(target=reader, name="cache-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = slots.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item if self.prepare_in_reader else self._ready(item)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a reader waiting on a full queue
                try:
                    slots.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)


def training_augmenter(config: ExperimentConfig, generator: torch.Generator, flip_permutation):
    """The per-batch `prepare` step of training: augment, render targets from the warped joints.
    Batches must go through it in order (the generator's stream is the epoch's augmentation)."""
    settings = AugmentSettings.from_train_config(config.train)

    def prepare(batch: dict) -> dict:
        images, targets, joints = random_augment(batch["images"], batch["joints"], settings, generator,
                                                 flip_permutation, config.preprocess.sigma,
                                                 recrop_prob=config.train.recrop_prob,
                                                 crop_context=config.preprocess.crop_context)
        return {**batch, "images": images, "targets": targets, "joints": joints}

    return prepare


def epoch_batches(cache, config: ExperimentConfig, rank: int, world_size: int, epoch: int, flip_permutation,
                  device) -> CacheBatches:
    """This rank's training batches of one epoch; each carries "targets": re-rendered by the loader
    after augmentation, or the cached belief maps when train.augment is off."""
    t = config.train
    positions = train_batches(len(cache), t.batch_size, rank, world_size, t.seed, epoch, t.max_steps_per_epoch)
    if not t.augment:
        return CacheBatches(cache, np.arange(len(cache)), positions, device, keys=TRAIN_KEYS,
                            prepare=_cached_targets)
    generator = torch.Generator().manual_seed(derived_seed(t.seed, rank, epoch))
    return CacheBatches(cache, np.arange(len(cache)), positions, device, keys=AUGMENTED_TRAIN_KEYS,
                        prepare=training_augmenter(config, generator, flip_permutation))


def scoring_batches(cache, batch_size: int, rank: int, world_size: int, device) -> CacheBatches:
    """This rank's shard of a whole split, with what scoring needs."""
    rows = np.arange(len(cache))
    return CacheBatches(cache, rows, eval_batches(len(rows), batch_size, rank, world_size), device, keys=EVAL_KEYS)


def _cached_targets(batch: dict) -> dict:
    return {**batch, "targets": batch["belief_maps"]}
