"""The ablation tables of a set of trial runs, as Markdown, CSV and LaTeX, and the report that
writes every table and figure into a directory (pipeline/report.py is its command line)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient

from pipeline.formatting import percent
from pipeline.reporting.claims import comparisons, write_claims
from pipeline.reporting.runs import (
    SCHEME_LABELS,
    ConfigGroup,
    Stat,
    collect_trial_runs,
    excluded_runs,
    group_by_config,
    joint_names,
    protocol_of_groups,
    varying_settings,
)
from pipeline.tracking import store
from pipeline.train import metric_names as names

# The paper's own numbers (Wei et al., CVPR 2016), each with the protocol it was measured under:
# ours are on another split, resolution and training set, so they sit beside, never against, these.
PAPER_RESULTS = (
    ("paper: LSP test PCK@0.2, person-centric, 6 stages, trained on LSP+LSPET", 6, 84.32),
    ("paper: MPII test-server PCKh@0.5, 6 stages", 6, 87.95),
)
PAPER_NOTE = ("Paper rows (Wei et al. 2016) use their own protocol (LSP test PCK@0.2 person-centric, trained on "
              "LSP+LSPET; MPII test-server PCKh@0.5); ours are {label} on this experiment's data, "
              "so they are context, not a comparison.")


def short(protocol: names.Protocol) -> str:
    """'PCK@0.2' or 'PCKh@0.5': the column name of the metric."""
    return protocol.label.split(" ")[0]


class Quoted(Stat):
    """A number quoted from the paper: shown as printed there (two decimals), no spread."""


class ReportError(RuntimeError):
    """The experiment cannot be reported (unknown, empty, nothing finished)."""


@dataclass
class Table:
    """Cells are str, int, float (a fraction, shown in %) or Stat (mean ± std over seeds, in %)."""
    name: str
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _cell(value, latex: bool = False) -> str:
    if isinstance(value, Quoted):
        return f"{100 * value.mean:.2f}"
    if isinstance(value, Stat):
        if value.n == 0:
            return "-"
        pm = r" $\pm$ " if latex else " ± "
        return percent(value.mean) + (f"{pm}{percent(value.std)}" if value.n > 1 else "")
    if isinstance(value, float):
        return percent(value)
    text = str(value)
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&") if latex else text


def _is_numeric(column_values) -> bool:
    return all(isinstance(v, (int, float, Stat)) or v == "" for v in column_values)


def to_markdown(table: Table, excluded: list[tuple[dict, str]]) -> str:
    aligns = ["---:" if _is_numeric([r[i] for r in table.rows]) else ":---" for i in range(len(table.columns))]
    lines = [f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    if not table.rows:
        lines.append("| " + " | ".join(["(no finished runs for this table)"] + [""] * (len(table.columns) - 1)) + " |")
    lines += [""] + [f"{note}" for note in table.notes]
    lines += _excluded_lines(excluded)
    return "\n".join(lines).rstrip() + "\n"


def _excluded_lines(excluded: list[tuple[dict, str]]) -> list[str]:
    if not excluded:
        return []
    return ["", "Runs not in the table:", ""] + [f"- {run['name']}: {why}" for run, why in excluded]


def to_csv(table: Table, path: Path) -> None:
    """Numbers as fractions; a Stat column becomes '<column> mean', '<column> std', '<column> n'."""
    stat_columns = {i for i in range(len(table.columns)) if any(isinstance(r[i], Stat) for r in table.rows)}
    header = []
    for i, name in enumerate(table.columns):
        header += [f"{name} mean", f"{name} std", f"{name} n"] if i in stat_columns else [name]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in table.rows:
            out = []
            for i, value in enumerate(row):
                if i in stat_columns:
                    out += [value.mean, value.std, value.n] if isinstance(value, Stat) else [value, "", ""]
                else:
                    out.append(value)
            writer.writerow(out)


def to_latex(table: Table) -> str:
    spec = "".join("r" if _is_numeric([r[i] for r in table.rows]) else "l" for i in range(len(table.columns)))
    head = " & ".join(_cell(c, latex=True) for c in table.columns)
    body = [" & ".join(_cell(c, latex=True) for c in row) + r" \\" for row in table.rows]
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_cell(table.title, latex=True)}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\hline", head + r" \\", r"\hline", *body, r"\hline",
             r"\end{tabular}"]
    lines += [rf"\par\footnotesize {_cell(note, latex=True)}" for note in table.notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# --- the tables ---------------------------------------------------------------------------------

def _extra_columns(groups: list[ConfigGroup]) -> tuple[list[str], callable]:
    """The settings outside the ablation axes that vary among `groups`: one column each."""
    varying = varying_settings(groups)
    return varying, (lambda g: [g.config.get(p, "") for p in varying])


def stages_table(groups: list[ConfigGroup], joints: list[str], protocol: names.Protocol = names.PCK) -> Table:
    """The paper's stage ablation: joint training with intermediate supervision, by depth and RF."""
    chosen = [g for g in groups if g.scheme == "joint" and g.supervised]
    extra, extra_of = _extra_columns(chosen)
    m, label = protocol.name, short(protocol)
    table = Table("ablation_stages",
                  f"{label} (%) against the number of stages (joint training, intermediate supervision; "
                  "val at the best epoch and test, mean ± std over seeds; per joint: val)",
                  ["stages", "RF (px)", "RF / person", *extra, "seeds", f"val {label}", f"test {label}",
                   "test AUC (0-0.5)", *[f"val {j}" for j in joints], "source / protocol"])
    for g in sorted(chosen, key=lambda g: (g.stages, g.rf_px)):
        table.rows.append([g.stages, g.rf_px, g.config["receptive_field_rel_person"], *extra_of(g), len(g.runs),
                           g.val(), g.stat(f"test_{m}"), g.stat("test_auc"), *[g.val(f"{m}_{j}") for j in joints],
                           f"ours: {protocol.label}"])
    for label, stages, value in PAPER_RESULTS:  # the paper's value sits in the test column, named by its protocol
        table.rows.append([stages, "", "", *[""] * len(extra), "", "", Quoted(value / 100, 0.0, 1), "",
                           *[""] * len(joints), label])
    table.notes.append(PAPER_NOTE.format(label=protocol.label))
    return table


