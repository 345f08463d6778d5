#!/usr/bin/env bash
# GPU speed figures in a few minutes on a one-GPU machine (no Ray or MLflow needed).
#
#   bash bench/gpu_check.sh [--cpu-smoke]
#
# Needs torch with CUDA, numpy, h5py, PyYAML, OpenCV and scipy (the cache builder); whatever is
# missing is installed from wheels in ./.whl (pip --no-index), since the machine may be offline.
# Runs bench/run.py's GPU parts (default preset and the paper's 6-stage model at 368 px, batch 32:
# pipeline vs model alone, bf16 + channels_last vs fp32, torch.compile vs eager, FLOPs, TFLOP/s)
# and prints a table; the JSON goes to gpu_check.json. Then checks SyncBatchNorm: the BatchNorm
# model converted as a multi-GPU run converts it (pipeline.train.loop.with_sync_batch_norm), in two
# DDP processes sharing the GPU, gives plain BatchNorm's output, gradients and running statistics
# on the whole batch. --cpu-smoke runs the same code on the CPU at tiny sizes (checks the script,
# measures nothing; there the model keeps BatchNorm, and the check shows per-worker statistics).
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'EOF' || pip install --no-index --find-links .whl numpy h5py pyyaml opencv-python-headless scipy
import numpy, h5py, yaml, cv2, scipy  # noqa: F401
EOF
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi

if [[ "${1:-}" == "--cpu-smoke" ]]; then
  args=(--device cpu --cpu-smoke --parts overhead paper)
  device=cpu
else
  args=(--device cuda --parts overhead paper)
  device=cuda
fi
python bench/run.py "${args[@]}" --json gpu_check.json

# SyncBatchNorm as a 2-GPU run uses it, on this one GPU: two processes in a gloo group (NCCL takes
# one GPU per rank; SyncBatchNorm has a gloo path), each with half the batch. Synced statistics
# make each half's output, the averaged gradients and the running statistics those of plain
# BatchNorm on the whole batch in one process. On the CPU (--cpu-smoke) the model keeps BatchNorm.
sync_check=$(mktemp --suffix=.py)
trap 'rm -f "$sync_check"' EXIT
cat > "$sync_check" <<'EOF'
import copy, socket, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from cpm_model import CPM
from pipeline.train.loop import uses_sync_batch_norm, with_sync_batch_norm

WORLD, BATCH = 2, 8


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def rank_main(rank, device_type, port):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 to fp32
    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    plain = CPM(stages=3, width=0.25, input_size=128, batch_norm=True).to(device).to(memory_format=torch.channels_last)
    model = with_sync_batch_norm(copy.deepcopy(plain), device.type, WORLD)
    synced = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    on_gpu = device.type == "cuda"
    assert uses_sync_batch_norm(device.type, WORLD, True) == on_gpu and (synced > 0) == on_gpu, synced
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0] if on_gpu else None)
    images = torch.rand(BATCH, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    images = images.to(device).to(memory_format=torch.channels_last)
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    ddp.train(), plain.train()
    out = ddp(images[half])
    out.float().square().mean().backward()  # DDP averages over ranks: the whole batch's mean
    full = plain(images)
    full.float().square().mean().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())
    out_diff = rel(out.detach(), full.detach()[half])
    grad_diff = max(rel(a.grad, b.grad) for a, b in zip(model.parameters(), plain.parameters()))
    norms = [(a, b) for a, b in zip(model.modules(), plain.modules()) if isinstance(b, torch.nn.BatchNorm2d)]
    stats_diff = max(rel(a.running_var, b.running_var) for a, b in norms)
    if rank == 0:
        print(f"\nBatchNorm, {WORLD} workers on {device.type}: {synced} of {len(norms)} layers SyncBatchNorm; "
              f"forward/backward under DDP ok; against plain BatchNorm on the whole batch: max rel. diff "
              f"{out_diff:.1e} (output), {grad_diff:.1e} (gradients), {stats_diff:.1e} (running variance)")
    if on_gpu:
        assert out_diff < 1e-3 and grad_diff < 1e-2 and stats_diff < 1e-3, (out_diff, grad_diff, stats_diff)
    else:  # per-worker statistics: each half normalised by its own
        assert out_diff > 1e-3, out_diff
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(sys.argv[1], free_port), nprocs=WORLD, start_method="spawn")
EOF
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python "$sync_check" "$device"

python - <<'EOF'
import json
data = json.load(open("gpu_check.json"))
print("\n" + json.dumps(data["machine"]))
print(f"| {'figure':<40} | {'value':>10} | {'unit':<9} | {'baseline':>10} | {'ratio':>6} |")
print(f"|{'-' * 42}|{'-' * 12}|{'-' * 11}|{'-' * 12}|{'-' * 8}|")
for f in data["figures"]:
    base = f"{f['baseline']:.4g}" if f["baseline"] is not None else "-"
    ratio = f"{f['ratio']:.3f}" if f["ratio"] is not None else "-"
    print(f"| {f['name']:<40} | {f['value']:>10.4g} | {f['unit']:<9} | {base:>10} | {ratio:>6} |")
EOF
