"""Expand a config's sweep section into trials: overrides, identity and a readable run name.

Pure (no Ray, no MLflow): `--dry-run` and the tests use it directly. The sweep's `grid` is a
cartesian product over dotted config keys; each point is one trial whose identity (a hash of its
overrides and the sweep id) names its MLflow run, so a resumed or restarted trial finds its run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

from cpm_model.config import ExperimentConfig
from cpm_model.receptive_field import later_layout, receptive_field_px
from pipeline.redaction import public_config
from pipeline.train.schedule import total_epochs

# Short labels for run names, in the order they appear (the paper's ablation axes first).
_RUN_NAME_LABELS = {
    "model.stages": "T",
    "model.later_kernel": "k",
    "model.later_convs": "convs",
    "train.intermediate_supervision": "is",
    "train.training_scheme": "scheme",
    "model.backbone": "backbone",
    "model.width": "width",
    "preprocess.input_size": "size",
    "train.lr": "lr",
    "preprocess.sigma": "sigma",
    "train.seed": "seed",
}


@dataclass(frozen=True)
class TrialSpec:
    overrides: dict[str, Any]  # dotted key -> value, applied on top of the base config
    config: ExperimentConfig
    key: str  # stable identity within the sweep (hash of the overrides)
    run_name: str
    receptive_field_px: int  # of the last stage, computed from the layers
    relative_receptive_field: float  # receptive field / mean person size in the crop

    def public(self) -> "TrialSpec":
        """This spec with the tracking URI's secrets masked: the form that is handed to Tune, its
        trials and their workers (and so pickled into the sweep's state on disk)."""
        return dataclasses.replace(self, config=public_config(self.config))

    def as_dict(self) -> dict[str, Any]:
        return {"overrides": self.overrides, "key": self.key, "run_name": self.run_name,
                "epochs": total_epochs(self.config),
                "receptive_field_px": self.receptive_field_px,
                "relative_receptive_field": self.relative_receptive_field}


def trial_key(overrides: dict[str, Any]) -> str:
    text = json.dumps(overrides, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def person_size_px(config: ExperimentConfig) -> float:
    """Nominal person size in the crop: crops are scaled so the person spans input/context px."""
    return config.preprocess.input_size / config.preprocess.crop_context


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_name(config: ExperimentConfig, overrides: dict[str, Any], rf_px: int) -> str:
    """E.g. 'T=3 rf=407px is=on seed=0': the paper's axes always, other swept keys when swept."""
    parts = [f"T={config.model.stages}", f"rf={rf_px}px",
             f"is={_format_value(config.train.intermediate_supervision)}"]
    for dotted, label in _RUN_NAME_LABELS.items():
        if dotted in ("model.stages", "train.intermediate_supervision", "train.seed"):
            continue
        if dotted in overrides:
            section, key = dotted.split(".")
            parts.append(f"{label}={_format_value(getattr(getattr(config, section), key))}")
    for dotted in sorted(overrides):
        if dotted not in _RUN_NAME_LABELS:
            parts.append(f"{dotted.split('.')[-1]}={_format_value(overrides[dotted])}")
    parts.append(f"seed={config.train.seed}")
    return " ".join(parts)


def make_trial(base: ExperimentConfig, overrides: dict[str, Any]) -> TrialSpec:
    config = base.with_overrides(overrides)
    rf = receptive_field_px(config.model)[-1]
    return TrialSpec(
        overrides=dict(overrides),
        config=config,
        key=trial_key(overrides),
        run_name=run_name(config, overrides, rf),
        receptive_field_px=int(rf),
        relative_receptive_field=round(rf / person_size_px(config), 3),
    )


def trial_of(specs: dict[str, TrialSpec], trial_config: dict) -> TrialSpec:
    """The spec of a Tune trial, from its config ({"trial": grid point, "search": sampled values}):
    the grid point's spec as `expand_grid` made it, or, where the sweep samples values
    (sweep.search), that spec with the sampled values applied on top."""
    spec = specs[trial_config["trial"]["key"]]
    sampled = trial_config.get("search") or {}
    # Re-applying the grid point's own overrides changes nothing; the key and name then cover both.
    return make_trial(spec.config, {**spec.overrides, **sampled}) if sampled else spec


def expand_grid(base: ExperimentConfig) -> list[TrialSpec]:
    """One trial per (variant, grid point): the grid's cartesian product crossed with the list of
    variants (a single trial when both are empty); a variant's values win over the grid's."""
    grid = base.sweep.grid
    keys = list(grid)
    points = list(itertools.product(*(grid[k] for k in keys))) if keys else [()]
    variants = base.sweep.variants or [{}]
    # A variant is the more specific choice: its values win over the grid's.
    trials = [make_trial(base, {**dict(zip(keys, values)), **variant}) for variant in variants for values in points]
    seen: dict[str, TrialSpec] = {}
    for trial in trials:
        seen.setdefault(trial.key, trial)
    return list(seen.values())


def format_trial_table(trials: list[TrialSpec]) -> str:
    """A plain-text table of the trials a sweep would run (for --dry-run)."""
    header = f"{'#':>3}  {'run name':<44} {'stages':>6} {'kernel':>6} {'RF px':>6} {'RF/person':>9}  overrides"
    lines = [header, "-" * len(header)]
    for i, t in enumerate(trials):
        m = t.config.model
        kernel, _ = later_layout(m.backbone, m.later_kernel, m.later_convs)
        lines.append(f"{i:>3}  {t.run_name:<44} {m.stages:>6} {kernel:>6} {t.receptive_field_px:>6} "
                     f"{t.relative_receptive_field:>9.2f}  {json.dumps(t.overrides, sort_keys=True)}")
    return "\n".join(lines)
