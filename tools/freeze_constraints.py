"""Write constraints.txt: the exact version of every package this project installs, from the
environment it was tested in (the project's requirements and theirs, transitively).

    python tools/freeze_constraints.py > constraints.txt

Every node of a cluster installs with `pip install -c constraints.txt -e .`, so nodes started on
different days run the same Ray, PyTorch and MLflow; the sweep checks it at start.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

PROJECT = "cpm-pipeline"
EXTRAS = ("test",)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    """{distribution name: installed version} of everything `root[extras]` pulls in."""
    pinned: dict[str, str] = {}
    pending = [(root, set(extras))]
    while pending:
        name, wanted = pending.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement not installed here
        for line in dist.requires or []:
            requirement = Requirement(line)
            env = [{"extra": extra} for extra in (wanted or {""})]
            if requirement.marker and not any(requirement.marker.evaluate(e) for e in env):
                continue
            key = canonical(requirement.name)
            if key in pinned:
                continue
            try:
                pinned[key] = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                continue
            pending.append((requirement.name, set(requirement.extras)))
    pinned.pop(canonical(root), None)
    return pinned


def main() -> int:
    pins = closure(PROJECT, EXTRAS)
    print("# Exact versions for every node of a cluster (and for `make install`):")
    print("# regenerate with `make constraints` after changing pyproject.toml's dependencies.")
    for name in sorted(pins):
        # A local build label (2.13.0+cpu) is left off: ==2.13.0 admits the CPU and the CUDA build.
        print(f"{name}=={pins[name].split('+')[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
