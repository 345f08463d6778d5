"""A local Ray cluster that the sweep starts for itself (RAY_ADDRESS=local, or no cluster running)
keeps working beside another cluster on the same machine.

Ray's state API, which Ray Train's controller, state actor and placement-group cleaner call from
inside the cluster, finds "the" cluster by scanning the machine for raylet processes when
RAY_ADDRESS is "local" or unset; with two raylets it raises "Found multiple active Ray instances"
and Ray Train's checks of its controller fail. The second raylet here is a real process that Ray's scan takes
for one (an executable named `raylet` with a `--gcs-address` flag).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent("""
    import ray
    from ray.util.state import list_nodes
    from pipeline.distributed.runner import connect_ray

    connect_ray()

    @ray.remote(num_cpus=0)
    def nodes_seen_from_inside():
        return [node.node_id for node in list_nodes()]

    inside = ray.get(nodes_seen_from_inside.remote())
    print("nodes", len(inside), inside[0] == ray.get_runtime_context().get_node_id())
    ray.shutdown()
""")


@pytest.fixture
def second_raylet(tmp_path):
    """A process that Ray's machine-wide scan counts as the raylet of another cluster."""
    raylet = tmp_path / "raylet"
    raylet.symlink_to(sys.executable)
    process = subprocess.Popen([str(raylet), "-c", "import time; time.sleep(600)", "--gcs-address=127.0.0.1:9"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_the_state_api_inside_a_local_cluster_finds_its_own_cluster(tmp_path, ray_tmpdir, second_raylet):
    env = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}
    env.update(RAY_ADDRESS="local", RAY_TMPDIR=ray_tmpdir, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nodes 1 True" in result.stdout
