"""The sweep's progress table in the driver's output: one row per trial with its configuration in
short columns and its epoch, validation PCK and best PCK, finished trials included. On a terminal
the table is printed every 30 s while anything changed; in a log (a `ray job submit` job's output)
a line a trial each time it starts or ends, and the table once at the end, so that the job's whole
output stays short.

Tune's own table shows the grid point as one truncated dict and reads its metric cells from each
trial's last row (for a finished trial, the artifacts row, which carries no metric). This one reads
the configuration from the trial specs and the metrics from every row Tune has seen.
"""

from __future__ import annotations

import math
import sys
import time

from ray import tune

from cpm_model.receptive_field import later_layout
from pipeline.formatting import percent
from pipeline.distributed.space import TrialSpec, trial_of
from pipeline.train import metric_names as names
from pipeline.train.scoring import protocol_for

COLUMNS = ("#", "stages", "RF px", "kernel", "IS", "seed", "status", "epoch", "pck", "best pck")


def _progress_of(trial, metric: str) -> tuple[str, str, str]:
    """(epochs done, last validation PCK (or PCKh), best of it) from every row Tune has seen."""
    analysis = getattr(trial, "metric_analysis", {}) or {}
    epoch = analysis.get(names.EPOCH, {}).get("max")
    pck = analysis.get(metric, {})
    return (str(int(epoch)) if epoch is not None else "-", percent(pck.get("last")), percent(pck.get("max")))


def trial_row(index: int, spec: TrialSpec, status: str, progress: tuple[str, str, str]) -> list[str]:
    model, train = spec.config.model, spec.config.train
    kernel, _ = later_layout(model.backbone, model.later_kernel, model.later_convs)
    return [str(index), str(model.stages), str(spec.receptive_field_px), str(kernel),
            "on" if train.intermediate_supervision else "off", str(train.seed), status, *progress]


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(cell.rjust(width) for cell, width in zip(cells, widths))  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(r) for r in rows)])


class SweepProgress(tune.Callback):
    """A Tune callback that prints the table every `every_s` seconds while anything changed, and
    once at the end (Tune's own table is turned off: RunConfig(verbose=0))."""

    def __init__(self, specs: dict[str, TrialSpec], every_s: float = 30.0, on_terminal: bool | None = None):
        self.specs = specs
        self.every_s = every_s
        self.on_terminal = sys.stdout.isatty() if on_terminal is None else on_terminal
        self._last_time = -math.inf
        self._last_table = None
        self._shown_status: dict[str, str] = {}  # trial id -> the status its last line said (in a log)

    def __getstate__(self) -> dict:  # pickled with the sweep (tuner.pkl): settings only
        return {"specs": self.specs, "every_s": self.every_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def on_step_end(self, iteration, trials, **info) -> None:
        if not self.on_terminal:
            self.report_changes(trials)
        elif time.monotonic() - self._last_time >= self.every_s:
            self.report(trials)

    def report_changes(self, trials) -> None:
        """One line for each trial whose status changed since its last line (pending ones wait)."""
        for i, t in enumerate(sorted(trials, key=lambda t: t.trial_id)):
            if t.status == "PENDING" or self._shown_status.get(t.trial_id) == t.status:
                continue
            self._shown_status[t.trial_id] = t.status
            spec = trial_of(self.specs, t.config)
            epoch, _, best = _progress_of(t, protocol_for(spec.config).name)
            ended = "" if t.status == "RUNNING" else f" after {epoch} epoch(s), best val {best}"
            print(f"{time.strftime('%H:%M:%S')} #{i} {spec.run_name}: {t.status.lower()}{ended}", flush=True)

    def on_experiment_end(self, trials, **info) -> None:
        self.report(trials, done=True)

    def report(self, trials, done: bool = False) -> None:
        rows = []
        for i, t in enumerate(sorted(trials, key=lambda t: t.trial_id)):
            spec = trial_of(self.specs, t.config)
            rows.append(trial_row(i, spec, t.status, _progress_of(t, protocol_for(spec.config).name)))
        table = format_table(rows)
        self._last_time = time.monotonic()
        if table == self._last_table and not done:
            return
        self._last_table = table
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        summary = ", ".join(f"{n} {status.lower()}" for status, n in sorted(counts.items()))
        print(f"\nTrials: {summary}\n{table}", flush=True)
