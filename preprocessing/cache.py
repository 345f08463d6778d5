"""The HDF5 cache format: file naming, the writer, and the lazy reader `PoseCache`.

One file per (dataset identity, split, content settings, format version). Datasets, N samples,
P parts, S = input_size, M = S / STRIDE (8):

    images           uint8    (N, S, S, 3)    RGB crops
    belief_maps      float16  (N, P+1, M, M)  ideal belief maps (background last)
    joints           float32  (N, P, 3)       crop pixels; flag 1 = annotated AND inside the crop
    joints_original  float32  (N, P, 3)       the annotation as read (original pixels, flag)
    affine           float64  (N, 2, 3)       CROP -> ORIGINAL (inverse of the crop affine)
    torso            float32  (N,)            PCK normaliser on the original joints, NaN if none
    head_size        float32  (N,)            PCKh normaliser, NaN where unknown
    source_index     int64    (N,)            index of the sample in its dataset
    image_size       int32    (N, 2)          original (H, W)

Attributes: format_version, num_samples, num_without_torso, joint_set, joint_names (JSON),
flip_pairs (JSON), settings (JSON), crop_rule (JSON), source (JSON dataset identity),
data_spec, split, skipped (JSON reason -> count), skipped_examples (JSON reason -> first names).

Completion record, written last, after every sample and attribute: `completion` (JSON: the sample
count, each dataset's shape and the CRC-32 of its rows' bytes in order, computed while writing) and
`file_size` (the finished file's size in bytes). Opening a cache checks the record cheaply (present,
file size, every dataset's shape against the sample count; no data read); `check_cache(full=True)`
also recomputes the checksums (one sequential read of the file). A file that fails either check is
damaged (`CacheDamagedError`); one without a record was written by an older version or never
finished, and counts as damaged too.

Layout (bench/RESULTS.md has the measurements, 368 px, random batches of 32): one sample per
chunk, so that a random training batch reads exactly its samples. Images uncompressed: lzf /
gzip-1 save 27% / 37% of the space but read 5-10x slower (560 / 300 vs 2,900 samples/s).
Belief maps lzf: 13x smaller (mostly zeros), 4,000 samples/s, far more than training consumes.
Samples are read one by one: h5py's fancy indexing of a chunked dataset is 100x slower here.
Uncompressed datasets (images and the small arrays) are read with os.pread at byte offsets
looked up once from HDF5's chunk index: pread releases the GIL, h5py does not, so a training
step running in another thread is not stalled by the reads (bench/RESULTS.md, "Speed"). The
compressed belief maps go through h5py's read_direct, on a file opened without a chunk cache
(rdcc_nbytes=0): no sample is read twice in a batch, and that makes them 30-70% faster.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cpm_model.geometry import STRIDE

from .datasets.base import DatasetError

FORMAT_VERSION = 1
COMPLETION_ATTR = "completion"
FILE_SIZE_ATTR = "file_size"
VERIFY_BLOCK_BYTES = 32 * 2**20  # rows read per step of a full check
# Files up to this size get the full check wherever they are checked (a build's hit, a node's
# existing copy): about 0.1 s at most on 2 cores (bench/RESULTS.md, "Preprocessing"), so a hit stays
# near-instant. Larger ones get the cheap check there, and the full one when copied to a node or
# by `python -m preprocessing verify`.
FULL_CHECK_MAX_BYTES = 32 * 2**20


def full_check_is_cheap(path: str | os.PathLike) -> bool:
    return os.path.getsize(path) <= FULL_CHECK_MAX_BYTES

# name -> (dtype, per-sample shape as a function of (num_parts, input_size), compression)
LAYOUT = {
    "images": (np.uint8, lambda p, s: (s, s, 3), None),
    "belief_maps": (np.float16, lambda p, s: (p + 1, s // STRIDE, s // STRIDE), "lzf"),
    "joints": (np.float32, lambda p, s: (p, 3), None),
    "joints_original": (np.float32, lambda p, s: (p, 3), None),
    "affine": (np.float64, lambda p, s: (2, 3), None),
    "torso": (np.float32, lambda p, s: (), None),
    "head_size": (np.float32, lambda p, s: (), None),
    "source_index": (np.int64, lambda p, s: (), None),
    "image_size": (np.int32, lambda p, s: (2,), None),
}
# Small per-sample arrays: many samples per chunk (a random read of them is cheap either way).
SMALL_CHUNK = 4096
LARGE_DATASETS = ("images", "belief_maps")


# --- naming --------------------------------------------------------------------------------------


def cache_key(identity: dict, split: str, settings: dict, extra: dict | None = None) -> str:
    """12 hex digits of sha256 over everything that determines the file's content."""
    payload = {"identity": identity, "split": split, "settings": settings, "extra": extra or {},
               "format_version": FORMAT_VERSION}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def dataset_type(identity: dict) -> str:
    """A short file-name-safe name for the dataset ('lspet', 'lsp+lspet', 'synthetic', ...)."""
    members = identity.get("members")
    if isinstance(members, list) and members:
        kind = "+".join(dataset_type(m) if isinstance(m, dict) else "data" for m in members)
    else:
        kind = identity.get("type") or "data"
    return re.sub(r"[^A-Za-z0-9_+.-]", "_", str(kind))