def receptive_field_table(groups: list[ConfigGroup], protocol: names.Protocol = names.PCK) -> Table:
    """The paper's receptive-field ablation: PCK against the later stages' receptive field."""
    chosen = [g for g in groups if g.scheme == "joint" and g.supervised]
    extra, extra_of = _extra_columns(chosen)
    label = short(protocol)
    table = Table("ablation_receptive_field",
                  f"{label} (%) against the receptive field of the later stages (pixels of the input crop)",
                  ["RF (px)", "RF / person", "kernel", "stages", *extra, "seeds", f"val {label}", f"test {label}",
                   "test AUC (0-0.5)"])
    for g in sorted(chosen, key=lambda g: (g.rf_px, g.stages)):
        table.rows.append([g.rf_px, g.config["receptive_field_rel_person"], g.config["kernel_size"], g.stages,
                           *extra_of(g), len(g.runs), g.val(), g.stat(f"test_{protocol.name}"), g.stat("test_auc")])
    return table


def supervision_table(groups: list[ConfigGroup], protocol: names.Protocol = names.PCK) -> Table:
    """Intermediate supervision on/off per depth, and the training schemes."""
    extra, extra_of = _extra_columns(groups)
    m, label = protocol.name, short(protocol)
    table = Table("ablation_supervision",
                  f"{label} (%) by training scheme: joint with and without intermediate supervision, "
                  "stage-wise, stage-wise then fine-tuned",
                  ["stages", "RF (px)", "scheme", "int. sup.", *extra, "seeds", f"val {label}", f"test {label}",
                   f"val {label} stage 1"])
    for g in sorted(groups, key=lambda g: (g.stages, g.rf_px, g.scheme, not g.supervised)):
        table.rows.append([g.stages, g.rf_px, SCHEME_LABELS.get((g.scheme, g.supervised), g.scheme),
                           "on" if g.supervised else "off", *extra_of(g), len(g.runs), g.val(),
                           g.stat(f"test_{m}"), g.val(names.pck_stage_key(1, metric=m))])
    return table


