"""Command line: build (or find) the HDF5 caches of a dataset; check cache files.

    cpm-preprocess build --data lspet:/data/lspet --out /data/cache --size 368 --split all
    cpm-preprocess verify /data/cache/lspet-val-368px-*.h5

build prints one line per split: "hit" or "built", the split and the cache path; a damaged cache
is rebuilt (with a warning naming it). With --split all, an empty split (a small dataset's hash
split can leave one empty) is named in a warning and the others are built; it is an error only
when every split is empty. verify prints "ok" or "damaged" and the reason per file (the full
checksum) and exits 2 if any is damaged. Bad input exits with code 2 and a one-line message.
Values come from the config (--config PRESET or FILE, default: the `default` preset; --set k=v),
then from the explicit flags (--data, --size, --sigma, --workers), which win.
"""

from __future__ import annotations

import argparse
import json
import sys

from cpm_model.config import DEFAULT_PRESET, ConfigError, add_config_arguments, load_config

from .build import SPLITS, build_caches_with_status
from .cache import CacheDamagedError, check_cache
from .datasets.base import DatasetError
from .datasets.splits import ALL_SPLITS


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpm-preprocess", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the HDF5 cache(s) of a dataset, or find them")
    build.add_argument("--data", default=None, help="data spec, e.g. lspet:PATH, lsp:PATH+lspet:PATH, "
                                                    "synthetic:500 (default: the config's data.spec)")
    build.add_argument("--out", default=None, help="cache directory (default: the config's data.cache_dir)")
    build.add_argument("--size", type=int, default=None, help="crop side in pixels (preprocess.input_size)")
    build.add_argument("--sigma", type=float, default=None, help="belief-map Gaussian in heatmap cells")
    build.add_argument("--split", choices=(*SPLITS, ALL_SPLITS), default="train", help="split to build; all = "
                                                                                  "train, val and test")
    build.add_argument("--workers", type=int, default=None, help="processes; 0 = all cores")
    build.add_argument("--max-samples", type=int, default=None, help="keep the first N samples of each split")
    build.add_argument("--strict", action="store_true", help="fail on the first sample that cannot be used")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(build)
    verify = commands.add_parser("verify", help="check cache files fully (completion record and checksums)")
    verify.add_argument("paths", nargs="+", help="cache files (.h5)")
    return parser


def verify_main(paths: list[str]) -> int:
    damaged = 0
    for path in paths:
        try:
            record = check_cache(path, full=True)
        except (CacheDamagedError, FileNotFoundError) as exc:
            damaged += 1
            print(f"damaged\t{path}\t{getattr(exc, 'reason', exc)}")
        else:
            print(f"ok\t{path}\t{record['num_samples']} samples")
    return 2 if damaged else 0


def _config(args):
    overrides = list(args.overrides)
    for key, value in (("data.spec", args.data), ("data.cache_dir", args.out), ("preprocess.input_size", args.size),
                       ("preprocess.sigma", args.sigma), ("preprocess.workers", args.workers)):
        if value is not None:
            # JSON is YAML: a quoted path stays a string, a number stays a number.
            overrides.append(f"{key}={json.dumps(value)}")
    return load_config(args.config or DEFAULT_PRESET, overrides)


def _what_the_builder_reads(config) -> str:
    """The config's name and the two sections a cache depends on, as YAML (the tracking section,
    which may hold a password, is not the builder's to show)."""
    import yaml

    data = config.to_dict()
    return yaml.safe_dump({key: data[key] for key in ("name", "data", "preprocess")}, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.command == "verify":
        return verify_main(args.paths)
    try:
        config = _config(args)
        if args.print_config:
            print(_what_the_builder_reads(config), end="")
            return 0
        if args.max_samples is not None and args.max_samples < 1:
            raise ConfigError(f"--max-samples must be a positive integer, got {args.max_samples}")
        splits = SPLITS if args.split == ALL_SPLITS else (args.split,)
        results = build_caches_with_status(config.data.spec, splits, config.preprocess, config.data.cache_dir,
                                           strict=args.strict, progress=not args.quiet,
                                           max_samples=args.max_samples, skip_empty=len(splits) > 1)
        if not results:
            raise DatasetError(f"{config.data.spec}: every split ({', '.join(splits)}) is empty: nothing to cache")
    except (DatasetError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split in splits:
        if split not in results:
            print(f"warning: {config.data.spec} split '{split}' is empty: no cache written for it", file=sys.stderr)
    for split, (path, hit) in results.items():
        print(f"{'hit' if hit else 'built'}\t{split}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
