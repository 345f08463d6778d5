"""What a training run's MLflow run is made of, the same for a sweep's trial (written by the Tune
callback in trial_logger) and a single `pipeline.fit` (fit_tracker): its params, the operation that
opens it, and the metrics operation of each row the training loop reports. No Ray here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpm_model.receptive_field import later_layout
from pipeline.tracking import store
from pipeline.tracking.operations import LogMetrics, OpenRun, metrics_op
from pipeline.train import metric_names as names
from pipeline.train.scoring import protocol_for

# Row keys that are bookkeeping (Tune's and the loop's), not metrics.
_SKIP = {names.EPOCH, "training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "pid",
         "time_since_restore", "iterations_since_restore", "done", "trial_id", "date", "hostname",
         "node_ip", "checkpoint_dir_name", "should_checkpoint", names.ARTIFACTS_DIR, names.BEST_CHECKPOINT_DIR,
         names.RESENT}


def cache_hash(path: str) -> str:
    """The content hash a cache file's name carries (…-{split}-{size}px-{hash}.h5)."""
    return Path(path).stem.rsplit("-", 1)[-1]


def trial_params(spec, cache_hashes: dict[str, str]) -> dict[str, Any]:
    """Flat params, the same names in every run: the paper's ablation axes first, then the config."""
    c = spec.config
    later_kernel, later_convs = later_layout(c.model.backbone, c.model.later_kernel, c.model.later_convs)
    params = {
        "stages": c.model.stages,
        "receptive_field_px": spec.receptive_field_px,
        "receptive_field_rel_person": spec.relative_receptive_field,
        "intermediate_supervision": c.train.intermediate_supervision,
        "training_scheme": c.train.training_scheme,
        "kernel_size": later_kernel,
        "later_convs": later_convs,
        "width": c.model.width,
        "input_size": c.preprocess.input_size,
        "backbone": c.model.backbone,
        "dataset": c.data.spec,
        "cache_hash": cache_hash(cache_hashes["train"]) if "train" in cache_hashes else "",
        "learning_rate": c.train.lr,
        "optimizer": c.train.optimizer,
        "seed": c.train.seed,
        "metric": protocol_for(c).name,  # pck (PCK@0.2, torso) or pckh (PCKh@0.5, MPII)
    }
    params.update(c.flat_params())
    return params


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def open_op(ref: dict, spec, cache_hashes: dict[str, str], tags: dict[str, str]) -> OpenRun:
    """The operation that finds or creates a training run: name, tags, flat params, the cache files
    as dataset inputs, the config as config.yaml."""
    return OpenRun(
        run=ref, run_name=spec.run_name, history_key=names.TRAIN_LOSS,
        tags={store.KIND_TAG: "trial", **tags},
        params={k: str(v) for k, v in trial_params(spec, cache_hashes).items()},
        datasets=[{"name": f"{spec.config.data.spec} [{split}]", "path": path, "digest": cache_hash(path),
                   "split": split} for split, path in sorted(cache_hashes.items())],
        config_yaml=spec.config.to_yaml())


def row_metrics(row: dict) -> dict[str, float]:
    """A row's metrics; on an epoch row that is the new best, best_{key} = its value too."""
    metrics = {k: v for k, v in row.items() if k not in _SKIP and is_number(v)}
    if names.is_epoch_row(row) and row.get(names.BEST_EPOCH) == row.get(names.EPOCH):
        metrics.update({names.BEST_PREFIX + k: v for k, v in metrics.items() if names.is_best_tracked(k)})
    return metrics


def summary_op(ref: dict, row: dict, config) -> LogMetrics:
    """A summary row (the test split) comes once per run; a resumed run may send it again, so the
    write checks the run's history of its test key (or another of its keys) first."""
    metrics = row_metrics(row)
    test_key = names.TEST_PREFIX + protocol_for(config).name
    probe = test_key if test_key in metrics else sorted(metrics)[0]
    return metrics_op(ref, metrics, int(row.get(names.EPOCH, 0) or 0), probe, guard=True)
