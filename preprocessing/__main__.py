"""Command line: build (or find) the HDF5 caches of a dataset.

    python -m preprocessing build --data lspet:/data/lspet --out /data/cache --size 368 --split all

Prints one line per split: "hit" or "built", the split and the cache path. Bad input exits with
code 2 and a one-line message. Values come from the config (--config FILE, --set k=v), then from
the explicit flags (--data, --size, --sigma, --workers), which win.
"""

from __future__ import annotations

import argparse
import json
import sys

from cpm_model.config import ConfigError, add_config_arguments, load_config

from .build import SPLITS, build_caches_with_status
from .datasets.base import DatasetError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m preprocessing", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the HDF5 cache(s) of a dataset, or find them")
    build.add_argument("--data", default=None, help="data spec, e.g. lspet:PATH, lsp:PATH+lspet:PATH, "
                                                    "synthetic:500 (default: the config's data.spec)")
    build.add_argument("--out", default=None, help="cache directory (default: the config's data.cache_dir)")
    build.add_argument("--size", type=int, default=None, help="crop side in pixels (preprocess.input_size)")
    build.add_argument("--sigma", type=float, default=None, help="belief-map Gaussian in heatmap cells")
    build.add_argument("--split", choices=(*SPLITS, "all"), default="train", help="split to build; all = "
                                                                                  "train, val and test")
    build.add_argument("--workers", type=int, default=None, help="processes; 0 = all cores")
    build.add_argument("--max-samples", type=int, default=None, help="keep the first N samples of each split")
    build.add_argument("--strict", action="store_true", help="fail on the first sample that cannot be used")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(build)
    return parser


def _config(args):
    overrides = list(args.overrides)
    for key, value in (("data.spec", args.data), ("data.cache_dir", args.out), ("preprocess.input_size", args.size),
                       ("preprocess.sigma", args.sigma), ("preprocess.workers", args.workers)):
        if value is not None:
            # JSON is YAML: a quoted path stays a string, a number stays a number.
            overrides.append(f"{key}={json.dumps(value)}")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        config = _config(args)
        if args.print_config:
            print(config.to_yaml(), end="")
            return 0
        if args.max_samples is not None and args.max_samples < 1:
            raise ConfigError(f"--max-samples must be a positive integer, got {args.max_samples}")
        splits = SPLITS if args.split == "all" else (args.split,)
        results = build_caches_with_status(config.data.spec, splits, config.preprocess, config.data.cache_dir,
                                           strict=args.strict, progress=not args.quiet,
                                           max_samples=args.max_samples)
    except (DatasetError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, (path, hit) in results.items():
        print(f"{'hit' if hit else 'built'}\t{split}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
