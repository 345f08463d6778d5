"""The CPM network: shapes, layer layout, parameter sharing, stage parameters, VGG weights, precision."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cpm_model import CPM, belief_map_loss, center_map, load_vgg_weights
from cpm_model.config import ModelConfig
from cpm_model.model import VGG19_CONV_INDICES

NARROW = 0.0625  # 8 / 2 / 32 channels: the layout and shapes do not depend on width


def _conv_out_channels(module: nn.Module) -> list[int]:
    return [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_output_shape_at_paper_input_size():
    torch.manual_seed(0)
    model = CPM(num_parts=14, stages=3, width=NARROW).eval()
    with torch.no_grad():
        beliefs = model(torch.rand(2, 3, 368, 368))
    assert beliefs.shape == (2, 3, 15, 46, 46)
    assert torch.isfinite(beliefs).all()


def test_output_shape_small_input_and_single_stage():
    model = CPM(num_parts=16, stages=1, width=NARROW, input_size=64)
    assert model.trunk is None and len(model.later_stages) == 0
    assert model(torch.rand(3, 3, 64, 96)).shape == (3, 1, 17, 8, 12)


def test_paper_layer_layout_with_default_kernels():
    model = CPM(stages=2, width=NARROW)
    spec = model.layer_spec()
    pool = (3, 2)
    assert spec.stage1 == ((9, 1), pool, (9, 1), pool, (9, 1), pool, (5, 1), (9, 1), (1, 1), (1, 1))
    assert spec.trunk == ((9, 1), pool, (9, 1), pool, (9, 1), pool, (5, 1))
    assert spec.later == ((11, 1), (11, 1), (11, 1), (1, 1), (1, 1))
    # stage1_kernel scales the large kernels and the narrow one (k - 4, at least 1).
    small = CPM(stages=2, width=NARROW, stage1_kernel=3, later_kernel=5, later_convs=2, input_size=64)
    assert small.layer_spec().stage1 == ((3, 1), pool, (3, 1), pool, (3, 1), pool, (1, 1), (3, 1), (1, 1), (1, 1))
    assert small.layer_spec().later == ((5, 1), (5, 1), (1, 1), (1, 1))


def test_channel_counts_scale_with_width():
    model = CPM(num_parts=14, stages=2, width=0.25)
    assert _conv_out_channels(model.stage1) == [32, 32, 32, 8, 128, 128, 15]
    assert _conv_out_channels(model.trunk) == [32, 32, 32, 8]
    assert _conv_out_channels(model.later_stages[0]) == [32, 32, 32, 32, 15]
    # concat input: trunk (8) + beliefs (15) + centre map (1)
    assert model.later_stages[0].layers[0].in_channels == 8 + 15 + 1
    full = CPM(num_parts=14, stages=2, width=1.0, input_size=64)
    assert _conv_out_channels(full.stage1) == [128, 128, 128, 32, 512, 512, 15]
    assert full.later_stages[0].layers[0].in_channels == 32 + 15 + 1
    tiny = CPM(stages=2, width=0.001, input_size=64)  # rounded, never below one channel
    assert min(_conv_out_channels(tiny)) == 1


def test_paper_parameter_count():
    # Conv weights k*k*in*out + out biases, paper Fig. 2 with P = 14, six stages, no BatchNorm.
    def conv(k, cin, cout):
        return k * k * cin * cout + cout

    image = conv(9, 3, 128) + 2 * conv(9, 128, 128) + conv(5, 128, 32)
    stage1 = image + conv(9, 32, 512) + conv(1, 512, 512) + conv(1, 512, 15)
    later = conv(11, 32 + 15 + 1, 128) + 2 * conv(11, 128, 128) + conv(1, 128, 128) + conv(1, 128, 15)
    expected = stage1 + image + 5 * later
    with torch.device("meta"):
        model = CPM(num_parts=14, stages=6)
    assert sum(p.numel() for p in model.parameters()) == expected == 30_810_138


def test_trunk_is_shared_by_all_later_stages_and_run_once():
    model = CPM(stages=4, width=NARROW, input_size=64)
    trunk_params = {id(p) for p in model.trunk.parameters()}
    # One trunk module: no later stage owns a copy of its weights.
    for stage in model.later_stages:
        assert not trunk_params & {id(p) for p in stage.parameters()}
    calls = []
    model.trunk.register_forward_hook(lambda *args: calls.append(1))
    beliefs = model(torch.rand(1, 3, 64, 64))
    assert len(calls) == 1
    # The last stage's output depends on the trunk (through it, every later stage reads it).
    beliefs[:, -1].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trunk.parameters() if p.dim() > 1)


def test_stage_parameters_partition_the_model():
    model = CPM(stages=4, width=NARROW, input_size=64, batch_norm=True)
    per_stage = [{id(p) for p in model.stage_parameters(t)} for t in range(1, 5)]
    assert set().union(*per_stage) == {id(p) for p in model.parameters()}
    assert sum(len(s) for s in per_stage) == len(list(model.parameters()))  # disjoint
    trunk_params = {id(p) for p in model.trunk.parameters()}
    assert trunk_params <= per_stage[1]  # the trunk counts as stage 2's
    assert not trunk_params & (per_stage[2] | per_stage[3])
    with pytest.raises(ValueError):
        model.stage_parameters(5)

    vgg = CPM(backbone="vgg", stages=2, width=NARROW, input_size=64)
    assert {id(p) for p in vgg.features.parameters()} <= {id(p) for p in vgg.stage_parameters(1)}


def test_stagewise_training_freezes_earlier_stages():
    model = CPM(stages=3, width=NARROW, input_size=64)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.stage_parameters(3):
        p.requires_grad_(True)
    model(torch.rand(1, 3, 64, 64))[:, -1].sum().backward()
    assert all(p.grad is None for t in (1, 2) for p in model.stage_parameters(t))
    assert all(p.grad is not None for p in model.stage_parameters(3))


def test_batch_norm_after_every_conv_but_each_stage_last():
    model = CPM(stages=2, width=NARROW, batch_norm=True, input_size=64)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 7 + 4 + 5 and len(norms) == len(convs) - 2
    assert sum(c.bias is not None for c in convs) == 2  # only the two belief outputs keep a bias
    model.train()
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 2, 15, 8, 8)


def test_center_map_peak_and_explicit_map_matches_default():
    cmap = center_map(64, 64, sigma=21.0)
    assert cmap.shape == (1, 1, 64, 64)
    # the crop centre (31.5, 31.5) lies between the four central pixels: all four equal the maximum
    assert torch.allclose(cmap[0, 0, 31:33, 31:33], cmap.max().expand(2, 2))
    # pixel (row 31, column 52) is 0.5 px above and 20.5 px right of the centre
    assert cmap[0, 0, 31, 52].item() == pytest.approx(math.exp(-(0.5**2 + 20.5**2) / (2 * 21.0**2)), rel=1e-6)
    model = CPM(stages=2, width=NARROW, input_size=64).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images), model(images, center_map=cmap.expand(2, -1, -1, -1)))
        shifted = torch.roll(cmap, shifts=16, dims=-1)
        assert not torch.allclose(model(images)[:, 1], model(images, center_map=shifted)[:, 1])
    assert model.pooled_center_map(images).shape == (1, 1, 8, 8)


def test_rejects_sizes_that_are_not_multiples_of_eight():
    model = CPM(stages=1, width=NARROW, input_size=64)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError):
        CPM(stage1_kernel=4)


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = CPM(stages=2, width=NARROW, input_size=64).to(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        beliefs = model(images)
        loss, per_stage = belief_map_loss(beliefs, torch.rand(2, 15, 8, 8), torch.ones(2, 14, dtype=torch.bool))
    assert beliefs.dtype == torch.bfloat16 and beliefs.shape == (2, 2, 15, 8, 8)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.stage1[0].weight.grad is not None
    with torch.no_grad():
        reference = CPM(stages=2, width=NARROW, input_size=64)
        reference.load_state_dict(model.state_dict())
        assert torch.allclose(reference(images.contiguous()), model(images), atol=1e-5)


def test_initialisation_keeps_a_deep_unnormalised_net_alive():
    torch.manual_seed(0)
    model = CPM(stages=6, width=0.25, input_size=64)
    with torch.no_grad():
        beliefs = model(torch.rand(4, 3, 64, 64))
    spread = beliefs.std(dim=(0, 2, 3, 4))
    assert bool((spread > 1e-3).all() and (spread < 1.0).all()), spread


def test_from_config():
    config = ModelConfig(stages=3, width=NARROW, stage1_kernel=3, later_kernel=5, later_convs=2, batch_norm=True)
    model = CPM.from_config(config, num_parts=16, input_size=96)
    assert (model.stages, model.later_kernel, model.later_convs, model.num_parts) == (3, 5, 2, 16)
    assert model(torch.rand(1, 3, 96, 96)).shape == (1, 3, 17, 12, 12)


# --- VGG backbone -------------------------------------------------------------------------------

def test_vgg_layout_and_shape():
    model = CPM(backbone="vgg", stages=3, width=NARROW, input_size=64)
    # the released models: VGG-19 conv1_1..conv4_2, conv4_3_CPM..conv4_7_CPM, conv5_1/5_2_CPM
    pool = (2, 2)
    assert model.layer_spec().stage1 == ((3, 1),) * 2 + (pool,) + ((3, 1),) * 2 + (pool,) + ((3, 1),) * 4 + (
        pool,) + ((3, 1),) * 7 + ((1, 1), (1, 1))
    assert _conv_out_channels(model.features)[-5:] == [16, 16, 16, 16, 8]
    assert (model.later_kernel, model.later_convs) == (7, 5)  # the released models' later stages
    assert model.layer_spec().later == ((7, 1),) * 5 + ((1, 1), (1, 1))
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3, 15, 8, 8)


def _fake_vgg19_state_dict(width_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A torchvision-vgg19-shaped state dict (features.N + a classifier entry), filled with 0.01 * N."""
    channels = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)
    indices = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)
    state, in_ch = {}, 3
    for index, out in zip(indices, channels):
        out = max(1, round(out * width_scale))
        state[f"features.{index}.weight"] = torch.full((out, in_ch, 3, 3), 0.01 * index)
        state[f"features.{index}.bias"] = torch.full((out,), -0.01 * index)
        in_ch = out
    state["classifier.0.weight"] = torch.zeros(4, 4)
    return state


