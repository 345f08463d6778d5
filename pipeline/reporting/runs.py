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
# Seeds are pooled into mean ± std; every other param that differs keeps two runs apart, except those
# that only name or place a run, or describe the sweep around it (the trial's own values are logged).
SEED_PARAMS = frozenset({"seed", "train.seed"})
PLACEMENT_PARAMS = frozenset({
    "name", "data.cache_dir", "preprocess.workers", "sweep.storage_path", "sweep.grid", "sweep.variants",
    "sweep.search", "sweep.num_samples", "sweep.max_concurrent_trials", "sweep.max_failures", "sweep.use_gpu",
    "tracking.tracking_uri", "tracking.experiment",
})
# Params of each ablation axis (the config key and what is derived from it): a table whose rows are
# an axis does not repeat them as columns, and a claim about an axis lets exactly these differ.
STAGE_AXIS = frozenset({"stages", "model.stages"})
RECEPTIVE_FIELD_AXIS = frozenset({"receptive_field_px", "receptive_field_rel_person", "kernel_size", "later_convs",
                                  "model.later_kernel", "model.later_convs"})
SUPERVISION_AXIS = frozenset({"intermediate_supervision", "train.intermediate_supervision"})
SCHEME_AXIS = frozenset({"training_scheme", "train.training_scheme", "train.finetune_epochs"})
AXIS_PARAMS = STAGE_AXIS | RECEPTIVE_FIELD_AXIS | SUPERVISION_AXIS | SCHEME_AXIS
# Summary params that restate a config key: when both vary, only the summary's name is shown.
RESTATED = {"model.width": "width", "preprocess.input_size": "input_size", "data.spec": "dataset",
            "train.lr": "learning_rate", "train.optimizer": "optimizer", "model.backbone": "backbone"}
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
    """The finished runs of one configuration (its seeds). `varying` holds the settings outside the
    ablation axes that tell this group from the others of the report (set by `group_by_config`)."""
    config: dict[str, str]
    runs: list[dict] = field(default_factory=list)
    varying: dict[str, str] = field(default_factory=dict)

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

    def seeds(self) -> dict[str, dict]:
        """seed -> run (the seed as logged; runs without one are keyed by run id)."""
        return {r["params"].get("train.seed", r["params"].get("seed", r["run_id"])): r for r in self.runs}

    def variant(self) -> str:
        """The settings that set this group apart beyond the axes, e.g. 'lr=0.004' ('' if none)."""
        return " ".join(f"{k.split('.')[-1]}={v}" for k, v in self.varying.items())

    def label(self) -> str:
        """E.g. 'T=3 rf=143px is=on', then the scheme when not joint and the variant."""
        parts = [f"T={self.stages} rf={self.rf_px}px is={'on' if self.supervised else 'off'}",
                 "" if self.scheme == "joint" else self.scheme, self.variant()]
        return " ".join(p for p in parts if p)


def config_of(run: dict) -> dict[str, str]:
    """The params that make a run's configuration: all of them less the seed and placement."""
    return {k: v for k, v in run["params"].items() if k not in SEED_PARAMS and k not in PLACEMENT_PARAMS}


def group_by_config(runs: list[dict]) -> list[ConfigGroup]:
    """Usable runs grouped by configuration (every param but the seed and placement; seeds pooled),
    sorted by scheme, supervision, stages, RF and the settings that vary."""
    groups: dict[tuple, ConfigGroup] = {}
    for run in filter(usable, runs):
        config = config_of(run)
        groups.setdefault(tuple(sorted(config.items())), ConfigGroup(config)).runs.append(run)
    found = list(groups.values())
    shown = varying_settings(found)
    for g in found:
        g.varying = {k: g.config.get(k, "") for k in shown}
    return sorted(found, key=lambda g: (g.scheme, not g.supervised, g.stages, g.rf_px, tuple(g.varying.values())))


def varying_settings(groups: list[ConfigGroup], shown: frozenset[str] = AXIS_PARAMS) -> list[str]:
    """Settings that differ between groups, less `shown` (the axes a table has columns for) and
    the config keys whose summary param is listed instead: shown so that rows are not mistaken
    for one configuration. Summary params first, then config keys in order."""
    keys = sorted({k for g in groups for k in g.config}, key=lambda k: ("." in k, k))
    varying = [k for k in keys if k not in shown and len({g.config.get(k, "") for g in groups}) > 1]
    return [k for k in varying if RESTATED.get(k) not in varying]


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
