"""The HDF5 pose cache: content, geometry, hits, locking, crashes, skips and errors."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import yaml

from cpm_model.config import PreprocessConfig, load_config
from cpm_model.geometry import apply_affine
from cpm_model.heatmaps import decode_belief_maps, input_to_heatmap, render_belief_maps
from cpm_model.joints import LSP
from cpm_model.metrics import PCK
from preprocessing.__main__ import main as cli_main
from preprocessing.build import SkippedSamplesWarning, build_cache, build_caches_with_status, cache_path_for
from preprocessing.cache import PoseCache, raw_row_offsets
from preprocessing.datasets import registry
from preprocessing.datasets.base import DatasetError, PoseSample, SampleSkipped

SIZE = 128
NUM_IMAGES = 300


# --- fixtures -------------------------------------------------------------------------------------


def make_lspet_subset(source: Path, target: Path, count: int, garbage: tuple[int, ...] = ()) -> Path:
    """An LSPET-format directory: symlinks to the first `count` images and a truncated joints.mat;
    images numbered in `garbage` (1-based) are replaced by undecodable bytes."""
    (target / "images").mkdir(parents=True)
    joints = scipy.io.loadmat(str(source / "joints.mat"))["joints"]
    scipy.io.savemat(str(target / "joints.mat"), {"joints": joints[:, :, :count]})
    for number in range(1, count + 1):
        name = f"im{number:05d}.jpg"
        if number in garbage:
            (target / "images" / name).write_bytes(b"this is not a jpeg" * 10)
        else:
            (target / "images" / name).symlink_to(source / "images" / name)
    return target


@pytest.fixture(scope="session")
def lspet_subset(lspet_dir, tmp_path_factory) -> Path:
    return make_lspet_subset(lspet_dir, tmp_path_factory.mktemp("lspet300"), NUM_IMAGES)


@pytest.fixture(scope="session")
def train_cache(lspet_subset, tmp_path_factory) -> PoseCache:
    path = build_cache(f"lspet:{lspet_subset}", "train", PreprocessConfig(input_size=SIZE), tmp_path_factory.mktemp("c"),
                       progress=False)
    return PoseCache(path)


@pytest.fixture(scope="session")
def train_data(train_cache) -> dict[str, np.ndarray]:
    return train_cache.load_all()


class FakeDataset:
    """A made-up reader: `count` PNG images of random noise with one 14-joint figure each.

    `fail_at`: load_image raises a plain (non-skip) error there, as a crashing reader would.
    `delay`: seconds per load_image (to make concurrent builds overlap).
    `die_at`: the process reading that sample exits at once, as one killed by the OOM killer would.
    """

    joint_set = LSP

    def __init__(self, root: Path, count: int = 12, fail_at: int | None = None, delay: float = 0.0,
                 joints_shape: tuple[int, int] = (14, 3), split_size: int | None = None, all_tiny: bool = False,
                 die_at: int | None = None):
        self.root, self.count, self.fail_at, self.delay, self.die_at = Path(root), count, fail_at, delay, die_at
        self.joints_shape, self.split_size, self.all_tiny = joints_shape, split_size, all_tiny
        self.root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(count):
            path = self.root / f"img{i}.png"
            if not path.exists():
                cv2.imwrite(str(path), rng.integers(0, 255, size=(90, 120, 3), dtype=np.uint8))

    def identity(self) -> dict:  # the failure knobs are not part of the content: same cache
        return {"type": "fake", "root": str(self.root), "count": self.count}

    def __len__(self) -> int:
        return self.count

    def split_indices(self, split: str) -> np.ndarray:
        return np.arange(self.count if self.split_size is None else self.split_size, dtype=np.int64)

    def sample(self, index: int) -> PoseSample:
        rng = np.random.default_rng(index)
        spread = 2.0 if self.all_tiny else 60.0
        joints = np.ones(self.joints_shape)
        joints[:, :2] = rng.uniform(0, spread, size=(self.joints_shape[0], 2)) + 20
        return PoseSample(index=index, image_path=str(self.root / f"img{index}.png"), joints=joints)

    def load_image(self, index: int) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        if index == self.fail_at:
            raise RuntimeError(f"reader bug at sample {index}")
        if index == self.die_at:
            os._exit(9)
        image = cv2.imread(str(self.root / f"img{index}.png"))
        if image is None:
            raise SampleSkipped("unreadable_image", f"img{index}.png: not decodable")
        return image[:, :, ::-1].copy()


@pytest.fixture(autouse=True, scope="module")
def fake_kind():
    """FakeDataset's kind, registered as a new dataset would be, for as long as these tests run."""
    registry.register(registry.DatasetKind("fake", FakeDataset, LSP, PCK, person_to_image_ratio=0.5))
    yield
    registry.unregister("fake")


