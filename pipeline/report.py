"""Ablation tables and figures of an MLflow experiment, read through MLflow's client API only.

    python -m pipeline.report --experiment NAME [--tracking-uri URI] [--out DIR] [--parent-run-id ID]

Writes ablation_stages, ablation_receptive_field, ablation_supervision and stage_pck as .md, .csv,
.tex and .png, pck_curves.png, gradients.png (when the runs carry gradients.json), claims.md and
claims.csv (the paper's claims the runs can test, each with a computed verdict) and report.md (all
of it). Runs are one configuration when every param but the seed and where the run is stored
agrees; seeds are pooled into mean ± std. Works on any store MLflow can read (a SQLite file copied
from another machine, a tracking server).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlflow import MlflowClient

from pipeline.reporting.tables import ReportError, build_report, load_runs
from pipeline.tracking import store
from pipeline.tracking.errors import TrackingError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpm-report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else the local SQLite store")
    parser.add_argument("--out", default="report", help="directory for the files (default: ./report)")
    parser.add_argument("--parent-run-id", default=None, help="only the trials of this sweep run")
    args = parser.parse_args(argv)
    try:
        with store.bounded_requests():
            client = MlflowClient(store.reading_uri(args.tracking_uri))
            runs = load_runs(client, args.experiment, args.parent_run_id)
            report = build_report(runs, Path(args.out), client)
    except (ReportError, TrackingError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    print(report.markdown)
    print(f"Wrote {len(report.files)} files to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
