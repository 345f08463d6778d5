"""The speed benchmarks in one entry point; every figure is a ratio against a baseline of the same run.

    python bench/run.py [--quick] [--json FILE] [--device cpu|cuda] [--parts ...]

Parts (default: all that the device allows):
  overhead     the worker loop's training throughput (cache, augmentation, model, loss, optimizer)
               against the model alone on random tensors already on the device (`pipeline_overhead`),
               on the reference config; plus the optimised step (bf16 autocast + channels_last) against
               plain fp32, torch.compile against eager, FLOPs per image and achieved TFLOP/s
  paper        (cuda) the same for the paper's 6-stage model at 368 px, batch 32
  read         cache read + augmentation + target rendering (samples/s) against decoding, cropping
               and rendering on the fly (LSPET at 128 px)
  gradients    an epoch of the worker loop with gradient sampling (grad_norm_stage{t}, gradients.json:
               4 sampled steps) against without, on the reference config's whole train split; and
               the time of one sampled step's measurement on the reference, lspet_cpu and paper models
  precision    bf16 autocast against fp32, model alone, on the default and lspet_cpu networks: the
               measurement behind `precision: auto` (bf16 only on a CPU with bf16 instructions)
  memory       peak RSS of a training worker process on a cache of 1,000 samples and on the full
               train split (one subprocess each)
  distributed  per-trial overhead of a sweep with its breakdown, Ray Train's own start-up per fit(),
               and images/s with 1 and 2 workers (bench_distributed; needs Ray and MLflow; not in --quick)
The JSON holds one object per figure: name, value, unit, baseline, ratio (plus what was measured).
Timed pairs alternate baseline and candidate (ABBA); value and baseline are the medians of each,
ratio the median of the per-pair ratios, ratio_quartiles their quartiles (the machine's noise).
Caches go to a temporary directory outside the repository, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import speed  # noqa: E402
from cpm_model.config import load_config  # noqa: E402
from pipeline.train.inference import use_bf16  # noqa: E402

# The CPU reference config: the default preset's network (3 stages, width 0.25, 64 px, batch 16) on
# its synthetic data, with its own precision choice (auto = bf16 autocast on a CPU), channels_last,
# one intra-op thread: what a one-CPU Ray Train worker of the default job runs with (Ray sets
# OMP_NUM_THREADS to the worker's CPUs). Two OpenMP threads on a loaded 2-core machine stall at
# every barrier (measured 2-10x slower and erratic), so one thread is also the fair setting here.
REFERENCE_PRESET = "default"
# The paper's Fig. 2 network at its own size (the size of the H100 reference figures: 368 px, batch 32).
PAPER_OVERRIDES = ["preprocess.input_size=368", "model.stages=6", "train.batch_size=32", "train.optimizer=sgd",
                   "train.lr=8e-5", "train.loss_reduction=sum", "data.spec=synthetic:1600"]
LSPET = REPO.parent / "shared" / "data" / "lspet"


def paired_figure(name: str, paired, unit: str, **extra) -> dict:
    """A figure from speed.interleaved_ratio: ratio = median of the per-pair ratios."""
    return {"name": name, "value": paired.value, "unit": unit, "baseline": paired.baseline,
            "ratio": paired.ratio, "ratio_quartiles": list(paired.ratio_quartiles), **extra}


def figure(name: str, value: float, unit: str, baseline: float | None = None, **extra) -> dict:
    ratio = value / baseline if baseline else None
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio, **extra}


def report(figures: list[dict], item: dict) -> None:
    figures.append(item)
    ratio = f"  ratio {item['ratio']:.3f}" if item["ratio"] is not None else ""
    if "ratio_quartiles" in item:
        ratio += " (pairs: quartiles {:.3f}-{:.3f})".format(*item["ratio_quartiles"])
    base = f"  baseline {item['baseline']:.4g}" if item["baseline"] is not None else ""
    print(f"{item['name']:<28} {item['value']:.4g} {item['unit']}{base}{ratio}", flush=True)


def train_cache(config, cache_dir: Path):
    from preprocessing.build import build_cache
    from preprocessing.cache import PoseCache

    return PoseCache(build_cache(config.data.spec, "train", config.preprocess, cache_dir, progress=False))


def step_figures(figures: list[dict], label: str, config, cache, device: torch.device, args,
                 compare_compile: bool) -> None:
    """pipeline_overhead, optimised vs plain, compile vs eager, FLOPs, TFLOP/s for one config."""
    steps, warmup, repeats = (20, 3, 6) if args.quick else (40, 5, 16)  # even: ABBA order
    if args.cpu_smoke:
        steps, warmup, repeats = 2, 1, 1
    precision = "bf16" if use_bf16(config.train.precision, device) else "fp32"  # what the loop would use
    optimised = speed.StepSetup(precision, channels_last=True)
    plain = speed.StepSetup("fp32", channels_last=False)
    # One state per setup, reused by every repeat, so warm-up (and compilation) is paid once.
    state = speed.build_training_state(speed.config_with(config, optimised), device, optimised, 10**6)
    overhead = speed.interleaved_ratio(
        lambda: speed.time_model_alone(config, device, optimised, steps, warmup, state),
        lambda: speed.time_pipeline(config, cache, device, optimised, steps, warmup, state), repeats)
    common = {"config": label, "setup": optimised.label, "device": str(device), "steps": steps, "repeats": repeats}
    report(figures, paired_figure("pipeline_overhead" + args.suffix(label), overhead, "images/s",
                                  measured="worker loop (train_one_epoch over the cache) vs model alone", **common))
    if device.type == "cpu" and not args.cpu_smoke:  # the loop before augmentation moved to the loader
        in_loop = speed.interleaved_ratio(
            lambda: speed.time_model_alone(config, device, optimised, steps, warmup, state),
            lambda: speed.time_pipeline(config, cache, device, optimised, steps, warmup, state,
                                        augment_in_loader=False), repeats)
        report(figures, paired_figure("pipeline_overhead_in_loop_augmentation" + args.suffix(label), in_loop,
                                      "images/s", measured="as pipeline_overhead, augmentation inside the step "
                                                           "(the loop before this change)", **common))
    plain_state = speed.build_training_state(config, device, plain, 10**6)
    optimised_vs_plain = speed.interleaved_ratio(
        lambda: speed.time_model_alone(config, device, plain, steps, warmup, plain_state),
        lambda: speed.time_model_alone(config, device, optimised, steps, warmup, state), repeats)
    report(figures, paired_figure("optimised_vs_plain" + args.suffix(label), optimised_vs_plain, "images/s",
                                  measured=f"model alone, {optimised.label} vs fp32", **common))
    if compare_compile:
        compiled = replace(optimised, compile=True)
        start = time.perf_counter()
        compiled_state = speed.build_training_state(speed.config_with(config, compiled), device, compiled, 10**6)
        speed.time_model_alone(config, device, compiled, 1, 2, compiled_state)  # compiles
        compile_s = time.perf_counter() - start
        compile_vs_eager = speed.interleaved_ratio(
            lambda: speed.time_model_alone(config, device, optimised, steps, warmup, state),
            lambda: speed.time_model_alone(config, device, compiled, steps, warmup, compiled_state), repeats)
        report(figures, paired_figure("compile_vs_eager" + args.suffix(label), compile_vs_eager, "images/s",
                                      measured=f"model alone, {compiled.label} vs {optimised.label}",
                                      compile_s=compile_s, **common))
    flops = speed.flops_per_image(config, device)
    report(figures, figure("flops_per_image" + args.suffix(label), flops / 1e9, "GFLOP", None,
                           measured="forward + backward, torch.utils.flop_counter", config=label))
    report(figures, figure("achieved_tflops" + args.suffix(label), flops * optimised_vs_plain.value / 1e12, "TFLOP/s",
                           None, measured=f"model alone, {optimised.label}", config=label))
    report(figures, figure("pipeline_tflops" + args.suffix(label), flops * overhead.value / 1e12, "TFLOP/s",
                           None, measured=f"worker loop, {optimised.label}", config=label))


def part_overhead(figures, args, tmp: Path) -> None:
    device = torch.device(args.device)
    overrides = [f"data.cache_dir={tmp / 'cache'}"]
    if args.cpu_smoke:
        overrides += ["data.spec=synthetic:200"]
    config = load_config(REFERENCE_PRESET, overrides)
    cache = train_cache(config, tmp / "cache")
    step_figures(figures, "default preset (3 stages, 64 px, batch 16)", config, cache, device, args,
                 compare_compile=args.compile and not args.quick)


def part_paper(figures, args, tmp: Path) -> None:
    device = torch.device(args.device)
    overrides = PAPER_OVERRIDES + [f"data.cache_dir={tmp / 'cache'}"]
    if args.cpu_smoke:  # the same code path at a size a CPU runs in seconds
        overrides += ["preprocess.input_size=64", "model.stages=2", "model.width=0.125", "train.batch_size=4",
                      "data.spec=synthetic:100"]
    config = load_config(None, overrides)
    cache = train_cache(config, tmp / "cache")
    step_figures(figures, "paper Fig. 2 (6 stages, 368 px, batch 32)", config, cache, device, args,
                 compare_compile=args.compile)


def part_read(figures, args, tmp: Path) -> None:
    from bench_preprocessing import random_batches
    from cpm_model.config import PreprocessConfig
    from cpm_model.joints import flip_permutation
    from pipeline.train.batches import _to_tensors, to_device, training_augmenter
    from preprocessing.build import build_cache, preprocess_sample
    from preprocessing.cache import PoseCache
    from preprocessing.spec import parse_data_spec

    spec, size = f"lspet:{LSPET}", 128
    path = build_cache(spec, "train", PreprocessConfig(input_size=size), tmp / "read", progress=False,
                       max_samples=1000)
    cache, dataset = PoseCache(path), parse_data_spec(spec)
    config = load_config("lspet_cpu", [f"preprocess.input_size={size}"])
    prepare = training_augmenter(config, torch.Generator().manual_seed(0), flip_permutation(len(cache.joint_names), cache.flip_pairs))
    plan = random_batches(len(cache), 4 if args.quick else 20, seed=2)
    start = time.perf_counter()
    for indices in plan:
        arrays = cache.read(indices, keys=("images", "joints"))
        prepare(to_device(_to_tensors(arrays, pin=False), torch.device("cpu")))
    cached = sum(len(i) for i in plan) / (time.perf_counter() - start)
    sources = cache.read(np.arange(len(cache)), keys=["source_index"])["source_index"]
    fly_plan = plan[:max(1, len(plan) // 4)]
    kinds = [dataset.identity()["type"]]
    start = time.perf_counter()
    for indices in fly_plan:
        for index in sources[indices]:
            preprocess_sample(dataset, int(index), "train", PreprocessConfig(input_size=size), kinds)
    on_the_fly = sum(len(i) for i in fly_plan) / (time.perf_counter() - start)
    report(figures, figure("cache_read_augmented", cached, "samples/s", on_the_fly,
                           measured="LSPET 128 px, batches of 32: cache read + augmentation + target rendering "
                                    "vs decode + crop + warp + render on the fly", samples=len(cache)))
    cache.close()


def part_gradients(figures, args, tmp: Path) -> None:
    from pipeline.train.gradients import SAMPLED_STEPS_PER_EPOCH

    device = torch.device(args.device)
    overrides = [f"data.cache_dir={tmp / 'cache'}"] + (["data.spec=synthetic:200"] if args.cpu_smoke else [])
    config = load_config(str(REPO / REFERENCE_PRESET), overrides)
    cache = train_cache(config, tmp / "cache")
    repeats = 1 if args.cpu_smoke else 4 if args.quick else 8  # even: ABBA order
    steps = len(cache) // config.train.batch_size  # a whole epoch, as a trial trains it
    setup = speed.StepSetup("bf16" if use_bf16(config.train.precision, device) else "fp32", channels_last=True)
    state = speed.build_training_state(speed.config_with(config, setup), device, setup, 10**6)
    speed.time_pipeline(config, cache, device, setup, 5, 0, state)  # warm-up, once
    paired = speed.interleaved_ratio(
        lambda: speed.time_pipeline(config, cache, device, setup, steps, 0, state),
        lambda: speed.time_pipeline(config, cache, device, setup, steps, 0, state,
                                    gradient_samples=SAMPLED_STEPS_PER_EPOCH), repeats)
    report(figures, paired_figure("gradient_sampling_epoch", paired, "images/s", steps=steps, repeats=repeats,
                                  measured=f"worker loop epoch with {SAMPLED_STEPS_PER_EPOCH} sampled steps vs none, "
                                           "default preset's network", setup=setup.label, device=str(device)))
    models = {"default": config, "lspet_cpu": load_config("lspet_cpu", []),
              "paper": load_config(None, PAPER_OVERRIDES)}
    for label, model_config in models.items():
        seconds = speed.time_gradient_sample(model_config, device)
        report(figures, figure(f"gradient_sample_ms_{label}", 1000 * seconds, "ms", None, device=str(device),
                               measured=f"one sampled step's measurement, {label} model"))


def part_memory(figures, args, tmp: Path) -> None:
    spec = f"lspet:{LSPET}"
    command = [sys.executable, "-m", "preprocessing", "build", "--data", spec, "--size", "128", "--split", "train"]
    caches = {}
    for label, extra in (("1000", ["--max-samples", "1000"]), ("full", [])):
        out = subprocess.run(command + extra + ["--out", str(tmp / f"mem{label}")], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
        caches[label] = Path(out.strip().splitlines()[-1].split("\t")[-1])
    max_steps = 20 if args.quick else None  # the full run trains a whole epoch over every sample
    overrides = ["preprocess.input_size=128", "train.precision=auto"]
    small = speed.peak_rss_of_worker(REFERENCE_PRESET, overrides, caches["1000"], max_steps)
    large = speed.peak_rss_of_worker(REFERENCE_PRESET, overrides, caches["full"], max_steps)
    report(figures, figure("worker_peak_rss", large["peak_rss_mib"], "MiB", small["peak_rss_mib"],
                           measured="peak RSS of a worker process training one epoch (default preset's network "
                                    "at 128 px, batch 16) on the full LSPET train split vs a 1,000-sample cache",
                           samples=large["samples"], baseline_samples=small["samples"],
                           steps=large["steps"], baseline_steps=small["steps"]))


def part_distributed(figures, args, tmp: Path) -> None:
    import bench_distributed

    for sub in ("overhead", "train_floor", "scaling"):
        (tmp / sub).mkdir()
    over = bench_distributed.overhead(tmp / "overhead")
    report(figures, figure("trial_overhead", over["startup_mean_s"], "s", None,
                           measured="trial start to first training step, 2-trial sweep", trials=over["startup_s"],
                           breakdown_mean_s=over["startup_breakdown_mean_s"], sweep_wall_s=over["sweep_wall_s"]))
    floor = bench_distributed.train_floor(tmp / "train_floor")
    report(figures, figure("train_fit_to_loop", statistics.median(floor["fit_to_loop_s"]), "s", None,
                           measured="TorchTrainer.fit() of an empty loop, 1 worker: the call to the loop's first line "
                                    "(Ray Train's own part of a trial's start-up)", fits=floor["fit_to_loop_s"]))
    scaling = bench_distributed.scaling(tmp / "scaling")
    report(figures, figure("workers_2_vs_1", scaling["images_per_s_2_workers"], "images/s",
                           scaling["images_per_s_1_worker"], measured="one configuration, 2 workers x 16 vs 1 x 32"))


def part_precision(figures, args, tmp: Path) -> None:
    """bf16 autocast against fp32 (both channels_last), model alone, whatever `auto` would choose:
    the measurement behind the `auto` rule (bf16 only on a CPU with bf16 instructions)."""
    device = torch.device(args.device)
    bf16, fp32 = speed.StepSetup("bf16", channels_last=True), speed.StepSetup("fp32", channels_last=True)
    # Emulated bf16 takes seconds a step on the larger nets: few steps, still ABBA pairs.
    sizes = {"default": (10, 2, 4), "lspet_cpu": (3, 1, 2)}
    if args.cpu_smoke:
        sizes = {label: (1, 1, 1) for label in sizes}
    for label, (steps, warmup, repeats) in sizes.items():
        config = load_config(label, [])
        states = {setup: speed.build_training_state(speed.config_with(config, setup), device, setup, 10**6)
                  for setup in (bf16, fp32)}
        paired = speed.interleaved_ratio(
            lambda: speed.time_model_alone(config, device, fp32, steps, warmup, states[fp32]),
            lambda: speed.time_model_alone(config, device, bf16, steps, warmup, states[bf16]), repeats)
        report(figures, paired_figure(f"bf16_vs_fp32_{label}", paired, "images/s", steps=steps, repeats=repeats,
                                      measured=f"model alone, {label} network, bf16 autocast vs fp32",
                                      device=str(device), auto_takes_bf16=use_bf16("auto", device)))


PARTS = {"overhead": part_overhead, "precision": part_precision, "paper": part_paper, "read": part_read,
         "gradients": part_gradients, "memory": part_memory, "distributed": part_distributed}


def machine() -> dict:
    from bench_preprocessing import cpu_model

    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "nproc": os.cpu_count(), "cpu": cpu_model(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_before": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small caches, few steps (a couple of minutes)")
    parser.add_argument("--json", default=None, help="write {machine, figures} to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile figures")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes: check that the GPU script runs")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on a CPU device (default 1)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.parts is None:
        args.parts = ["overhead", "read", "gradients", "memory"] + (["paper"] if args.device == "cuda" else []) + \
            ([] if args.quick else ["distributed"])
    args.suffix = lambda label: "" if label.startswith("default") else "_paper"
    info = machine()
    print(json.dumps(info), flush=True)
    figures: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cpm-speed-") as tmp:
        for name in args.parts:
            (Path(tmp) / name).mkdir()
            PARTS[name](figures, args, Path(tmp) / name)
    info["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
