"""Presets ship inside the package and are chosen by name or by path; every command's default is
the `default` preset; a directory or an unknown name is one line listing the packaged presets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpm_model.config import DEFAULT_PRESET, PRESETS_DIR, ConfigError, load_config, preset_names, preset_path

REPO = Path(__file__).resolve().parents[1]


def test_a_name_is_the_packaged_file_and_a_path_wins(tmp_path, monkeypatch):
    assert preset_path("synthetic_tiny") == PRESETS_DIR / "synthetic_tiny.yaml"
    assert preset_path("synthetic_tiny.yaml") == PRESETS_DIR / "synthetic_tiny.yaml"
    assert {"default", "synthetic_tiny", "lspet_cpu", "search_lr_sigma"} <= set(preset_names())
    mine = tmp_path / "my.yaml"
    mine.write_text(yaml.safe_dump({"name": "mine", "model": {"stages": 2}}))
    monkeypatch.chdir(tmp_path)
    assert preset_path("./my.yaml") == Path("my.yaml")
    assert load_config("./my.yaml").model.stages == 2
    # A file in the working directory named like a preset is that file, not the preset.
    (tmp_path / "default").write_text(yaml.safe_dump({"name": "local"}))
    assert load_config("default").name == "local"


@pytest.mark.parametrize("value, what", [("nope", "neither a file nor a packaged preset"),
                                         ("cpm_model", "is a directory"),
                                         ("cpm_model/presets/nope.yaml", "neither a file")])
def test_a_directory_or_an_unknown_preset_lists_the_presets(value, what, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=what) as error:
        preset_path(value)
    assert str(error.value).endswith("packaged presets: " + ", ".join(preset_names()))


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.integration  # runs a command in a subprocess (Python and PyTorch start-up)
def test_every_command_defaults_to_the_default_preset_and_print_config_needs_no_out(tmp_path):
    default = load_config(DEFAULT_PRESET)
    assert (default.name, default.preprocess.input_size, default.model.stages) == ("default", 64, 3)
    whole = yaml.safe_load(default.to_yaml())
    cache_sections = {key: whole[key] for key in ("name", "data", "preprocess")}  # what a cache depends on
    for command, expected in ((["-m", "pipeline.fit"], whole), ([str(REPO / "pipeline" / "sweep.py")], whole),
                              (["-m", "preprocessing", "build"], cache_sections)):
        done = cli(tmp_path, *command, "--print-config")
        assert done.returncode == 0, done.stderr
        assert yaml.safe_load(done.stdout) == expected, command
    assert list(tmp_path.iterdir()) == []  # --print-config wrote nothing (no runs/ folder)

    done = cli(tmp_path, "-m", "pipeline.fit", "--config", "nope")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "synthetic_tiny" in done.stderr, done.stderr
