"""The training loop on a tiny synthetic cache: loss goes down, determinism, resume, sharding, schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cpm_model.config import ConfigError, load_config
from pipeline.train.batches import eval_batches, train_batches
from pipeline.train.context import LocalContext
from pipeline.train.loop import train_worker
from pipeline.train.schedule import Phase, lr_factor, total_epochs, training_phases

TINY = [
    "data.spec=synthetic:160", "preprocess.input_size=64",
    "model.stages=2", "model.width=0.125", "model.stage1_kernel=3", "model.later_kernel=3", "model.later_convs=1",
    "model.batch_norm=true", "model.center_sigma=8",
    "train.batch_size=8", "train.max_steps_per_epoch=4", "train.optimizer=adam", "train.lr=0.003",
    "train.lr_schedule=constant", "train.epochs=2",
]


def tiny_config(cache_dir: Path, *extra: str):
    return load_config(None, TINY + [f"data.cache_dir={cache_dir}", *extra])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    # One directory for every test module of the session: a second build is a cache hit.
    return tmp_path_factory.getbasetemp() / "cpm_tiny_caches"


class StopAfter(LocalContext):
    """A local context that stops the run (as a crash would) after epoch `stop_after` is saved."""

    def __init__(self, *args, stop_after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_after = stop_after

    def report(self, metrics, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir)
        if metrics.get("epoch") == self.stop_after and "train_loss" in metrics:
            raise KeyboardInterrupt("stopped for the test")


def _run(config, out: Path, resume: bool = False):
    ctx = LocalContext(out, device="cpu", resume=resume, quiet=True)
    return train_worker(config, ctx, progress=False), ctx


@pytest.fixture(scope="session")
def straight_run(cache_dir, tmp_path_factory):
    config = tiny_config(cache_dir)
    out = tmp_path_factory.mktemp("straight")
    result, ctx = _run(config, out)
    return config, result, ctx, out


def test_metrics_keys_per_epoch(straight_run):
    config, result, ctx, out = straight_run
    history = result["history"]
    assert [m["epoch"] for m in history] == [1, 2]
    for m in history:
        for key in ("epoch", "train_loss", "train_loss_stage1", "train_loss_stage2", "pck", "pck_stage1",
                    "pck_stage2", "pck_right_wrist", "pck_head_top", "pck@0.1", "auc", "lr", "epoch_time_s",
                    "images_per_s", "grad_norm_stage1", "grad_norm_stage2"):
            assert key in m, key
        assert 0.0 <= m["pck"] <= 1.0 and 0.0 <= m["auc"] <= 1.0
        assert m["pck"] == m["pck_stage2"]
        assert all(0.0 < m[f"grad_norm_stage{t}"] < math.inf for t in (1, 2))
    # The per-layer record behind them: 4 steps an epoch, all sampled; its stage norms are the row's.
    gradients = result["gradients"]
    assert [g["epoch"] for g in gradients] == [1, 2] and all(g["sampled_steps"] == [1, 2, 3, 4] for g in gradients)
    assert [g["stage_grad_norm"] for g in gradients] == [[m["grad_norm_stage1"], m["grad_norm_stage2"]]
                                                         for m in history]
    assert 0.0 <= result["test"]["test_pck"] <= 1.0 and "test_pck_stage1" in result["test"]
    assert result["best_epoch"] in (1, 2)
    assert (out / "metrics.jsonl").read_text().count("\n") == 3  # two epochs and the test row


def test_an_epoch_lowers_the_loss(cache_dir, tmp_path):
    config = tiny_config(cache_dir, "train.epochs=3", "train.augment=false", "train.max_steps_per_epoch=6")
    result, _ = _run(config, tmp_path)
    losses = [m["train_loss"] for m in result["history"]]
    assert losses[-1] < 0.8 * losses[0], losses


def test_same_config_and_seed_give_the_same_numbers(straight_run, tmp_path):
    config, result, _, _ = straight_run
    again, _ = _run(config, tmp_path)
    keys = ("train_loss", "train_loss_stage1", "pck", "pck_stage1", "auc")
    assert [[m[k] for k in keys] for m in again["history"]] == [[m[k] for k in keys] for m in result["history"]]
    for (name, a), b in zip(result["model"].state_dict().items(), again["model"].state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_continues_exactly(straight_run, tmp_path):
    config, result, _, _ = straight_run
    with pytest.raises(KeyboardInterrupt):
        train_worker(config, StopAfter(tmp_path, device="cpu", quiet=True, stop_after=1), progress=False)
    assert (tmp_path / "checkpoints" / "epoch_0001" / "checkpoint.pt").is_file()
    resumed, _ = _run(config, tmp_path, resume=True)
    assert [m["epoch"] for m in resumed["history"]] == [1, 2]
    assert resumed["history"][1]["train_loss"] == result["history"][1]["train_loss"]
    assert resumed["history"][1]["pck"] == result["history"][1]["pck"]
    assert resumed["best_epoch"] == result["best_epoch"]
    assert resumed["test"]["test_pck"] == result["test"]["test_pck"]
    assert resumed["gradients"] == result["gradients"]  # epoch 1's from the checkpoint, epoch 2's measured again
    for (name, a), b in zip(result["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), name


def test_stagewise_then_finetune(cache_dir, tmp_path):
    config = tiny_config(cache_dir, "train.training_scheme=stagewise_finetune", "train.finetune_epochs=1",
                         "train.max_steps_per_epoch=2")
    assert training_phases(config) == [Phase(0, 1, 1), Phase(1, 1, 2), Phase(2, 1, None)]
    result, _ = _run(config, tmp_path)
    history = result["history"]
    assert [m["trained_stage"] for m in history] == [1, 2, 0]
    # A frozen stage has no gradient: stage 2's norm is 0 while stage 1 trains, and the reverse.
    assert history[0]["grad_norm_stage2"] == 0.0 < history[0]["grad_norm_stage1"]
    assert history[1]["grad_norm_stage1"] == 0.0 < history[1]["grad_norm_stage2"]
    assert min(history[2]["grad_norm_stage1"], history[2]["grad_norm_stage2"]) > 0.0
    assert len(history) == total_epochs(config) == 3


def test_stagewise_freezes_earlier_stages(cache_dir, tmp_path):
    config = tiny_config(cache_dir, "train.training_scheme=stagewise", "train.max_steps_per_epoch=2")
    torch.manual_seed(0)
    ctx = StopAfter(tmp_path, device="cpu", quiet=True, stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        train_worker(config, ctx, progress=False)
    after_stage1 = torch.load(tmp_path / "checkpoints" / "epoch_0001" / "checkpoint.pt", weights_only=True)["model"]
    _run(config, tmp_path, resume=True)
    # The returned model holds the best epoch's weights; the epoch-2 checkpoint holds the last ones.
    final = torch.load(tmp_path / "checkpoints" / "epoch_0002" / "checkpoint.pt", weights_only=True)["model"]
    stage1 = [k for k in final if k.startswith("stage1.")]
    later = [k for k in final if k.startswith("later_stages.") and k.endswith("weight")]
    assert stage1 and all(torch.equal(final[k], after_stage1[k]) for k in stage1)  # frozen in phase 2
    assert any(not torch.equal(final[k], after_stage1[k]) for k in later)  # stage 2 trained


def test_stagewise_needs_an_epoch_per_stage(cache_dir):
    with pytest.raises(ConfigError, match="epochs >= model.stages"):
        training_phases(tiny_config(cache_dir, "train.training_scheme=stagewise", "train.epochs=1"))


def test_train_batches_shard_without_duplicates_and_equal_steps():
    n, batch, world = 103, 8, 3
    shards = [train_batches(n, batch, rank, world, seed=5, epoch=2) for rank in range(world)]
    assert {len(s) for s in shards} == {n // (batch * world)}
    seen = np.concatenate([np.concatenate(s) for s in shards])
    assert len(seen) == len(set(seen.tolist())) == (n // (batch * world)) * batch * world
    assert all((np.diff(b) > 0).all() for s in shards for b in s)  # sorted within a batch (h5py)
    again = train_batches(n, batch, 1, world, seed=5, epoch=2)
    assert all((a == b).all() for a, b in zip(again, shards[1]))
    other_epoch = train_batches(n, batch, 1, world, seed=5, epoch=3)
    assert not all((a == b).all() for a, b in zip(other_epoch, shards[1]))
    assert len(train_batches(n, batch, 0, world, 5, 0, max_steps=2)) == 2


def test_eval_batches_cover_every_sample_once():
    n, world = 23, 4
    rows = np.concatenate([np.concatenate(eval_batches(n, 5, rank, world)) for rank in range(world)])
    assert sorted(rows.tolist()) == list(range(n))


def test_lr_schedule_warmup_step_cosine():
    train = load_config(None, ["train.lr_schedule=step", "train.lr_step_epochs=2", "train.lr_gamma=0.1",
                               "train.warmup_epochs=1"]).train
    assert lr_factor(0.5, 6, train) == pytest.approx(0.5)
    assert lr_factor(1.0, 6, train) == 1.0 and lr_factor(1.99, 6, train) == 1.0
    assert lr_factor(2.0, 6, train) == pytest.approx(0.1) and lr_factor(4.5, 6, train) == pytest.approx(0.01)
    cosine = load_config(None, ["train.lr_schedule=cosine"]).train
    assert lr_factor(0.0, 10, cosine) == 1.0
    assert lr_factor(5.0, 10, cosine) == pytest.approx(0.5)
    assert lr_factor(10.0, 10, cosine) == pytest.approx(0.0, abs=1e-12)


def test_too_few_samples_for_a_batch_is_a_clear_error(cache_dir, tmp_path):
    config = tiny_config(cache_dir, "train.batch_size=4096")
    with pytest.raises(ConfigError, match="fewer than one batch"):
        _run(config, tmp_path)


def test_isnan_safe_metrics_are_plain_floats(straight_run):
    _, result, _, _ = straight_run
    for m in result["history"]:
        assert all(isinstance(v, (int, float)) for v in m.values())
        assert not math.isnan(m["train_loss"])


def test_three_stages_beat_one_stage_on_synthetic(cache_dir, tmp_path):
    """The paper's effect, small: stage 1 sees little of the figure (1x1 convolutions and three
    pools: a 15 px field on a ~50 px figure), so it cannot tell left from right; stages 2 and 3
    add 5x5 convolutions at stride 8 (+64 px each) and see the whole figure. Same per-stage capacity."""
    common = ["data.spec=synthetic:600", "model.stage1_kernel=1", "model.later_kernel=5", "model.later_convs=2",
              "model.width=0.25", "train.max_steps_per_epoch=null", "train.batch_size=16", "train.epochs=2",
              "train.lr=0.002", "train.lr_schedule=cosine", "train.rotation_deg=20", "train.scale_min=0.85",
              "train.scale_max=1.15"]
    three, _ = _run(tiny_config(cache_dir, *common, "model.stages=3"), tmp_path / "three")
    one, _ = _run(tiny_config(cache_dir, *common, "model.stages=1"), tmp_path / "one")
    last3, last1 = three["history"][-1], one["history"][-1]
    print(f"3 stages: {last3['pck_stage1']:.3f} / {last3['pck_stage2']:.3f} / {last3['pck_stage3']:.3f}; "
          f"1 stage: {last1['pck']:.3f}")
    assert last3["pck"] > last1["pck"] + 0.05
    assert last3["pck_stage3"] > last3["pck_stage1"] + 0.05


def test_fit_stops_a_diverging_run_with_one_line_naming_epoch_and_step(cache_dir, tmp_path, capsys):
    from pipeline import fit

    overrides = TINY + [f"data.cache_dir={cache_dir}", "train.optimizer=sgd", "train.lr=1e6", "train.epochs=1"]
    args = ["--out", str(tmp_path / "out"), "--quiet", "--no-figures"]
    for override in overrides:
        args += ["--set", override]
    assert fit.main(args) == 1
    error = capsys.readouterr().err
    assert "loss became NaN at epoch 1, step " in error and "Traceback" not in error
    assert not (tmp_path / "out" / "summary.json").exists()


def test_fit_no_test_leaves_the_test_split_unread(tmp_path):
    # Runs that choose between recipes (bench/recipe_levers.py) must not see the test split.
    from pipeline import fit

    caches, out = tmp_path / "caches", tmp_path / "out"
    args = ["--out", str(out), "--quiet", "--no-figures", "--no-test"]
    for override in TINY + [f"data.cache_dir={caches}", "train.epochs=1"]:
        args += ["--set", override]
    assert fit.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= summary["best_val_pck"] <= 1.0 and summary["best_epoch"] == 1
    assert not any(key.startswith("test_") for key in summary)
    assert len(rows) == 1 and not any(key.startswith("test_") for row in rows for key in row)
    gradients = json.loads((out / "gradients.json").read_text())
    assert [e["epoch"] for e in gradients["epochs"]] == [1] and gradients["layers"][0]["name"] == "stage1.0"
    assert gradients["epochs"][0]["stage_grad_norm"] == [rows[0]["grad_norm_stage1"], rows[0]["grad_norm_stage2"]]
    built = sorted(p.name for p in caches.rglob("*.h5"))
    assert any("train" in name for name in built) and not any("test" in name for name in built), built
