"""The HDF5 pose caches a run reads: which sample caps apply to which split, and opening (building
when missing) the caches of a config. Training, `pipeline.fit`, the sweep driver and
`pipeline.evaluate` all go through `cache_caps`, so they score the same samples.
"""

from __future__ import annotations

from cpm_model.config import ExperimentConfig


def cache_caps(config: ExperimentConfig) -> dict[str, int | None]:
    """{split: max samples} (None = all). The test split takes the validation cap: a capped run is a
    small run, and scoring its test split whole would cost more than its training."""
    data = config.data
    return {"train": data.max_train_samples, "val": data.max_val_samples, "test": data.max_val_samples}


def build_split_cache(config: ExperimentConfig, split: str, max_samples: int | None, progress: bool = True,
                      rebuild_damaged: bool = False):
    """The cache file of one split of a config, built if missing (EmptySplitError for an empty
    split), holding its first `max_samples` samples (None = all). Readers leave a damaged file as
    it is (it stops them with the command that rebuilds it); the sweep driver rebuilds it."""
    from preprocessing.build import build_cache

    return build_cache(config.data.spec, split, config.preprocess, config.data.cache_dir, progress=progress,
                       max_samples=max_samples, rebuild_damaged=rebuild_damaged)


def open_caches(config: ExperimentConfig, ctx, splits=("train", "val"), progress: bool = True,
                cache_paths: dict | None = None) -> dict:
    """{split: PoseCache}: the given `cache_paths` ({split: file}, e.g. copied to this node), else
    built from the config; the chief (`ctx`, a WorkerContext) builds missing caches first, the
    others then find them."""
    from preprocessing.cache import PoseCache

    cache_paths = cache_paths or {}
    caps = cache_caps(config)
    missing = [split for split in splits if split not in cache_paths]
    if missing and ctx.world_size > 1:
        if ctx.is_chief:
            for split in missing:
                build_split_cache(config, split, caps[split], progress)
        ctx.barrier()
    return {split: PoseCache(cache_paths[split] if split in cache_paths
                             else build_split_cache(config, split, caps[split], progress and ctx.is_chief))
            for split in splits}


def open_split_caches(config: ExperimentConfig, split: str, progress: bool = True,
                      max_samples: int | None = None) -> list:
    """PoseCaches of a split ('all' = train, val and test, leaving out a split that is empty), each
    with its first `max_samples` samples (None = the whole split: the config's caps do not apply)."""
    from preprocessing.build import EmptySplitError
    from preprocessing.cache import PoseCache
    from preprocessing.datasets.base import DatasetError

    if split != "all":
        return [PoseCache(build_split_cache(config, split, max_samples, progress))]
    caches = []
    for part in ("train", "val", "test"):  # a small directory may leave a split empty
        try:
            caches.append(PoseCache(build_split_cache(config, part, max_samples, progress)))
        except EmptySplitError:
            pass
    if not caches:
        raise DatasetError(f"data spec {config.data.spec!r} has no samples to evaluate")
    return caches
