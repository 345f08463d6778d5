"""Shared test fixtures. The real LSPET copy lives beside the repository in ../shared/data/lspet."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LSPET_DIR = Path(os.environ.get("CPM_LSPET_DIR", REPO_ROOT.parent / "shared" / "data" / "lspet"))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Slow tests first, then the other integration tests, then unit tests (a stable sort): under
    `pytest -n 2` the run ends when its last long test does, so none may be left for the end."""
    def rank(item) -> int:
        return 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("integration") else 2

    items.sort(key=rank)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def lspet_dir() -> Path:
    """The real LSPET directory (images/im%05d.jpg + joints.mat); set CPM_LSPET_DIR to move it."""
    if not (LSPET_DIR / "joints.mat").is_file():
        pytest.fail(f"LSPET data not found at {LSPET_DIR}: place it at ../shared/data/lspet or set CPM_LSPET_DIR")
    return LSPET_DIR


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line and environment) of every process we can read."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            text = (entry / "cmdline").read_bytes().replace(b"\0", b" ") + b"\n" + (entry / "environ").read_bytes()
        except OSError:
            continue
        found[int(entry.name)] = (int(fields[1]), int(fields[3]), text.decode(errors="replace"))
    return found


def _kill(pids) -> int:
    import signal

    killed = 0
    for pid in pids:
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def kill_processes_mentioning(marker: str) -> int:
    """SIGKILL every process whose command line or environment contains `marker`, and their
    descendants; returns how many.

    Descendants too: a cluster's agents rename themselves (ray::DashboardAgent) over their
    command line and environment, but are the raylet's children."""
    processes = _processes()
    doomed = {pid for pid, (_, _, text) in processes.items() if marker in text}
    grown = True
    while grown:
        children = {pid for pid, (parent, _, _) in processes.items() if parent in doomed} - doomed
        doomed |= children
        grown = bool(children)
    return _kill(sorted(doomed))


def kill_session(session_id: int) -> int:
    """SIGKILL every process of a session (a command started with start_new_session and what it
    started, reparented or not); returns how many."""
    return _kill(pid for pid, (_, session, _) in _processes().items() if session == session_id)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (`item.report_call`, ...), for fixtures that keep
    evidence when the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def ray_tmpdir(request, tmp_path):
    """A short temp dir for a test's own Ray cluster(s) (RAY_TMPDIR); every Ray process carries it
    on its command line, so teardown stops exactly this test's clusters and no one else's. When the
    test failed, the clusters' logs are kept in its tmp_path (ray-logs/) before the dir goes."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        yield path
    finally:
        kill_processes_mentioning(path)
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            for logs in Path(path).glob("**/session_*/logs"):  # RAY_TMPDIR=path puts them under path/ray/
                if not logs.parent.is_symlink():  # session_latest points at one of them
                    shutil.copytree(logs, tmp_path / "ray-logs" / logs.parent.name, dirs_exist_ok=True)
            print(f"Ray logs of the failed test kept in {tmp_path / 'ray-logs'}")
            print_error_lines(tmp_path / "ray-logs")
        shutil.rmtree(path, ignore_errors=True)


def print_error_lines(logs: Path, most: int = 40) -> None:
    """The last error lines of a cluster's logs, by file: what a CI log shows of a failure whose
    log directory stays on the CI machine."""
    import re

    # Ray's C++ lines at level E or F ("[time E pid tid] ..."), Python's ERROR records and exceptions.
    error = re.compile(r"^\[[^\]]* [EF] \d+ \d+\]|\bERROR\b|^Traceback|^[\w.]+(Error|Exception): ")
    found, seen = [], set()
    for log in sorted(logs.glob("**/*")):
        if log.is_file() and log.suffix in (".log", ".err", ".out"):
            for number, line in enumerate(log.read_text(errors="replace").splitlines()):
                if error.search(line) and not line.startswith("[state-dump]") and line not in seen:
                    seen.add(line)
                    found.append((log.stat().st_mtime, number, f"{log.name}: {line[:240]}"))
    for *_, line in sorted(found)[-most:]:  # the files written last, each in its own order
        print(line)


@pytest.fixture(scope="module")
def shared_ray():
    """One Ray cluster (`ray start --head`, 2 CPUs, its own token) for a module's sweeps that
    inject no fault into Ray: each joins it instead of starting a cluster of its own. The sweeps
    that kill Ray's processes or nodes keep their own clusters (ray_tmpdir).

    Per module, not per session: an idle cluster costs about 6.4 CPU-seconds a minute here (its
    dashboard, agents, GCS and raylet), more over a whole run than the ~13 CPU-seconds each
    cluster start it saves (bench/RESULTS.md, test suite)."""
    from services import ray_head

    with ray_head(num_cpus=2) as head:
        yield head
