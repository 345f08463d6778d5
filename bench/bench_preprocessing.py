"""Benchmark of the preprocessing cache (not a test).

    python bench/bench_preprocessing.py --lspet /path/to/lspet [--sizes 368 128] [--part build layout read]

Parts:
  build   build the train, val and test caches of every LSPET image at each size: wall time,
          images/s, peak RSS (parent + workers, sampled from /proc), file size; then the hit time.
  layout  chunking and compression of `images` / `belief_maps`: file size and random-batch read
          throughput (batches of 32 sorted random indices, as training reads), per-sample
          read_direct vs h5py fancy indexing vs os.pread at the chunk index's offsets.
  read    training reads from the cache vs decoding + cropping + rendering on the fly, on LSPET and
          on large (1280x720, MPII-sized) JPEGs made here.
Caches go to a temporary directory (outside the repository) that is deleted at the end. Prints a
Markdown report; --results FILE appends it to FILE (e.g. bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import scipy.io

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpm_model.config import PreprocessConfig  # noqa: E402
from preprocessing.build import build_caches_with_status, preprocess_sample  # noqa: E402
from preprocessing.cache import PoseCache, pread_rows, raw_row_offsets  # noqa: E402
from preprocessing.spec import parse_data_spec  # noqa: E402

BATCH = 32


# --- measuring ------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    stack.extend(int(child) for child in handle.read().split())
        except OSError:
            pass
    return found


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakRSS:
    """Peak of the summed RSS of this process and its descendants, sampled every 50 ms."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_rss_bytes(p) for p in _descendants(os.getpid())))
            self._stop.wait(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def random_batches(length: int, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(length, size=min(BATCH, length), replace=False)) for _ in range(count)]


# --- parts ----------------------------------------------------------------------------------------


def bench_build(spec: str, sizes: list[int], workdir: Path, lines: list[str]) -> dict[int, dict]:
    lines += ["", "Build: train + val + test caches (every image of the dataset), `workers` = all cores.", "",
              "| size | images | wall s | images/s | peak RSS parent+workers | files | hit s | load avg before |",
              "|---|---|---|---|---|---|---|---|"]
    paths = {}
    for size in sizes:
        config = PreprocessConfig(input_size=size)
        out = workdir / f"build{size}"
        before = load_average()
        with PeakRSS() as rss:
            start = time.perf_counter()
            statuses = build_caches_with_status(spec, ("train", "val", "test"), config, out, progress=False)
            wall = time.perf_counter() - start
        assert not any(hit for _, hit in statuses.values())
        count = sum(len(PoseCache(p)) for p, _ in statuses.values())
        size_bytes = sum(p.stat().st_size for p, _ in statuses.values())
        start = time.perf_counter()
        hits = build_caches_with_status(spec, ("train", "val", "test"), config, out, progress=False)
        hit_s = time.perf_counter() - start
        assert all(hit for _, hit in hits.values())
        lines.append(f"| {size} px | {count} | {wall:.1f} | {count / wall:.0f} | {rss.peak / 2**20:.0f} MiB | "
                     f"{size_bytes / 1e9:.2f} GB | {hit_s:.2f} (3 splits) | {before} |")
        print(lines[-1], flush=True)
        paths[size] = {split: path for split, (path, _) in statuses.items()}
    return paths


def _per_sample_reader(dataset):
    return lambda indices: _read_per_sample(dataset, indices)


def _fancy_reader(dataset):
    return lambda indices: dataset[indices]


def _raw_row_reader(dataset):
    """PoseCache's path for unfiltered datasets (os.pread at offsets from the chunk index), or None."""
    offsets = raw_row_offsets(dataset)
    if offsets is None:
        return None
    fd = os.open(dataset.file.filename, os.O_RDONLY)

    def read(indices: np.ndarray) -> np.ndarray:
        block = np.empty((len(indices), *dataset.shape[1:]), dtype=dataset.dtype)
        pread_rows(fd, block, offsets[indices], dataset.name)
        return block

    read.close = lambda: os.close(fd)
    return read