def stage_pck_table(groups: list[ConfigGroup], protocol: names.Protocol = names.PCK) -> Table:
    """PCK of every stage of the deepest model(s): rows are stages, columns configurations."""
    deepest = max((g.stages for g in groups), default=0)
    chosen = [g for g in groups if g.stages == deepest]
    table = Table("stage_pck", f"{short(protocol)} (%, val, best epoch) of every stage of the deepest model "
                  f"({deepest} stages)", ["stage", *[g.label() for g in chosen]])
    for t in range(1, deepest + 1):
        table.rows.append([t, *[g.val(names.pck_stage_key(t, metric=protocol.name)) for g in chosen]])
    return table


# --- reading MLflow -----------------------------------------------------------------------------

def load_runs(client: MlflowClient, experiment_name: str, parent_run_id: str | None = None) -> list[dict]:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments(max_results=1000))
        raise ReportError(f"no experiment named {experiment_name!r} in {store.redact_uri(client.tracking_uri)}; "
                          f"experiments there: {', '.join(known) if known else '(none)'}")
    runs = collect_trial_runs(client, experiment.experiment_id, parent_run_id)
    if not runs:
        total = len(client.search_runs([experiment.experiment_id], max_results=1000))
        raise ReportError(f"experiment {experiment_name!r} has no trial runs (tag {store.KIND_TAG}=trial"
                          f"{' under parent run ' + parent_run_id if parent_run_id else ''}); "
                          f"it holds {total} other run(s)")
    return runs


def runs_overview(runs: list[dict]) -> str:
    lines = ["| run | status | stages | RF (px) | val PCK@0.2 or PCKh@0.5 | note |", "|:---|:---|---:|---:|---:|:---|"]
    excluded = dict((r["run_id"], why) for r, why in excluded_runs(runs))
    for r in runs:
        best = next((r["metrics"][k] for k in ("best_pck", "best_pckh", "pck", "pckh") if k in r["metrics"]), None)
        lines.append(f"| {r['name']} | {r['status']} | {r['params'].get('stages', '?')} | "
                     f"{r['params'].get('receptive_field_px', '?')} | {percent(best) if best is not None else '-'} | "
                     f"{excluded.get(r['run_id'], '')} |")
    return "\n".join(lines)


@dataclass
class Report:
    tables: list[Table]
    excluded: list[tuple[dict, str]]
    files: list[Path]
    markdown: str
    claims: str  # claims.md: the paper's claims this sweep tests, with their verdicts


def build_report(runs: list[dict], out_dir: Path, client: MlflowClient | None = None) -> Report:
    """Every table (md, csv, tex) and figure (png) into out_dir; raises ReportError when nothing finished."""
    groups = group_by_config(runs)
    excluded = excluded_runs(runs)
    if not groups:
        raise ReportError("no finished trial run with the ablation params; what there is:\n\n" + runs_overview(runs))
    from pipeline.reporting.figures import draw_figures

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        protocol = protocol_of_groups(groups)
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    joints = joint_names([r for g in groups for r in g.runs], protocol.name)
    tables = [stages_table(groups, joints, protocol), receptive_field_table(groups, protocol),
              supervision_table(groups, protocol), stage_pck_table(groups, protocol)]
    files: list[Path] = []
    sections = []
    for table in tables:
        markdown = to_markdown(table, excluded)
        sections.append(markdown)
        for suffix, text in ((".md", markdown), (".tex", to_latex(table))):
            (out_dir / f"{table.name}{suffix}").write_text(text)
            files.append(out_dir / f"{table.name}{suffix}")
        to_csv(table, out_dir / f"{table.name}.csv")
        files.append(out_dir / f"{table.name}.csv")
    files += draw_figures(groups, joints, out_dir, protocol)
    from pipeline.reporting.gradients import write_gradients_figure  # reads each run's gradients.json

    drawn, gradients_line = write_gradients_figure(client, runs, out_dir)
    files += drawn
    claims, claim_files = write_claims(comparisons(groups, protocol), groups, protocol, out_dir)
    files += claim_files
    combined = "\n".join([*sections, gradients_line + "\n", claims])
    (out_dir / "report.md").write_text(combined)
    files.append(out_dir / "report.md")
    return Report(tables, excluded, files, combined, claims)
