"""A sweep's trial runs read from MLflow (client API only), grouped by configuration over seeds."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from mlflow import MlflowClient

from pipeline.tracking import store
from pipeline.train import metric_names as names

# The paper's ablation axes: a run without one of these cannot be placed in any table.
REQUIRED_PARAMS = ("stages", "receptive_field_px", "intermediate_supervision", "training_scheme")
# Settings that make two runs different configurations; seeds are pooled, everything else is shown.
CONFIG_PARAMS = REQUIRED_PARAMS + ("receptive_field_rel_person", "kernel_size", "width", "input_size", "dataset",
                                   "metric")
SCHEME_LABELS = {  # (training_scheme, intermediate_supervision) -> how the paper names it
    ("joint", True): "joint, intermediate supervision",
    ("joint", False): "joint, no intermediate supervision",
    ("stagewise", True): "stage-wise", ("stagewise", False): "stage-wise",
    ("stagewise_finetune", True): "stage-wise, then fine-tuned",
    ("stagewise_finetune", False): "stage-wise, then fine-tuned",
}
_NOT_JOINTS = re.compile(r"^(stage\d+|0\.\d+|curve_.*)$")


def collect_trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str | None = None) -> list[dict]:
    """One dict per trial run: run_id, name, status, params, metrics (latest values), error."""
    query = f"tags.`{store.KIND_TAG}` = 'trial'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = []
    page_token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=page_token)
        for run in page:
            runs.append({
                "run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                "params": dict(run.data.params), "metrics": dict(run.data.metrics),
                "error": run.data.tags.get("cpm.error", ""),
            })
        page_token = page.token
        if not page_token:
            break
    runs.sort(key=lambda r: r["name"] or "")
    return runs


def missing_params(run: dict) -> list[str]:
    return [p for p in REQUIRED_PARAMS if p not in run["params"]]


def usable(run: dict) -> bool:
    return run["status"] == "FINISHED" and not missing_params(run)


def excluded_runs(runs: list[dict]) -> list[tuple[dict, str]]:
    """Runs left out of the tables, each with why (so none is dropped silently)."""
    out = []
    for run in runs:
        if run["status"] != "FINISHED":
            cause = run["error"].splitlines()[0] if run["error"] else ""
            out.append((run, run["status"] + (f": {cause}" if cause else "")))
        elif missing_params(run):
            out.append((run, "missing param(s) " + ", ".join(missing_params(run))))
    return out


@dataclass
class Stat:
    """Mean and sample standard deviation over seeds (NaN values ignored)."""
    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not values:
            return cls(math.nan, math.nan, 0)
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return cls(mean, std, len(values))


@dataclass
class ConfigGroup:
    """The finished runs of one configuration (its seeds)."""
    config: dict[str, str]
    runs: list[dict] = field(default_factory=list)

    @property
    def stages(self) -> int:
        return int(self.config["stages"])

    @property
    def rf_px(self) -> int:
        return int(float(self.config["receptive_field_px"]))

    @property
    def supervised(self) -> bool:
        return self.config["intermediate_supervision"] == "True"

    @property
    def scheme(self) -> str:
        return self.config["training_scheme"]

    @property
    def protocol(self) -> names.Protocol:
        """How the runs were scored (their `metric` param; runs from before it had the torso PCK)."""
        return names.PROTOCOLS[self.config.get("metric") or names.PCK.name]

    def stat(self, key: str) -> Stat:
        return Stat.of([r["metrics"].get(key, math.nan) for r in self.runs])

    def val(self, key: str | None = None) -> Stat:
        """Validation value at each run's best epoch (best_{key}), else its last value; key defaults
        to the runs' metric (pck or pckh)."""
        key = key or self.protocol.name
        return Stat.of([r["metrics"].get(f"best_{key}", r["metrics"].get(key, math.nan)) for r in self.runs])

    def label(self) -> str:
        return (f"T={self.stages} rf={self.rf_px}px is={'on' if self.supervised else 'off'}"
                + ("" if self.scheme == "joint" else f" {self.scheme}"))


def group_by_config(runs: list[dict]) -> list[ConfigGroup]:
    """Usable runs grouped by configuration (seeds pooled), sorted by scheme, supervision, stages, RF."""
    groups: dict[tuple, ConfigGroup] = {}
    for run in filter(usable, runs):
        key = tuple(run["params"].get(p, "") for p in CONFIG_PARAMS)
        groups.setdefault(key, ConfigGroup(dict(zip(CONFIG_PARAMS, key)))).runs.append(run)
    return sorted(groups.values(), key=lambda g: (g.scheme, not g.supervised, g.stages, g.rf_px))


def varying_settings(groups: list[ConfigGroup]) -> list[str]:
    """Non-axis settings that differ between groups (shown, so rows are not mistaken for one axis)."""
    extra = [p for p in CONFIG_PARAMS if p not in REQUIRED_PARAMS and p != "receptive_field_rel_person"]
    return [p for p in extra if len({g.config[p] for g in groups}) > 1]


def joint_names(runs: list[dict], metric: str = names.PCK.name) -> list[str]:
    """Joints named by the runs' {metric}_{joint} metrics (pck_ or pckh_)."""
    found: dict[str, None] = {}
    prefix = f"{metric}_"
    for run in runs:
        for key in run["metrics"]:
            if key.startswith(prefix) and not _NOT_JOINTS.match(key[len(prefix):]):
                found[key[len(prefix):]] = None
    return list(found)


def curve_alphas(runs: list[dict], metric: str = names.PCK.name) -> list[float]:
    prefix = names.test_curve_prefix(metric)
    return sorted({float(k[len(prefix):]) for r in runs for k in r["metrics"] if k.startswith(prefix)})


def protocol_of_groups(groups: list[ConfigGroup]) -> names.Protocol:
    """The one protocol the groups were scored with (ValueError when they mix PCK and PCKh)."""
    protocols = {g.protocol for g in groups}
    if len(protocols) > 1:
        raise ValueError("the runs mix " + " and ".join(sorted(p.label for p in protocols))
                         + ": report one sweep at a time (--parent-run-id)")
    return protocols.pop() if protocols else names.PCK
