"""Deterministic train/val/test splits from a hash of each sample's name.

The rule: bucket = (first 8 bytes of sha1(name as UTF-8), read as a big-endian unsigned integer)
mod 100, where `name` is the image's file name (e.g. "im00042.jpg") or, for generated data, the
sample id. Buckets 0-79 are 'train', 80-89 'val' and 90-99 'test' (about 80/10/10). The split of
a sample depends on its name alone, so it never changes when images are appended, removed or
reordered, and every person in one image lands in the same split (no image is seen in training
and in evaluation). 'all' names their union, every sample.

Datasets with an official split (LSP, MPII) keep it, and take their 'val' split out of the
official training part with the same rule: the training images whose bucket is in the val range.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from .base import DatasetError

SPLITS = ("train", "val", "test")  # disjoint; each gets its own cache file
ALL_SPLITS = "all"  # the union of SPLITS
NUM_BUCKETS = 100
VAL_BUCKETS = range(80, 90)
TEST_BUCKETS = range(90, 100)


def check_split(split: str) -> str:
    """`split` itself, or DatasetError naming the accepted splits."""
    if split not in SPLITS and split != ALL_SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {[*SPLITS, ALL_SPLITS]}")
    return split


def hash_bucket(name: str) -> int:
    """The sample's bucket in [0, 100): first 8 bytes of sha1(UTF-8 name), big-endian, mod 100."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % NUM_BUCKETS


def split_of_name(name: str) -> str:
    """'train', 'val' or 'test' for one sample name, by the hash rule above."""
    bucket = hash_bucket(name)
    if bucket in TEST_BUCKETS:
        return "test"
    if bucket in VAL_BUCKETS:
        return "val"
    return "train"


def hashed_split_indices(names: Iterable[str], split: str) -> np.ndarray:
    """Sorted int64 indices (positions in `names`) of the samples in `split` ('all' = every one)."""
    check_split(split)
    names = list(names)
    if split == ALL_SPLITS:
        return np.arange(len(names), dtype=np.int64)
    return np.array([i for i, name in enumerate(names) if split_of_name(name) == split], dtype=np.int64)


def official_split_indices(names: Iterable[str], is_official_train: Iterable[bool], split: str) -> np.ndarray:
    """Indices for a dataset with an official train/test split, val held out of its train part.

    'train' = official training samples outside the val buckets, 'val' = official training samples
    in the val buckets, 'test' = the official test samples, 'all' = every sample.
    """
    check_split(split)
    names = list(names)
    official_train = np.asarray(list(is_official_train), dtype=bool)
    if len(official_train) != len(names):
        raise ValueError(f"{len(names)} names but {len(official_train)} official-train flags")
    if split == ALL_SPLITS:
        return np.arange(len(names), dtype=np.int64)
    if split == "test":
        return np.flatnonzero(~official_train).astype(np.int64)
    held_out = np.array([split_of_name(name) == "val" for name in names], dtype=bool)
    chosen = official_train & (held_out if split == "val" else ~held_out)
    return np.flatnonzero(chosen).astype(np.int64)
