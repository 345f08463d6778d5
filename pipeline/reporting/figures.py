"""The report's figures (matplotlib, PNG): PCK in % against stages, receptive field, scheme, stage, alpha."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.reporting.runs import SCHEME_LABELS, ConfigGroup, Stat, curve_alphas  # noqa: E402
from pipeline.train import metric_names as names  # noqa: E402


def _axis(protocol: names.Protocol) -> str:
    """'PCK@0.2 (%, val, best epoch)' or 'PCKh@0.5 (...)'."""
    return f"{protocol.label.split(' ')[0]} (%, val, best epoch)"


def _errorbar(ax, xs: list, stats: list[Stat], **kwargs) -> None:
    ax.errorbar(xs, [100 * s.mean for s in stats], yerr=[100 * s.std for s in stats], capsize=3, marker="o",
                **kwargs)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _paper_supervised(groups: list[ConfigGroup]) -> list[ConfigGroup]:
    return [g for g in groups if g.scheme == "joint" and g.supervised]


def stages_figure(groups: list[ConfigGroup], joints: list[str], path: Path, protocol: names.Protocol = names.PCK) -> Path:
    """Left: mean PCK against stages, a line per receptive field. Right: per joint, at each depth's
    largest receptive field."""
    chosen = _paper_supervised(groups)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_rf: dict[tuple, list[ConfigGroup]] = defaultdict(list)
    for g in chosen:
        by_rf[g.rf_px, g.variant()].append(g)
    for (rf, variant), members in sorted(by_rf.items()):
        members.sort(key=lambda g: g.stages)
        _errorbar(left, [g.stages for g in members], [g.val() for g in members], label=f"RF {rf} px {variant}")
    first_variant = min((g.variant() for g in chosen), default="")  # one line per joint: one variant only
    widest = {}
    for g in sorted(chosen, key=lambda g: (g.stages, g.rf_px)):
        if g.variant() == first_variant:
            widest[g.stages] = g
    depths = sorted(widest)
    for joint in joints:
        right.plot(depths, [100 * widest[t].val(f"{protocol.name}_{joint}").mean for t in depths], marker=".", label=joint)
    if depths:
        right.plot(depths, [100 * widest[t].val().mean for t in depths], color="black", linewidth=2.5, label="mean")
    right_title = f"per joint (widest RF per depth) {first_variant}"
    for ax, title in ((left, "mean over joints (± std over seeds)"), (right, right_title)):
        ax.set_xlabel("number of stages T")
        ax.set_ylabel(_axis(protocol))
        ax.set_title(title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def receptive_field_figure(groups: list[ConfigGroup], path: Path, protocol: names.Protocol = names.PCK) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    by_stages: dict[tuple, list[ConfigGroup]] = defaultdict(list)
    for g in _paper_supervised(groups):
        by_stages[g.stages, g.variant()].append(g)
    for (stages, variant), members in sorted(by_stages.items()):
        members.sort(key=lambda g: g.rf_px)
        _errorbar(ax, [g.rf_px for g in members], [g.val() for g in members], label=f"T={stages} {variant}")
    ax.set_xlabel("receptive field of the later stages (px of the input crop)")
    ax.set_ylabel(_axis(protocol))
    ax.set_title("receptive-field ablation (± std over seeds)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend()
    return _save(fig, path)


def supervision_figure(groups: list[ConfigGroup], path: Path, protocol: names.Protocol = names.PCK) -> Path:
    """Grouped bars: one group per (stages, RF), one bar per scheme / supervision setting."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    settings = sorted({(g.scheme, g.supervised) for g in groups}, key=lambda s: (s[0], not s[1]))
    places = sorted({(g.stages, g.rf_px, g.variant()) for g in groups})
    width = 0.8 / max(len(settings), 1)
    for i, setting in enumerate(settings):
        xs, stats = [], []
        for j, place in enumerate(places):
            for g in groups:
                if (g.scheme, g.supervised) == setting and (g.stages, g.rf_px, g.variant()) == place:
                    xs.append(j + (i - (len(settings) - 1) / 2) * width)
                    stats.append(g.val())
        ax.bar(xs, [100 * s.mean for s in stats], width, yerr=[100 * s.std for s in stats], capsize=3,
               label=SCHEME_LABELS.get(setting, setting[0]))
    ax.set_xticks(range(len(places)), [f"T={t}\nRF {rf} px\n{variant}" for t, rf, variant in places])
    ax.set_xlabel("configuration (stages, receptive field)")
    ax.set_ylabel(_axis(protocol))
    ax.set_title("intermediate supervision and training schemes (± std over seeds)")
    ax.grid(alpha=0.3, axis="y")
    if settings:
        ax.legend(fontsize=8)
    return _save(fig, path)


def stage_pck_figure(groups: list[ConfigGroup], path: Path, protocol: names.Protocol = names.PCK) -> Path:
    deepest = max((g.stages for g in groups), default=0)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for g in (g for g in groups if g.stages == deepest):
        stages = list(range(1, deepest + 1))
        _errorbar(ax, stages, [g.val(names.pck_stage_key(t, metric=protocol.name)) for t in stages], label=g.label())
    ax.set_xlabel("stage t of the deepest model")
    ax.set_ylabel(_axis(protocol))
    ax.set_title(f"PCK of every stage ({deepest}-stage models)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=8)
    return _save(fig, path)


def pck_curves_figure(groups: list[ConfigGroup], path: Path, protocol: names.Protocol = names.PCK) -> Path:
    """Test PCK against alpha (0 to 0.5), a line per configuration (mean over seeds), AUC in the legend."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    alphas = curve_alphas([r for g in groups for r in g.runs], protocol.name)
    for g in groups:
        curve = [g.stat(names.test_curve_key(a, protocol.name)).mean for a in alphas]
        if not alphas or all(math.isnan(v) for v in curve):
            continue
        auc = g.stat("test_auc").mean
        ax.plot(alphas, [100 * v for v in curve], marker=".", label=f"{g.label()}  AUC {100 * auc:.1f}")
    size = "torso size" if protocol.normaliser == "torso" else "head size"
    ax.set_xlabel(f"alpha (distance threshold, fraction of the {size})")
    ax.set_ylabel(f"{protocol.label.split('@')[0]}@alpha (%, test)")
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.set_title("PCK curves (mean over seeds); AUC over alpha 0-0.5")
        ax.legend(fontsize=7)
    else:  # runs from before the curve was logged: say so rather than draw an empty plot silently
        ax.set_title(f"no run logged {names.test_curve_prefix(protocol.name)}* metrics")
    return _save(fig, path)


def draw_figures(groups: list[ConfigGroup], joints: list[str], out_dir: Path,
                 protocol: names.Protocol = names.PCK) -> list[Path]:
    return [stages_figure(groups, joints, out_dir / "ablation_stages.png", protocol),
            receptive_field_figure(groups, out_dir / "ablation_receptive_field.png", protocol),
            supervision_figure(groups, out_dir / "ablation_supervision.png", protocol),
            stage_pck_figure(groups, out_dir / "stage_pck.png", protocol),
            pck_curves_figure(groups, out_dir / "pck_curves.png", protocol)]
