"""Getting the HDF5 cache to every node that trains.

The driver builds each cache once (on the head). A worker uses it in place when its node sees the
same path (one machine, or shared storage); otherwise it copies the file to the node's local cache
directory on first use, keyed by the file name (which carries the content hash), streaming it in
chunks from a task pinned to the node that holds it. A file lock makes the workers of one node
wait for one copy instead of each copying; the copy lands under a temporary name and is renamed,
so a crash never leaves a file that looks complete.

A copy is trusted by its content, not its name: a new copy is checked fully (sizes, shapes and
every dataset's checksum against the source's completion record) before it is renamed into place,
and copied once more if it does not match; an existing copy must carry the same completion record
as the source (a rebuilt source has other checksums) and pass the check a hit gets (the full one
up to FULL_CHECK_MAX_BYTES, the cheap one above), else it is replaced.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from preprocessing.cache import CacheDamagedError, check_cache, full_check_is_cheap

CHUNK_BYTES = 64 * 1024 * 1024
COPY_ATTEMPTS = 2
# Set on a node whose disk does not see the driver's cache directory (no shared storage).
LOCAL_CACHE_ENV = "CPM_LOCAL_CACHE_DIR"


@ray.remote(num_cpus=0)
def _read_chunk(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


@ray.remote(num_cpus=0)
def _size_and_record(path: str) -> tuple[int, dict]:
    """The source's size and completion record (cheap checks: a damaged source is not copied)."""
    return os.path.getsize(path), check_cache(path)


def cache_location(source_path: str) -> Path:
    """Where this node reads the cache: in place, or in its local cache directory."""
    local_dir = os.environ.get(LOCAL_CACHE_ENV)
    if local_dir:
        return Path(local_dir).expanduser() / Path(source_path).name
    return Path(source_path)


def _usable_copy(path: Path, source_record: dict, full: bool) -> str | None:
    """None when the file at `path` is a good copy of the source, else what is wrong with it."""
    try:
        record = check_cache(path, full=full)
    except (CacheDamagedError, FileNotFoundError) as exc:
        return str(exc)
    return None if record == source_record else f"{path} holds another version of the cache than its source"


def _copy(source_path: str, target: Path, size: int, pinned) -> Path:
    partial = target.with_name(f".{target.name}.copying-{os.getpid()}")
    with open(partial, "wb") as out:
        for offset in range(0, size, CHUNK_BYTES):
            out.write(ray.get(_read_chunk.options(scheduling_strategy=pinned)
                              .remote(source_path, offset, CHUNK_BYTES)))
        out.flush()
        os.fsync(out.fileno())
    return partial


def ensure_on_node(source_path: str, source_node_id: str) -> str:
    """A path to the cache readable on this node, copying it here first if needed (and checked)."""
    target = cache_location(source_path)
    if target == Path(source_path) and target.is_file():
        return str(target)  # the same file: PoseCache checks it when it opens it
    target.parent.mkdir(parents=True, exist_ok=True)
    pinned = NodeAffinitySchedulingStrategy(node_id=source_node_id, soft=False)
    size, source_record = ray.get(_size_and_record.options(scheduling_strategy=pinned).remote(source_path))
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per node; the others wait, then find it
        if target.is_file() and _usable_copy(target, source_record, full_check_is_cheap(target)) is None:
            return str(target)
        problem = None
        for _ in range(COPY_ATTEMPTS):
            partial = _copy(source_path, target, size, pinned)
            try:
                problem = _usable_copy(partial, source_record, full=True)
                if problem is None:
                    os.replace(partial, target)
                    return str(target)
            finally:
                partial.unlink(missing_ok=True)
        raise CacheDamagedError(target, f"{COPY_ATTEMPTS} copies of {source_path} failed their check "
                                        f"(last: {problem})", "check the source file and this node's disk")
