"""A Tune callback that writes each trial's MLflow run from the sweep driver (the one writer).

Ray's stock MLflowLoggerCallback logs only the Tune config and opens a new run after a restore;
this one logs the project's flat params and computed receptive field, finds an existing run by the
trial's identity tag, skips epochs it has already logged (a restarted worker group reports again
from its last checkpoint), and records failures with their error text.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag
from ray import tune

from . import tracking
from cpm_model.receptive_field import later_layout

from .sweep_space import make_trial

EPOCH_ROW = "train_loss"  # rows with it are per-epoch metrics; others are summaries
ARTIFACT_ROW = "artifacts_dir"
_SKIP = {"epoch", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "pid",
         "time_since_restore", "iterations_since_restore", "done", "trial_id", "date", "hostname",
         "node_ip", "checkpoint_dir_name", "should_checkpoint", ARTIFACT_ROW, "best_checkpoint_dir"}


def trial_overrides(trial_config: dict) -> dict[str, Any]:
    """The dotted overrides of a Tune trial: its grid point plus any sampled search values."""
    overrides = dict(trial_config["trial"]["overrides"])
    overrides.update(trial_config.get("search", {}))
    return overrides


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
    }
    params.update(c.flat_params())
    return params


class MLflowTrialLogger(tune.Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep_id: str,
                 base_config: dict, cache_hashes: dict[str, dict[str, str]], extra_tags: dict[str, str],
                 repeats_grid_points: bool = False):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_id = sweep_id
        self.base_config = base_config
        self.cache_hashes = cache_hashes  # trial key -> {split: cache file name}
        self.extra_tags = extra_tags
        # With num_samples > 1 one grid point runs several times: Tune's trial id tells them apart.
        self.repeats_grid_points = repeats_grid_points
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self.last_epoch: dict[str, int] = {}
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    # --- run lookup ------------------------------------------------------------------------
    def _run_for(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        from cpm_model.config import from_dict

        spec = make_trial(from_dict(self.base_config), trial_overrides(trial.config))
        key = f"{spec.key}-{trial.trial_id}" if self.repeats_grid_points else spec.key
        identity = {tracking.SWEEP_TAG: self.sweep_id, tracking.TRIAL_TAG: key}
        tags = {tracking.KIND_TAG: "trial", "mlflow.parentRunId": self.parent_run_id,
                "cpm.overrides": str(spec.overrides), **self.extra_tags}
        run_id, created = tracking.get_or_create_run(self.client, self.experiment_id, identity, spec.run_name, tags)
        hashes = self.cache_hashes.get(spec.key, {})
        if created:
            tracking.log_params(self.client, run_id, trial_params(spec, hashes))
            self._log_dataset(run_id, spec.config.data.spec, hashes)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                path.write_text(spec.config.to_yaml())
                self.client.log_artifact(run_id, str(path))
        self.runs[trial.trial_id] = run_id
        self.last_epoch[trial.trial_id] = self._logged_epochs(run_id)
        return run_id

    def _logged_epochs(self, run_id: str) -> int:
        history = self.client.get_metric_history(run_id, EPOCH_ROW)
        return max((m.step for m in history), default=0)

    def _log_dataset(self, run_id: str, spec: str, hashes: dict[str, str]) -> None:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        for split, path in sorted(hashes.items()):
            dataset = MetaDataset(source=LocalArtifactDatasetSource(path), name=f"{spec} [{split}]",
                                  digest=cache_hash(path))
            self.client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                         tags=[InputTag("mlflow.data.context", split)])])

    # --- Tune hooks ------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_restore(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        metrics = {k: v for k, v in result.items() if k not in _SKIP and _is_number(v)}
        if EPOCH_ROW in result:
            epoch = int(result["epoch"])
            if epoch <= self.last_epoch.get(trial.trial_id, 0):
                return  # already logged before a restart
            tracking.log_metrics(self.client, run_id, metrics, step=epoch)
            self.last_epoch[trial.trial_id] = epoch
        elif result.get(ARTIFACT_ROW):
            self._log_artifacts(run_id, result)
        elif metrics:
            step = int(result.get("epoch", 0) or 0)
            tracking.log_metrics(self.client, run_id, metrics, step=step)

    def _log_artifacts(self, run_id: str, result: dict) -> None:
        directory = Path(result[ARTIFACT_ROW])
        if not directory.is_dir():  # storage the driver cannot see: leave a pointer
            tracking.set_tags(self.client, run_id, {"cpm.artifacts_dir": str(directory)})
            return
        for path in sorted(directory.iterdir()):
            if path.is_file():
                self.client.log_artifact(run_id, str(path))
        if result.get("best_checkpoint_dir"):
            tracking.set_tags(self.client, run_id, {"cpm.best_checkpoint": str(result["best_checkpoint_dir"])})

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self._log_best(run_id)
        planned = trial.config.get("trial", {}).get("epochs")
        if planned and self.last_epoch.get(trial.trial_id, 0) < planned:  # a scheduler (ASHA) stopped it
            tracking.set_tags(self.client, run_id, {"cpm.stopped_early": "true"})
        self.client.set_terminated(run_id, status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        error = _error_text(trial)
        tracking.set_tags(self.client, run_id, {"cpm.error": error, "cpm.status": "failed"})
        self.client.set_terminated(run_id, status="FAILED")

    def _log_best(self, run_id: str) -> None:
        """best_* metrics: every metric's value at the epoch with the highest validation pck."""
        history = self.client.get_metric_history(run_id, "pck")
        if not history:
            return
        best = max(history, key=lambda m: (m.value if not math.isnan(m.value) else -math.inf, -m.step))
        run = self.client.get_run(run_id)
        best_metrics = {"best_epoch": best.step}
        for key in run.data.metrics:
            if key.startswith(("pck", "auc", "train_loss")):
                for m in self.client.get_metric_history(run_id, key):
                    if m.step == best.step:
                        best_metrics[f"best_{key}"] = m.value
        tracking.log_metrics(self.client, run_id, best_metrics, step=best.step)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    text = ""
    if path and Path(path).is_file():
        text = Path(path).read_text(errors="replace")
    # The last exception line is the one that says what went wrong; keep it and the tail before it.
    lines = [line for line in text.strip().splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line or "Exception" in line), "")
    return (cause + "\n\n" + "\n".join(lines[-40:]))[:5000] if lines else "trial failed (no error text)"
