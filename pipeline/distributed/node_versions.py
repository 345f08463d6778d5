"""Every node runs the driver's Ray, PyTorch and MLflow.

Nodes of an autoscaling cluster boot on different days; one that installed another release can
fail in ways that look like bugs (a checkpoint that does not load, a metric named differently).
The sweep checks the nodes alive at its start, and each training worker checks itself against
the versions the driver passes on, which covers the nodes that join later.
"""

from __future__ import annotations

from importlib import metadata

PINNED_PACKAGES = ("ray", "torch", "mlflow")
INSTALL_HINT = "install every node from the project's constraints file: pip install -c constraints.txt -e ."


class VersionMismatchError(RuntimeError):
    """A node runs other releases of the pinned packages than the driver."""


def installed_versions(packages=PINNED_PACKAGES) -> dict[str, str]:
    """{package: release} in this process; a local build label (2.13.0+cpu) is left off, since
    the CPU and CUDA builds of one release run the same code."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package).split("+")[0]
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def describe_mismatch(node: str, reference: dict[str, str], found: dict[str, str]) -> str | None:
    """One line naming the node and each package whose release differs, or None."""
    differing = [name for name in reference if found.get(name) != reference[name]]
    if not differing:
        return None
    theirs = ", ".join(f"{name} {found.get(name, 'unknown')}" for name in differing)
    ours = ", ".join(f"{name} {reference[name]}" for name in differing)
    return f"node {node} runs {theirs}; the driver runs {ours}"


def check_worker_versions(node: str, reference: dict[str, str]) -> None:
    """Raise in a training worker whose releases differ from the driver's."""
    problem = describe_mismatch(node, reference, installed_versions(tuple(reference)))
    if problem:
        raise VersionMismatchError(f"{problem}: {INSTALL_HINT}")


def check_cluster_versions(timeout_s: float = 120.0) -> dict[str, str]:
    """Ask every alive node (one zero-CPU task pinned to each) for its releases; raise naming every
    node that differs from this driver. Returns the driver's versions, for the workers' check."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    reference = installed_versions()
    probe = ray.remote(num_cpus=0)(installed_versions)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    pending = {node["NodeManagerAddress"] + f" ({node['NodeID'][:8]})":
               probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
               for node in nodes}
    found = dict(zip(pending, ray.get(list(pending.values()), timeout=timeout_s)))
    problems = [line for node, versions in found.items() if (line := describe_mismatch(node, reference, versions))]
    if problems:
        raise VersionMismatchError("; ".join(problems) + f": {INSTALL_HINT}")
    return reference
