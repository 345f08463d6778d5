"""What the training loop needs from its surroundings, and the single-process implementation.

The loop (`pipeline.train.loop.train_worker`) talks only to a `WorkerContext`: which rank it is, which
device to use, how to sum numbers over ranks, how to wrap the model for data parallelism, where to
report metrics and checkpoints, and which checkpoint to resume from. `LocalContext` runs one process;
a Ray Train context implements the same methods with ray.train.report / get_checkpoint /
get_context, so the loop runs unchanged inside a Ray Train worker.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cpm_model.durable import copy_durably
from pipeline.train import metric_names as names
from pipeline.train.checkpoint import CHECKPOINT_FILE
from pipeline.train.progress import NoProgress, ProgressBar, ProgressLine


class WorkerContext:
    """Interface the training loop uses. Subclasses set rank, world_size and device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of `values` over all ranks (every rank must call it, same shape)."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait for every rank (a sum of zeros: needs nothing beyond all_reduce_sum)."""
        self.all_reduce_sum(np.zeros(1))

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as the optimiser should see it (DistributedDataParallel when world_size > 1)."""
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return model

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        """Publish one row of metrics and, optionally, a directory holding a checkpoint.

        Every rank calls it the same number of times; only the chief passes a directory.
        """
        raise NotImplementedError

    def restore_checkpoint_dir(self) -> str | None:
        """A directory holding the checkpoint to resume from, or None to start afresh."""
        raise NotImplementedError

    def report_restored(self, rows: list[dict]) -> None:
        """After a resume, the rows of the epochs the checkpoint holds. A local run's rows are in
        its metrics file already: nothing to do."""

    def restore_checkpoint_dirs(self) -> list[str]:
        """Directories to resume from, newest first: the loop takes the first whose checkpoint
        loads (a corrupt newest one falls back to an older kept one)."""
        latest = self.restore_checkpoint_dir()
        return [latest] if latest is not None else []

    def epoch_progress(self, epoch: int, epochs: int, steps: int, batch_size: int):
        """What shows an epoch's progress: by default the chief's line about once a minute."""
        return ProgressLine(epoch, epochs, steps) if self.is_chief else NoProgress()


def default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class LocalContext(WorkerContext):
    """One process. Checkpoints are copied to `out_dir/checkpoints/epoch_NNNN/` (through a temp
    directory, fsynced, then renamed); the newest `keep_checkpoints` are kept plus the best epoch's
    (the `best_epoch` every row carries), as Ray's CheckpointConfig does.

    `report` prints a row per call (unless quiet) and passes the metrics to `on_report`.
    `progress`: "bar" (a tqdm bar per epoch), "line" (a line about once a minute) or None.
    With `resume=True`, `restore_checkpoint_dirs` lists the saved checkpoints, newest first.
    """

    def __init__(self, out_dir: str | Path | None = None, device: torch.device | str | None = None,
                 resume: bool = False, keep_checkpoints: int = 1,
                 on_report: Callable[[dict, str | None], None] | None = None, quiet: bool = False,
                 progress: str | None = None):
        self.rank = 0
        self.world_size = 1
        self.device = torch.device(device) if device is not None else default_device()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume = resume
        self.keep_checkpoints = max(1, keep_checkpoints)
        self.best_epoch: int | None = None
        self.on_report = on_report
        self.quiet = quiet
        self.progress = progress
        self.history: list[dict] = []
        self.saved: list[Path] = []  # epoch directories written, in report order
        self._printed_header = False

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values).copy()

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        metrics = dict(metrics)
        self.history.append(metrics)
        self.best_epoch = metrics.get(names.BEST_EPOCH, self.best_epoch)
        saved_dir = None
        if checkpoint_dir is not None and self.out_dir is not None:
            saved_dir = self._persist(metrics, Path(checkpoint_dir))
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(_plain(metrics)) + "\n")
        if not self.quiet:
            self._print_row(metrics)
        if self.on_report is not None:
            self.on_report(metrics, str(saved_dir) if saved_dir else checkpoint_dir)

    def _persist(self, metrics: dict, source: Path) -> Path:
        root = self.out_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        target = self._epoch_dir(int(metrics.get(names.EPOCH, len(self.saved))))
        copy_durably(source, target)  # replaces an epoch written before a resume from an older one
        self.saved = [path for path in self.saved if path != target]  # pruning must not delete it
        self.saved.append(target)
        self._prune()
        return target

    def _epoch_dir(self, epoch: int) -> Path:
        return self.out_dir / "checkpoints" / f"epoch_{epoch:04d}"

    def _prune(self) -> None:
        best = self._epoch_dir(self.best_epoch) if self.best_epoch is not None else None
        newest = self.saved[-self.keep_checkpoints:]
        for path in self.saved:
            if path not in newest and path != best:
                shutil.rmtree(path, ignore_errors=True)
        self.saved = [path for path in self.saved if path in newest or path == best]

    def epoch_progress(self, epoch: int, epochs: int, steps: int, batch_size: int):
        if self.progress == "bar":
            return ProgressBar(epoch, epochs, steps, batch_size)
        return ProgressLine(epoch, epochs, steps) if self.progress == "line" else NoProgress()

    def checkpoint_dirs(self) -> list[Path]:
        """Saved epoch directories holding a checkpoint file, oldest first (temp ones never match)."""
        root = self.out_dir / "checkpoints" if self.out_dir is not None else None
        if root is None or not root.is_dir():
            return []
        return sorted(p for p in root.glob("epoch_*") if (p / CHECKPOINT_FILE).is_file())

    def best_checkpoint_dir(self) -> Path | None:
        """The best epoch's saved directory (None before any epoch is saved)."""
        if self.best_epoch is None or self.out_dir is None:
            return None
        path = self._epoch_dir(self.best_epoch)
        return path if (path / CHECKPOINT_FILE).is_file() else None

    def restore_checkpoint_dir(self) -> str | None:
        candidates = self.restore_checkpoint_dirs()
        return candidates[0] if candidates else None

    def restore_checkpoint_dirs(self) -> list[str]:
        if not self.resume:
            return []
        candidates = self.checkpoint_dirs()
        # Tracked for pruning: the newest (rewritten when its epoch is trained again after a fallback).
        self.saved = candidates[-1:]
        return [str(path) for path in reversed(candidates)]

    # --- printing --------------------------------------------------------------------------
    _COLUMNS = (("epoch", "{:>5}", "{:>5d}"), ("train_loss", "{:>11}", "{:>11.4g}"),
                ("pck", "{:>7}", "{:>7.3f}"), ("pck@0.1", "{:>7}", "{:>7.3f}"), ("auc", "{:>6}", "{:>6.3f}"),
                ("lr", "{:>9}", "{:>9.2e}"), ("epoch_time_s", "{:>7}", "{:>7.1f}"),
                ("images_per_s", "{:>8}", "{:>8.1f}"))

    def _print_row(self, metrics: dict) -> None:
        metric = names.PCKH.name if names.PCKH.name in metrics else names.PCK.name  # the dataset's protocol
        if not names.is_epoch_row(metrics):  # a summary row (e.g. the test score): its totals, not per joint
            shown = {k: v for k, v in metrics.items()
                     if not k.startswith(f"{names.TEST_PREFIX}{metric}_") or "stage" in k}
            print("  ".join(f"{k}={_fmt(v)}" for k, v in shown.items()), flush=True)
            return
        stage_keys = names.stage_keys(metrics)
        columns = [(key.replace(names.PCK.name, metric, 1) if key.startswith(names.PCK.name) else key, head, fmt)
                   for key, head, fmt in self._COLUMNS]
        if not self._printed_header:
            short = {"epoch_time_s": "time_s", "images_per_s": "img/s"}
            header = [fmt.format(short.get(key, key)) for key, fmt, _ in columns]
            header += [f"{metric + '_s' + str(names.stage_of_key(k)):>7}" for k in stage_keys]
            print(" ".join(header), flush=True)
            self._printed_header = True
        cells = []
        for key, head_fmt, fmt in columns:
            value = metrics.get(key)
            cells.append(fmt.format(value) if isinstance(value, (int, float)) and value is not None
                         else head_fmt.format("-"))
        cells += [f"{metrics[k]:>7.3f}" for k in stage_keys]
        print(" ".join(cells), flush=True)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plain(value):
    """JSON-safe copy (numpy scalars -> Python; NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
