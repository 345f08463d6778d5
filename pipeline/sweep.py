"""Run a Ray Tune sweep of CPM trainings, one MLflow run per configuration.

    ray job submit -- python pipeline/sweep.py                      # the `default` preset
    cpm-sweep --config ablation_stages --data lspet:/data/lspet     # a packaged preset by name
    cpm-sweep --config ./my_sweep.yaml                              # or a YAML file
    python pipeline/sweep.py --dry-run                              # list the trials and exit
    python pipeline/sweep.py --resume                               # continue the last sweep
    python pipeline/sweep.py --config lspet_cpu --single             # one configuration, one trial
    python pipeline/sweep.py --register cpm-default                 # then register the best trial's model

The driver resolves the config, checks the tracking store, builds each cache once, opens the
sweep's parent MLflow run and starts Tune: each trial fits a TorchTrainer; a Tune callback in
this process writes every trial's MLflow run. At the end it prints the ablation table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python pipeline/sweep.py`): use this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpm_model.config import ConfigError, ExperimentConfig, add_config_arguments, check_path_component  # noqa: E402
from pipeline.cli import check_data_spec, config_from_args  # noqa: E402
from pipeline.redaction import public_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cpm-sweep", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--data", default=None, help="data spec, e.g. lspet:/data/lspet or synthetic:2000")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI "
                        "or a SQLite file under ~/.cache/cpm-pipeline/mlflow)")
    parser.add_argument("--storage-path", default=None, help="where Ray keeps checkpoints (default sweep.storage_path); "
                        "on a cluster, storage every node sees")
    parser.add_argument("--dry-run", action="store_true", help="list the trials with their receptive fields and exit")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SWEEP_ID",
                        help="continue a sweep whose driver stopped (default: the latest one of this preset), "
                        "with the same config and tracking URI")
    parser.add_argument("--retry-failed", action="store_true",
                        help="with --resume: run the trials that failed again (in their MLflow runs)")
    parser.add_argument("--single", action="store_true",
                        help="train the preset's base configuration alone: its grid and search are left out, "
                        "the run is tracked, checkpointed and resumable like a sweep's trial")
    parser.add_argument("--register", default=None, metavar="NAME",
                        help="at the end, register the best finished trial's MLflow model as a new version of NAME "
                        "in the model registry (models:/NAME/VERSION)")
    parser.add_argument("--sweep-id", default=None,
                        help="name the sweep (default: preset name + start time + a random suffix)")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    if args.single:  # one configuration: the preset's grid, variants and search cleared
        args.overrides = [*args.overrides, "sweep.grid={}", "sweep.variants=[]", "sweep.search={}",
                          "sweep.num_samples=1"]
    return config_from_args(args)


def check_arguments(args: argparse.Namespace) -> None:
    """Sweep ids become directory names under the storage path and MLflow tag values."""
    if args.retry_failed and not args.resume:
        raise ConfigError("--retry-failed needs --resume [SWEEP_ID]: it re-runs the failed trials of a sweep")
    if args.resume and args.sweep_id:
        raise ConfigError("give the sweep to resume as --resume SWEEP_ID, not with --sweep-id")
    if args.sweep_id is not None:
        check_path_component(args.sweep_id, "--sweep-id")
    if args.resume not in (None, "latest"):
        check_path_component(args.resume, "--resume")
    if args.register is not None:
        from pipeline.tracking.errors import TrackingError
        from pipeline.tracking.pose_model import check_model_name

        try:
            check_model_name(args.register)
        except TrackingError as exc:
            raise ConfigError(str(exc)) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_arguments(args)
        config = resolve_config(args)
        from pipeline.distributed.space import expand_grid, format_trial_table
        trials = expand_grid(config)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(public_config(config).to_yaml())
        return 0
    try:
        check_data_spec(config)  # in --dry-run too: a spec that cannot be read fails before Ray starts
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    samples = config.sweep.num_samples
    print(f"Sweep '{config.name}': {len(trials) * samples} trial(s) on {config.data.spec}"
          + (f" ({len(trials)} grid point(s) x {samples} samples)" if samples > 1 else ""))
    print(format_trial_table(trials))
    for key, distribution in config.sweep.search.items():
        print(f"  searched: {key} ~ {distribution}")
    if config.sweep.scheduler:
        print(f"  scheduler: {config.sweep.scheduler} on validation pck")
    if args.dry_run:
        return 0

    from pipeline.distributed.interrupts import SweepStopped
    from pipeline.distributed.runner import SweepError, run_sweep

    try:
        outcome = run_sweep(config, trials, resume=args.resume, sweep_id=args.sweep_id,
                            retry_failed=args.retry_failed)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SweepStopped as exc:
        print(f"{exc}: continue with the same command and --resume", file=sys.stderr)
        return exc.exit_code
    if args.register and outcome.completed:
        return register(config, outcome, args.register)
    return 0 if outcome.completed else 1


def register(config: ExperimentConfig, outcome, name: str) -> int:
    """The best trial's model as a new version of `name`; a store that refuses it is exit 2."""
    from pipeline.tracking import store
    from pipeline.tracking.errors import TrackingError
    from pipeline.tracking.pose_model import register_best_model

    uri = store.resolve_tracking_uri(config.tracking.tracking_uri)
    try:
        version, run, score, protocol = register_best_model(uri, outcome.experiment_id, outcome.parent_run_id, name)
    except TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Registered models:/{name}/{version.version}: {run.info.run_name} (run {run.info.run_id}), "
          f"validation {protocol.label} {100 * score:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
