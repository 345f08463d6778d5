"""The tracking writer's operations: one dataclass per kind of MLflow write, and their JSON form
(one line of the spool file each).

The JSON is flat: `kind`, `run`, the operation's own fields, and the writer's delivery state
(`attempts`, `behind`, `replayed`) once set. Spool files have always had that form, so a spool file
an earlier driver left behind is read back as it was written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from pipeline.tracking import store

_DELIVERY = ("attempts", "behind", "replayed")


def run_ref(experiment_id: str, identity: dict[str, str]) -> dict:
    """How an operation names its run: found by identity tags, so it survives a driver restart."""
    return {"experiment_id": experiment_id, "identity": dict(sorted(identity.items()))}


def ref_key(ref: dict) -> str:
    return json.dumps(ref, sort_keys=True)


@dataclass(kw_only=True)
class Operation:
    """A write to one run (`run_ref`), with the writer's delivery state."""

    kind: ClassVar[str]
    run: dict
    attempts: int = 0  # sends tried; counted before each, so a kill mid-call leaves it counted
    behind: bool = False  # queued behind others: a partial send may have stored it
    replayed: bool = False  # read back from a spool file

    def may_be_stored(self) -> bool:
        """Whether an earlier send may already have reached the store."""
        return bool(self.attempts or self.replayed or self.behind)


@dataclass(kw_only=True)
class OpenRun(Operation):
    """Find or create the run; a created one gets its params, dataset inputs and config.yaml.
    `history_key`: the metric whose highest logged step the writer notes (`max_step`)."""

    kind: ClassVar[str] = "open"
    run_name: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    datasets: list[dict] = field(default_factory=list)  # [{"name", "path", "digest", "split"}]
    config_yaml: str = ""
    history_key: str = ""


@dataclass(kw_only=True)
class LogMetrics(Operation):
    """One step's metrics. `probe`: the key whose history tells whether the step is stored already;
    `guard`: check it even on a first send (the run's history is unknown to the caller)."""

    kind: ClassVar[str] = "metrics"
    metrics: dict[str, float]
    step: int
    timestamp: int
    probe: str
    guard: bool = False


@dataclass(kw_only=True)
class SetTags(Operation):
    kind: ClassVar[str] = "tags"
    tags: dict[str, str]


@dataclass(kw_only=True)
class LogArtifacts(Operation):
    """Files to attach to the run; one gone by the time it is sent is skipped."""

    kind: ClassVar[str] = "artifacts"
    paths: list[str]


@dataclass(kw_only=True)
class LogModel(Operation):
    """A checkpoint as the run's pose model (pipeline.tracking.pose_model)."""

    kind: ClassVar[str] = "model"
    checkpoint: str


@dataclass(kw_only=True)
class SetStatus(Operation):
    """RUNNING reopens the run; FINISHED, FAILED or KILLED ends it."""

    kind: ClassVar[str] = "status"
    status: str


@dataclass(kw_only=True)
class ClearEndTags(Operation):
    """A reopened run drops the tags that said how it ended before."""

    kind: ClassVar[str] = "clear_end"


KINDS: dict[str, type[Operation]] = {cls.kind: cls for cls in (
    OpenRun, LogMetrics, SetTags, LogArtifacts, LogModel, SetStatus, ClearEndTags)}


def to_json(op: Operation) -> dict:
    """The spool's form: delivery state only once set, as spool files have always held it."""
    data: dict[str, Any] = {"kind": op.kind}
    for item in fields(op):
        value = getattr(op, item.name)
        if item.name not in _DELIVERY or value:
            data[item.name] = value
    return data


def from_json(data: Any) -> Operation:
    """The operation a spool line (or a write handed over in that form) holds; ValueError naming
    what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError(f"a tracking operation is a JSON object, not {type(data).__name__}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown tracking operation {kind!r} (known: {', '.join(KINDS)})")
    cls = KINDS[kind]
    values = {k: v for k, v in data.items() if k != "kind"}
    unknown = sorted(set(values) - {item.name for item in fields(cls)})
    if unknown:
        raise ValueError(f"tracking operation {kind!r}: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**values)
    except TypeError as exc:  # a required field missing
        raise ValueError(f"tracking operation {kind!r}: {exc}") from None


def metrics_op(ref: dict, metrics: dict[str, Any], step: int, probe: str, guard: bool) -> LogMetrics:
    """A metrics write with its timestamp fixed now (a resend is then an identical metric)."""
    names = {store.metric_name(k): float(v) for k, v in metrics.items()}
    return LogMetrics(run=ref, metrics=names, step=int(step), timestamp=int(time.time() * 1000),
                      probe=store.metric_name(probe), guard=guard)
