"""Ordered MLflow writes that survive an outage of the tracking store.

The sweep driver is the single writer of every run. Each write is a small operation (a dataclass
of `pipeline.tracking.operations`, one JSON line in a spool file); `submit` sends it at once when the
store answers and nothing is waiting, otherwise it joins a queue (in memory, in order, and appended
to a spool file in the sweep's storage directory) that is sent, still in order, when the store is
back. The store's failures never propagate to the caller: a transient one (connection refused,
timeout, 5xx) keeps the operation queued and retries with backoff; a permanent one (the store
rejects the request) drops it with a warning naming the cause. Any other exception is a bug, not
the store's: it raises (`failure_kind`).

A driver that dies during an outage leaves the spool file behind; the next driver of the same
sweep (`--resume`) replays it before anything else. Replaying must not duplicate metrics
(MLflow appends every logged value, and a request that reached the server just before the
connection broke may have been stored): metric operations keep the timestamp they were created
with (the SQL store ignores an identical metric), and any operation that may already have been
stored (retried, replayed, or queued behind others) first checks the run's history of one of its
keys for its step. One batch is committed by the SQL store in one transaction, so one key tells.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable, ContextManager, Literal, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from pipeline.tracking import store
from pipeline.tracking.errors import TrackingError
from pipeline.tracking.operations import (
    ClearEndTags, LogArtifacts, LogMetrics, LogModel, OpenRun, Operation, SetStatus, SetTags, from_json, ref_key,
    to_json)

SPOOL_FILE = "mlflow_spool.jsonl"
END_TAGS = ("cpm.status", "cpm.error")  # how a run ended other than FINISHED
FIRST_RETRY_S = 2.0
MAX_RETRY_S = 15.0
# MLflow's HTTP client retries a failed request 7 times over about 4 minutes by default, with a
# 120 s timeout: during an outage every write would stall Tune that long. A few seconds per
# attempt is enough; the queue above retries for as long as it takes.
HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED",
                    "ENDPOINT_NOT_FOUND", "NOT_FOUND", "INVALID_REQUEST"}


def say(message: str) -> None:
    """Print a line; never fails (it may run in a signal handler that interrupted a print, where
    a buffered stream raises 'reentrant call')."""
    try:
        print(message, flush=True)
    except (RuntimeError, OSError, ValueError):
        pass


def bound_http_retries() -> None:
    """Make one MLflow HTTP call fail within seconds (the user's own settings win)."""
    for key, value in HTTP_RETRY_ENV.items():
        os.environ.setdefault(key, value)


class Unwritable(Exception):
    """A write whose content cannot be stored (a model from a checkpoint that cannot be read):
    dropped like one the store rejects."""


def failure_kind(exc: BaseException) -> Literal["transient", "rejected"] | None:
    """"transient": worth retrying (the store is away or overloaded: connection errors of the
    HTTP client, the database or the file system, MLflow's 5xx and TEMPORARILY_UNAVAILABLE);
    "rejected": the store refuses the request, retrying would fail the same way; None: not the
    store's error at all (a bug), which the caller must raise."""
    if isinstance(exc, MlflowException):  # RestException (an HTTP store's answer) included
        return "rejected" if exc.error_code in _PERMANENT_CODES else "transient"
    if isinstance(exc, (Unwritable, TrackingError)):  # TrackingError: a run the store cannot search for
        return "rejected"
    if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("requests", "urllib3", "sqlalchemy"):
        return "transient"
    return None


T = TypeVar("T")


def short_error(exc: BaseException, uri: str) -> str:
    """A store's error on one line, without the URI's secrets."""
    return store.scrub(str(exc), uri)[:300] or type(exc).__name__


def call_while_transient(call: Callable[[], T], uri: str, timeout_s: float, log: Callable[[str], None] = say) -> T:
    """`call()` on the store at `uri`, tried again with back-off while it fails for a transient
    reason (the store is away or overloaded) and `timeout_s` has not passed; the last failure, or a
    rejection, is raised. For a caller that cannot go on without the answer; `call` must be safe
    to repeat."""
    deadline = time.monotonic() + timeout_s
    delay = FIRST_RETRY_S
    while True:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below; a bug is raised as it is
            if failure_kind(exc) != "transient" or time.monotonic() + delay > deadline:
                raise
            log(f"Tracking: {store.redact_uri(uri)} did not answer ({short_error(exc, uri)}); "
                f"trying again in {delay:.0f} s")
        time.sleep(delay)
        delay = min(2 * delay, MAX_RETRY_S)


# Tune pickles the sweep's callbacks and `--resume` runs the unpickled ones: the trial logger can
# only find this driver's writer by the sweep id (pipeline.tracking.trial_logger).
_ACTIVE: dict[str, "TrackingWriter"] = {}  # sweep id -> this driver's writer


def active_writer(sweep_id: str) -> "TrackingWriter":
    """The writer the sweep's driver opened (`TrackingWriter.activate`)."""
    if sweep_id not in _ACTIVE:
        raise RuntimeError(f"no tracking writer for sweep {sweep_id!r} in this process")
    return _ACTIVE[sweep_id]


class TrackingWriter:
    def __init__(self, tracking_uri: str, spool_path: Path | None = None, log: Callable[[str], None] | None = None,
                 uninterrupted: Callable[[], ContextManager] = contextlib.nullcontext):
        self.tracking_uri = tracking_uri
        # Each write runs inside it: the sweep driver's stop signals wait for the write in progress
        # (pipeline.distributed.interrupts.uninterrupted).
        self.uninterrupted = uninterrupted
        self.shown_uri = store.redact_uri(tracking_uri)  # for messages: no secrets
        self.client = MlflowClient(tracking_uri)
        self.spool_path = Path(spool_path) if spool_path else None
        self.log = log or say
        self.queue: deque[Operation] = deque()
        self.run_ids: dict[str, str] = {}  # ref key -> run id
        self.max_step: dict[str, int] = {}  # ref key -> highest step of the open op's history key
        self.open_refs: dict[str, dict] = {}  # runs opened and not yet ended, by ref key
        self.sent_from_queue = 0
        self._next_attempt = 0.0
        self._delay = FIRST_RETRY_S
        self._down_since: float | None = None
        self._load_spool()

    # --- public ----------------------------------------------------------------------------
    def register(self, ref: dict, run_id: str) -> None:
        self.run_ids[ref_key(ref)] = run_id

    def run_id(self, ref: dict) -> str | None:
        return self.run_ids.get(ref_key(ref))

    @property
    def pending(self) -> int:
        return len(self.queue)

    def activate(self, sweep_id: str) -> "TrackingWriter":
        _ACTIVE[sweep_id] = self
        return self

    def _track_open(self, op: Operation) -> None:
        key = ref_key(op.run)
        if isinstance(op, OpenRun) or (isinstance(op, SetStatus) and op.status == "RUNNING"):
            self.open_refs[key] = op.run
        elif isinstance(op, SetStatus):
            self.open_refs.pop(key, None)

    def close_open_runs(self, status: str, reason: str) -> int:
        """The driver stops (KILLED) or fails (FAILED): end every run still open the same way.
        Queued and spooled before sending (`drain`), so a kill during the send loses nothing."""
        refs = list(self.open_refs.values())
        for ref in refs:
            self.enqueue(SetTags(run=ref, tags=dict(zip(END_TAGS, (status.lower(), reason)))))
            self.enqueue(SetStatus(run=ref, status=status))
        return len(refs)

    def submit(self, op: Operation) -> None:
        """Send now if possible, else queue (and spool). Raises only for a bug (`flush`)."""
        self._track_open(op)
        if self.queue:
            op.behind = True  # queued behind others: it may be replayed after a partial send
        self.queue.append(op)
        if len(self.queue) > 1:
            self._append_spool(op)
        self.flush()
        if self.queue and len(self.queue) == 1 and self.queue[0] is op:
            self._rewrite_spool()  # the first write that failed: start the spool file

    def enqueue(self, op: Operation) -> None:
        """Queue and spool first, send later (`drain`): for writes a kill may interrupt."""
        self._track_open(op)
        op.behind = True
        self.queue.append(op)
        self._append_spool(op)

    def flush(self, force: bool = False) -> bool:
        """Send queued operations in order until one fails; True when the queue is empty. An
        exception that is not the store's (`failure_kind`) is a bug: it raises, and its operation
        leaves the queue first, so that the writes behind it (closing the runs) still go out."""
        if not self.queue:
            return True
        if not force and time.monotonic() < self._next_attempt:
            return False
        progressed = False
        while self.queue:
            # A stop signal waits until this write is done and off the queue: its handler closes
            # the runs, and cutting in here it would send this write again and wait on its lock.
            with self.uninterrupted():
                taken = self._send_first()
            if not taken:
                if progressed:
                    self._rewrite_spool()
                return False
            progressed = True
        self._note_up()
        self._rewrite_spool()
        return True

    def _send_first(self) -> bool:
        """Send the queue's first operation. True when it has left the queue (stored, or rejected
        by the store and dropped); False when the store is away (it stays first)."""
        op = self.queue[0]
        maybe_stored = op.may_be_stored()
        op.attempts += 1  # counted before: a kill mid-call replays it guarded
        try:
            self._execute(op, maybe_stored)
        except Exception as exc:
            failure = failure_kind(exc)
            if failure is None:
                self.queue.popleft()
                self._rewrite_spool()
                raise
            if failure == "transient":
                self._note_down(exc)
                return False
            self.log(f"Tracking: dropped a '{op.kind}' write the store rejects: {self._short(exc)}")
        self.queue.popleft()
        if self._down_since is not None or op.replayed:
            self.sent_from_queue += 1
        return True

    def drain(self, timeout_s: float) -> bool:
        """Keep sending until the queue is empty or the store has not taken a write for
        `timeout_s`; True when empty."""
        deadline = time.monotonic() + timeout_s
        while True:
            before = len(self.queue)
            if self.flush(force=True):
                break
            if len(self.queue) < before:  # the store takes writes again: wait for it, not the clock
                deadline = time.monotonic() + timeout_s
            wait = min(self._delay, deadline - time.monotonic())
            if wait <= 0:
                break
            time.sleep(wait)
        if self.queue:
            where = f" (kept in {self.spool_path}; `--resume` sends them)" if self.spool_path else ""
            self.log(f"Tracking: {len(self.queue)} write(s) not sent to {self.shown_uri}{where}")
        return not self.queue

    # --- operations ------------------------------------------------------------------------
    def _resolve(self, ref: dict) -> str:
        key = ref_key(ref)
        if key not in self.run_ids:
            run = store.find_run(self.client, ref["experiment_id"], ref["identity"])
            if run is None:
                raise MlflowException(f"no run with tags {ref['identity']}", error_code=RESOURCE_DOES_NOT_EXIST)
            self.run_ids[key] = run.info.run_id
        return self.run_ids[key]

    def _execute(self, op: Operation, maybe_stored: bool) -> None:
        if isinstance(op, OpenRun):
            self._open(op, op.attempts > 1 or op.replayed)
            return
        run_id = self._resolve(op.run)
        match op:
            case LogMetrics():
                if (op.guard or maybe_stored) and self._already_logged(run_id, op.probe, op.step):
                    return
                items = [Metric(k, float(v), op.timestamp, op.step) for k, v in sorted(op.metrics.items())]
                for start in range(0, len(items), 500):
                    self.client.log_batch(run_id, metrics=items[start:start + 500])
            case SetTags():
                store.set_tags(self.client, run_id, op.tags)
            case LogArtifacts():
                for path in op.paths:
                    if Path(path).is_file():
                        self.client.log_artifact(run_id, path)
            case LogModel():
                self._log_model(op, run_id)
            case SetStatus(status="RUNNING"):
                self.client.update_run(run_id, status="RUNNING")
            case SetStatus():
                self.client.set_terminated(run_id, status=op.status)
            case ClearEndTags():
                self._clear_end_tags(run_id)
            case _:
                raise TypeError(f"the tracking writer cannot send a {type(op).__name__}")

    def _log_model(self, op: LogModel, run_id: str) -> None:
        if not Path(op.checkpoint).is_file():
            return
        # pyfunc, pandas and torch: imported only here
        from pipeline.tracking.pose_model import log_pose_model
        from pipeline.train.checkpoint import CheckpointError

        try:
            log_pose_model(self.tracking_uri, op.run["experiment_id"], run_id, op.checkpoint)
        except CheckpointError as exc:  # a torn or foreign file: no model can be made of it
            raise Unwritable(str(exc)) from exc

    def _open(self, op: OpenRun, retried: bool) -> None:
        """Find or create the run; on creation (or a retry, which may follow a half-done creation)
        write its params, dataset inputs and config (all of which MLflow stores idempotently)."""
        ref = op.run
        run_id, created = store.get_or_create_run(self.client, ref["experiment_id"], ref["identity"],
                                                     op.run_name, op.tags)
        if created or retried:
            store.log_params(self.client, run_id, op.params)
            if op.datasets:
                _log_datasets(self.client, run_id, op.datasets)
            if op.config_yaml:
                import tempfile
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "config.yaml"
                    path.write_text(op.config_yaml)
                    self.client.log_artifact(run_id, str(path))
        else:
            self._clear_end_tags(run_id)
        key = ref_key(ref)
        self.run_ids[key] = run_id
        if op.history_key:
            history = self.client.get_metric_history(run_id, op.history_key)
            self.max_step[key] = max((m.step for m in history), default=0)

    def _clear_end_tags(self, run_id: str) -> None:
        """A reopened run (resumed, retried) drops the tags that said how it ended before."""
        tags = self.client.get_run(run_id).data.tags
        for key in END_TAGS:
            if key in tags:
                self.client.delete_tag(run_id, key)

    def _already_logged(self, run_id: str, probe: str, step: int) -> bool:
        return any(m.step == step for m in self.client.get_metric_history(run_id, probe))

    # --- outage bookkeeping ----------------------------------------------------------------
    def _short(self, exc: BaseException) -> str:
        return short_error(exc, self.tracking_uri)

    def _note_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._delay = FIRST_RETRY_S
            where = f", spooled to {self.spool_path}" if self.spool_path else ""
            self.log(f"Tracking: {self.shown_uri} unreachable ({self._short(exc)}); queueing writes in order"
                     f"{where}, retrying with backoff")
        else:
            self._delay = min(self._delay * 2, MAX_RETRY_S)
        self._next_attempt = now + self._delay

    def _note_up(self) -> None:
        if self._down_since is not None:
            self.log(f"Tracking: {self.shown_uri} is back after {time.monotonic() - self._down_since:.0f} s; "
                     f"{self.sent_from_queue} queued write(s) sent")
        self._down_since = None
        self.sent_from_queue = 0
        self._next_attempt = 0.0
        self._delay = FIRST_RETRY_S

    # --- spool file ------------------------------------------------------------------------
    def _append_spool(self, op: Operation) -> None:
        if self.spool_path is None:
            return
        try:
            self.spool_path.parent.mkdir(parents=True, exist_ok=True)
            with self.spool_path.open("a") as handle:
                handle.write(json.dumps(to_json(op)) + "\n")
        except OSError as exc:
            self.log(f"Tracking: cannot write the spool file {self.spool_path} ({exc}); queued writes are "
                     f"kept in memory only")

    def _rewrite_spool(self) -> None:
        """The file holds exactly the queue (atomically replaced), or is gone when it is empty."""
        if self.spool_path is None:
            return
        try:
            if not self.queue:
                self.spool_path.unlink(missing_ok=True)
                return
            self.spool_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.spool_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(to_json(op)) + "\n" for op in self.queue))
            os.replace(tmp, self.spool_path)
        except OSError as exc:
            self.log(f"Tracking: cannot write the spool file {self.spool_path} ({exc})")

    def _load_spool(self) -> None:
        if self.spool_path is None or not self.spool_path.is_file():
            return
        lines = self.spool_path.read_text(errors="replace").splitlines()
        torn, unreadable = 0, []
        for line in lines:
            try:
                op = from_json(json.loads(line))
            except json.JSONDecodeError:  # the last line of a driver killed while appending
                torn += 1
                continue
            except ValueError as exc:  # not an operation this code knows
                unreadable.append(str(exc))
                continue
            op.replayed = True
            self.queue.append(op)
        self.log(f"Tracking: replaying {len(self.queue)} write(s) a previous driver left in {self.spool_path}"
                 + (f" ({torn} torn line(s) skipped)" if torn else "")
                 + (f" ({len(unreadable)} unreadable line(s) skipped: {unreadable[0]})" if unreadable else ""))


def _log_datasets(client: MlflowClient, run_id: str, datasets: list[dict]) -> None:
    """The cache files as the run's dataset inputs: [{"name", "path", "digest", "split"}]."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    for item in datasets:
        dataset = MetaDataset(source=LocalArtifactDatasetSource(item["path"]), name=item["name"], digest=item["digest"])
        split = item["split"]
        client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                tags=[InputTag("mlflow.data.context", split)])])
