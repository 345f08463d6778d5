"""Files written whole or not at all: a temp name beside the target, fsync, an atomic rename.

One naming rule for every such temp file (caches, checkpoints, copies): ".<name>.tmp-<pid>-<random>",
in the target's directory (the same filesystem, so os.replace is atomic), dotted so that globs for
the real files never see it, and never ending in the real file's suffix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TMP_MARKER = ".tmp-"


def temp_path_for(final_path: Path) -> Path:
    """A unique temp name beside `final_path`."""
    return final_path.with_name(f".{final_path.name}{TMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}")


def stale_temp_files(final_path: Path) -> list[Path]:
    """Temp files of `final_path` left by writers that died (only safe to remove under a lock)."""
    return sorted(final_path.parent.glob(f".{final_path.name}{TMP_MARKER}*"))


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename a written temp file or directory onto `path`, with the data on disk before and the
    rename after. A directory cannot be renamed over a non-empty one: the old one is moved aside
    first and removed after (a crash in between leaves it under a dotted temp name, never half)."""
    for item in ([tmp] if tmp.is_file() else [*(p for p in tmp.rglob("*") if p.is_file()), tmp]):
        fsync_path(item)
    aside = None
    if tmp.is_dir() and path.exists():
        aside = temp_path_for(path)
        os.replace(path, aside)
    os.replace(tmp, path)
    fsync_path(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def copy_durably(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy a file or a directory onto `target` through a temp name (see replace_durably)."""
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(target)
    try:
        if source.is_dir():
            shutil.copytree(source, tmp)
        else:
            shutil.copyfile(source, tmp)
        replace_durably(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return target