def cache_file_name(identity: dict, split: str, input_size: int, key: str) -> str:
    return f"{dataset_type(identity)}-{split}-{input_size}px-{key}.h5"


# --- writing -------------------------------------------------------------------------------------


def _to_attr(value) -> str | int | float:
    return value if isinstance(value, (str, int, float, np.integer, np.floating)) else json.dumps(value)


class CacheWriter:
    """Appends blocks of samples to a new HDF5 file; `finish` writes the attributes and closes."""

    def __init__(self, path: Path, num_parts: int, input_size: int, expected_samples: int):
        self.path = Path(path)
        self.num_samples = 0
        self._crc32 = dict.fromkeys(LAYOUT, 0)  # running checksum of each dataset's rows, in order
        self._file = h5py.File(self.path, "w", libver="latest")
        for name, (dtype, shape_of, compression) in LAYOUT.items():
            shape = shape_of(num_parts, input_size)
            rows = 1 if name in LARGE_DATASETS else max(1, min(SMALL_CHUNK, expected_samples))
            self._file.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                      chunks=(rows, *shape), compression=compression)

    def append(self, block: dict[str, np.ndarray]) -> None:
        count = len(block["images"])
        if count == 0:
            return
        start, stop = self.num_samples, self.num_samples + count
        for name, (dtype, _, _) in LAYOUT.items():
            rows = np.ascontiguousarray(block[name], dtype=dtype)  # the bytes the file will hold
            dataset = self._file[name]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = rows
            self._crc32[name] = zlib.crc32(rows, self._crc32[name])
        self.num_samples = stop

    def finish(self, attrs: dict) -> None:
        for key, value in attrs.items():
            self._file.attrs[key] = _to_attr(value)
        self._file.attrs["num_samples"] = self.num_samples
        self._file.attrs["format_version"] = FORMAT_VERSION
        record = {"num_samples": self.num_samples,
                  "datasets": {name: {"shape": list(self._file[name].shape), "crc32": self._crc32[name]}
                               for name in LAYOUT}}
        self._file.attrs[COMPLETION_ATTR] = json.dumps(record)
        self._file.attrs[FILE_SIZE_ATTR] = np.int64(0)  # set below, in place, once the size is known
        self._file.close()
        self._record_file_size()

    def _record_file_size(self) -> None:
        """Store the closed file's size in its own `file_size` attribute. Rewriting a fixed-size
        attribute does not move anything, so the size stays the one recorded (checked)."""
        size = os.path.getsize(self.path)
        with h5py.File(self.path, "r+", locking=False) as file:
            file.attrs.modify(FILE_SIZE_ATTR, np.int64(size))
        if os.path.getsize(self.path) != size:
            raise OSError(f"{self.path}: recording the file size changed it "
                          f"({size} -> {os.path.getsize(self.path)} bytes)")

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()


# --- reading -------------------------------------------------------------------------------------