def _read_per_sample(dataset, indices: np.ndarray) -> np.ndarray:
    block = np.empty((len(indices), *dataset.shape[1:]), dtype=dataset.dtype)
    for row, index in enumerate(indices):
        dataset.read_direct(block, np.s_[index], np.s_[row])
    return block


def bench_layout(source: Path, workdir: Path, lines: list[str], batches: int = 60) -> None:
    """Copy `images` and `belief_maps` of an existing cache into files of each layout and time reads."""
    with h5py.File(source, "r") as f:
        images, maps = f["images"][()], f["belief_maps"][()]
    n, size = len(images), images.shape[1]
    variants = [
        ("contiguous", None, None),
        ("1/chunk", (1,), None),
        ("1/chunk", (1,), "lzf"),
        ("1/chunk", (1,), "gzip-1"),
        ("8/chunk", (8,), None),
        ("8/chunk", (8,), "lzf"),
        ("32/chunk", (32,), None),
    ]
    lines += ["", f"Layout: {n} samples at {size} px copied from a train cache; random batches of {BATCH} "
                  f"sorted indices ({batches} batches, file in the page cache), one process.", "",
              "| dataset | chunking | compression | MB per 1000 samples | per-sample reads, 1 MiB chunk cache: "
              "samples/s | per-sample reads, no chunk cache: samples/s | h5py fancy index: samples/s | "
              "os.pread at chunk-index offsets (unfiltered only): samples/s |",
              "|---|---|---|---|---|---|---|---|"]
    for name, data in (("images", images), ("belief_maps", maps)):
        for label, rows, compression in variants:
            path = workdir / "layout.h5"
            kwargs = {}
            if rows is not None:
                kwargs["chunks"] = (*rows, *data.shape[1:])
            if compression == "gzip-1":
                kwargs.update(compression="gzip", compression_opts=1)
            elif compression:
                kwargs["compression"] = compression
            with h5py.File(path, "w", libver="latest") as f:
                f.create_dataset(name, data=data, **kwargs)
            megabytes = path.stat().st_size / 1e6 * 1000 / n
            rates = []
            # Per-sample reads with HDF5's default 1 MiB chunk cache, without one (as PoseCache
            # opens compressed datasets), h5py's fancy indexing of the whole batch, and PoseCache's
            # raw reads of unfiltered datasets.
            readers = ((_per_sample_reader, None), (_per_sample_reader, 0), (_fancy_reader, None), (_raw_row_reader, 0))
            for make_reader, cache_bytes in readers:
                options = {} if cache_bytes is None else {"rdcc_nbytes": cache_bytes}
                with h5py.File(path, "r", **options) as f:
                    reader = make_reader(f[name])
                    if reader is None:
                        rates.append(None)
                        continue
                    # Fancy indexing is slow enough that a few batches measure it.
                    plan = random_batches(n, 4 if make_reader is _fancy_reader else batches, seed=1)
                    reader(plan[0])  # warm-up
                    start = time.perf_counter()
                    for indices in plan:
                        reader(indices)
                    rates.append(len(plan) * BATCH / (time.perf_counter() - start))
                    getattr(reader, "close", lambda: None)()
            rates = [f"{rate:.0f}" if rate is not None else "-" for rate in rates]
            lines.append(f"| {name} | {label} | {compression or 'none'} | {megabytes:.1f} | " + " | ".join(rates) + " |")
            print(lines[-1], flush=True)
            path.unlink()


def make_large_images(lspet: Path, target: Path, count: int) -> Path:
    """LSPET-format copy of the first `count` images resized to 1280x720 (joints scaled to match)."""
    (target / "images").mkdir(parents=True)
    joints = scipy.io.loadmat(str(lspet / "joints.mat"))["joints"][:, :, :count].copy()
    for i in range(count):
        name = f"im{i + 1:05d}.jpg"
        image = cv2.imread(str(lspet / "images" / name))
        height, width = image.shape[:2]
        cv2.imwrite(str(target / "images" / name), cv2.resize(image, (1280, 720)), [cv2.IMWRITE_JPEG_QUALITY, 92])
        # Pixel centres at integers: x' = (x + 0.5) * s - 0.5.
        joints[:, 0, i] = (joints[:, 0, i] + 0.5) * 1280 / width - 0.5
        joints[:, 1, i] = (joints[:, 1, i] + 0.5) * 720 / height - 0.5
    scipy.io.savemat(str(target / "joints.mat"), {"joints": joints})
    return target


