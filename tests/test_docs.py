"""The documentation keeps up with the code: every config key has a row in docs/configuration.md,
every packaged preset is listed in README.md, and every relative link in README.md and docs/*.md
reaches a file (and, with a #fragment, a heading of that file)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cpm_model.config import SECTIONS, ExperimentConfig, preset_names

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
CONFIG_DOC = REPO_ROOT / "docs" / "configuration.md"
DOC_FILES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]

# [text](target): inline Markdown links; fenced and indented code is dropped before matching.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def config_keys() -> list[str]:
    """Every key a configuration takes, as the docs write it: `name` and `section.key`."""
    sections = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    keys = [name for name in sections if name not in SECTIONS]
    defaults = ExperimentConfig()
    for section in SECTIONS:
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(getattr(defaults, section))]
    return keys


def prose(text: str) -> str:
    """The Markdown without code blocks (indented by 4 spaces or fenced), where links are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return "\n".join(line for line in text.splitlines() if not line.startswith("    "))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in _HEADING.findall(prose(path.read_text()))}


def relative_links(path: Path) -> list[str]:
    return [t for t in _LINK.findall(prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_config_keys_are_what_the_dataclasses_hold():
    keys = config_keys()
    assert len(keys) == len(set(keys))
    for key in ("name", "data.spec", "preprocess.sigma", "model.later_kernel", "train.compile",
                "sweep.storage_path", "tracking.experiment"):
        assert key in keys
    assert {k.split(".")[0] for k in keys if "." in k} == set(SECTIONS)


@pytest.mark.parametrize("key", config_keys())
def test_every_config_key_has_a_row_in_the_configuration_reference(key):
    rows = [line for line in CONFIG_DOC.read_text().splitlines() if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"docs/configuration.md needs one table row '| `{key}` | type | default | meaning |'"


@pytest.mark.parametrize("preset", preset_names())
def test_every_packaged_preset_is_listed_in_the_readme(preset):
    assert f"| `{preset}.yaml` |" in README.read_text(), f"README.md's preset table lacks {preset}.yaml"


def test_the_readme_lists_no_preset_that_is_not_packaged():
    listed = re.findall(r"^\| `([\w.-]+)\.yaml` \|", README.read_text(), flags=re.MULTILINE)
    assert sorted(listed) == preset_names()


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_reach_a_file_and_its_heading(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, fragment = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(REPO_ROOT) if dest.is_relative_to(REPO_ROOT) else dest})")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.name})")
    assert not broken, f"{doc.relative_to(REPO_ROOT)}: broken links: {broken}"


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\nSee [a](missing.md), [b](#top), [c](#nowhere), [d](https://example.org).\n\n"
                    "    [not a link](also-missing.md)\n")
    assert relative_links(page) == ["missing.md", "#top", "#nowhere"]
    assert anchors(page) == {"top"}
    assert slug("Gradients: the paper's Fig. 5") == "gradients-the-papers-fig-5"
    assert slug("`cpm-sweep`") == "cpm-sweep"
