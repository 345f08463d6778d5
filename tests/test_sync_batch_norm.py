"""SyncBatchNorm for multi-GPU data parallelism: when it is used, and what the conversion keeps."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from cpm_model import CPM
from pipeline.train.loop import uses_sync_batch_norm, with_sync_batch_norm


@pytest.mark.parametrize("device_type, world_size, has_batch_norm, expected", [
    ("cuda", 2, True, True),
    ("cuda", 8, True, True),
    ("cuda", 1, True, False),  # one worker: its batch is the whole batch
    ("cpu", 2, True, False),  # SyncBatchNorm refuses CPU tensors
    ("cuda", 2, False, False),  # nothing to convert
])
def test_decision(device_type, world_size, has_batch_norm, expected):
    assert uses_sync_batch_norm(device_type, world_size, has_batch_norm) is expected


def _batch_norms(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


def test_conversion_keeps_the_weights_and_the_state_dict():
    torch.manual_seed(0)
    model = CPM(stages=3, width=0.0625, input_size=64, batch_norm=True)
    model.train()
    model(torch.rand(4, 3, 64, 64))  # running statistics away from their initial values
    model.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model(images)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = [id(p) for p in model.parameters()]
    norms = _batch_norms(model, nn.BatchNorm2d)

    assert with_sync_batch_norm(model, "cpu", 4) is model and _batch_norms(model, nn.BatchNorm2d) == norms
    assert with_sync_batch_norm(model, "cuda", 1) is model and _batch_norms(model, nn.SyncBatchNorm) == 0

    converted = with_sync_batch_norm(model, "cuda", 2)
    assert converted is model  # converted in place: the optimiser and checkpoints see the same model
    assert norms == 6 + 3 + 2 * 5 and _batch_norms(model, nn.SyncBatchNorm) == norms and _batch_norms(model, nn.BatchNorm2d) == 0
    assert [id(p) for p in model.parameters()] == parameters  # the same tensors, not copies
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():  # eval mode uses the running statistics, no communication: same outputs
        assert torch.equal(model(images), before)
    fresh = CPM(stages=3, width=0.0625, input_size=64, batch_norm=True)
    fresh.load_state_dict(after)  # a checkpoint of a converted model loads into a plain one
    # a model without BatchNorm stays as it is
    plain = CPM(stages=2, width=0.0625, input_size=64)
    assert with_sync_batch_norm(plain, "cuda", 2) is plain and _batch_norms(plain, nn.SyncBatchNorm) == 0


def test_sync_batch_norm_refuses_cpu_tensors_in_a_process_group():
    # Why CPU workers keep BatchNorm: in a (one-process, gloo) group, a training-mode SyncBatchNorm
    # forward on CPU tensors raises. Run in a child process so no group is left in this one.
    script = textwrap.dedent("""
        import os, socket, torch, torch.distributed as dist
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        bn = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3))).train()
        try:
            bn(torch.rand(2, 3, 4, 4))
            print("no error")
        except ValueError as exc:
            print("refused:", exc)
        dist.destroy_process_group()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: SyncBatchNorm expected input tensor to be on GPU" in result.stdout