def raw_row_offsets(dataset: h5py.Dataset) -> np.ndarray | None:
    """Byte offset in the file of each row (sample) of an unfiltered dataset, or None when its rows
    cannot be read as plain bytes (compressed or otherwise filtered, or a chunk never written).

    An unfiltered chunk is stored as its full chunk shape in C order (edge chunks too), so row i
    lies at chunk_start + (i mod rows_per_chunk) * row_bytes when chunks span whole rows.
    """
    row_shape = dataset.shape[1:]
    row_bytes = dataset.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    num_rows = dataset.shape[0]
    if dataset.chunks is None:  # contiguous layout: one block of rows
        start = dataset.id.get_offset()
        return None if start is None else start + row_bytes * np.arange(num_rows, dtype=np.int64)
    if dataset.id.get_create_plist().get_nfilters() or tuple(dataset.chunks[1:]) != tuple(row_shape):
        return None
    rows_per_chunk = dataset.chunks[0]
    num_chunks = -(-num_rows // rows_per_chunk)
    chunk_starts = np.full(num_chunks, -1, dtype=np.int64)

    def record(info) -> None:
        chunk_starts[info.chunk_offset[0] // rows_per_chunk] = info.byte_offset

    if num_chunks:
        dataset.id.chunk_iter(record)
    if (chunk_starts < 0).any():
        return None
    rows = np.arange(num_rows, dtype=np.int64)
    return chunk_starts[rows // rows_per_chunk] + (rows % rows_per_chunk) * row_bytes


@dataclass(frozen=True)
class DatasetInfo:
    """What a read needs of one dataset, looked up once per open file (h5py lookups hold the GIL
    and cost about a third of a raw batch read): shape, dtype, raw row offsets (None: use h5py)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offsets: np.ndarray | None


def pread_rows(fd: int, block: np.ndarray, offsets: np.ndarray, what: str) -> None:
    """Fill block[k] with the raw bytes at offsets[k] of the open file `fd` (os.preadv: no GIL held)."""
    rows = block.reshape(len(block), -1).view(np.uint8)  # one writable byte row per sample
    row_bytes = rows.shape[1]
    for row, offset in enumerate(offsets.tolist()):
        got = os.preadv(fd, [rows[row]], offset)
        if got != row_bytes:
            raise OSError(f"{what} is truncated (read {got} of {row_bytes} bytes at offset {offset})")


# --- integrity ------------------------------------------------------------------------------------


REBUILD_HINT = "rebuild it with `python -m preprocessing build` and the same data and settings"


class CacheDamagedError(DatasetError):
    """A cache file that cannot be trusted: truncated, corrupt, unfinished or without its record."""

    def __init__(self, path, reason: str, hint: str = REBUILD_HINT):
        self.path, self.reason = Path(path), reason
        super().__init__(f"pose cache {path} is damaged: {reason}; {hint}")


def _open_h5(path: Path, **kwargs) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False, **kwargs)
    except OSError as exc:  # HDF5 itself notices a file shorter than its superblock says
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CacheDamagedError(path, f"not a readable HDF5 file ({first_line})") from None


def check_record(file: h5py.File, path: Path) -> dict:
    """The completion record of an open cache after the cheap checks (record present, file size,
    every dataset's shape and dtype); CacheDamagedError otherwise. Reads no sample."""
    if COMPLETION_ATTR not in file.attrs or FILE_SIZE_ATTR not in file.attrs:
        raise CacheDamagedError(path, "it has no completion record (written by an older version of "
                                      "cpm-pipeline, or never finished)")
    try:
        record = json.loads(file.attrs[COMPLETION_ATTR])
        recorded_size, num_samples = int(file.attrs[FILE_SIZE_ATTR]), int(record["num_samples"])
        shapes = {name: tuple(record["datasets"][name]["shape"]) for name in LAYOUT}
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheDamagedError(path, f"its completion record is unreadable ({type(exc).__name__})") from None
    size = os.path.getsize(path)
    if size != recorded_size:
        raise CacheDamagedError(path, f"it is {size} bytes, its completion record says {recorded_size}")
    for name, (dtype, _, _) in LAYOUT.items():
        if name not in file:
            raise CacheDamagedError(path, f"dataset {name!r} is missing")
        dataset = file[name]
        if dataset.shape != shapes[name] or dataset.shape[:1] != (num_samples,) or dataset.dtype != dtype:
            raise CacheDamagedError(path, f"dataset {name!r} is {dataset.dtype} {dataset.shape}; the completion "
                                          f"record says {np.dtype(dtype)} {shapes[name]} ({num_samples} samples)")
    return record


def dataset_crc32(dataset: h5py.Dataset, fd: int) -> int:
    """CRC-32 of a dataset's rows in order (the value CacheWriter records), in blocks of rows; raw
    rows (uncompressed) read with os.pread from `fd`, the same file (1.3x faster than h5py slices)."""
    row_bytes = max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:], dtype=np.int64)))
    step = max(1, VERIFY_BLOCK_BYTES // row_bytes)
    offsets = raw_row_offsets(dataset)
    crc = 0
    for start in range(0, dataset.shape[0], step):
        if offsets is None:
            block = np.ascontiguousarray(dataset[start:start + step])
        else:
            block = np.empty((len(offsets[start:start + step]), *dataset.shape[1:]), dtype=dataset.dtype)
            pread_rows(fd, block, offsets[start:start + step], f"dataset {dataset.name!r}")
        crc = zlib.crc32(block, crc)
    return crc


def check_cache(path: str | os.PathLike, full: bool = False, hint: str = REBUILD_HINT) -> dict:
    """The completion record of the cache at `path` after the cheap checks and, with `full`, the
    checksum of every dataset; CacheDamagedError naming the file otherwise (FileNotFoundError when
    there is no file). Cost: milliseconds cheap; full, one sequential read of the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pose cache {path} does not exist")
    try:
        with _open_h5(path) as file:
            record = check_record(file, path)
            if full:
                fd = os.open(path, os.O_RDONLY)
                try:
                    for name in LAYOUT:
                        expected, actual = record["datasets"][name]["crc32"], dataset_crc32(file[name], fd)
                        if actual != expected:
                            raise CacheDamagedError(path, f"dataset {name!r} does not match its checksum "
                                                          f"(crc32 {actual:08x}, recorded {expected:08x})")
                finally:
                    os.close(fd)
    except CacheDamagedError as exc:
        raise CacheDamagedError(path, exc.reason, hint) from None
    except (OSError, RuntimeError) as exc:  # HDF5 cannot read a chunk or its index
        raise CacheDamagedError(path, f"reading it failed ({type(exc).__name__}: {exc})", hint) from None
    return record


class PoseCache:
    """Lazy reader of one cache file. Picklable: the h5py handle is opened on first use in each
    process (and reopened after a fork), never pickled. Each open checks the completion record
    cheaply (`check_record`: no sample is read); reads themselves are not checked."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"pose cache {self.path} does not exist")
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._fd: int | None = None
        self._infos: dict[str, DatasetInfo] = {}

    # h5py handles and file descriptors must not cross process boundaries.
    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:  # no existence check: the file may be copied later
        self.path = state["path"]
        self._file = None
        self._pid = None
        self._fd = None
        self._infos = {}

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            # locking=False: read-only use, and file locks fail on some shared filesystems.
            # No chunk cache: each chunk is one sample, read once per request (flat memory too).
            file = _open_h5(self.path, rdcc_nbytes=0)
            try:
                check_record(file, self.path)
            except CacheDamagedError:
                file.close()
                raise
            self._file = file
            self._pid = os.getpid()
            # The same inode as the h5py handle, even if the file is atomically replaced later.
            self._fd = os.open(self.path, os.O_RDONLY)
            self._infos = {}
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
            os.close(self._fd)
        self._file = None
        self._fd = None
        self._infos = {}

    def __enter__(self) -> "PoseCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.dataset_info("images").shape[0])

    @property
    def attrs(self) -> dict:
        """All attributes, JSON ones decoded."""
        out = {}
        for key, value in self.file.attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            elif isinstance(value, np.generic):
                value = value.item()
            out[key] = value
        return out

    @property
    def joint_names(self) -> list[str]:
        return json.loads(self.file.attrs["joint_names"])

    @property
    def flip_pairs(self) -> list[tuple[int, int]]:
        return [tuple(pair) for pair in json.loads(self.file.attrs["flip_pairs"])]

    @property
    def settings(self) -> dict:
        return json.loads(self.file.attrs["settings"])

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(LAYOUT)

    def read(self, indices, keys=None) -> dict[str, np.ndarray]:
        """Arrays for `indices` (any order, repeats allowed), in that order; `keys` picks datasets."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        length = len(self)
        if indices.size and (indices.min() < -length or indices.max() >= length):
            raise IndexError(f"indices out of range for a cache of {length} samples")
        indices = np.where(indices < 0, indices + length, indices)
        unique, inverse = np.unique(indices, return_inverse=True)  # h5py wants increasing, distinct
        out = {}
        for name in keys or LAYOUT:
            info = self.dataset_info(name)
            block = np.empty((len(unique), *info.shape[1:]), dtype=info.dtype)
            if info.offsets is not None:
                pread_rows(self._fd, block, info.offsets[unique], f"pose cache {self.path}: dataset {name!r}")
            else:  # compressed: one read_direct per sample beats h5py's fancy selection
                dataset = self.file[name]
                for row, index in enumerate(unique):
                    dataset.read_direct(block, np.s_[index], np.s_[row])
            out[name] = block if len(unique) == len(indices) and (inverse == np.arange(len(indices))).all() \
                else block[inverse]
        return out

    def dataset_info(self, name: str) -> DatasetInfo:
        file = self.file  # (re)opens in a new process, which also clears the lookups
        if name not in self._infos:
            dataset = file[name]
            self._infos[name] = DatasetInfo(dataset.shape, dataset.dtype, raw_row_offsets(dataset))
        return self._infos[name]

    def load_all(self, keys=None) -> dict[str, np.ndarray]:
        """Every sample in memory: for small caches only."""
        return {name: self.file[name][()] for name in keys or LAYOUT}

    def __repr__(self) -> str:
        return f"PoseCache({str(self.path)!r})"
