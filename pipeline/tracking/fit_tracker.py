"""MLflow tracking for `pipeline.fit`: the run a sweep's trial gets (the same params, epoch rows,
test row, artifacts and pose model), written through the same outage-proof `TrackingWriter`, so a
single fit and a sweep's trials of one configuration land together in `pipeline.report`.

The run is found again by an identity tag kept in the output directory: `fit --resume` goes on
writing the run it started, a fresh fit into the same directory starts a new one.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from mlflow import MlflowClient

from pipeline.distributed.space import make_trial
from pipeline.tracking import store
from pipeline.tracking.run_ops import open_op, row_metrics, summary_op
from pipeline.tracking.operations import LogArtifacts, LogModel, SetStatus, metrics_op, ref_key, run_ref
from pipeline.tracking.writer import SPOOL_FILE, TrackingWriter, bound_http_retries
from pipeline.train import metric_names as names

IDENTITY_FILE = "mlflow_run.json"  # in the fit's output directory: the run's identity tag
FIT_TAG = "cpm.fit_id"
DRAIN_TIMEOUT_S = 60.0


class FitTracker:
    """Pass `on_report` to the LocalContext; call `finish` once the fit's files are written."""

    def __init__(self, tracking_uri: str | None, config, out_dir: Path, resume: bool):
        self.uri = store.resolve_tracking_uri(tracking_uri)
        store.check_reachable(self.uri)  # one line now rather than a queue of writes nobody takes
        bound_http_retries()
        self.config = config
        experiment_id = store.get_or_create_experiment(MlflowClient(self.uri), config.tracking.experiment)
        identity_path = out_dir / IDENTITY_FILE
        if resume and identity_path.is_file():
            identity = json.loads(identity_path.read_text())
        else:
            identity = {FIT_TAG: uuid.uuid4().hex}
            identity_path.write_text(json.dumps(identity))
        self.ref = run_ref(experiment_id, identity)
        self.writer = TrackingWriter(self.uri, spool_path=out_dir / SPOOL_FILE)
        spec = make_trial(config, {})
        self.writer.submit(open_op(self.ref, spec, {}, {"cpm.source": "pipeline.fit",
                                                       "cpm.fit_dir": str(out_dir.resolve())}))
        self.last_epoch = self.writer.max_step.get(ref_key(self.ref)) or 0
        self.history_known = self.writer.pending == 0

    def on_report(self, row: dict, checkpoint_dir: str | None) -> None:
        if names.is_epoch_row(row):
            epoch = int(row[names.EPOCH])
            if epoch > self.last_epoch:  # a resumed fit reports no epoch twice; a guard covers a lost answer
                self.writer.submit(metrics_op(self.ref, row_metrics(row), epoch, names.TRAIN_LOSS,
                                              guard=not self.history_known))
                self.last_epoch = epoch
        elif row_metrics(row):
            self.writer.submit(summary_op(self.ref, row, self.config))
        self.writer.flush()

    def finish(self, status: str, artifacts: list[Path], best_checkpoint: Path | None) -> str:
        """Artifacts, the best weights as the run's pose model, the end status; returns where to look."""
        self.writer.submit(LogArtifacts(run=self.ref, paths=[str(p) for p in artifacts]))
        if best_checkpoint is not None and best_checkpoint.is_file():
            self.writer.submit(LogModel(run=self.ref, checkpoint=str(best_checkpoint)))
        self.writer.submit(SetStatus(run=self.ref, status=status))
        if not self.writer.drain(DRAIN_TIMEOUT_S):
            return (f"MLflow: {self.writer.pending} write(s) not sent to {self.writer.shown_uri}; they are kept in "
                    f"{self.writer.spool_path} and sent by `--resume`")
        run_id = self.writer.run_id(self.ref)
        return f"MLflow run {run_id} in experiment '{self.config.tracking.experiment}' at {self.writer.shown_uri}"
