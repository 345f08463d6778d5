"""Getting the HDF5 cache to every node that trains.

The driver builds each cache once (on the head). A worker uses it in place when its node sees the
same path (one machine, or shared storage); otherwise it copies the file to the node's local cache
directory on first use, keyed by the file name (which carries the content hash), streaming it in
chunks from a task pinned to the node that holds it. A file lock makes the workers of one node
wait for one copy instead of each copying; the copy lands under a temporary name and is renamed,
so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

CHUNK_BYTES = 64 * 1024 * 1024
# Set on a node whose disk does not see the driver's cache directory (no shared storage).
LOCAL_CACHE_ENV = "CPM_LOCAL_CACHE_DIR"


@ray.remote(num_cpus=0)
def _read_chunk(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


@ray.remote(num_cpus=0)
def _file_size(path: str) -> int:
    return os.path.getsize(path)


def cache_location(source_path: str) -> Path:
    """Where this node reads the cache: in place, or in its local cache directory."""
    local_dir = os.environ.get(LOCAL_CACHE_ENV)
    if local_dir:
        return Path(local_dir).expanduser() / Path(source_path).name
    return Path(source_path)


def ensure_on_node(source_path: str, source_node_id: str) -> str:
    """A path to the cache readable on this node, copying it here first if needed."""
    target = cache_location(source_path)
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per node; the others wait, then find it
        if target.is_file():
            return str(target)
        pinned = NodeAffinitySchedulingStrategy(node_id=source_node_id, soft=False)
        size = ray.get(_file_size.options(scheduling_strategy=pinned).remote(source_path))
        partial = target.with_name(f".{target.name}.copying-{os.getpid()}")
        try:
            with open(partial, "wb") as out:
                for offset in range(0, size, CHUNK_BYTES):
                    out.write(ray.get(_read_chunk.options(scheduling_strategy=pinned)
                                      .remote(source_path, offset, CHUNK_BYTES)))
            if partial.stat().st_size != size:
                raise OSError(f"copy of {source_path} to {target} is {partial.stat().st_size} bytes, expected {size}")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return str(target)
