"""The paper's ablation claims that a sweep can test, each with a verdict computed by a stated rule.

A claim compares two configurations that differ only along one ablation axis (every other setting
equal, seeds aside): more stages, a larger receptive field of the later stages, intermediate
supervision on against off, and joint training with intermediate supervision against the stage-wise
schemes. Written as claims.md and claims.csv beside the report's tables.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from pipeline.reporting.runs import RECEPTIVE_FIELD_AXIS, SCHEME_AXIS, STAGE_AXIS, SUPERVISION_AXIS, ConfigGroup, Stat
from pipeline.train import metric_names as names

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
MARGIN_STDS = 2.0  # the difference must exceed this many pooled seed standard deviations
RULE = (f"Rule: **{REPRODUCED}** when the mean difference (expected better minus expected worse) exceeds "
        f"{MARGIN_STDS:g} x the pooled seed standard deviation and the difference has the expected sign for every "
        f"seed both configurations share; **{INCONCLUSIVE}** when either configuration has fewer than two seeds or "
        f"they share fewer than two; **{NOT_REPRODUCED}** otherwise. The verdict is judged on the test split "
        "where every run of both configurations has a test score, else on validation at the best epoch.")


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims, as a comparison along one axis."""
    name: str
    statement: str
    axis: frozenset[str]  # the params allowed to differ between the two configurations


# The params' receptive field is the last stage's, so it moves with the number of stages; the later
# stages' layout (kernel, number of convolutions) is held fixed.
STAGES = Claim("stages", "more stages give a higher PCK (same per-stage layout)",
               STAGE_AXIS | {"receptive_field_px", "receptive_field_rel_person"})
RECEPTIVE_FIELD = Claim("receptive_field", "a larger receptive field of the later stages gives a higher PCK "
                        "(same number of stages)", RECEPTIVE_FIELD_AXIS)
SUPERVISION = Claim("intermediate_supervision", "intermediate supervision gives a higher PCK than a loss on the "
                    "last stage only (joint training, same configuration)", SUPERVISION_AXIS)
SCHEME = Claim("training_scheme", "joint training with intermediate supervision beats stage-wise training "
               "(same configuration)", SCHEME_AXIS | SUPERVISION_AXIS)


@dataclass
class Comparison:
    """`better` is the configuration the paper expects to score higher."""
    claim: Claim
    better: ConfigGroup
    worse: ConfigGroup
    protocol: names.Protocol

    @property
    def split(self) -> str:
        """'test' when every run of both sides has a test score, else 'val'."""
        key = f"{names.TEST_PREFIX}{self.protocol.name}"
        has_test = all(key in r["metrics"] for g in (self.better, self.worse) for r in g.runs)
        return "test" if has_test else "val"

    def _stat(self, group: ConfigGroup, split: str) -> Stat:
        return group.stat(f"{names.TEST_PREFIX}{self.protocol.name}") if split == "test" else group.val()

    def difference(self, split: str) -> float:
        return self._stat(self.better, split).mean - self._stat(self.worse, split).mean

    def pooled_std(self) -> float:
        """sqrt(((n1 - 1) s1² + (n2 - 1) s2²) / (n1 + n2 - 2)) over the seeds (NaN with one seed each)."""
        a, b = self._stat(self.better, self.split), self._stat(self.worse, self.split)
        dof = a.n + b.n - 2
        return math.sqrt(((a.n - 1) * a.std ** 2 + (b.n - 1) * b.std ** 2) / dof) if dof > 0 else math.nan

    def per_seed(self) -> dict[str, float]:
        """Seed -> difference, for the seeds both configurations ran."""
        key = f"{names.TEST_PREFIX}{self.protocol.name}" if self.split == "test" else None
        better, worse = self.better.seeds(), self.worse.seeds()
        return {seed: _score(better[seed], key, self.protocol) - _score(worse[seed], key, self.protocol)
                for seed in sorted(better.keys() & worse.keys())}

    def verdict(self) -> str:
        a, b = self._stat(self.better, self.split), self._stat(self.worse, self.split)
        per_seed = self.per_seed()
        if min(a.n, b.n) < 2 or len(per_seed) < 2:
            return INCONCLUSIVE
        agree = all(d > 0 for d in per_seed.values())
        return REPRODUCED if agree and self.difference(self.split) > MARGIN_STDS * self.pooled_std() else NOT_REPRODUCED


def _score(run: dict, key: str | None, protocol: names.Protocol) -> float:
    """A run's test score (key), or its validation score at the best epoch (as ConfigGroup.val)."""
    metrics = run["metrics"]
    if key:
        return metrics[key]
    return metrics.get(f"{names.BEST_PREFIX}{protocol.name}", metrics.get(protocol.name, math.nan))


