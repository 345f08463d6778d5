"""The config's type checks, read from the dataclasses' hints, and sweep.search parsed once into
typed distributions."""

from __future__ import annotations

from typing import Optional, get_type_hints

import pytest

from cpm_model.config import (SECTIONS, ConfigError, Distribution, ExperimentConfig, _check_type, _outer_type,
                              load_config, parse_distribution)


@pytest.mark.parametrize("hint, expected", [
    (int, (int, False)),
    (int | None, (int, True)),
    (Optional[float], (float, True)),
    (bool | None, (bool, True)),
    (dict[str, list], (dict, False)),
    (dict[str, dict], (dict, False)),
    (list, (list, False)),
    (str | None, (str, True)),
])
def test_the_outer_type_of_each_hint(hint, expected):
    assert _outer_type(hint) == expected


@pytest.mark.parametrize("hint", [int | str, tuple, set[int], float | str | None])
def test_a_hint_the_checker_cannot_read_is_a_programming_error(hint):
    with pytest.raises(TypeError, match="config fields"):
        _outer_type(hint)


def test_every_config_field_has_a_hint_the_checker_reads():
    for section in SECTIONS:
        for name, hint in get_type_hints(get_type_hints(ExperimentConfig)[section]).items():
            assert _outer_type(hint), f"{section}.{name}"


@pytest.mark.parametrize("value, hint, expected", [
    (None, int | None, None),
    (3, int | None, 3),
    (2, float, 2.0),  # an integer where a number is expected becomes a float
    ("1e-3", float, 0.001),  # YAML 1.1 reads 1e-3 as a string
    ({"model.stages": [1, 2]}, dict[str, list], {"model.stages": [1, 2]}),
    ([{"model.stages": 1}], list, [{"model.stages": 1}]),
    (False, bool | None, False),
])
def test_values_of_the_right_type_pass(value, hint, expected):
    checked = _check_type("k.v", value, hint)
    assert checked == expected and type(checked) is type(expected)


@pytest.mark.parametrize("value, hint, message", [
    (None, int, "config key 'k.v' must not be null"),
    (3.0, int | None, "config key 'k.v' must be an integer, got 3.0"),
    (True, int | None, "config key 'k.v' must be an integer, got True"),
    (True, float, "config key 'k.v' must be a number, got True"),
    ("abc", float, "config key 'k.v' must be a number, got 'abc'"),
    (1, bool, "config key 'k.v' must be true or false, got 1"),
    (3, str | None, "config key 'k.v' must be a string, got 3"),
    ([1], dict[str, list], "config key 'k.v' must be a mapping, got [1]"),
    ({}, list, "config key 'k.v' must be a list, got {}"),
])
def test_values_of_the_wrong_type_are_named(value, hint, message):
    with pytest.raises(ConfigError) as error:
        _check_type("k.v", value, hint)
    assert str(error.value) == message


def test_a_mapping_of_variants_is_refused_as_not_a_list():
    # The variants are a list of mappings (docs/configuration.md); a bare mapping used to pass.
    with pytest.raises(ConfigError, match=r"^config key 'sweep.variants' must be a list, got \{'model.stages': 1\}$"):
        load_config(None, ["sweep.variants={model.stages: 1}"])


def test_the_search_space_is_parsed_once_into_distributions():
    config = load_config(None, ["sweep.search={train.lr: {loguniform: ['1e-4', 1.0e-2]}, "
                                "model.width: {uniform: [0.5, 1]}, train.seed: {choice: [0, 1, 2]}}"])
    assert config.search_space == {
        "train.lr": Distribution("loguniform", low=1e-4, high=1e-2),
        "model.width": Distribution("uniform", low=0.5, high=1.0),
        "train.seed": Distribution("choice", values=(0, 1, 2)),
    }
    # The config's own data keeps the search as written (MLflow's params, config.yaml).
    assert config.to_dict()["sweep"]["search"]["train.lr"] == {"loguniform": ["1e-4", 0.01]}
    assert "search_space" not in config.to_dict() and "search_space" not in config.to_yaml()
    assert config.with_overrides({"sweep.search": {}}).search_space == {}
    assert load_config(None).search_space == {}


def test_a_distribution_checks_its_bounds_or_its_choices_against_the_key():
    assert Distribution("uniform", low=0.5, high=1.0).points() == [0.5, 1.0]
    assert Distribution("choice", values=(1, 3)).points() == [1, 3]
    with pytest.raises(ConfigError, match=r"^sweep.search\['model.stages'\]: config key 'model.stages' must be "
                                          r"an integer >= 1, got 0$"):
        load_config(None, ["sweep.search={model.stages: {choice: [1, 0]}}"])


@pytest.mark.parametrize("spec, message", [
    ({"normal": [0, 1]}, "x must be {loguniform: [lo, hi]}, {uniform: [lo, hi]} or {choice: [v1, v2, ...]}, "
                         "got {'normal': [0, 1]}"),
    ({"choice": []}, "x: choice must be a non-empty list of values, got []"),
    ({"uniform": [1, True]}, "x: uniform must be [lo, hi], two numbers, got [1, True]"),
    ({"uniform": [2, 1]}, "x: uniform needs lo < hi, got [2, 1]"),
    ({"loguniform": [0, 1e-2]}, "x: loguniform needs bounds > 0, got [0, 0.01]"),
])
def test_a_bad_distribution_is_named(spec, message):
    with pytest.raises(ConfigError) as error:
        parse_distribution("x", spec)
    assert str(error.value) == message
