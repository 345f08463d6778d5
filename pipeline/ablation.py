"""Ablation tables from a sweep's MLflow runs (read through the client API only)."""

from __future__ import annotations

import math
from collections import defaultdict

from mlflow import MlflowClient

from . import tracking

CONFIG_COLUMNS = ("stages", "receptive_field_px", "receptive_field_rel_person", "intermediate_supervision",
                  "training_scheme")


def collect_trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str | None = None) -> list[dict]:
    """One dict per trial run: run_id, name, status, params, metrics (latest values), error."""
    query = f"tags.`{tracking.KIND_TAG}` = 'trial'"
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
    return runs


def _score(run: dict, key: str = "pck") -> float:
    """The run's validation PCK@0.2 at its best epoch (best_pck), else its last value."""
    metrics = run["metrics"]
    value = metrics.get(f"best_{key}", metrics.get(key))
    return float(value) if value is not None else math.nan


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def group_by_config(runs: list[dict]) -> list[dict]:
    """Finished runs grouped by their configuration (seeds pooled): mean and spread of PCK."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        if run["status"] != "FINISHED":
            continue
        key = tuple(run["params"].get(c, "") for c in CONFIG_COLUMNS)
        groups[key].append(run)
    rows = []
    for key, members in groups.items():
        row = dict(zip(CONFIG_COLUMNS, key))
        row["seeds"] = len(members)
        row["pck_mean"], row["pck_std"] = _mean_std([_score(r) for r in members])
        row["test_pck_mean"], _ = _mean_std([float(r["metrics"].get("test_pck", math.nan)) for r in members])
        stages = int(row["stages"] or 0)
        row["stage_pcks"] = [_mean_std([_score(r, f"pck_stage{t}") for r in members])[0] for t in range(1, stages + 1)]
        rows.append(row)
    rows.sort(key=lambda r: (r["training_scheme"], r["intermediate_supervision"], int(r["stages"] or 0),
                             int(r["receptive_field_px"] or 0)))
    return rows


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def ablation_markdown(runs: list[dict]) -> str:
    """PCK@0.2 (validation, best epoch, %) against stages and receptive field, plus unfinished runs."""
    rows = group_by_config(runs)
    lines = ["PCK@0.2 (%, validation, best epoch; mean ± std over seeds) against stages and receptive field",
             "",
             "| stages | RF (px) | RF / person | int. sup. | scheme | seeds | PCK@0.2 | test PCK@0.2 | per stage |",
             "|---:|---:|---:|:---:|:---|---:|---:|---:|:---|"]
    for r in rows:
        spread = f" ± {_pct(r['pck_std'])}" if r["seeds"] > 1 else ""
        per_stage = " / ".join(_pct(v) for v in r["stage_pcks"])
        lines.append(f"| {r['stages']} | {r['receptive_field_px']} | {r['receptive_field_rel_person']} | "
                     f"{'on' if r['intermediate_supervision'] == 'True' else 'off'} | {r['training_scheme']} | "
                     f"{r['seeds']} | {_pct(r['pck_mean'])}{spread} | {_pct(r['test_pck_mean'])} | {per_stage} |")
    unfinished = [r for r in runs if r["status"] != "FINISHED"]
    if unfinished:
        lines += ["", "Runs that did not finish (not in the table):", ""]
        for r in unfinished:
            cause = r["error"].splitlines()[0] if r["error"] else ""
            lines.append(f"- {r['name']}: {r['status']}{' - ' + cause if cause else ''}")
    if not runs:
        lines += ["", "(no trial runs found)"]
    return "\n".join(lines)
