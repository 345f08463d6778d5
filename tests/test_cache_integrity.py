"""Damaged caches, for real: truncated files, flipped bytes, files without their completion record,
node copies of a corrupt source, and a dataset whose hash split leaves one split empty."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cpm_model.config import PreprocessConfig
from preprocessing.__main__ import main as cli_main
from preprocessing.build import DamagedCacheRebuiltWarning, EmptySplitError, build_cache, cache_path_for
from preprocessing.cache import (COMPLETION_ATTR, FILE_SIZE_ATTR, CacheDamagedError, PoseCache, check_cache,
                                 raw_row_offsets)
from preprocessing.spec import parse_data_spec

from test_cache import make_lspet_subset

REPO = Path(__file__).resolve().parents[1]
SPEC = "synthetic:120"
SIZE = 64


def settings() -> PreprocessConfig:
    return PreprocessConfig(input_size=SIZE, workers=1)


def built(cache_dir: Path, split: str = "val") -> Path:
    return build_cache(SPEC, split, settings(), cache_dir, progress=False)


def flip_image_bytes(path: Path, row: int = 3, count: int = 64) -> None:
    """Invert `count` bytes in the middle of image `row`, in place (the file keeps its size)."""
    with h5py.File(path, "r") as file:
        offset = int(raw_row_offsets(file["images"])[row]) + SIZE * SIZE
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_a_finished_cache_carries_its_completion_record(tmp_path):
    path = built(tmp_path)
    record = check_cache(path, full=True)
    with PoseCache(path) as cache:
        assert record["num_samples"] == len(cache) > 0
        assert cache.attrs[FILE_SIZE_ATTR] == path.stat().st_size
    assert record["datasets"]["images"]["shape"] == [len(cache), SIZE, SIZE, 3]


def test_a_truncated_cache_is_named_on_open_and_rebuilt_by_build(tmp_path, capsys):
    path = built(tmp_path)
    original = PoseCache(path).load_all()
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CacheDamagedError, match=f"pose cache {path} is damaged"):
        len(PoseCache(path))

    with pytest.warns(DamagedCacheRebuiltWarning, match=f"{path.name} is damaged"):
        code = cli_main(["build", "--data", SPEC, "--split", "val", "--size", str(SIZE), "--out", str(tmp_path),
                         "--workers", "1", "--quiet"])
    assert code == 0
    assert capsys.readouterr().out.split("\t")[0] == "built"  # not "hit"
    check_cache(path, full=True)
    rebuilt = PoseCache(path).load_all()
    assert all(np.array_equal(rebuilt[k], original[k], equal_nan=True) for k in original)


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_flipped_bytes_pass_the_cheap_check_fail_the_full_one_and_are_rebuilt(tmp_path):
    path = built(tmp_path)
    original = PoseCache(path).read([3], keys=["images"])["images"]
    flip_image_bytes(path)
    check_cache(path)  # same size, same shapes: only the checksum can tell
    with pytest.raises(CacheDamagedError, match="dataset 'images' does not match its checksum"):
        check_cache(path, full=True)
    assert subprocess.run([sys.executable, "-m", "preprocessing", "verify", str(path)], capture_output=True,
                          text=True, cwd=REPO).returncode == 2

    with pytest.warns(DamagedCacheRebuiltWarning, match="does not match its checksum"):
        assert built(tmp_path) == path
    assert np.array_equal(PoseCache(path).read([3], keys=["images"])["images"], original)


def test_a_cache_without_completion_record_is_stale_and_rebuilt(tmp_path):
    path = built(tmp_path)
    with h5py.File(path, "r+") as file:  # what a file written before the record existed lacks
        del file.attrs[COMPLETION_ATTR]
        del file.attrs[FILE_SIZE_ATTR]
    with pytest.raises(CacheDamagedError, match="no completion record .written by an older version"):
        check_cache(path)
    with pytest.warns(DamagedCacheRebuiltWarning, match="no completion record"):
        built(tmp_path)
    check_cache(path, full=True)


def test_readers_do_not_rebuild_but_name_the_file_and_the_command(tmp_path):
    path = built(tmp_path)
    os.truncate(path, path.stat().st_size - 1000)
    size = path.stat().st_size
    with pytest.raises(CacheDamagedError) as caught:
        build_cache(SPEC, "val", settings(), tmp_path, progress=False, rebuild_damaged=False)
    message = str(caught.value)
    assert str(path) in message
    assert f"python -m preprocessing build --data {SPEC} --split val --size {SIZE} --out {tmp_path}" in message
    assert path.stat().st_size == size  # left as it was, for the builder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_evaluate_and_fit_on_a_truncated_cache_exit_2_with_one_line(tmp_path):
    common = ["--config", "synthetic_tiny", "--set", f"data.spec={SPEC}",
              "--set", f"data.cache_dir={tmp_path}", "--set", "preprocess.workers=1"]
    config = PreprocessConfig(input_size=SIZE, sigma=1.0, workers=1)
    val = build_cache(SPEC, "val", config, tmp_path, progress=False)
    build_cache(SPEC, "train", config, tmp_path, progress=False)
    os.truncate(val, val.stat().st_size // 2)
    size_before = val.stat().st_size

    evaluate = _cli("-m", "pipeline.evaluate", "--baseline", "mean-pose", "--split", "val", "--quiet", *common)
    fit = _cli("-m", "pipeline.fit", "--out", str(tmp_path / "run"), "--no-figures", "--quiet",
               "--set", "train.epochs=1", *common)
    for result in (evaluate, fit):
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert f"pose cache {val} is damaged" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert val.stat().st_size == size_before  # readers leave the file to the builder

    command = shlex.split(fit.stderr.split("rebuild it with: ")[1])  # the command the message gives repairs it
    assert command[:4] == ["python", "-m", "preprocessing", "build"]
    assert subprocess.run([sys.executable, *command[1:], "--quiet"], cwd=REPO, timeout=300).returncode == 0
    check_cache(val, full=True)


def test_build_all_on_a_dataset_with_an_empty_split_builds_the_others(lspet_dir, tmp_path, capsys):
    root = make_lspet_subset(lspet_dir, tmp_path / "lspet9", 9)
    dataset = parse_data_spec(f"lspet:{root}")
    sizes = {split: len(dataset.split_indices(split)) for split in ("train", "val", "test")}
    empty = sorted(split for split, n in sizes.items() if n == 0)
    assert empty and len(empty) < 3  # the hash split of these 9 names leaves a split empty

    code = cli_main(["build", "--data", f"lspet:{root}", "--split", "all", "--size", "64", "--out",
                     str(tmp_path / "cache"), "--workers", "1", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0
    assert sorted(line.split("\t")[1] for line in out.splitlines()) == sorted(set(sizes) - set(empty))
    for split in empty:
        assert f"split '{split}' is empty" in err
        assert not cache_path_for(dataset, split, PreprocessConfig(input_size=64), tmp_path / "cache").exists()
    with pytest.raises(EmptySplitError):
        build_cache(f"lspet:{root}", empty[0], PreprocessConfig(input_size=64), tmp_path / "cache", progress=False)
    assert cli_main(["build", "--data", f"lspet:{root}", "--split", empty[0], "--out", str(tmp_path / "cache"),
                     "--quiet"]) == 2


@pytest.fixture
def local_ray(ray_tmpdir, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "local")
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=ray_tmpdir, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.integration  # a local Ray cluster
def test_node_copies_are_checked_fully_and_replaced_when_they_differ(local_ray, tmp_path, monkeypatch):
    from pipeline.distributed import cache_sync

    source = built(tmp_path / "shared")
    monkeypatch.setenv(cache_sync.LOCAL_CACHE_ENV, str(tmp_path / "node"))
    node_id = local_ray.get_runtime_context().get_node_id()
    copy = Path(cache_sync.ensure_on_node(str(source), node_id))
    assert copy == tmp_path / "node" / source.name and copy.read_bytes() == source.read_bytes()

    flip_image_bytes(copy)  # a copy damaged on the node's disk is copied again
    assert Path(cache_sync.ensure_on_node(str(source), node_id)).read_bytes() == source.read_bytes()

    copy.unlink()
    flip_image_bytes(source)  # a source whose bytes no longer match its record is never trusted
    with pytest.raises(CacheDamagedError, match="2 copies of .* failed their check"):
        cache_sync.ensure_on_node(str(source), node_id)
    assert not copy.exists() and not list(copy.parent.glob(".*copying*"))
