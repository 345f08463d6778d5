"""Data specs: one string that names the dataset(s) to read, as given in config `data.spec`.

Grammar:
    spec    := dataset ('+' dataset)*
    dataset := 'lspet:' PATH | 'lsp:' PATH | 'mpii:' PATH | 'synthetic' | 'synthetic:' N
               | any other kind of preprocessing.datasets.registry
The name is split from its argument at the FIRST ':' only, so PATH may contain ':' (it may not
contain '+'). PATH has ~ expanded and is made absolute. '+' joins datasets of one joint set into a
ConcatDataset (e.g. 'lsp:/data/lsp+lspet:/data/lspet', the paper's 11,000-image LSP training set).
"""

from __future__ import annotations

import bisect
import dataclasses
import os

import numpy as np

from cpm_model.joints import JointSet

from .datasets.base import DatasetError, PoseDataset, PoseSample, check_index
from .datasets.registry import DatasetKind, kind_named, known_names, open_dataset
from .datasets.splits import check_split


class ConcatDataset:
    """Several datasets of one joint set read as one; global index = member offset + local index.

    A split is the union of the members' splits (each member keeps its own split rule).
    """

    def __init__(self, members: list[PoseDataset], labels: list[str] | None = None):
        if not members:
            raise DatasetError("ConcatDataset needs at least one dataset")
        labels = labels or [repr(m) for m in members]
        first = members[0].joint_set
        for member, label in zip(members[1:], labels[1:]):
            if not same_joint_set(member.joint_set, first):
                raise DatasetError(f"cannot join {labels[0]} (joint set '{first.name}') with {label} "
                                   f"(joint set '{member.joint_set.name}'): '+' needs datasets of one joint set")
        self.members = list(members)
        self.joint_set: JointSet = first
        # offsets[k] = global index of member k's first sample; offsets[-1] = total length
        self._offsets = np.concatenate([[0], np.cumsum([len(m) for m in self.members])]).astype(np.int64)

    def identity(self) -> dict:
        return {"type": "concat", "members": [m.identity() for m in self.members]}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(member number, index within that member) of a global index."""
        index = check_index(index, len(self))
        member = bisect.bisect_right(self._offsets, index) - 1
        return member, index - int(self._offsets[member])

    def split_indices(self, split: str) -> np.ndarray:
        check_split(split)
        parts = [np.asarray(m.split_indices(split), dtype=np.int64) + offset
                 for m, offset in zip(self.members, self._offsets[:-1])]
        return np.concatenate(parts).astype(np.int64)

    def sample(self, index: int) -> PoseSample:
        member, local = self.locate(index)
        sample = self.members[member].sample(local)
        extras = {**sample.extras, "member": member, "member_index": local}
        return dataclasses.replace(sample, index=int(index), extras=extras)

    def load_image(self, index: int) -> np.ndarray:
        member, local = self.locate(index)
        return self.members[member].load_image(local)

    def __repr__(self) -> str:
        return f"ConcatDataset({self.members!r})"


def same_joint_set(a: JointSet, b: JointSet) -> bool:
    return a.name == b.name and a.names == b.names


def kind_names(spec: str) -> list[str]:
    """The kind name of each item of a spec: ['lsp', 'lspet'] for 'lsp:/a+lspet:/b' (unchecked)."""
    return [part.partition(":")[0].strip().lower() for part in spec.split("+")]


def first_kind(spec: str) -> DatasetKind:
    """The registered kind of a spec's first dataset: it decides the spec's scoring protocol."""
    name = kind_names(spec)[0]
    return kind_named(name, f" in data spec '{spec}'")


def parse_one(part: str) -> PoseDataset:
    """One 'name[:argument]' item of a spec."""
    name, has_argument, argument = part.partition(":")
    kind = kind_named(name.strip().lower(), f" in data spec '{part}'")
    argument = argument.strip() if has_argument else None
    if kind.takes_path:
        if not argument:
            raise DatasetError(f"data spec '{part}' needs a path: '{kind.name}:PATH'")
        argument = os.path.abspath(os.path.expanduser(argument))
    return open_dataset(kind, argument)


def parse_data_spec(spec: str) -> PoseDataset:
    """The dataset named by `spec` (see the module docstring); '+' gives a ConcatDataset."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"empty data spec {spec!r}; expected e.g. 'lspet:PATH' or 'synthetic'; "
                           f"known: {list(known_names())}")
    parts = [part.strip() for part in spec.split("+")]
    if any(not part for part in parts):
        raise DatasetError(f"data spec {spec!r} has an empty item around '+'")
    datasets = [parse_one(part) for part in parts]
    if len(datasets) == 1:
        return datasets[0]
    identities = [repr(sorted(d.identity().items())) for d in datasets]
    for i, identity in enumerate(identities):
        if identity in identities[:i]:
            raise DatasetError(f"data spec {spec!r} names '{parts[i]}' twice; each dataset may appear once")
    return ConcatDataset(datasets, labels=parts)
