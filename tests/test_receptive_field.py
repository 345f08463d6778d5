"""Receptive fields: the analytic numbers, and analytic == measured on the real modules."""

from __future__ import annotations

import pytest
from torch import nn

from cpm_model import CPM, cpm_layer_spec, effective_receptive_field_px, receptive_field_px, receptive_field_table
from cpm_model.config import ModelConfig
from cpm_model.receptive_field import receptive_field_of_layers

TINY = 0.005  # one channel per layer (three for the 512 ones): the field does not depend on width


def test_layer_arithmetic_by_hand():
    # conv3: 3 px; pool2 s2: 3 + 1 = 4, jump 2; conv3: 4 + 2 * 2 = 8, jump 2
    assert receptive_field_of_layers([(3, 1), (2, 2), (3, 1)]) == (8, 2)
    assert receptive_field_of_layers([]) == (1, 1)


def test_paper_layout_167_407_then_plus_240():
    assert receptive_field_px() == [167, 407, 647, 887, 1127, 1367]
    assert receptive_field_px(stages=3) == [167, 407, 647]


def test_released_lsp_layout_built_model():
    # Stages >= 2 share the trunk up to its third pool and each has its own conv5x5-32 (as the
    # released LSP model): the image path is 103 px, below every previous stage's field, so the
    # fields stay 167 / 407 / +240 per stage. Read from the built layers, not from a table.
    model = CPM(stages=6)  # full width: the layers as released
    spec = model.layer_spec()
    assert spec.trunk[-1] == (3, 2) and spec.branch == ((5, 1),)
    assert receptive_field_of_layers(spec.trunk + spec.branch) == (103, 8)
    assert receptive_field_px(model) == [167, 407, 647, 887, 1127, 1367]
    assert spec == cpm_layer_spec("paper")


def test_each_stages_own_conv_is_on_the_image_path():
    # A 41x41 conv of its own on the trunk (71 px) makes the image path 71 + 40 x 8 = 391 px, more
    # than stage 1's 167: stage 2 then sees 391 + 240 = 631 px, analytic and measured.
    model = CPM(stages=2, width=TINY, input_size=64)
    stage = model.later_stages[0]
    own = stage.image_conv[0]
    stage.image_conv[0] = nn.Conv2d(own.in_channels, own.out_channels, 41, padding=20)
    assert receptive_field_of_layers(model.layer_spec().trunk) == (71, 8)
    assert receptive_field_px(model) == [167, 631]
    assert effective_receptive_field_px(model, 2) == 631


def test_vgg_layout():
    # VGG-19 conv1_1..conv4_2: 84 px; five 3x3 CPM convs at stride 8: +80 -> 164;
    # five 7x7 per later stage at stride 8 add 5 * 6 * 8 = 240
    assert receptive_field_px(backbone="vgg", stages=3) == [164, 404, 644]


def test_config_dict_kwargs_and_model_agree():
    config = ModelConfig(stages=4, stage1_kernel=3, later_kernel=5, later_convs=2, width=TINY)
    expected = [45, 109, 173, 237]  # 45 + 2 * 4 * 8 = 109, then +64 per stage
    assert receptive_field_px(config) == expected
    assert receptive_field_px({"stages": 4, "stage1_kernel": 3, "later_kernel": 5, "later_convs": 2}) == expected
    assert receptive_field_px(stages=4, stage1_kernel=3, later_kernel=5, later_convs=2) == expected
    assert receptive_field_px(ModelConfig(), stages=2) == [167, 407]  # keywords override
    model = CPM.from_config(config, input_size=64)
    assert model.layer_spec() == cpm_layer_spec("paper", 3, 5, 2)
    assert receptive_field_px(model) == expected
    with pytest.raises(TypeError):
        receptive_field_px(kernel=3)


def test_small_cpu_presets_table():
    # stage 1 depends on stage1_kernel only: 15 / 45 / 75 / 121 / 167 px for k = 1 / 3 / 5 / 7 / 9
    assert [receptive_field_px(stages=1, stage1_kernel=k)[0] for k in (1, 3, 5, 7, 9)] == [15, 45, 75, 121, 167]
    rows = {(r["input_size"], r["stage1_kernel"], r["later_kernel"]): r for r in receptive_field_table()}
    assert rows[(128, 3, 3)]["rf_px"] == [45, 93, 141, 189]
    assert rows[(128, 3, 3)]["rf_per_person"] == [0.5, 1.04, 1.57, 2.11]  # person = 0.7 x 128 = 89.6 px
    assert rows[(128, 3, 5)]["rf_px"] == [45, 141, 237, 333]
    assert rows[(128, 3, 7)]["rf_px"] == [45, 189, 333, 477]
    assert rows[(96, 3, 3)]["rf_per_person"][0] == 0.67
    assert rows[(64, 3, 3)]["rf_per_person"][0] == 1.0
    assert rows[(128, 5, 5)]["rf_px"] == [75, 171, 267, 363]
    assert rows[(128, 7, 7)]["rf_px"] == [121, 265, 409, 553]


@pytest.mark.parametrize("kwargs", [
    dict(stages=3),  # the paper: 167 / 407 / 647
    dict(stages=3, stage1_kernel=3, later_kernel=5, batch_norm=True),
    dict(stages=2, stage1_kernel=5, later_kernel=7, later_convs=2),
    dict(stages=2, backbone="vgg"),
])
def test_measured_field_equals_analytic(kwargs):
    model = CPM(width=TINY, input_size=64, **kwargs)
    analytic = receptive_field_px(model)
    measured = [effective_receptive_field_px(model, t) for t in range(1, model.stages + 1)]
    assert measured == analytic


def test_measurement_refuses_a_clipped_field():
    model = CPM(stages=1, width=TINY, input_size=64)
    with pytest.raises(ValueError, match="clips"):
        effective_receptive_field_px(model, 1, input_size=128)  # the field is 167 px
