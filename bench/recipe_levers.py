"""Training levers of the LSPET CPU recipe, each a short `pipeline.fit` run from the same preset:

- recipe: configs/lspet_cpu.yaml as it is, for EPOCHS epochs (the reference);
- lr_2e-3 / lr_5e-4: the Adam learning rate doubled / halved;
- constant_lr: no cosine decay;
- loss_sum: the loss summed over map cells instead of averaged (a loss scale of B x P x 16 x 16);
- width_0.5: 64 / 16 / 256 channels instead of 48 / 12 / 192, for fewer epochs;
- input_160: 160 px crops (20 x 20 maps), for fewer epochs.

    python bench/recipe_levers.py --data lspet:../shared/data/lspet [--epochs 4] [--only recipe,lr_2e-3] [--reuse]

Runs one after another on the same machine (compare them as ratios to `recipe`, measured in the
same run) into runs/recipe_levers/NAME, with the test split left unread: these runs choose a
recipe, so only validation may guide them. Prints a table of best validation PCK@0.2 and wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "lspet_cpu.yaml"


def levers(epochs: int) -> dict[str, list[str]]:
    """name -> --set overrides of the preset. The wider and larger-input runs get epochs / 1.5
    (rounded): fewer epochs for more cost per epoch (width 0.5 measured 2.3x the recipe's on 2 CPU
    cores, so its runs still take longer; compare its wall time too)."""
    fewer = max(1, round(epochs / 1.5))
    return {
        "recipe": [],
        "lr_2e-3": ["train.lr=2.0e-3"],
        "lr_5e-4": ["train.lr=5.0e-4"],
        "constant_lr": ["train.lr_schedule=constant"],
        "loss_sum": ["train.loss_reduction=sum"],
        "width_0.5": ["model.width=0.5", f"train.epochs={fewer}"],
        "input_160": ["preprocess.input_size=160", "model.center_sigma=9.1", f"train.epochs={fewer}"],
    }


def run_lever(name: str, overrides: list[str], epochs: int, data: str, out_root: Path, reuse: bool) -> dict:
    out = out_root / name
    sets = [f"train.epochs={epochs}"] + overrides  # a later --set of the same key wins
    command = [sys.executable, "-m", "pipeline.fit", "--config", str(PRESET), "--data", data, "--out", str(out),
               "--quiet", "--no-figures", "--no-test"] + [arg for s in sets for arg in ("--set", s)]
    if reuse and (out / "summary.json").exists():  # a finished run of an earlier invocation
        wall = json.loads((out / "summary.json").read_text())["wall_time_s"]
        print(f"[{name}] reused {out} (its wall is fit's own, without start-up)", flush=True)
    else:
        print(f"[{name}] {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True)
        wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs_rows = [r for r in rows if "train_loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    metric = summary["metric"]  # pck (LSP) or pckh (MPII): the epoch rows' validation key
    return {"lever": name, "epochs": len(epochs_rows), "wall_s": wall,
            "train_s_per_epoch": sum(r["epoch_time_s"] for r in epochs_rows) / len(epochs_rows),
            "best_val_pck": summary["best_val_pck"], "last_val_pck": epochs_rows[-1][metric],
            "last_train_loss": epochs_rows[-1]["train_loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data spec, e.g. lspet:../shared/data/lspet")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the reference run (default 4)")
    parser.add_argument("--only", default=None, help="comma-separated lever names")
    parser.add_argument("--out", default=str(REPO / "runs" / "recipe_levers"))
    parser.add_argument("--reuse", action="store_true", help="keep the figures of runs that finished before")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    table = levers(args.epochs)
    names = args.only.split(",") if args.only else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"error: --only: unknown lever(s) {unknown}; expected some of {list(table)}", file=sys.stderr)
        return 2
    results = []
    for name in names:
        results.append(run_lever(name, table[name], args.epochs, args.data, Path(args.out), args.reuse))
        if args.json:  # after every run: a stopped benchmark keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))
    reference = next((r for r in results if r["lever"] == "recipe"), None)
    print("\n| lever | epochs | wall min | s/epoch | best val PCK@0.2 | vs recipe | last train loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        delta = f"{100 * (r['best_val_pck'] - reference['best_val_pck']):+.1f}" if reference else "-"
        print(f"| {r['lever']} | {r['epochs']} | {r['wall_s'] / 60:.1f} | {r['train_s_per_epoch']:.0f} | "
              f"{100 * r['best_val_pck']:.1f} | {delta} | {r['last_train_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