def _rest(group: ConfigGroup, axis: frozenset[str], keys: list[str]) -> tuple:
    """The group's settings off the axis: two groups with equal rests differ only along it."""
    return tuple(group.config.get(k, "") for k in keys if k not in axis)


def _families(groups: list[ConfigGroup], axis: frozenset[str]) -> list[list[ConfigGroup]]:
    keys = sorted({k for g in groups for k in g.config})
    families: dict[tuple, list[ConfigGroup]] = {}
    for g in groups:
        families.setdefault(_rest(g, axis, keys), []).append(g)
    return [members for members in families.values() if len(members) > 1]


def _ordered_pairs(groups, claim: Claim, order, protocol) -> list[Comparison]:
    """Neighbours along the axis within each family: (next, previous) by `order`, the larger expected better."""
    out = []
    for family in _families(groups, claim.axis):
        family.sort(key=order)
        out += [Comparison(claim, b, a, protocol) for a, b in pairwise(family) if order(a) != order(b)]
    return out


def comparisons(groups: list[ConfigGroup], protocol: names.Protocol) -> list[Comparison]:
    """Every comparison the groups allow, one per pair of configurations that differ along one axis."""
    joint = [g for g in groups if g.scheme == "joint"]
    found = _ordered_pairs(groups, STAGES, lambda g: g.stages, protocol)
    found += _ordered_pairs(groups, RECEPTIVE_FIELD, lambda g: g.rf_px, protocol)
    for family in _families(joint, SUPERVISION.axis):
        on = [g for g in family if g.supervised]
        off = [g for g in family if not g.supervised]
        found += [Comparison(SUPERVISION, a, b, protocol) for a in on for b in off]
    for family in _families(groups, SCHEME.axis):
        best = [g for g in family if g.scheme == "joint" and g.supervised]
        staged = [g for g in family if g.scheme != "joint"]
        found += [Comparison(SCHEME, a, b, protocol) for a in best for b in staged]
    return found


# --- claims.md and claims.csv --------------------------------------------------------------------

CSV_COLUMNS = ["claim", "statement", "expected_better", "expected_worse", "seeds_better", "seeds_worse",
               "shared_seeds", "val_difference", "test_difference", "verdict_split", "pooled_seed_std",
               "per_seed_differences", "verdict"]


def _points(value: float, sign: bool = True) -> str:
    """A difference of fractions in percentage points, '-' when missing."""
    return "-" if math.isnan(value) else f"{100 * value:{'+' if sign else ''}.1f}"


def claims_markdown(found: list[Comparison], groups: list[ConfigGroup], protocol: names.Protocol) -> str:
    metric = protocol.label.split(" ")[0]
    lines = [f"**The paper's claims that this sweep tests** ({metric}, differences in percentage points)", ""]
    if not found:
        lines.append(f"No claim can be tested: the sweep has {len(groups)} configuration(s), and no two differ "
                     "along one ablation axis alone (stages, receptive field of the later stages, intermediate "
                     "supervision, training scheme) with every other setting equal.")
        return "\n".join(lines) + "\n"
    header = ("| claim | expected better | expected worse | seeds | val Δ | test Δ | pooled seed std | "
              "per-seed Δ | verdict |")
    lines += [header, "|:---|:---|:---|---:|---:|---:|---:|:---|:---|"]
    for c in found:
        per_seed = ", ".join(f"{seed}: {_points(d)}" for seed, d in c.per_seed().items()) or "-"
        lines.append(f"| {c.claim.name} | {c.better.label()} | {c.worse.label()} | "
                     f"{len(c.better.runs)} / {len(c.worse.runs)} | {_points(c.difference('val'))} | "
                     f"{_points(c.difference('test'))} | {_points(c.pooled_std(), sign=False)} ({c.split}) | "
                     f"{per_seed} | **{c.verdict()}** ({c.split}) |")
    lines += ["", RULE, "", "Claims:"]
    lines += [f"- {claim.name}: {claim.statement}." for claim in dict.fromkeys(c.claim for c in found)]
    return "\n".join(lines) + "\n"


def write_claims(found: list[Comparison], groups: list[ConfigGroup], protocol: names.Protocol,
                 out_dir: Path) -> tuple[str, list[Path]]:
    """claims.md and claims.csv (differences as fractions) into out_dir; returns the Markdown and the files."""
    markdown = claims_markdown(found, groups, protocol)
    (out_dir / "claims.md").write_text(markdown)
    with (out_dir / "claims.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for c in found:
            per_seed = c.per_seed()
            writer.writerow([c.claim.name, c.claim.statement, c.better.label(), c.worse.label(), len(c.better.runs),
                             len(c.worse.runs), len(per_seed), c.difference("val"), c.difference("test"), c.split,
                             c.pooled_std(), ";".join(f"{s}:{d:.6g}" for s, d in per_seed.items()), c.verdict()])
    return markdown, [out_dir / "claims.md", out_dir / "claims.csv"]
