"""The MLflow UI as a user sees it: a tiny sweep against a real `mlflow server`, checked through the
REST API (the contract) and then in headless Chromium (the trial runs nested under the sweep run).

Needs Debian's chromium (/usr/bin/chromium; `.ci/run` installs it) and Playwright's Python package,
which drives that browser: no browser is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import services
from services import NO_PROXY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "ui-test"
STAGES = (1, 2)
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _get(url: str) -> dict:
    with NO_PROXY.open(url, timeout=30) as response:
        return json.load(response)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with NO_PROXY.open(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture
def mlflow_server(tmp_path):
    with services.mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path) as base:
        yield base


def _run_tiny_sweep(base: str, tmp: Path, ray_tmpdir: str) -> None:
    grid = "sweep.grid={model.stages: [" + ", ".join(map(str, STAGES)) + "]}"
    command = [sys.executable, str(REPO / "pipeline" / "sweep.py"), "--config", "synthetic_tiny",
               "--tracking-uri", base, "--storage-path", str(tmp / "ray"),
               "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "data.spec=synthetic:300",
               "--set", "train.epochs=2", "--set", grid, "--set", f"tracking.experiment={EXPERIMENT}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **services.LOOPBACK_ENV)
    env["RAY_ADDRESS"] = "local"  # the driver starts its own local Ray, even beside a running cluster
    env["RAY_TMPDIR"] = ray_tmpdir  # in a temp dir of its own, beside other tests' clusters
    result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def _check_rest_contract(base: str) -> tuple[str, str, list[str]]:
    """(experiment id, parent run name, trial run names) after checking what the UI relies on."""
    query = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
    experiment_id = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]["experiment_id"]
    runs = _post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    parents = [r for r, t in zip(runs, tags) if t.get("cpm.run_kind") == "sweep"]
    assert len(parents) == 1, tags
    parent = parents[0]
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED"
    assert {t["key"] for t in parent["data"].get("tags", [])} >= {"cpm.sweep_id"}
    trials = [r for r, t in zip(runs, tags) if t.get("cpm.run_kind") == "trial"]
    assert len(trials) == len(STAGES)
    param_names = None
    for run, run_tags in ((r, t) for r, t in zip(runs, tags) if t.get("cpm.run_kind") == "trial"):
        assert run_tags["mlflow.parentRunId"] == parent_id  # nested under the sweep run
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert {"stages", "receptive_field_px", "intermediate_supervision", "training_scheme", "seed"} <= set(params)
        assert run["info"]["run_name"].startswith(f"T={params['stages']} rf={params['receptive_field_px']}px")
        assert 0.0 <= metrics["pck"] <= 1.0 and "best_pck" in metrics and "test_pck_curve_a0.20" in metrics
        # Comparable in the UI: the same param names in every trial run.
        param_names = param_names or set(params)
        assert set(params) == param_names
    # The sweep's report went to its run's artifacts.
    listing = _get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={parent_id}&path=report")
    assert {"report/ablation_stages.md", "report/pck_curves.png"} <= {f["path"] for f in listing.get("files", [])}
    return experiment_id, parent["info"]["run_name"], sorted(r["info"]["run_name"] for r in trials)


def _chromium_or_fail():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (`apt-get install -y chromium`; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright's Python package is missing: pip install -e '.[test]'")
    return sync_playwright


def _best_effort(action) -> None:
    """Cosmetics for the screenshot (closing a side panel, widening a column) must not fail the test."""
    try:
        action()
    except Exception:
        pass


def test_trial_runs_nested_under_the_sweep_in_the_ui(mlflow_server, tmp_path, ray_tmpdir):
    sync_playwright = _chromium_or_fail()
    _run_tiny_sweep(mlflow_server, tmp_path, ray_tmpdir)
    experiment_id, parent_name, trial_names = _check_rest_contract(mlflow_server)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 800})
            # The runs table of the experiment (the bare experiment URL may open another tab first).
            page.goto(f"{mlflow_server}/#/experiments/{experiment_id}/runs", wait_until="domcontentloaded")
            parent_cell = page.locator('[role="gridcell"]', has_text=parent_name)
            parent_cell.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "runs_collapsed.png"))
            for name in trial_names:  # nested: hidden until the parent row is expanded
                assert not page.get_by_text(name, exact=True).is_visible()
            # Comparable: the same metric and params are columns for every run.
            page.get_by_role("button", name="Columns").click()
            for column in ("pck", "stages", "receptive_field_px"):
                page.get_by_text(column, exact=True).first.click()
            page.keyboard.press("Escape")
            page.locator('.ag-header-cell[col-id="metrics.`pck`"]').wait_for(timeout=10_000)

            parent_cell.locator("button").first.click()  # the expander beside the parent's name
            for name in trial_names:
                page.get_by_text(name, exact=True).wait_for(state="visible", timeout=30_000)

            _best_effort(lambda: page.get_by_role("button", name="Close").first.click(timeout=2000))  # side panel
            _best_effort(lambda: _widen_run_name_column(page))
            page.wait_for_timeout(500)
            shot = tmp_path / "mlflow_ui_nested_runs.png"
            page.screenshot(path=str(shot))
            _best_effort(lambda: shutil.copy(shot, Path(tempfile.gettempdir()) / "mlflow_ui.png"))  # one place to look
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


def _widen_run_name_column(page) -> None:
    """So the screenshot shows whole run names (the configuration), not ellipses."""
    header = page.locator('.ag-header-cell[col-id="attributes.`Run Name`"]').first
    header.hover()
    box = header.bounding_box(timeout=2000)
    x, y = box["x"] + box["width"] - 2, box["y"] + box["height"] / 2  # the column's resize handle
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 80, y, steps=8)
    page.mouse.move(x + 130, y, steps=8)
    page.mouse.up()
