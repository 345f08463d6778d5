"""Signs of life: the line a sweep worker prints about once a minute inside a long epoch, and the
sweep's progress table."""

from __future__ import annotations

from types import SimpleNamespace

from cpm_model.config import load_config
from pipeline.distributed.progress import SweepProgress
from pipeline.distributed.space import expand_grid
from pipeline.train.progress import ProgressLine, eta_text


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_epoch_shorter_than_a_minute_prints_nothing():
    clock, lines = Clock(), []
    progress = ProgressLine(1, 5, steps=100, write=lines.append, clock=clock)
    for _ in range(100):
        clock.now += 0.5  # 50 s in all
        progress.step(16)
    assert lines == []


def test_a_long_epoch_prints_a_line_a_minute_with_rate_and_time_left():
    clock, lines = Clock(), []
    progress = ProgressLine(3, 40, steps=800, write=lines.append, clock=clock)
    for _ in range(800):
        clock.now += 0.5  # 64 images/s at 32 per step; 400 s for the epoch
        progress.step(32)
    assert len(lines) == 6  # at 60, 120, ..., 360 s
    # At 60 s: 120 of 800 steps done, 680 left at 0.5 s each = 340 s.
    assert lines[0] == "epoch 3/40: step 120/800 (15%), 64.0 images/s, about 6 min left"
    assert lines[-1] == "epoch 3/40: step 720/800 (90%), 64.0 images/s, about 40 s left"


def test_eta_text():
    assert [eta_text(s) for s in (42, 420, 3 * 3600 + 300)] == ["42 s", "7 min", "3 h 05 min"]


def test_the_sweep_table_has_short_columns_and_metrics_for_finished_trials(capsys):
    config = load_config(None, ["sweep.grid={model.stages: [1, 3]}", "train.epochs=4"])
    specs = {spec.key: spec.public() for spec in expand_grid(config)}
    trials = []
    for i, spec in enumerate(specs.values()):
        # A finished trial's last row is its artifacts row (no pck): the table reads every row seen.
        analysis = {"epoch": {"max": 4}, "pck": {"last": 0.40 + i / 10, "max": 0.45 + i / 10}}
        trials.append(SimpleNamespace(trial_id=f"t_{i:05d}", config={"trial": spec.as_dict()},
                                      status="TERMINATED", metric_analysis=analysis))
    SweepProgress(specs).on_experiment_end(trials)
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0] == "Trials: 2 terminated"
    assert lines[1].split() == ["#", "stages", "RF", "px", "kernel", "IS", "seed", "status", "epoch", "pck", "best",
                                "pck"]
    rf = [spec.receptive_field_px for spec in specs.values()]
    assert lines[3].split() == ["0", "1", str(rf[0]), "11", "on", "0", "TERMINATED", "4", "40.0", "45.0"]
    assert lines[4].split()[:3] == ["1", "3", str(rf[1])] and lines[4].split()[-2:] == ["50.0", "55.0"]


def test_the_last_line_names_the_report_and_the_ui():
    from pipeline.tracking.store import where_to_look

    assert where_to_look("http://127.0.0.1:5000/", "3", "abc") == (
        "Report: artifacts report/ of sweep run abc; MLflow UI: http://127.0.0.1:5000/#/experiments/3/runs/abc")
    assert where_to_look("sqlite:////tmp/m/mlflow.db", "1", "r1").endswith(
        "MLflow UI: mlflow ui --backend-store-uri sqlite:////tmp/m/mlflow.db")
    line = where_to_look("postgresql://cpm:s3cret@db:5432/mlflow", "1", "r1")
    assert "s3cret" not in line and "postgresql://cpm:***@db:5432/mlflow" in line


def test_startup_metrics_time_each_moment_from_the_one_before():
    from pipeline.distributed.ray_context import startup_metrics

    moments = {"trial_process": 100.0, "trial": 103.5, "worker_loop": 110.0, "context": 111.0,
               "caches_open": 111.25, "model_ready": 112.0, "first_step": 113.0}
    assert startup_metrics(moments) == {
        "startup_trial_s": 3.5, "startup_worker_loop_s": 6.5, "startup_context_s": 1.0,
        "startup_caches_open_s": 0.25, "startup_model_ready_s": 0.75, "startup_first_step_s": 1.0,
        "startup_s": 13.0}
    # Without /proc (no process start time) the total counts from the trainable's start.
    del moments["trial_process"]
    assert startup_metrics(moments)["startup_s"] == 9.5 and "startup_trial_s" not in startup_metrics(moments)


def test_in_a_log_each_trial_gets_a_line_when_it_starts_and_ends(capsys):
    config = load_config(None, ["sweep.grid={model.stages: [1, 3]}", "train.epochs=4"])
    specs = {spec.key: spec.public() for spec in expand_grid(config)}
    names = [spec.run_name for spec in specs.values()]
    trials = [SimpleNamespace(trial_id=f"t_{i:05d}", config={"trial": spec.as_dict()}, status="PENDING",
                              metric_analysis={}) for i, spec in enumerate(specs.values())]
    progress = SweepProgress(specs, on_terminal=False)
    progress.on_step_end(0, trials)
    assert capsys.readouterr().out == ""  # pending trials wait
    trials[0].status = "RUNNING"
    progress.on_step_end(1, trials)
    progress.on_step_end(2, trials)  # nothing changed: nothing printed
    trials[0].status, trials[0].metric_analysis = "TERMINATED", {"epoch": {"max": 4}, "pck": {"last": 0.4, "max": 0.45}}
    trials[1].status = "ERROR"
    progress.on_step_end(3, trials)
    lines = [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines()]  # less the time
    assert lines == [f"#0 {names[0]}: running", f"#0 {names[0]}: terminated after 4 epoch(s), best val 45.0",
                     f"#1 {names[1]}: error after - epoch(s), best val -"]