def h5_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.h5"))


def small(**kwargs) -> PreprocessConfig:
    return PreprocessConfig(input_size=64, **{"workers": 1, **kwargs})


# --- content --------------------------------------------------------------------------------------


def test_layout_shapes_and_dtypes(train_cache, train_data):
    n, parts = len(train_cache), LSP.num_parts
    expected = {
        "images": ((n, SIZE, SIZE, 3), np.uint8),
        "belief_maps": ((n, parts + 1, SIZE // 8, SIZE // 8), np.float16),
        "joints": ((n, parts, 3), np.float32),
        "joints_original": ((n, parts, 3), np.float32),
        "affine": ((n, 2, 3), np.float64),
        "torso": ((n,), np.float32),
        "head_size": ((n,), np.float32),
        "source_index": ((n,), np.int64),
        "image_size": ((n, 2), np.int32),
    }
    assert {k: (v.shape, v.dtype) for k, v in train_data.items()} == expected
    attrs = train_cache.attrs
    assert 200 < n == attrs["num_samples"] < NUM_IMAGES  # the train split of the first 300 images
    assert attrs["split"] == "train" and attrs["joint_set"] == "lsp" and attrs["format_version"] == 1
    assert train_cache.joint_names == list(LSP.names)
    assert train_cache.flip_pairs == list(LSP.flip_pairs)
    assert train_cache.settings == {"input_size": SIZE, "sigma": 1.0, "train_crop": "bbox", "crop_context": 1.3}
    assert attrs["source"]["type"] == "lspet" and attrs["skipped"] == {}
    assert train_cache.path.name.startswith(f"lspet-train-{SIZE}px-") and train_cache.path.suffix == ".h5"


def test_belief_map_peaks_decode_to_the_crop_joints(train_data):
    maps = train_data["belief_maps"][:, :-1].astype(np.float32)
    decoded, _ = decode_belief_maps(maps)
    joints = train_data["joints"].astype(np.float64)
    in_crop = joints[..., 2] > 0
    error_cells = np.abs(decoded - joints[..., :2]) / 8.0
    # Where the peak has neighbours on both sides the decoder refines it: 0.1 cell.
    cells = input_to_heatmap(joints[..., :2], 8)
    interior = in_crop & ((cells >= 0.5) & (cells <= SIZE // 8 - 1.5)).all(axis=-1)
    assert interior.sum() > 2000
    assert error_cells[interior].max() < 0.1
    # A peak on the map's border cell cannot be refined outwards: still within half a cell.
    assert error_cells[in_crop].max() <= 0.5 + 1e-6
    # Parts without a target (unannotated or outside the crop) have all-zero maps.
    assert not maps[~in_crop].any()


def test_crop_joints_map_back_to_the_original_annotation(train_data):
    back = apply_affine(train_data["joints"][..., :2], train_data["affine"])
    original = train_data["joints_original"]
    annotated = original[..., 2] > 0
    assert np.abs(back - original[..., :2])[annotated].max() < 0.5
    # Training crops are centred on the joints' box: nearly every annotated joint is in the crop.
    assert (train_data["joints"][..., 2] > 0).sum() / annotated.sum() > 0.99


def test_joints_original_are_the_annotation_as_read(train_data, lspet_subset):
    mat = scipy.io.loadmat(str(lspet_subset / "joints.mat"))["joints"].transpose(2, 0, 1)
    np.testing.assert_allclose(train_data["joints_original"], mat[train_data["source_index"]], atol=1e-3)


def test_flipping_the_crop_and_swapping_pairs_gives_the_flipped_maps(train_data):
    perm = LSP.flip_permutation()

    def flip_maps(maps):
        return np.concatenate([maps[:-1][perm], maps[-1:]])[:, :, ::-1]

    for index in range(0, len(train_data["joints"]), 5):
        joints = train_data["joints"][index].astype(np.float64)
        flipped = joints[perm].copy()
        flipped[:, 0] = SIZE - 1 - flipped[:, 0]
        rendered_flipped = render_belief_maps(flipped, SIZE // 8, 1.0)
        # Exactly the flipped maps of the same joints...
        np.testing.assert_array_equal(rendered_flipped, flip_maps(render_belief_maps(joints, SIZE // 8, 1.0)))
        # ...and the flipped stored maps up to float16 rounding (the maps were rendered before the
        # joints were rounded to float32 for storage).
        stored = train_data["belief_maps"][index].astype(np.float32)
        np.testing.assert_allclose(flip_maps(stored), rendered_flipped, rtol=2.0**-10, atol=2.0**-24)


def test_torso_fallback_and_count_without_normaliser(train_cache, train_data, lspet_subset):
    mat = scipy.io.loadmat(str(lspet_subset / "joints.mat"))["joints"].transpose(2, 0, 1)
    rows = mat[train_data["source_index"]]
    has = lambda j: rows[:, j, 2] > 0  # noqa: E731
    primary = has(9) & has(2)  # left shoulder - right hip
    fallback = ~primary & has(8) & has(3)  # right shoulder - left hip
    neither = ~primary & ~fallback
    torso = train_data["torso"]
    dist = lambda a, b: np.linalg.norm(rows[:, a, :2] - rows[:, b, :2], axis=1)  # noqa: E731
    np.testing.assert_allclose(torso[primary], dist(9, 2)[primary], rtol=1e-5)
    np.testing.assert_allclose(torso[fallback], dist(8, 3)[fallback], rtol=1e-5)
    assert np.isnan(torso[neither]).all() and np.isfinite(torso[~neither]).all()
    assert fallback.sum() > 10 and neither.sum() > 0  # LSPET has both cases
    assert train_cache.attrs["num_without_torso"] == neither.sum()
    assert np.isnan(train_data["head_size"]).all()  # LSPET has no head boxes


def test_evaluation_cache_uses_image_centre_and_size(lspet_subset, tmp_path):
    cache = PoseCache(build_cache(f"lspet:{lspet_subset}", "val", PreprocessConfig(input_size=64), tmp_path,
                                  progress=False))
    data = cache.read(np.arange(len(cache)))
    height, width = data["image_size"][:, 0], data["image_size"][:, 1]
    centre = apply_affine(np.full((len(cache), 1, 2), 31.5), data["affine"])[:, 0]
    np.testing.assert_allclose(centre, np.column_stack([(width - 1) / 2, (height - 1) / 2]), atol=1e-6)
    side = data["affine"][:, 0, 0] * 64
    np.testing.assert_allclose(side, 1.3 * 0.392 * np.maximum(height, width), rtol=1e-9)


# --- the reader -----------------------------------------------------------------------------------


def test_read_restores_requested_order_with_repeats(train_cache, train_data):
    indices = [5, 2, 5, 0, len(train_cache) - 1]
    batch = train_cache.read(indices)
    for name, values in batch.items():
        np.testing.assert_array_equal(values, train_data[name][indices])
    assert set(train_cache.read([3], keys=["images", "joints"])) == {"images", "joints"}
    with pytest.raises(IndexError):
        train_cache.read([len(train_cache)])


def test_cache_reader_pickles_without_its_handle(train_cache, train_data):
    train_cache.read([0])  # opens the file
    clone = pickle.loads(pickle.dumps(train_cache))
    assert clone._file is None
    np.testing.assert_array_equal(clone.read([1])["images"][0], train_data["images"][1])


def test_uncompressed_datasets_are_read_as_raw_rows_and_belief_maps_through_h5py(train_cache, train_data):
    batch = train_cache.read([7, 1], keys=["images", "joints", "torso", "belief_maps"])
    raw = {name for name in batch if train_cache.dataset_info(name).offsets is not None}
    assert raw == {"images", "joints", "torso"}  # belief maps are lzf-compressed
    for name, values in batch.items():
        np.testing.assert_array_equal(values, train_data[name][[7, 1]])


@pytest.mark.parametrize("layout", [
    {"chunks": (4, 3, 2)},  # several rows per chunk, a partial edge chunk (10 rows)
    {"chunks": (1, 3, 2)},
    {},  # contiguous
])
def test_raw_row_offsets_address_every_row(tmp_path, layout):
    import h5py

    values = np.arange(10 * 3 * 2, dtype=np.float32).reshape(10, 3, 2) * 1.5
    path = tmp_path / "rows.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("x", data=values, **layout)
    with h5py.File(path, "r") as file:
        offsets = raw_row_offsets(file["x"])
    raw = path.read_bytes()
    rows = [np.frombuffer(raw[o:o + 24], dtype=np.float32).reshape(3, 2) for o in offsets]
    np.testing.assert_array_equal(np.stack(rows), values)


def test_raw_row_offsets_refuse_compressed_and_partial_row_chunks(tmp_path):
    import h5py

    with h5py.File(tmp_path / "x.h5", "w") as file:
        file.create_dataset("gzip", data=np.ones((8, 4)), chunks=(2, 4), compression="gzip")
        file.create_dataset("split_rows", data=np.ones((8, 4)), chunks=(2, 2))
        file.create_dataset("unwritten", shape=(8, 4), chunks=(2, 4), dtype="f4")
        assert raw_row_offsets(file["gzip"]) is None
        assert raw_row_offsets(file["split_rows"]) is None
        assert raw_row_offsets(file["unwritten"]) is None


def test_a_forked_child_reads_through_its_own_file_descriptor(train_cache, train_data):
    train_cache.read([0])  # the parent's handle and descriptor are open
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    # With fork, Process arguments are inherited, not pickled: the child sees the open reader.
    child = context.Process(target=_read_images_into, args=(train_cache, [4, 9], results))
    child.start()
    images = results.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(images, train_data["images"][[4, 9]])
    np.testing.assert_array_equal(train_cache.read([3])["images"][0], train_data["images"][3])


def _read_images_into(cache: PoseCache, indices: list[int], results) -> None:
    assert cache._pid != os.getpid() and cache._fd is not None  # inherited from the parent
    results.put(cache.read(indices, keys=["images"])["images"])


# --- hits, names, locking, crashes ----------------------------------------------------------------


def test_second_build_is_a_fast_hit_that_does_not_rewrite(lspet_subset, train_cache):
    mtime = train_cache.path.stat().st_mtime_ns
    start = time.perf_counter()
    statuses = build_caches_with_status(f"lspet:{lspet_subset}", ["train"], PreprocessConfig(input_size=SIZE),
                                        train_cache.path.parent, progress=False)
    assert time.perf_counter() - start < 1.0
    assert statuses == {"train": (train_cache.path, True)}
    assert train_cache.path.stat().st_mtime_ns == mtime


def test_different_settings_or_splits_never_share_a_file(tmp_path):
    dataset = FakeDataset(tmp_path / "fake")
    paths = {cache_path_for(dataset, split, config, tmp_path)
             for split in ("train", "val")
             for config in (small(), small(sigma=1.5), small(crop_context=1.5), small(train_crop="image"),
                            PreprocessConfig(input_size=72))}
    assert len(paths) == 10
    assert cache_path_for(dataset, "train", small(), tmp_path) == cache_path_for(dataset, "train", small(workers=4),
                                                                                 tmp_path)


def _build_in_child(root: str, cache_dir: str, barrier, queue) -> None:
    dataset = FakeDataset(Path(root), count=30, delay=0.02)
    barrier.wait()
    statuses = build_caches_with_status(dataset, ["train"], small(), cache_dir, progress=False)
    queue.put(statuses["train"])


def test_concurrent_builders_build_once_and_share_the_file(tmp_path):
    FakeDataset(tmp_path / "fake", count=30)  # write the images before the race
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(2), context.Queue()
    children = [context.Process(target=_build_in_child, args=(str(tmp_path / "fake"), str(tmp_path / "c"), barrier,
                                                              queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    (path_a, hit_a), (path_b, hit_b) = results
    assert path_a == path_b and sorted([hit_a, hit_b]) == [False, True]  # one built, one waited and hit
    assert h5_files(tmp_path / "c") == [path_a] and len(PoseCache(path_a)) == 30
    assert not list((tmp_path / "c").glob(".*tmp-*"))


def test_build_in_the_callers_process_leaves_its_thread_settings(tmp_path):
    import torch

    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(2)
    cv2.setNumThreads(2)
    try:
        build_cache(FakeDataset(tmp_path / "fake"), "train", small(workers=1), tmp_path / "c", progress=False)
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (2, 2)  # only pool workers use 1 thread
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


@pytest.mark.parametrize("workers", [1, 2])
def test_crashed_build_leaves_no_finished_looking_file(tmp_path, workers):
    cache_dir = tmp_path / "c"
    with pytest.raises(RuntimeError, match="reader bug at sample 7"):
        build_cache(FakeDataset(tmp_path / "fake", fail_at=7), "train", small(workers=workers), cache_dir,
                    progress=False)
    assert h5_files(cache_dir) == []
    assert not list(cache_dir.glob(".*tmp-*"))
    # A build killed outright leaves its temp file: the next build removes it and succeeds.
    final = cache_path_for(FakeDataset(tmp_path / "fake"), "train", small(), cache_dir)
    stale = final.with_name(f".{final.name}.tmp-99999-deadbeef")
    stale.write_bytes(b"half a file")
    path = build_cache(FakeDataset(tmp_path / "fake"), "train", small(workers=workers), cache_dir, progress=False)
    assert path == final and len(PoseCache(path)) == 12
    assert h5_files(cache_dir) == [path] and not stale.exists()


def test_a_worker_that_dies_fails_the_build_instead_of_hanging(tmp_path):
    cache_dir = tmp_path / "c"
    with pytest.raises(RuntimeError, match="worker process died"):
        build_cache(FakeDataset(tmp_path / "fake", count=40, die_at=21), "train", small(workers=2), cache_dir,
                    progress=False)
    assert h5_files(cache_dir) == [] and not list(cache_dir.glob(".*tmp-*"))


# --- skips and errors -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lspet_with_garbage(lspet_dir, tmp_path_factory) -> Path:
    # im00002.jpg is in the train split: replace it with bytes that are no image.
    return make_lspet_subset(lspet_dir, tmp_path_factory.mktemp("lspet_garbage"), 40, garbage=(2,))


def test_undecodable_image_is_skipped_counted_and_named(lspet_with_garbage, tmp_path):
    with pytest.warns(SkippedSamplesWarning, match="im00002.jpg"):
        path = build_cache(f"lspet:{lspet_with_garbage}", "train", small(), tmp_path, progress=False)
    attrs = PoseCache(path).attrs
    assert attrs["skipped"] == {"unreadable_image": 1}
    assert "im00002.jpg" in attrs["skipped_examples"]["unreadable_image"][0]
    assert 1 not in set(PoseCache(path).read(np.arange(attrs["num_samples"]))["source_index"])


def test_strict_mode_turns_a_skip_into_an_error(lspet_with_garbage, tmp_path):
    with pytest.raises(DatasetError, match="im00002.jpg"):
        build_cache(f"lspet:{lspet_with_garbage}", "train", small(workers=2), tmp_path, strict=True, progress=False)
    assert h5_files(tmp_path) == [] and not list(tmp_path.glob(".*tmp-*"))


def test_cli_strict_exits_2_with_one_line(lspet_with_garbage, tmp_path, capsys):
    code = cli_main(["build", "--data", f"lspet:{lspet_with_garbage}", "--out", str(tmp_path), "--size", "64",
                     "--workers", "1", "--strict", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "im00002.jpg" in err and err.count("\n") == 1 and err.startswith("error: ")
    assert h5_files(tmp_path) == []


@pytest.mark.parametrize("spec, message", [
    ("lspet:/nonexistent/lspet", "does not exist"),
    ("nosuchdata:/x", "unknown dataset"),
    ("", "empty data spec"),
])
def test_bad_spec_is_a_clear_error_and_writes_nothing(spec, message, tmp_path, capsys):
    with pytest.raises(DatasetError, match=message):
        build_cache(spec, "train", small(), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    assert cli_main(["build", "--data", spec or " ", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"joints_shape": (13, 3)}, "shape"),
    ({"split_size": 0}, "split 'train' is empty"),
    ({"all_tiny": True}, "split 'train': no usable sample"),
])
def test_bad_or_empty_input_is_an_error_and_leaves_no_file(kwargs, message, tmp_path):
    cache_dir = tmp_path / "c"
    with pytest.raises(DatasetError, match=message):
        build_cache(FakeDataset(tmp_path / "fake", **kwargs), "train", small(), cache_dir, progress=False)
    leftovers = [p for p in cache_dir.glob("*") if not p.name.endswith(".lock")] if cache_dir.exists() else []
    assert leftovers == []


def test_unknown_split_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="unknown split"):
        build_cache(FakeDataset(tmp_path / "fake"), "training", small(), tmp_path / "c", progress=False)


def test_cli_builds_all_splits_then_reports_hits(lspet_subset, tmp_path, capsys):
    argv = ["build", "--data", f"lspet:{lspet_subset}", "--out", str(tmp_path), "--size", "64", "--split", "all",
            "--max-samples", "40", "--quiet"]
    assert cli_main(argv) == 0
    first = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in first] == [["built", "train"], ["built", "val"], ["built", "test"]]
    assert cli_main(argv) == 0
    second = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in second] == ["hit"] * 3
    assert [line.split("\t")[2] for line in first] == [line.split("\t")[2] for line in second]
    assert all(Path(line.split("\t")[2]).is_file() for line in first)


def test_cli_print_config_applies_flags(capsys):
    assert cli_main(["build", "--print-config", "--size", "96", "--set", "preprocess.sigma=2"]) == 0
    out = capsys.readouterr().out
    assert "input_size: 96" in out and "sigma: 2.0" in out


def test_cli_print_config_shows_what_a_cache_depends_on_and_no_tracking_secret(capsys):
    assert cli_main(["build", "--print-config", "--set",
                     "tracking.tracking_uri=postgresql://cpm:hunter2@db:5432/mlflow"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert list(printed) == ["name", "data", "preprocess"]
    assert printed["preprocess"]["input_size"] == load_config("default").preprocess.input_size
    assert "hunter2" not in repr(printed)


def test_default_cache_dir_is_outside_the_repository(repo_root):
    from cpm_model.config import DataConfig

    cache_dir = Path(os.path.expanduser(DataConfig().cache_dir)).resolve()
    assert repo_root not in cache_dir.parents


def test_pool_build_after_the_caller_used_opencv_and_torch_threads(tmp_path):
    """Workers forked from the caller deadlocked (in cv2.setNumThreads) once the caller had used
    OpenCV's thread pool; this test then hangs instead of passing."""
    import torch

    cv2.warpAffine(np.zeros((2000, 2000, 3), np.uint8), np.eye(2, 3), (1500, 1500))
    torch.ones(512, 512) @ torch.ones(512, 512)
    path = build_cache(FakeDataset(tmp_path / "fake", count=20), "train", small(workers=2), tmp_path / "c",
                       progress=False)
    assert len(PoseCache(path)) == 20
