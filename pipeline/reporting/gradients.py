"""gradients.png: gradient magnitude by layer depth across epochs, with and without intermediate
supervision (the paper's Fig. 5), from the gradients.json artifact of each trial run (written by
pipeline.train.gradients; read here through MlflowClient only).

Panels side by side: intermediate supervision on and off for the deepest configuration the runs
have both ways (otherwise the deepest configuration alone). Top row: the L2 norm of each
convolution's gradient, stage 1's first convolution (depth 0, farthest from the last stage's loss)
to the last stage's output, one line per epoch. Bottom row: the distribution of log10 |grad| of
stage 1's first convolution per epoch. Values are means over each epoch's sampled steps and the
configuration's seeds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from pipeline.reporting.runs import SUPERVISION_AXIS, config_of  # noqa: E402
from pipeline.tracking import store  # noqa: E402
from pipeline.train import metric_names as names  # noqa: E402
from pipeline.train.gradients import GRADIENTS_FILE  # noqa: E402

FIGURE_FILE = "gradients.png"
MAX_EPOCH_LINES = 6


def fetch_gradients(client: MlflowClient, run_id: str) -> dict | None:
    """A run's gradients.json, or None when it has none (runs trained before it was written)."""
    if GRADIENTS_FILE not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="cpm-gradients-") as tmp:
        with store.quiet_artifact_downloads():
            return json.loads(Path(client.download_artifacts(run_id, GRADIENTS_FILE, tmp)).read_text())


def _config_key(run: dict) -> tuple:
    """The run's configuration (as the tables group it) less intermediate supervision, the two sides."""
    return tuple(sorted((k, v) for k, v in config_of(run).items() if k not in SUPERVISION_AXIS))


def _supervised(run: dict) -> bool:
    return run["params"].get("intermediate_supervision") == "True"


def choose_panels(runs: list[dict]) -> list[list[dict]]:
    """[[on runs], [off runs]] of the deepest configuration trained jointly both ways, else
    [[runs]] of the deepest configuration; runs carry their gradients under "gradients"."""
    joint = [r for r in runs if r.get("gradients") and r["params"].get("training_scheme", "joint") == "joint"]
    pool = joint or [r for r in runs if r.get("gradients")]
    by_config: dict[tuple, dict[bool, list[dict]]] = {}
    for run in pool:
        by_config.setdefault(_config_key(run), {}).setdefault(_supervised(run), []).append(run)

    def depth(sides: dict) -> int:
        return max(int(r["params"].get("stages", 0)) for side in sides.values() for r in side)

    both = [sides for sides in by_config.values() if len(sides) == 2]
    if both:
        sides = max(both, key=depth)
        return [sides[True], sides[False]]
    if not by_config:
        return []
    sides = max(by_config.values(), key=depth)
    return [next(iter(sides.values()))]


def mean_over_runs(runs: list[dict]) -> tuple[dict, list[dict]]:
    """(the first run's record, per epoch {"epoch", "layer_grad_norm", "layer_histogram"} averaged
    over the runs that have that epoch and the same layers)."""
    record = runs[0]["gradients"]
    layers = [layer["name"] for layer in record["layers"]]
    same = [r["gradients"] for r in runs if [layer["name"] for layer in r["gradients"]["layers"]] == layers]
    epochs = []
    for epoch in sorted({e[names.EPOCH] for g in same for e in g["epochs"]}):
        rows = [e for g in same for e in g["epochs"] if e[names.EPOCH] == epoch]
        epochs.append({names.EPOCH: epoch,
                       "layer_grad_norm": np.mean([e["layer_grad_norm"] for e in rows], axis=0),
                       "layer_histogram": np.mean([e["layer_histogram"] for e in rows], axis=0)})
    return record, epochs


def _shown(epochs: list[dict]) -> list[dict]:
    """At most MAX_EPOCH_LINES epochs, evenly spread, first and last included."""
    if len(epochs) <= MAX_EPOCH_LINES:
        return epochs
    picks = np.unique(np.linspace(0, len(epochs) - 1, MAX_EPOCH_LINES).round().astype(int))
    return [epochs[i] for i in picks]


def _panel_title(runs: list[dict]) -> str:
    params = runs[0]["params"]
    return (f"T={params.get('stages', '?')}, RF {params.get('receptive_field_px', '?')} px, intermediate "
            f"supervision {'on' if _supervised(runs[0]) else 'off'} ({len(runs)} seed{'s' * (len(runs) > 1)})")


def _draw_panel(top, bottom, runs: list[dict]) -> None:
    record, epochs = mean_over_runs(runs)
    stages = [layer["stage"] for layer in record["layers"]]
    depths = np.arange(len(stages))
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(_shown(epochs)), 1)))
    edges = np.asarray(record["histogram_log10_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    for colour, epoch in zip(colours, _shown(epochs)):
        label = f"epoch {epoch[names.EPOCH]}"
        top.semilogy(depths, np.maximum(epoch["layer_grad_norm"], 1e-30), marker=".", color=colour, label=label)
        bottom.plot(centres, epoch["layer_histogram"][0], marker=".", color=colour, label=label)
    for depth in np.flatnonzero(np.diff(stages)) + 0.5:  # stage boundaries
        top.axvline(depth, color="grey", linestyle=":", linewidth=1)
    for stage in sorted(set(stages)):
        at = np.flatnonzero(np.asarray(stages) == stage)
        top.text(at.mean(), 1.0, f"stage {stage}", transform=top.get_xaxis_transform(), ha="center", va="bottom",
                 fontsize=8)
    top.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    top.set_title(_panel_title(runs), fontsize=9, pad=14)
    top.set_xlabel("convolution, stage 1's first (0) to the last stage's output")
    top.set_ylabel("L2 norm of the layer's gradient")
    bottom.set_xlabel(f"log10 |grad| at {record['layers'][0]['name']} (stage 1's first convolution)")
    bottom.set_ylabel("fraction of the layer's weights")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def gradients_figure(runs: list[dict], path: Path) -> Path | None:
    """Draw gradients.png from runs carrying "gradients" (None when none does)."""
    panels = choose_panels(runs)
    if not panels:
        return None
    fig, axes = plt.subplots(2, len(panels), figsize=(6.5 * len(panels), 8), sharey="row", squeeze=False)
    for column, panel in enumerate(panels):
        _draw_panel(axes[0, column], axes[1, column], panel)
    fig.suptitle("Gradient magnitude by layer depth across epochs (mean over sampled steps and seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _stage1_norm(runs: list[dict]) -> str:
    values = [r["metrics"].get(names.grad_norm_stage_key(1)) for r in runs]
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3g}" if values else "-"


def write_gradients_figure(client: MlflowClient | None, runs: list[dict], out_dir: Path) -> tuple[list[Path], str]:
    """([gradients.png] or [], the report's one line saying what it shows or why there is none)."""
    if client is None:
        return [], "No gradients.png: the report was built without an MLflow client to read gradients.json."
    carrying = [{**run, "gradients": gradients} for run in runs if run["status"] == "FINISHED"
                and (gradients := fetch_gradients(client, run["run_id"])) is not None]
    if not carrying:
        return [], (f"No gradients.png: no finished trial run carries {GRADIENTS_FILE} "
                    "(runs trained before gradients were sampled).")
    panels = choose_panels(carrying)
    path = gradients_figure(carrying, Path(out_dir) / FIGURE_FILE)
    shown = "; ".join(f"{_panel_title(p)}: stage 1 grad norm {_stage1_norm(p)} at the last epoch" for p in panels)
    return [path], f"gradients.png: gradient magnitude by layer depth across epochs ({shown})."
