"""A Tune callback that writes each trial's MLflow run from the sweep driver (the one writer).

Ray's stock MLflowLoggerCallback logs only the Tune config and opens a new run after a restore;
this one logs the project's flat params and computed receptive field, finds an existing run by the
trial's identity tag, skips epochs it has already logged (a restarted worker group reports again
from its last checkpoint), and records failures with their error text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray import tune

from pipeline.distributed.interrupts import SweepStopped, stop_requested
from pipeline.distributed.space import TrialSpec, trial_of
from pipeline.tracking import store
from pipeline.tracking.run_ops import open_op, row_metrics, summary_op
from pipeline.tracking.operations import LogArtifacts, LogModel, SetStatus, SetTags, metrics_op, ref_key, run_ref
from pipeline.tracking.writer import TrackingWriter, active_writer, failure_kind
from pipeline.train import metric_names as names
from pipeline.train.checkpoint import BEST_MODEL_FILE


class MLflowTrialLogger(tune.Callback):
    """Every write goes through a `TrackingWriter`: in order, queued while the store is away, and
    no failure of the store raises into Tune (an exception in a Tune callback ends the driver, or
    turns a trial that trained fine into ERROR); a bug in a write does."""

    def __init__(self, sweep_id: str, experiment_id: str, parent_run_id: str, specs: dict[str, TrialSpec],
                 cache_hashes: dict[str, dict[str, str]], extra_tags: dict[str, str],
                 repeats_grid_points: bool = False):
        self.sweep_id = sweep_id
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.specs = specs  # trial key -> spec, as the driver expanded the grid (public: no secrets)
        self.cache_hashes = cache_hashes  # trial key -> {split: cache file name}
        self.extra_tags = extra_tags
        # With num_samples > 1 one grid point runs several times: Tune's trial id tells them apart.
        self.repeats_grid_points = repeats_grid_points
        self._reset()

    def _reset(self) -> None:
        self.refs: dict[str, dict] = {}  # Tune trial id -> the run's reference (see tracking_writer)
        self.last_epoch: dict[str, int] = {}
        self.history_known: dict[str, bool] = {}  # False: the epochs already in MLflow are unknown
        self._restored_checked = False

    # Tune pickles its callbacks with the sweep (tuner.pkl) and `--resume` runs the unpickled one:
    # it keeps only its settings and finds this driver's writer by the sweep id.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("refs", "last_epoch", "history_known", "_restored_checked")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def writer(self) -> TrackingWriter:
        return active_writer(self.sweep_id)

    # --- run lookup ------------------------------------------------------------------------
    def _identity(self, trial) -> tuple[Any, dict]:
        """(trial spec, run reference) of a Tune trial."""
        spec = trial_of(self.specs, trial.config)
        key = f"{spec.key}-{trial.trial_id}" if self.repeats_grid_points else spec.key
        return spec, run_ref(self.experiment_id, {store.SWEEP_TAG: self.sweep_id, store.TRIAL_TAG: key})

    def _open(self, trial) -> dict:
        if trial.trial_id in self.refs:
            return self.refs[trial.trial_id]
        spec, ref = self._identity(trial)
        hashes = self.cache_hashes.get(spec.key, {})
        self.writer.submit(open_op(ref, spec, hashes, {"mlflow.parentRunId": self.parent_run_id,
                                                      "cpm.overrides": str(spec.overrides), **self.extra_tags}))
        self.refs[trial.trial_id] = ref
        logged = self.writer.max_step.get(ref_key(ref))  # None while the open is queued
        self.history_known[trial.trial_id] = logged is not None and self.writer.pending == 0
        self.last_epoch[trial.trial_id] = max(self.last_epoch.get(trial.trial_id, 0), logged or 0)
        return ref

    # --- Tune hooks ------------------------------------------------------------------------
    def on_step_begin(self, iteration, trials, **info):
        _stop_if_requested()
        if not self._restored_checked:
            self._restored_checked = True
            self._close_restored(trials)
        self.writer.flush()

    def on_step_end(self, iteration, trials, **info):
        _stop_if_requested()
        self.writer.flush()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._open(trial)

    def on_trial_restore(self, iteration, trials, trial, **info):
        self._open(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._log_result(trial, result)

    def _log_result(self, trial, result: dict) -> None:
        ref = self._open(trial)
        if names.is_epoch_row(result):
            epoch = int(result[names.EPOCH])
            if epoch <= self.last_epoch.get(trial.trial_id, 0):
                return  # already logged before a restart
            self.writer.submit(metrics_op(ref, row_metrics(result), epoch, names.TRAIN_LOSS,
                                          guard=not self.history_known.get(trial.trial_id, False)))
            self.last_epoch[trial.trial_id] = epoch
        elif result.get(names.ARTIFACTS_DIR):
            self._log_artifacts(ref, result)
        elif row_metrics(result):
            self.writer.submit(summary_op(ref, result, self._identity(trial)[0].config))

    def _log_artifacts(self, ref: dict, result: dict) -> None:
        directory = Path(result[names.ARTIFACTS_DIR])
        if not directory.is_dir():  # storage the driver cannot see: leave a pointer
            self.writer.submit(SetTags(run=ref, tags={"cpm.artifacts_dir": str(directory)}))
            return
        # The best weights go into the run's MLflow model (runs:/RUN_ID/model), not beside it.
        paths = [str(path) for path in sorted(directory.iterdir()) if path.is_file() and path.name != BEST_MODEL_FILE]
        self.writer.submit(LogArtifacts(run=ref, paths=paths))
        if (directory / BEST_MODEL_FILE).is_file():
            self.writer.submit(LogModel(run=ref, checkpoint=str(directory / BEST_MODEL_FILE)))
        if result.get(names.BEST_CHECKPOINT_DIR):
            self.writer.submit(SetTags(run=ref, tags={"cpm.best_checkpoint": str(result[names.BEST_CHECKPOINT_DIR])}))

    def on_trial_complete(self, iteration, trials, trial, **info):
        ref = self._open(trial)
        planned = trial.config.get("trial", {}).get("epochs")
        if planned and self.last_epoch.get(trial.trial_id, 0) < planned:  # a scheduler (ASHA) stopped it
            self.writer.submit(SetTags(run=ref, tags={"cpm.stopped_early": "true"}))
        self.writer.submit(SetStatus(run=ref, status="FINISHED"))

    def on_trial_error(self, iteration, trials, trial, **info):
        ref = self._open(trial)
        self.writer.submit(SetTags(run=ref, tags={"cpm.error": _error_text(trial), "cpm.status": "failed"}))
        self.writer.submit(SetStatus(run=ref, status="FAILED"))

    # --- resume -------------------------------------------------------------------------
    def _close_restored(self, trials) -> None:
        """On --resume: trials Tune had already finished are not run again, so their runs are
        closed here: a TERMINATED trial whose run is not FINISHED (the driver died between its
        last row and its end) gets the rows Tune kept on disk and FINISHED; an ERROR one FAILED."""
        for trial in trials:
            if trial.status not in ("TERMINATED", "ERROR") or trial.trial_id in self.refs:
                continue
            status = self._run_status(trial)
            if (trial.status, status) in (("TERMINATED", "FINISHED"), ("ERROR", "FAILED")):
                continue
            if trial.status == "ERROR":
                self.on_trial_error(0, trials, trial)
                continue
            for row in _result_rows(trial):
                self._log_result(trial, row)
            self.on_trial_complete(0, trials, trial)

    def _run_status(self, trial) -> str | None:
        """The MLflow status of a trial's run (None: no run, or the store does not answer)."""
        ref = self._identity(trial)[1]
        try:
            with self.writer.uninterrupted():  # a read holds SQLite's lock too: see TrackingWriter.flush
                run = store.find_run(self.writer.client, ref["experiment_id"], ref["identity"])
        except Exception as exc:  # the store's error: unknown, so close it again (every write of it is idempotent)
            if failure_kind(exc) is None:
                raise
            return None
        return run.info.status if run is not None else None


def _stop_if_requested() -> None:
    """A stop signal whose exception was lost in Ray's C++ code stops the sweep at the next step
    (its runs are already closed: pipeline.distributed.interrupts)."""
    signum = stop_requested()
    if signum is not None:
        raise SweepStopped(signum)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    text = ""
    if path and Path(path).is_file():
        text = Path(path).read_text(errors="replace")
    # The last exception line is the one that says what went wrong; keep it and the tail before it.
    lines = [line for line in text.strip().splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line or "Exception" in line), "")
    return (cause + "\n\n" + "\n".join(lines[-40:]))[:5000] if lines else "trial failed (no error text)"


def _result_rows(trial) -> list[dict]:
    """The rows Tune wrote for a trial (result.json in its directory), oldest first."""
    for directory in (trial.path, trial.local_path):
        path = Path(directory) / "result.json" if directory else None
        if path is not None and path.is_file():
            rows = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            return rows
    return []
