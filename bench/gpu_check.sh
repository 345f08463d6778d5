#!/usr/bin/env bash
# GPU speed figures in a few minutes on a one-GPU machine (no Ray or MLflow needed).
#
#   bash bench/gpu_check.sh [--cpu-smoke]
#
# Needs torch with CUDA, numpy, h5py, PyYAML, OpenCV and scipy (the cache builder); whatever is
# missing is installed from wheels in ./.whl (pip --no-index), since the machine may be offline.
# Runs bench/run.py's GPU parts (default preset and the paper's 6-stage model at 368 px, batch 32:
# pipeline vs model alone, bf16 + channels_last vs fp32, torch.compile vs eager, FLOPs, TFLOP/s)
# and prints a table; the JSON goes to gpu_check.json. --cpu-smoke runs the same code on the CPU
# at tiny sizes (checks the script, measures nothing).
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'EOF' || pip install --no-index --find-links .whl numpy h5py pyyaml opencv-python-headless scipy
import numpy, h5py, yaml, cv2, scipy  # noqa: F401
EOF
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi

if [[ "${1:-}" == "--cpu-smoke" ]]; then
  args=(--device cpu --cpu-smoke --parts overhead paper)
else
  args=(--device cuda --parts overhead paper)
fi
python bench/run.py "${args[@]}" --json gpu_check.json

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
