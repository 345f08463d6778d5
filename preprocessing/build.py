"""Build HDF5 pose caches: dataset -> person crops -> ideal belief maps -> one file per split.

`build_cache` returns at once when the file for (dataset identity, split, content settings)
exists and passes its integrity check (a hit: only the annotation-level identity is computed, no
image is read; `preprocessing.cache.check_cache`, with the full checksum for files up to
FULL_CHECK_MAX_BYTES). A damaged file is a miss: it is rebuilt, with a warning naming it (or, with
`rebuild_damaged=False`, for readers, a CacheDamagedError that says how to rebuild it). Otherwise
it takes a lock next to the file (a second process asking for the same cache waits, then gets the
hit), preprocesses the samples in a pool of worker processes (decode, crop, warp, render), writes
them in order, in blocks, from the parent (memory stays flat whatever the dataset size) into a
temp file, and renames it into place. A failed build leaves only a temp file that is never taken
for a cache and is removed by the next build of the same cache.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import multiprocessing
import os
import shlex
import sys
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cpm_model.config import PreprocessConfig
from cpm_model.durable import stale_temp_files, temp_path_for
from cpm_model.geometry import STRIDE, invert_affine
from cpm_model.heatmaps import render_belief_maps
from cpm_model.joints import torso_size

from . import crops
from .cache import (LAYOUT, CacheDamagedError, CacheWriter, cache_file_name, cache_key, check_cache,
                    full_check_is_cheap)
from .datasets.base import DatasetError, PoseDataset, SampleSkipped
from .datasets.splits import SPLITS

log = logging.getLogger(__name__)

WRITE_BLOCK = 64  # samples per write; also bounds how far workers may run ahead (x IN_FLIGHT_BLOCKS)
IN_FLIGHT_BLOCKS = 4
MAX_SKIP_EXAMPLES = 5


class SkippedSamplesWarning(UserWarning):
    """Some samples could not be used and were left out of a cache."""


class DamagedCacheRebuiltWarning(UserWarning):
    """A cache file failed its integrity check and was rebuilt."""


class EmptySplitError(DatasetError):
    """The split has no sample to cache (a small dataset's hash split can leave one empty)."""

    def __init__(self, label: str, split: str):
        self.split = split
        super().__init__(f"{label} split '{split}' is empty: nothing to cache")


def content_settings(preprocess: PreprocessConfig) -> dict:
    """The preprocessing fields that change what a cache holds (not `workers`)."""
    settings = dataclasses.asdict(preprocess)
    settings.pop("workers", None)
    return settings


def num_workers(preprocess: PreprocessConfig) -> int:
    return preprocess.workers or os.cpu_count() or 1


# --- one sample -----------------------------------------------------------------------------------


def dataset_kinds(dataset: PoseDataset) -> list[str]:
    """Kind of each member dataset ('lspet', ...); one entry for a plain dataset (unchecked)."""
    members = getattr(dataset, "members", None)
    if members:
        return [m.identity().get("type", "") for m in members]
    return [dataset.identity().get("type", "")]


def preprocess_sample(dataset: PoseDataset, index: int, split: str, preprocess: PreprocessConfig,
                      ratios: list[float]) -> dict[str, np.ndarray]:
    """One cache row (see preprocessing.cache for the fields); raises SampleSkipped. `ratios`: the
    person-to-image ratio of each member dataset's kind."""
    sample = dataset.sample(index)
    image = dataset.load_image(index)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SampleSkipped("unreadable_image", f"{sample.image_path}: expected RGB uint8, got "
                                                f"{image.dtype} {image.shape}")
    image_hw = image.shape[:2]
    ratio = ratios[sample.extras.get("member", 0)] if len(ratios) > 1 else ratios[0]
    size = preprocess.input_size
    to_crop = crops.person_crop(sample, image_hw, split, preprocess.train_crop, preprocess.crop_context, size, ratio)
    joints_original = np.asarray(sample.joints, dtype=np.float64)
    joints = crops.crop_joints(joints_original, to_crop, size)
    return {
        "images": crops.warp_image(image, to_crop, size),
        "belief_maps": render_belief_maps(joints, size // STRIDE, preprocess.sigma).astype(np.float16),
        "joints": joints.astype(np.float32),
        "joints_original": joints_original.astype(np.float32),
        "affine": invert_affine(to_crop),
        "torso": np.float32(torso_size(joints_original[None], dataset.joint_set)[0]),
        "head_size": np.float32(sample.head_size),
        "source_index": np.int64(index),
        "image_size": np.array(image_hw, dtype=np.int32),
    }


# Worker-process state, set once by the pool initializer (the dataset is not re-sent per task).
_WORKER: dict = {}


def _init_worker(dataset, split, preprocess, ratios) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already
    cv2.setNumThreads(1)
    _WORKER.update(dataset=dataset, split=split, preprocess=preprocess, ratios=ratios)


def _work(index: int):
    """('ok', row) or ('skip', reason, message); any other exception fails the build."""
    try:
        return "ok", preprocess_sample(_WORKER["dataset"], int(index), _WORKER["split"], _WORKER["preprocess"],
                                       _WORKER["ratios"])
    except SampleSkipped as skip:
        return "skip", skip.reason, str(skip)


def _work_chunk(indices: list[int]) -> list:
    """Several samples per task: one round trip to a worker costs more than a small sample."""
    return [_work(index) for index in indices]


def _pool_context():
    """Workers forked from a clean server process, not from the caller: a plain fork deadlocks
    when the caller has already used OpenCV's or PyTorch's thread pools (their locks are copied
    mid-use). The server preloads this module, so each worker starts in milliseconds."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _ordered_results(executor: ProcessPoolExecutor, chunks: list, in_flight: int):
    """Results in the order of `chunks`, submitting a chunk only as one is consumed, so that at
    most `in_flight` chunks are queued or held (flat memory whatever the dataset size)."""
    pending = deque(executor.submit(_work_chunk, chunk) for chunk in chunks[:in_flight])
    upcoming = iter(chunks[in_flight:])
    while pending:
        try:
            done = pending.popleft().result()
        except BrokenProcessPool as error:
            raise RuntimeError("a preprocessing worker process died (killed, or out of memory?); "
                               "no cache was written") from error
        chunk = next(upcoming, None)
        if chunk is not None:
            pending.append(executor.submit(_work_chunk, chunk))
        yield from done


@contextmanager
def _results(dataset, indices, split, preprocess, ratios, workers: int):
    """Iterator of _work results in the order of `indices`.

    A ProcessPoolExecutor rather than multiprocessing.Pool: Pool.terminate() can hang when a
    build stops early (strict mode, an error), and a Pool whose worker dies waits forever; the
    executor cancels what is queued and reports a dead worker as BrokenProcessPool."""
    if workers <= 1 or len(indices) <= 1:
        # In the caller's process: leave its thread settings alone (cv2.setNumThreads also hangs
        # in a process forked while OpenCV's pool was busy).
        _WORKER.update(dataset=dataset, split=split, preprocess=preprocess, ratios=ratios)
        yield (_work(i) for i in indices)
        return
    size = max(1, min(8, len(indices) // (4 * workers)))
    chunks = [[int(i) for i in indices[start:start + size]] for start in range(0, len(indices), size)]
    in_flight = max(2 * workers, WRITE_BLOCK * IN_FLIGHT_BLOCKS // size)
    executor = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker,
                                   initargs=(dataset, split, preprocess, ratios))
    try:
        yield _ordered_results(executor, chunks, in_flight)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# --- one cache ------------------------------------------------------------------------------------


def _stack(rows: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.stack([row[name] for row in rows]) for name in LAYOUT}


@contextmanager
def _exclusive_lock(lock_path: Path):
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes, also if we crash
        yield


def _select_indices(dataset: PoseDataset, split: str, max_samples: int | None) -> np.ndarray:
    indices = np.asarray(dataset.split_indices(split), dtype=np.int64)
    return indices[:max_samples] if max_samples is not None else indices


def _check_samples(dataset: PoseDataset, indices: np.ndarray) -> None:
    """Annotation-level checks before any file is written (cheap: no image is decoded)."""
    expected = (dataset.joint_set.num_parts, 3)
    for index in indices:
        joints = np.asarray(dataset.sample(int(index)).joints)
        if joints.shape != expected:
            raise DatasetError(f"{dataset!r}: sample {index} has joints of shape {joints.shape}; expected {expected}")


def _write_cache(dataset, label: str, split, indices, preprocess, final_path, strict, progress, extra) -> Path:
    joint_set = dataset.joint_set
    # Looked up here: a worker process may not know a kind registered in this one.
    ratios = [crops.person_to_image_ratio(kind) for kind in dataset_kinds(dataset)]
    workers = min(num_workers(preprocess), max(1, len(indices)))
    skips = _Skips(f"{label} split '{split}'", strict)
    tmp_path = temp_path_for(final_path)
    writer = None
    try:
        with _results(dataset, indices, split, preprocess, ratios, workers) as results:
            writer = CacheWriter(tmp_path, joint_set.num_parts, preprocess.input_size, len(indices))
            bar = _progress_bar(results, final_path, len(indices), workers, progress)
            without_torso = _append_results(bar, writer, skips)
        if writer.num_samples == 0:
            raise DatasetError(f"{label} split '{split}': no usable sample out of "
                               f"{len(indices)} (skipped: {skips.counts or 'none'})")
        writer.finish({
            "joint_set": joint_set.name,
            "joint_names": list(joint_set.names),
            "flip_pairs": [list(pair) for pair in joint_set.flip_pairs],
            "settings": content_settings(preprocess),
            "crop_rule": extra["crop_rule"],
            "source": dataset.identity(),
            "data_spec": label,
            "split": split,
            "max_samples": extra.get("max_samples"),
            "skipped": skips.counts,
            "skipped_examples": skips.examples,
            "num_without_torso": without_torso,
        })
        writer = None
        os.replace(tmp_path, final_path)
    finally:
        if writer is not None:
            writer.close()
        tmp_path.unlink(missing_ok=True)
    if skips.counts:
        names = "; ".join(m for ms in skips.examples.values() for m in ms)
        message = (f"{final_path.name}: skipped {sum(skips.counts.values())} of {len(indices)} samples "
                   f"{skips.counts}, e.g. {names}")
        log.warning(message)
        warnings.warn(message, SkippedSamplesWarning, stacklevel=3)
    return final_path


class _Skips:
    """Samples skipped while building, counted by reason with a few messages each (strict: an error)."""

    def __init__(self, where: str, strict: bool):
        self.where, self.strict = where, strict
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, message: str) -> None:
        if self.strict:
            raise DatasetError(f"{self.where}: {message} (strict mode turns skipped samples into errors)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_SKIP_EXAMPLES:
            examples.append(message)


def _progress_bar(results, final_path: Path, total: int, workers: int, progress: bool):
    # A bar on a terminal; in a log (a sweep's job) one line, not a bar redrawn a thousand times.
    on_terminal = progress and sys.stderr.isatty()
    if progress and not on_terminal:
        print(f"building {final_path.name}: {total} images, {workers} worker(s)", flush=True)
    return tqdm(results, total=total, disable=not on_terminal, unit="img", desc=f"{final_path.name}",
                dynamic_ncols=True)


def _append_results(results, writer: CacheWriter, skips: _Skips) -> int:
    """Writes the samples in blocks of WRITE_BLOCK, counts the skipped ones; returns how many
    samples have no torso size (scored by no torso-normalised metric)."""
    rows: list[dict] = []
    without_torso = 0
    for result in results:
        if result[0] == "skip":
            skips.add(*result[1:])
            continue
        rows.append(result[1])
        without_torso += int(np.isnan(result[1]["torso"]))
        if len(rows) >= WRITE_BLOCK:
            writer.append(_stack(rows))
            rows = []
    if rows:
        writer.append(_stack(rows))
    return without_torso


def _resolve_dataset(data_spec) -> tuple[PoseDataset, str]:
    """(dataset, label for messages and attributes) from a spec string or a dataset object."""
    if isinstance(data_spec, str):
        from .spec import parse_data_spec

        return parse_data_spec(data_spec), data_spec
    return data_spec, repr(data_spec)


def _cache_extra(dataset: PoseDataset, max_samples: int | None) -> dict:
    """Content-determining inputs beyond the settings: the crop rule's constants, a sample cap."""
    extra = {"crop_rule": crops.crop_rule_constants(dataset_kinds(dataset))}
    if max_samples is not None:
        extra["max_samples"] = int(max_samples)
    return extra


def cache_path_for(dataset: PoseDataset, split: str, preprocess: PreprocessConfig, cache_dir,
                   max_samples: int | None = None) -> Path:
    """Where the cache of (dataset, split, settings) lives, whether or not it exists yet."""
    identity = dataset.identity()
    key = cache_key(identity, split, content_settings(preprocess), _cache_extra(dataset, max_samples))
    directory = Path(os.path.expanduser(os.fspath(cache_dir)))
    return directory / cache_file_name(identity, split, preprocess.input_size, key)


def rebuild_command(label: str, split: str, preprocess: PreprocessConfig, cache_dir,
                    max_samples: int | None = None) -> str:
    """The `python -m preprocessing build` command line that (re)builds this cache."""
    words = ["python", "-m", "preprocessing", "build", "--data", label, "--split", split,
             "--size", str(preprocess.input_size), "--out", os.fspath(cache_dir)]
    defaults = content_settings(PreprocessConfig())
    for key, value in content_settings(preprocess).items():
        if key != "input_size" and value != defaults.get(key):
            words += ["--set", f"preprocess.{key}={value}"]
    if max_samples is not None:
        words += ["--max-samples", str(max_samples)]
    return shlex.join(words)


def _damage(path: Path, hint: str) -> CacheDamagedError | None:
    """None when the file at `path` passes its check, else the error saying what is wrong."""
    try:
        check_cache(path, full=full_check_is_cheap(path), hint=hint)
    except CacheDamagedError as exc:
        return exc
    return None


def _build_one(dataset, label, split, preprocess, cache_dir, strict, progress, max_samples,
               rebuild_damaged: bool = True) -> tuple[Path, bool]:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    final_path = cache_path_for(dataset, split, preprocess, cache_dir, max_samples)
    hint = f"rebuild it with: {rebuild_command(label, split, preprocess, cache_dir, max_samples)}"
    if final_path.is_file():
        damage = _damage(final_path, hint)
        if damage is None:
            return final_path, True
        if not rebuild_damaged:
            raise damage
    indices = _select_indices(dataset, split, max_samples)
    if len(indices) == 0:
        raise EmptySplitError(label, split)
    _check_samples(dataset, indices)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(final_path.with_name(final_path.name + ".lock")):
        damage = _damage(final_path, hint) if final_path.is_file() else None
        if final_path.is_file() and damage is None:  # built (or repaired) by another process while we waited
            return final_path, True
        for stale in stale_temp_files(final_path):  # we hold the lock: these are from crashed builds
            stale.unlink(missing_ok=True)
        if damage is not None:
            message = f"{final_path} is damaged ({damage.reason}): rebuilding it"
            log.warning(message)
            warnings.warn(message, DamagedCacheRebuiltWarning, stacklevel=4)
        # The new file replaces the damaged one atomically (readers that have it open keep the old inode).
        _write_cache(dataset, label, split, indices, preprocess, final_path, strict, progress,
                     _cache_extra(dataset, max_samples))
        return final_path, False


def build_caches_with_status(data_spec, splits=SPLITS, preprocess: PreprocessConfig | None = None,
                             cache_dir=None, strict: bool = False, progress: bool = True,
                             max_samples: int | None = None, rebuild_damaged: bool = True,
                             skip_empty: bool = False) -> dict[str, tuple[Path, bool]]:
    """{split: (path, hit)}: like `build_caches`, also saying whether each file already existed
    (and passed its check). With `skip_empty`, an empty split is left out of the result instead of
    raising EmptySplitError."""
    if cache_dir is None:
        raise ValueError("cache_dir is required")
    preprocess = preprocess or PreprocessConfig()
    dataset, label = _resolve_dataset(data_spec)
    out = {}
    for split in splits:
        try:
            out[split] = _build_one(dataset, label, split, preprocess, cache_dir, strict, progress, max_samples,
                                    rebuild_damaged)
        except EmptySplitError:
            if not skip_empty:
                raise
    return out


def build_cache(data_spec, split: str, preprocess: PreprocessConfig, cache_dir, strict: bool = False,
                progress: bool = True, max_samples: int | None = None, rebuild_damaged: bool = True) -> Path:
    """Path of the HDF5 cache of `split` ('train', 'val' or 'test') of `data_spec` (a spec string
    such as 'lspet:/data/lspet', or a dataset object), built if it does not exist yet or is damaged.

    `strict` turns the first skipped sample into a DatasetError; `max_samples` keeps the first N
    samples of the split (a different cache). Raises DatasetError for bad input, before writing
    (EmptySplitError for an empty split). `rebuild_damaged=False` (readers): a damaged file raises
    CacheDamagedError with the command that rebuilds it instead of being rebuilt here.
    """
    return build_caches_with_status(data_spec, [split], preprocess, cache_dir, strict, progress,
                                    max_samples, rebuild_damaged)[split][0]


def build_caches(data_spec, splits=SPLITS, preprocess: PreprocessConfig | None = None, cache_dir=None,
                 strict: bool = False, progress: bool = True, max_samples: int | None = None) -> dict[str, Path]:
    """{split: path} for several splits of one dataset (the spec is read once)."""
    statuses = build_caches_with_status(data_spec, splits, preprocess, cache_dir, strict, progress, max_samples)
    return {split: path for split, (path, _) in statuses.items()}