def bench_read(label: str, spec: str, cache_path: Path, size: int, lines: list[str], batches: int = 30) -> None:
    """Training reads (images, belief maps, joints) from the cache vs the same batches made on the fly."""
    cache = PoseCache(cache_path)
    dataset = parse_data_spec(spec)
    config = PreprocessConfig(input_size=size)
    kinds = [dataset.identity()["type"]]
    sources = cache.read(np.arange(len(cache)), keys=["source_index"])["source_index"]
    plan = random_batches(len(cache), batches, seed=2)
    cache.read(plan[0], keys=["images", "belief_maps", "joints"])
    start = time.perf_counter()
    for indices in plan:
        cache.read(indices, keys=["images", "belief_maps", "joints"])
    cached = batches * BATCH / (time.perf_counter() - start)
    fly_batches = max(3, batches // 5)
    start = time.perf_counter()
    for indices in plan[:fly_batches]:
        for index in sources[indices]:
            preprocess_sample(dataset, int(index), "train", config, kinds)
    on_the_fly = fly_batches * BATCH / (time.perf_counter() - start)
    lines.append(f"| {label} | {size} px | {len(cache)} | {cached:.0f} | {on_the_fly:.0f} | {cached / on_the_fly:.0f}x |")
    print(lines[-1], flush=True)
    cache.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lspet", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "lspet"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[368, 128])
    parser.add_argument("--part", choices=("all", "build", "layout", "read"), nargs="+", default=["all"])
    parser.add_argument("--layout-samples", type=int, default=1000)
    parser.add_argument("--large-images", type=int, default=300)
    parser.add_argument("--results", default=None, help="append the report to this Markdown file")
    args = parser.parse_args()
    lspet = Path(args.lspet).resolve()
    spec = f"lspet:{lspet}"
    workdir = Path(tempfile.mkdtemp(prefix="cpm-bench-preprocessing-"))
    lines = [f"### Preprocessing cache benchmark, {datetime.date.today().isoformat()}", "",
             f"Command: `python bench/bench_preprocessing.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, "
             f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), OpenCV {cv2.__version__}; "
             f"load average at start {load_average()} (other jobs share the cores when it exceeds the core count)."]
    try:
        if {"all", "build"} & set(args.part):
            bench_build(spec, args.sizes, workdir, lines)
        if {"all", "layout"} & set(args.part):
            source = build_caches_with_status(spec, ["train"], PreprocessConfig(input_size=args.sizes[0]),
                                              workdir / "layout_src", progress=False,
                                              max_samples=args.layout_samples)["train"][0]
            bench_layout(source, workdir, lines)
        if {"all", "read"} & set(args.part):
            lines += ["", f"Training reads (batches of {BATCH} random samples: images + belief maps + joints) from "
                          f"the cache vs decode + crop + warp + render on the fly, one process.", "",
                      "| images | size | cached samples | cache: samples/s | on the fly: samples/s | speed-up |",
                      "|---|---|---|---|---|---|"]
            large = make_large_images(lspet, workdir / "large", args.large_images)
            for size in args.sizes:
                small_path = build_caches_with_status(spec, ["train"], PreprocessConfig(input_size=size),
                                                      workdir / "read", progress=False,
                                                      max_samples=2000)["train"][0]
                bench_read("LSPET (median 250x240)", spec, small_path, size, lines)
                large_path = build_caches_with_status(f"lspet:{large}", ["train"], PreprocessConfig(input_size=size),
                                                      workdir / "read", progress=False)["train"][0]
                bench_read("1280x720 JPEG", f"lspet:{large}", large_path, size, lines)
        lines.append(f"\nLoad average at the end: {load_average()}.")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.results:
        with open(args.results, "a") as handle:
            handle.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
