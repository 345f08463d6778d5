"""The built wheel works on its own: installed into a new virtual environment and run from an empty
directory outside the checkout with an empty HOME, its console scripts run the packaged presets.

The venv sees the system's site-packages (torch, Ray and MLflow are not downloaded again) and the
wheel is installed without dependencies and without an index: the test needs no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "cpm_model", "pipeline", "preprocessing")
ONE_STEP = ["train.epochs=1", "train.max_steps_per_epoch=1", "data.spec=synthetic:40", "data.max_val_samples=8"]


def build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the sources (a build leaves build/ and *.egg-info behind), built with
    the installed setuptools (no isolated build environment to download)."""
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(REPO / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--wheel-dir", str(tmp / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return next((tmp / "dist").glob("cpm_pipeline-*.whl"))


def make_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    # The system's pip, run by the venv's interpreter, installs into the venv; --ignore-installed
    # because the system may hold an (editable) install of this project already.
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                           "--ignore-installed", "--quiet", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return venv


def test_the_wheel_runs_its_console_scripts_outside_the_checkout(tmp_path):
    venv = make_venv(tmp_path, build_wheel(tmp_path))
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(HOME=str(home), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    def run(*command: str) -> subprocess.CompletedProcess:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}: {done.stdout[-1500:]}{done.stderr[-1500:]}"
        return done

    where = run(str(venv / "bin" / "python"), "-c", "import cpm_model; print(cpm_model.__file__)").stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not the checkout

    dry = run("cpm-sweep", "--dry-run")
    assert "Sweep 'default': 10 trial(s) on synthetic:2000" in dry.stdout
    sets = [arg for item in ONE_STEP for arg in ("--set", item)]
    run("cpm-fit", "--config", "synthetic_tiny", *sets, "--no-figures", "--no-test", "--quiet")
    checkpoint = work / "runs" / "synthetic_tiny" / "best.pt"  # the documented default --out
    assert checkpoint.is_file()

    from preprocessing.datasets.synthetic import SyntheticDataset

    image = tmp_path / "person.png"
    cv2.imwrite(str(image), cv2.cvtColor(SyntheticDataset(num_samples=1).load_image(0), cv2.COLOR_RGB2BGR))
    record = json.loads(run("cpm-predict", "--checkpoint", str(checkpoint), str(image)).stdout)
    assert record["image"] == str(image) and len(record["joints"]) == 14
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
