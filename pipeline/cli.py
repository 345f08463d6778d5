"""What the command-line entry points share: the config from their arguments, and bad input turned
into one line on stderr with exit status 2 (no traceback).
"""

from __future__ import annotations

import sys
from typing import Callable

from cpm_model.config import DEFAULT_PRESET, ConfigError, ExperimentConfig, load_config, parse_override

INPUT_ERROR_EXIT = 2


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


def config_from_args(args) -> ExperimentConfig:
    """The preset of --config (a packaged name or a YAML file; else the `default` preset, the same
    for every command) with --set overrides, then --data / --tracking-uri / --storage-path where the
    command has them."""
    return load_config(args.config or DEFAULT_PRESET, args.overrides, data=getattr(args, "data", None),
                       tracking_uri=getattr(args, "tracking_uri", None),
                       storage_path=getattr(args, "storage_path", None))


def check_data_spec(config: ExperimentConfig) -> None:
    """Open the datasets `data.spec` names (the kind known, the path there, the reader's files
    present: reading annotations, not images) before any work; ConfigError naming the spec."""
    from preprocessing.datasets.base import DatasetError
    from preprocessing.spec import parse_data_spec

    try:
        parse_data_spec(config.data.spec)
    except DatasetError as exc:
        raise ConfigError(f"data spec {config.data.spec!r} (--data or data.spec): {exc}") from None


def with_overrides(config: ExperimentConfig, overrides: list[str], **dotted) -> ExperimentConfig:
    """A config read from a checkpoint, with --set overrides and the named dotted values that are
    not None (e.g. data.spec from --data)."""
    changes = dict(parse_override(text) for text in overrides)
    changes.update({key.replace("__", "."): value for key, value in dotted.items() if value is not None})
    return config.with_overrides(changes) if changes else config


def is_input_error(exc: BaseException) -> bool:
    """Errors that describe bad input (file, config, data spec, tracking store), reported as one line."""
    from pipeline.tracking.errors import TrackingError
    from pipeline.train.checkpoint import CheckpointError
    from preprocessing.datasets.base import DatasetError

    return isinstance(exc, (CheckpointError, ConfigError, DatasetError, FileNotFoundError, UsageError, TrackingError))


def report_input_errors(work: Callable[[], int]) -> int:
    """`work()`'s exit status; bad input becomes `error: ...` on stderr and exit status 2."""
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: its traceback is wanted
        if is_input_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return INPUT_ERROR_EXIT
        raise