def test_vgg_names_match_torchvision_shapes():
    with torch.device("meta"):
        model = CPM(backbone="vgg", stages=2)
    own = model.state_dict()
    fake = _fake_vgg19_state_dict()
    for index in VGG19_CONV_INDICES:
        name = model.vgg_layer_names[index]
        assert own[f"{name}.weight"].shape == fake[f"features.{index}.weight"].shape


def test_load_vgg_weights_copies_conv1_1_to_conv4_2():
    model = CPM(backbone="vgg", stages=2, width=NARROW, input_size=64)
    fake = {f"module.{k}": v for k, v in _fake_vgg19_state_dict(NARROW).items()}  # DataParallel prefix
    loaded = load_vgg_weights(model, fake)
    assert loaded == [f"features.{i}.{s}" for i in VGG19_CONV_INDICES for s in ("weight", "bias")]
    conv4_2 = model.get_submodule(model.vgg_layer_names[21])
    assert torch.all(conv4_2.weight == 0.21) and torch.all(conv4_2.bias == -0.21)
    conv4_3_cpm = model.features[len(model.features) - 10]  # not from VGG: left as initialised
    assert conv4_3_cpm.out_channels == 16 and not torch.all(conv4_3_cpm.weight == 0.23)
    assert torch.all(model.features[0].weight == 0.0)  # features.0 -> 0.01 * 0


def test_load_vgg_weights_names_missing_and_mismatching_keys():
    model = CPM(backbone="vgg", stages=1, width=NARROW, input_size=64)
    fake = _fake_vgg19_state_dict(NARROW)
    del fake["features.21.bias"]
    fake["features.5.weight"] = torch.zeros(8, 4, 5, 5)
    with pytest.raises(ValueError) as err:
        load_vgg_weights(model, fake)
    assert "features.21.bias" in str(err.value)
    assert "features.5.weight: expected (8, 4, 3, 3), got (8, 4, 5, 5)" in str(err.value)
    with pytest.raises(ValueError, match="vgg-backbone"):
        load_vgg_weights(CPM(stages=1, width=NARROW, input_size=64), fake)
