"""Distributed figures: per-trial overhead, the default job's wall time, 1 vs 2 workers.

    python bench/bench_distributed.py [--part overhead scaling default] [--results bench/RESULTS.md]

- overhead: a 2-trial sweep (synthetic_tiny preset); per trial, the time from the trial's start
  (Tune's clock) to its first training step = time_total_s of the first epoch row minus that
  epoch's own epoch_time_s (cache open, model build and the Train worker group's start included),
  with its breakdown moment by moment (the first epoch row's startup_*_s) and the trial's end.
- scaling: one configuration trained with 1 and with 2 Ray Train workers (one CPU each), the same
  global batch; images/s from the worker loop's own epoch timing, ratio 2 workers / 1 worker.
- default: wall time of the embedded default sweep (`python pipeline/sweep.py`), end to end.
- train_floor: Ray Train's own part of a trial's start-up: `TorchTrainer.fit()` of an empty loop
  (one worker), four times in one local cluster, from the call to the loop's first line.
- report_cadence: a one-worker `TorchTrainer.fit()` whose loop reports 10 "epochs" of 0.2 s each,
  once per controller poll interval (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: Ray's 2 s, then shorter);
  a report waits until the controller has taken the one before, so short epochs wait for the poll.
Everything runs in temporary directories (caches, checkpoints, MLflow) removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_sweep(tmp: Path, *extra: str, config: str = "synthetic_tiny") -> float:
    command = [sys.executable, str(REPO / "pipeline" / "sweep.py"), "--config", config,
               "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--storage-path", str(tmp / "ray"),
               "--set", f"data.cache_dir={tmp / 'cache'}", *extra]
    env = dict(os.environ, RAY_ADDRESS="local")  # its own cluster, even beside a running one
    start = time.perf_counter()
    result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"sweep failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return elapsed


def result_rows(tmp: Path) -> list[list[dict]]:
    trials = []
    for path in sorted((tmp / "ray").glob("*/trial_*/result.json")):
        trials.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    return trials


def overhead(tmp: Path) -> dict:
    wall = run_sweep(tmp, "--set", "sweep.grid={model.stages: [1, 3]}", "--set", "train.epochs=2")
    startup, parts = [], []
    for rows in result_rows(tmp):
        first = next(r for r in rows if "train_loss" in r)
        startup.append(first["time_total_s"] - first["epoch_time_s"])
        parts.append(trial_breakdown(rows))
    breakdown = {key: statistics.mean(p[key] for p in parts) for key in parts[0] if key.startswith("startup_")}
    breakdown["end_s"] = statistics.mean(p["end_s"] for p in parts)
    return {"trials": len(startup), "startup_s": startup, "startup_mean_s": statistics.mean(startup),
            "startup_breakdown_mean_s": breakdown, "sweep_wall_s": wall}


def scaling(tmp: Path) -> dict:
    out = {}
    for workers in (1, 2):
        run_dir = tmp / f"w{workers}"
        run_dir.mkdir()
        # The same global batch (32) split over the workers; 2 workers x 16 or 1 worker x 32.
        run_sweep(run_dir, "--set", "sweep.grid={}", "--set", f"sweep.workers_per_trial={workers}",
                  "--set", f"train.batch_size={32 // workers}", "--set", "train.epochs=3",
                  "--set", "data.spec=synthetic:2000")
        rows = [r for r in result_rows(run_dir)[0] if "train_loss" in r]
        out[workers] = statistics.median(r["images_per_s"] for r in rows[1:])  # skip the warm-up epoch
    return {"images_per_s_1_worker": out[1], "images_per_s_2_workers": out[2], "ratio": out[2] / out[1]}


STARTUP_PARTS = ("trial", "worker_loop", "context", "caches_open", "model_ready", "first_step")


def trial_breakdown(rows: list[dict]) -> dict:
    """One trial's time from its Tune rows: start-up moment by moment (the first epoch row's
    startup_* metrics), its epochs (training + validation), and the end (test split, artifacts and
    Ray Train's teardown: from the last epoch row to the artifacts row)."""
    epochs = [r for r in rows if "train_loss" in r and not r.get("resent")]
    first = epochs[0]
    end = next(r for r in reversed(rows) if "artifacts_dir" in r)
    out = {f"startup_{name}_s": first.get(f"startup_{name}_s", float("nan")) for name in STARTUP_PARTS}
    out["startup_s"] = first.get("startup_s", float("nan"))
    out["epochs_s"] = sum(r["epoch_time_s"] for r in epochs)
    out["end_s"] = end["timestamp"] - epochs[-1]["timestamp"]
    return out


def sweep_ratio(tmp: Path) -> dict:
    """The sweep's wall time (its MLflow run's start to end) against the trials' own training and
    validation time (sum of epoch_time_s) divided by the trials that run at once."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("cpm.run_kind") == "sweep")
    trials = [r for r in runs if r.data.tags.get("cpm.run_kind") == "trial"]
    concurrent = int(parent.data.params["max_concurrent_trials"])
    epochs_s = sum(sum(m.value for m in client.get_metric_history(r.info.run_id, "epoch_time_s")) for r in trials)
    wall_s = (parent.info.end_time - parent.info.start_time) / 1000
    return {"sweep_wall_s": wall_s, "trial_epochs_s": epochs_s, "concurrent_trials": concurrent,
            "ratio": wall_s / (epochs_s / concurrent)}


def default_job(tmp: Path) -> dict:
    """The default job end to end: its wall time, the sweep ratio and each trial's breakdown."""
    wall = run_sweep(tmp, config="default")
    trials = [trial_breakdown(rows) for rows in result_rows(tmp)]
    mean = {key: statistics.mean(t[key] for t in trials) for key in trials[0]}
    return {"wall_s": wall, "trials": len(trials), **sweep_ratio(tmp), "trial_mean": mean, "per_trial": trials}


def start_local_cluster_like_a_sweep() -> None:
    """A local cluster as `pipeline/sweep.py` starts one (RAY_ADDRESS=local): with its dashboard,
    which Ray Train's placement-group cleaner asks about the controller every second; without it
    (or with a stale cluster address on the machine) each of those calls waits out a 10 s timeout
    and every fit() ends about 12 s late."""
    sys.path.insert(0, str(REPO))
    from pipeline.distributed.runner import connect_ray

    os.environ["RAY_ADDRESS"] = "local"
    connect_ray()


def _empty_loop(config: dict) -> None:
    Path(config["marker"]).write_text(repr(time.time()))


def train_floor(tmp: Path) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start_local_cluster_like_a_sweep()
    try:
        to_loop, fits = [], []
        for attempt in range(4):
            marker = tmp / f"loop-started-{attempt}"
            start = time.time()
            TorchTrainer(_empty_loop, train_loop_config={"marker": str(marker)},
                         scaling_config=ScalingConfig(num_workers=1),
                         run_config=RunConfig(name=f"floor-{attempt}", storage_path=str(tmp / "ray"))).fit()
            fits.append(time.time() - start)
            to_loop.append(float(marker.read_text()) - start)
    finally:
        ray.shutdown()
    return {"fit_to_loop_s": to_loop, "fit_s": fits}


def _reporting_loop(config: dict) -> None:
    import ray.train

    for epoch in range(config["epochs"]):
        time.sleep(config["epoch_s"])
        ray.train.report({"epoch": epoch + 1})
    Path(config["marker"]).write_text(repr(time.time()))


REPORT_CADENCE_INTERVALS_S = ("2.0", "0.5", "0.25")  # Ray Train's default first


def report_cadence(tmp: Path, epochs: int = 10, epoch_s: float = 0.2, repeats: int = 2) -> dict:
    """fit() wall time and the loop's own time (10 reports) under each controller poll interval,
    each interval `repeats` times in turn in one local cluster."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    env_var = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    before = os.environ.get(env_var)
    figures = {interval: {"fit_s": [], "loop_end_s": []} for interval in REPORT_CADENCE_INTERVALS_S}
    start_local_cluster_like_a_sweep()
    try:
        for attempt in range(repeats):
            for interval in REPORT_CADENCE_INTERVALS_S:
                os.environ[env_var] = interval  # Train copies it to its controller at fit()
                marker = tmp / f"loop-ended-{interval}-{attempt}"
                start = time.time()
                TorchTrainer(_reporting_loop, train_loop_config={"marker": str(marker), "epochs": epochs,
                                                                 "epoch_s": epoch_s},
                             scaling_config=ScalingConfig(num_workers=1),
                             run_config=RunConfig(name=f"cadence-{interval}-{attempt}",
                                                  storage_path=str(tmp / "ray"))).fit()
                figures[interval]["fit_s"].append(round(time.time() - start, 2))
                figures[interval]["loop_end_s"].append(round(float(marker.read_text()) - start, 2))
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop(env_var, None)
        else:
            os.environ[env_var] = before
    return {"epochs": epochs, "epoch_s": epoch_s, "by_interval_s": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", nargs="+", default=["overhead", "scaling", "default"],
                        choices=["overhead", "scaling", "default", "train_floor", "report_cadence"])
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    figures = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "python": platform.python_version(),
               "load_before": os.getloadavg()}
    parts = {"overhead": overhead, "scaling": scaling, "default": default_job, "train_floor": train_floor,
             "report_cadence": report_cadence}
    for name in args.part:
        with tempfile.TemporaryDirectory(prefix=f"cpm-bench-{name}-") as tmp:
            figures[name] = parts[name](Path(tmp))
        print(name, json.dumps(figures[name], indent=1), flush=True)
    figures["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
