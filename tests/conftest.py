"""Shared test fixtures. The real LSPET copy lives beside the repository in ../shared/data/lspet."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LSPET_DIR = Path(os.environ.get("CPM_LSPET_DIR", REPO_ROOT.parent / "shared" / "data" / "lspet"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def lspet_dir() -> Path:
    """The real LSPET directory (images/im%05d.jpg + joints.mat); set CPM_LSPET_DIR to move it."""
    if not (LSPET_DIR / "joints.mat").is_file():
        pytest.fail(f"LSPET data not found at {LSPET_DIR}: place it at ../shared/data/lspet or set CPM_LSPET_DIR")
    return LSPET_DIR
