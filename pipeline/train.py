"""Train one configuration as one Ray Train run, tracked in MLflow like a sweep trial.

    python pipeline/train.py --config configs/lspet_cpu.yaml [--data SPEC] [--set train.epochs=5]

It is a sweep of one trial: the config's grid is ignored, so the run gets the same params,
metrics, artifacts, fault tolerance and resume as every trial of a sweep.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python pipeline/train.py`): use this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import sweep  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # One configuration: clear the preset's grid and search space.
    argv += ["--set", "sweep.grid={}", "--set", "sweep.search={}", "--set", "sweep.num_samples=1"]
    return sweep.main(argv)


if __name__ == "__main__":
    sys.exit(main())
