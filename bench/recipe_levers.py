"""Training levers of the LSPET CPU recipe, each a short `pipeline.fit` run from the same preset:

- recipe: lspet_cpu as it is, for EPOCHS epochs (the reference);
- lr_2e-3 / lr_5e-4: the Adam learning rate doubled / halved;
- constant_lr: no cosine decay;
- loss_sum: `loss_reduction: sum` (S / 2B, Caffe's) instead of the mean per valid map pixel: a loss
  scale of (valid maps) x 16 x 16 / 2, up to 1,920x;
- width_0.5: 64 / 16 / 256 channels instead of 48 / 12 / 192, for fewer epochs;
- input_160: 160 px crops (20 x 20 maps), for fewer epochs.

    python bench/recipe_levers.py --data lspet:/path/to/lspet [--epochs 4] [--only recipe,lr_2e-3] [--reuse]

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
sys.path.insert(0, str(REPO))

from cpm_model.config import load_config  # noqa: E402

PRESET = "lspet_cpu"


def levers(epochs: int) -> dict[str, list[str]]:
    """name -> --set overrides of the preset. The wider and larger-input runs get epochs / 1.5
    (rounded): fewer epochs for more cost per epoch (measured 1.8x and 1.7x the recipe's on 2 CPU
    cores, so their runs still take longer; compare their wall time too)."""
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


def run_lever(name: str, overrides: list[str], epochs: int, data: str, out_root: Path, reuse: bool) -> dict | int:
    """The lever's row, or pipeline.fit's exit code when it failed (its error is already printed)."""
    out = out_root / name
    sets = [f"train.epochs={epochs}"] + overrides  # a later --set of the same key wins
    command = [sys.executable, "-m", "pipeline.fit", "--config", str(PRESET), "--data", data, "--out", str(out),
               "--quiet", "--no-figures", "--no-test"] + [arg for s in sets for arg in ("--set", s)]
    if reuse and finished_with(out, load_config(PRESET, sets, data=data)):
        wall = json.loads((out / "summary.json").read_text())["wall_time_s"]
        print(f"[{name}] reused {out} (its wall is fit's own, without start-up)", flush=True)
    else:
        print(f"[{name}] {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(command, cwd=REPO).returncode
        if code != 0:
            print(f"error: lever {name}: pipeline.fit exited with {code}", file=sys.stderr)
            return code
        wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epoch_rows = [r for r in rows if "train_loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    metric = summary["metric"]  # pck (LSP) or pckh (MPII): the epoch rows' validation key
    return {"lever": name, "epochs": len(epoch_rows), "wall_s": wall,
            "s_per_epoch": sum(r["epoch_time_s"] for r in epoch_rows) / len(epoch_rows),  # train + validation
            "best_val_pck": summary["best_val_pck"], "last_val_pck": epoch_rows[-1][metric],
            "last_train_loss": epoch_rows[-1]["train_loss"]}


def finished_with(out: Path, config) -> bool:
    """Whether `out` holds a finished run (summary.json) of exactly this config (fit's config.yaml)."""
    return (out / "summary.json").exists() and (out / "config.yaml").exists() \
        and (out / "config.yaml").read_text() == config.to_yaml()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data spec, e.g. lspet:/path/to/lspet")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the reference run (default 4)")
    parser.add_argument("--only", default=None, help="comma-separated lever names")
    parser.add_argument("--out", default=str(REPO / "runs" / "recipe_levers"))
    parser.add_argument("--reuse", action="store_true",
                        help="keep the figures of runs that finished before with the same config")
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
        row = run_lever(name, table[name], args.epochs, args.data, Path(args.out), args.reuse)
        if isinstance(row, int):
            return row
        results.append(row)
        if args.json:  # after every run: a stopped benchmark keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))
    reference = next((r for r in results if r["lever"] == "recipe"), None)
    print("\n| lever | epochs | wall min | s/epoch | best val PCK@0.2 | vs recipe | last train loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        delta = f"{100 * (r['best_val_pck'] - reference['best_val_pck']):+.1f}" if reference else "-"
        print(f"| {r['lever']} | {r['epochs']} | {r['wall_s'] / 60:.1f} | {r['s_per_epoch']:.0f} | "
              f"{100 * r['best_val_pck']:.1f} | {delta} | {r['last_train_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
