"""Every dataset kind a data spec can name, with what the rest of the project needs to know of it.

One entry per kind (`DatasetKind`): its name in a data spec, the reader that opens it, its joint
set (names, left/right flip pairs, torso joints), the protocol its predictions are scored with,
the person-to-image ratio of its evaluation crops, and whether the spec gives it a path. The
spec parser, the crop rule, the cache builder, scoring and prediction all ask `kind_named`, which
raises DatasetError naming the known kinds for any other name.

Adding a dataset: a module with its reader and one `register(DatasetKind(...))` call, run when
that module is imported. The reader's `identity()["type"]` and `joint_set` must be the kind's
name and joint set (the cache builder looks a dataset's kind up by that type). A kind registered
in one process is unknown to the others (the commands, a sweep's workers); an installed package
makes it known to every process with an entry point in the group PLUGIN_GROUP that names its
DatasetKind, e.g. in its pyproject.toml:

    [project.entry-points."cpm_pipeline.datasets"]
    toy = "toy_poses.reader:KIND"

The entry points are read once, when a name is not (yet) registered or the known names are listed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import dataclass

from cpm_model.joints import LSP, MPII, JointSet
from cpm_model.metrics import PCK, PCKH, Protocol

from .base import DatasetError, PoseDataset
from .lsp import LSPDataset
from .lspet import LSPETDataset
from .mpii import MPIIDataset

PLUGIN_GROUP = "cpm_pipeline.datasets"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # no ':' or '+': those separate the items of a data spec


@dataclass(frozen=True)
class DatasetKind:
    """One kind of dataset. `open` takes the spec's argument: the absolute path when `takes_path`
    ('lspet:PATH'), else the text after ':' or None ('synthetic', 'synthetic:N')."""

    name: str
    open: Callable[[str | None], PoseDataset]
    joint_set: JointSet
    protocol: Protocol  # PCK@0.2 with the torso normaliser, or PCKh@0.5 with the head size
    # Median person size / max(H, W) of its images, for evaluation crops around the image centre
    # (measured as preprocessing.crops says). None: its people carry a rough centre and scale
    # (MPII), and one without them takes LSPET's ratio.
    person_to_image_ratio: float | None
    takes_path: bool = True


_KINDS: dict[str, DatasetKind] = {}


def register(kind: DatasetKind) -> DatasetKind:
    """Make `kind` known to data specs and to everything that asks the registry; returns it."""
    if not _NAME.match(kind.name):
        raise ValueError(f"dataset kind name {kind.name!r}: expected lower-case letters, digits and '_'")
    if kind.name in _KINDS and _KINDS[kind.name] != kind:
        raise ValueError(f"dataset kind '{kind.name}' is already registered")
    if kind.person_to_image_ratio is not None and not kind.person_to_image_ratio > 0:
        raise ValueError(f"dataset kind '{kind.name}': person_to_image_ratio must be > 0 or None")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Forget a kind (tests that register one of their own)."""
    _KINDS.pop(name, None)


@functools.cache
def load_plugins() -> None:
    """Register the DatasetKind that each installed entry point of PLUGIN_GROUP names (once)."""
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            kind = entry.load()
        except Exception as exc:  # whatever the plugin's import raises: name the plugin
            raise DatasetError(f"dataset plugin '{entry.name} = {entry.value}' cannot be loaded: {exc}") from exc
        if not isinstance(kind, DatasetKind) or kind.name != entry.name:
            raise DatasetError(f"dataset plugin '{entry.name} = {entry.value}' names {kind!r}; expected "
                               f"the DatasetKind named '{entry.name}'")
        register(kind)


def known_names() -> tuple[str, ...]:
    """The registered kinds' names, in the order they were registered (installed plugins last)."""
    load_plugins()
    return tuple(_KINDS)


def kind_named(name: str, where: str = "") -> DatasetKind:
    """The registered kind `name`; DatasetError naming the known ones otherwise (`where` goes after
    the name in that message, e.g. " in data spec 'coco:/x'")."""
    if name not in _KINDS:
        load_plugins()
    if name not in _KINDS:
        raise DatasetError(f"unknown dataset '{name}'{where}; known: {list(_KINDS)}")
    return _KINDS[name]


def open_dataset(kind: DatasetKind, argument: str | None) -> PoseDataset:
    """`kind.open(argument)`, checked against the entry (a mismatch is a bug in the registration)."""
    dataset = kind.open(argument)
    kind_of_reader = dataset.identity().get("type")
    if dataset.joint_set != kind.joint_set or kind_of_reader != kind.name:
        raise ValueError(f"dataset kind '{kind.name}' (joint set '{kind.joint_set.name}') opened a reader of "
                         f"type {kind_of_reader!r} with joint set '{dataset.joint_set.name}'")
    return dataset


def _open_synthetic(count_text: str | None) -> PoseDataset:
    count = None
    if count_text is not None:
        try:
            count = int(count_text)
        except ValueError:
            count = 0
        if count < 1:
            raise DatasetError(f"data spec 'synthetic:{count_text}': expected 'synthetic:N' with N a positive integer")
    try:  # imported here so the file readers work without the generator module
        from .synthetic import SyntheticDataset
    except ImportError as exc:
        raise DatasetError(f"data spec 'synthetic': the synthetic dataset is not available ({exc})") from exc
    return SyntheticDataset() if count is None else SyntheticDataset(num_samples=count)


# LSP is not at hand to measure; its people are scaled to about LSPET's size.
LSPET_PERSON_TO_IMAGE_RATIO = 0.392

# The kinds this package provides, in the order data-spec messages list them. Every cache key
# holds their crop ratios (preprocessing.crops.crop_rule_constants): a new kind is registered on
# its own, not added here, so that their caches keep their names.
BUILTIN = tuple(register(kind) for kind in (
    DatasetKind("lspet", LSPETDataset, LSP, PCK, LSPET_PERSON_TO_IMAGE_RATIO),
    DatasetKind("lsp", LSPDataset, LSP, PCK, LSPET_PERSON_TO_IMAGE_RATIO),
    DatasetKind("mpii", MPIIDataset, MPII, PCKH, None),
    DatasetKind("synthetic", _open_synthetic, LSP, PCK, 0.669, takes_path=False),
))
