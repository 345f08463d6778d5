"""Checkpoints under faults, for real: truncated and bit-flipped files, a corrupt newest checkpoint
that `--resume` (pipeline.fit) and a restored Ray Train run skip for the previous kept one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpm_model.config import load_config
from cpm_model.durable import copy_durably
from cpm_model.model import CPM
from pipeline.train.checkpoint import (CheckpointError, CheckpointFallbackWarning, CorruptCheckpointError,
                                 build_checkpoint, load_newest_usable, read_checkpoint, save_checkpoint)
from pipeline.distributed.ray_context import older_sibling_checkpoints

REPO = Path(__file__).resolve().parents[1]
TINY = ["preprocess.input_size=64", "model.stages=2", "model.width=0.125", "model.stage1_kernel=3",
        "model.later_kernel=3", "model.later_convs=1"]


def _saved(path: Path, epoch: int) -> Path:
    config = load_config(None, TINY)
    model = CPM.from_config(config.model, num_parts=14, input_size=64)
    return save_checkpoint(build_checkpoint(model, config, epoch), path)


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_save_leaves_only_the_finished_file(tmp_path):
    path = _saved(tmp_path / "ckpt" / "checkpoint.pt", 3)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]
    assert read_checkpoint(path)["epoch"] == 3


def test_flipped_tensor_bytes_fail_the_checksum(tmp_path):
    path = _saved(tmp_path / "checkpoint.pt", 1)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the tensors' storage: torch.load itself would not notice
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {path} is corrupt: its tensors do not match"):
        read_checkpoint(path)


def test_a_corrupt_newest_falls_back_to_the_previous_and_names_both(tmp_path):
    old, new = _saved(tmp_path / "e1" / "checkpoint.pt", 1), _saved(tmp_path / "e2" / "checkpoint.pt", 2)
    _truncate_half(new)
    with pytest.warns(CheckpointFallbackWarning) as caught:
        path, checkpoint = load_newest_usable([new, old])
    assert path == old and checkpoint["epoch"] == 1
    message = str(caught[0].message)
    assert str(new) in message and str(old) in message
    _truncate_half(old)
    with pytest.raises(CheckpointError, match="no usable checkpoint") as error:
        load_newest_usable([new, old])
    assert str(new) in str(error.value) and str(old) in str(error.value)


def test_copying_a_directory_onto_an_older_copy_replaces_it_whole(tmp_path):
    source = _saved(tmp_path / "source" / "checkpoint.pt", 2).parent
    target = _saved(tmp_path / "checkpoints" / "epoch_0002" / "checkpoint.pt", 1).parent
    copy_durably(source, target)
    assert read_checkpoint(target)["epoch"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["epoch_0002"]  # no temp or set-aside directory


def test_ray_fallbacks_are_the_kept_siblings_newest_first(tmp_path):
    dirs = []
    for index, name in enumerate(["checkpoint_2026-12-01_10-00-00.000001", "checkpoint_2026-12-01_10-01-00.000001",
                                  "checkpoint_2026-12-01_10-02-00.000001"]):
        dirs.append(_saved(tmp_path / name / "checkpoint.pt", index + 1).parent)
        os.utime(dirs[-1] / "checkpoint.pt", (time.time() + index, time.time() + index))
    (tmp_path / "checkpoint_tmp_without_file").mkdir()
    assert older_sibling_checkpoints(str(dirs[2])) == [str(dirs[1]), str(dirs[0])]


def _fit(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline.fit", "--config", "synthetic_tiny", "--out", str(out),
               "--no-figures", "--quiet", "--device", "cpu", "--set", "data.spec=synthetic:300",
               "--set", "train.epochs=2", "--set", f"data.cache_dir={out.parent / 'cache'}", *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


def _epoch_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train_loss" in row]


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_fit_resume_skips_a_truncated_newest_checkpoint(tmp_path):
    out = tmp_path / "run"
    first = _fit(out)
    assert first.returncode == 0, first.stderr[-2000:]
    newest, previous = out / "checkpoints" / "epoch_0002" / "checkpoint.pt", out / "checkpoints" / "epoch_0001" / "checkpoint.pt"
    assert previous.is_file() and newest.is_file()  # the two newest are kept
    assert read_checkpoint(out / "best.pt")["epoch"] in (1, 2)
    _truncate_half(newest)

    resumed = _fit(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"checkpoint {newest} is corrupt" in resumed.stderr
    assert f"resuming from the previous kept checkpoint {previous}" in resumed.stderr
    rows = _epoch_rows(out)
    assert [row["epoch"] for row in rows] == [1, 2, 2]  # epoch 2 trained again, from epoch 1's state
    assert rows[2]["train_loss"] == pytest.approx(rows[1]["train_loss"], rel=1e-5)
    assert read_checkpoint(newest)["epoch"] == 2  # the truncated file was replaced whole


@pytest.mark.integration
def test_a_restored_ray_train_run_skips_a_truncated_latest_checkpoint(tmp_path, ray_tmpdir, monkeypatch):
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    monkeypatch.setenv("RAY_ADDRESS", "local")
    config = load_config("synthetic_tiny",
                         ["data.spec=synthetic:300", "train.epochs=2", f"data.cache_dir={tmp_path / 'cache'}",
                          "train.max_steps_per_epoch=4"])
    storage = tmp_path / "ray"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmpdir, logging_level="ERROR",
             # Workers import the project and this module (the loop function is pickled by reference).
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}})
    try:
        def fit(epochs: int):
            trainer = TorchTrainer(
                _ray_loop, train_loop_config={"config": config.with_overrides({"train.epochs": epochs}).to_dict()},
                scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False),
                run_config=ray.train.RunConfig(name="recovery", storage_path=str(storage),
                                               checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
            return trainer.fit()

        fit(2)
        checkpoints = sorted((storage / "recovery").glob("checkpoint_*/checkpoint.pt"))
        assert len(checkpoints) == 2
        _truncate_half(checkpoints[-1])
        result = fit(3)  # the same run name and storage: Ray hands the (truncated) latest checkpoint
        assert result.error is None
        epochs = [row["epoch"] for row in result.metrics_dataframe.to_dict("records") if "train_loss" in row
                  and row["train_loss"] == row["train_loss"]]
        assert epochs[-2:] == [2, 3]  # resumed from epoch 1, not from the truncated epoch 2
    finally:
        ray.shutdown()


def _ray_loop(loop_config: dict) -> None:
    from cpm_model.config import from_dict
    from pipeline.distributed.ray_context import RayTrainContext
    from pipeline.train.loop import train_worker

    torch.set_num_threads(1)
    train_worker(from_dict(loop_config["config"]), RayTrainContext(), progress=False)
