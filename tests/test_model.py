"""The CPM network: shapes, layer layout (layer for layer the released models), parameter counts and
sharing, stage parameters, VGG weights and input normalisation, earlier-layout checkpoints, precision."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cpm_model import CPM, belief_map_loss, center_map, load_vgg_weights
from cpm_model.config import ModelConfig
from cpm_model.model import IMAGENET_MEAN, IMAGENET_STD, VGG19_CONV_INDICES
from pipeline.train.checkpoint import CheckpointError, load_init_weights, load_model_state

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
    assert spec.trunk == ((9, 1), pool, (9, 1), pool, (9, 1), pool)  # shared up to the third pool
    assert spec.branch == ((5, 1),)  # each stage's own conv5x5-32
    assert spec.later == ((11, 1), (11, 1), (11, 1), (1, 1), (1, 1))
    # stage1_kernel scales the large kernels and the narrow one (k - 4, at least 1).
    small = CPM(stages=2, width=NARROW, stage1_kernel=3, later_kernel=5, later_convs=2, input_size=64)
    assert small.layer_spec().stage1 == ((3, 1), pool, (3, 1), pool, (3, 1), pool, (1, 1), (3, 1), (1, 1), (1, 1))
    assert small.layer_spec().later == ((5, 1), (5, 1), (1, 1), (1, 1))


def test_channel_counts_scale_with_width():
    model = CPM(num_parts=14, stages=2, width=0.25)
    assert _conv_out_channels(model.stage1) == [32, 32, 32, 8, 128, 128, 15]
    assert _conv_out_channels(model.trunk) == [32, 32, 32]
    assert _conv_out_channels(model.later_stages[0]) == [8, 32, 32, 32, 32, 15]
    assert model.later_stages[0].image_conv[0].in_channels == 32  # the trunk's third pool
    # concat input: the stage's own narrow conv (8) + beliefs (15) + centre map (1)
    assert model.later_stages[0].layers[0].in_channels == 8 + 15 + 1
    full = CPM(num_parts=14, stages=2, width=1.0, input_size=64)
    assert _conv_out_channels(full.stage1) == [128, 128, 128, 32, 512, 512, 15]
    assert full.later_stages[0].layers[0].in_channels == 32 + 15 + 1
    tiny = CPM(stages=2, width=0.001, input_size=64)  # rounded, never below one channel
    assert min(_conv_out_channels(tiny)) == 1


def _conv_params(k, cin, cout):
    return k * k * cin * cout + cout  # weights + biases


def _parameter_count(**kwargs) -> int:
    return sum(p.numel() for p in CPM(**kwargs).parameters())


def test_paper_parameter_count_is_the_released_lsp_models():
    # The released LSP model (pose_deploy_centerMap), P = 14, six stages, no BatchNorm: stages >= 2
    # share conv1..pool3_stage2 and each has its own conv5x5-32 (conv4_stage2, conv1_stage3..6).
    conv = _conv_params
    trunk = conv(9, 3, 128) + 2 * conv(9, 128, 128)
    narrow = conv(5, 128, 32)
    stage1 = trunk + narrow + conv(9, 32, 512) + conv(1, 512, 512) + conv(1, 512, 15)
    later = narrow + conv(11, 32 + 15 + 1, 128) + 2 * conv(11, 128, 128) + conv(1, 128, 128) + conv(1, 128, 15)
    expected = stage1 + trunk + 5 * later
    assert _parameter_count(num_parts=14, stages=6) == expected == 31_219_866
    # one shared conv5x5-32 for all stages would be 4 x 102,432 fewer
    assert narrow == 102_432 and expected - 4 * narrow == 30_810_138


def test_vgg_parameter_count_is_the_released_models():
    conv = _conv_params
    vgg = (conv(3, 3, 64) + conv(3, 64, 64) + conv(3, 64, 128) + conv(3, 128, 128) + conv(3, 128, 256)
           + 3 * conv(3, 256, 256) + conv(3, 256, 512) + conv(3, 512, 512))  # conv1_1 .. conv4_2
    cpm = conv(3, 512, 256) + 3 * conv(3, 256, 256) + conv(3, 256, 128)  # conv4_3_CPM .. conv4_7_CPM
    stage1 = conv(1, 128, 512) + conv(1, 512, 15)  # conv5_1_CPM, conv5_2_CPM
    later = conv(7, 128 + 15 + 1, 128) + 4 * conv(7, 128, 128) + conv(1, 128, 128) + conv(1, 128, 15)
    expected = vgg + cpm + stage1 + 5 * later
    assert _parameter_count(num_parts=14, stages=6, backbone="vgg") == expected == 29_852_058


def _stage_layers(model: CPM, stage: int) -> list[tuple]:
    """(module name, kernel, in channels, out channels) of stage `stage`'s convolutions and pools, in
    forward order (pools: (name, kernel, None, None))."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for root in model.stage_modules(stage):
        for m in root.modules():
            if isinstance(m, nn.Conv2d):
                out.append((names[id(m)], m.kernel_size[0], m.in_channels, m.out_channels))
            elif isinstance(m, nn.MaxPool2d):
                out.append((names[id(m)], m.kernel_size, None, None))
    return out


def _released_later_stage(t: int, own: str, first: int) -> list[tuple]:
    """Stage t of the released LSP model: its conv5x5-32 on pool3_stage2, then Mconv1..5_stage{t}."""
    i = t - 2
    return [(f"conv{first}_stage{t}", own, 5, 128, 32),
            (f"Mconv1_stage{t}", f"later_stages.{i}.layers.0", 11, 32 + 15 + 1, 128),
            (f"Mconv2_stage{t}", f"later_stages.{i}.layers.2", 11, 128, 128),
            (f"Mconv3_stage{t}", f"later_stages.{i}.layers.4", 11, 128, 128),
            (f"Mconv4_stage{t}", f"later_stages.{i}.layers.6", 1, 128, 128),
            (f"Mconv5_stage{t}", f"later_stages.{i}.layers.8", 1, 128, 15)]


# The released LSP model layer by layer (name there, module here, kernel, in, out; pools: 3x3 s2).
RELEASED_LSP = {
    1: [("conv1_stage1", "stage1.0", 9, 3, 128), ("pool1_stage1", "stage1.2", 3, None, None),
        ("conv2_stage1", "stage1.3", 9, 128, 128), ("pool2_stage1", "stage1.5", 3, None, None),
        ("conv3_stage1", "stage1.6", 9, 128, 128), ("pool3_stage1", "stage1.8", 3, None, None),
        ("conv4_stage1", "stage1.9", 5, 128, 32), ("conv5_stage1", "stage1.11", 9, 32, 512),
        ("conv6_stage1", "stage1.13", 1, 512, 512), ("conv7_stage1", "stage1.15", 1, 512, 15)],
    2: [("conv1_stage2", "trunk.0", 9, 3, 128), ("pool1_stage2", "trunk.2", 3, None, None),
        ("conv2_stage2", "trunk.3", 9, 128, 128), ("pool2_stage2", "trunk.5", 3, None, None),
        ("conv3_stage2", "trunk.6", 9, 128, 128), ("pool3_stage2", "trunk.8", 3, None, None),
        *_released_later_stage(2, "later_stages.0.image_conv.0", first=4)],
    **{t: _released_later_stage(t, f"later_stages.{t - 2}.image_conv.0", first=1) for t in range(3, 7)},
}


def test_paper_stages_layer_for_layer_the_released_lsp_model():
    model = CPM(num_parts=14, stages=6)
    for stage, layers in RELEASED_LSP.items():
        assert _stage_layers(model, stage) == [row[1:] for row in layers], f"stage {stage}"
    # stages >= 3 read the trunk's pool3 output through their own conv5x5-32, never stage 2's
    own = [model.later_stages[i].image_conv[0].weight for i in range(5)]
    assert len({id(w) for w in own}) == 5


def test_vgg_stages_layer_for_layer_the_released_model():
    model = CPM(num_parts=14, stages=3, backbone="vgg")
    stage1 = _stage_layers(model, 1)
    vgg_names = ["conv1_1", "conv1_2", "pool1", "conv2_1", "conv2_2", "pool2", "conv3_1", "conv3_2", "conv3_3",
                 "conv3_4", "pool3", "conv4_1", "conv4_2", "conv4_3_CPM", "conv4_4_CPM", "conv4_5_CPM",
                 "conv4_6_CPM", "conv4_7_CPM", "conv5_1_CPM", "conv5_2_CPM"]
    assert len(stage1) == len(vgg_names)
    assert [row[1:] for row in stage1] == [
        (3, 3, 64), (3, 64, 64), (2, None, None), (3, 64, 128), (3, 128, 128), (2, None, None),
        (3, 128, 256), (3, 256, 256), (3, 256, 256), (3, 256, 256), (2, None, None), (3, 256, 512), (3, 512, 512),
        (3, 512, 256), (3, 256, 256), (3, 256, 256), (3, 256, 256), (3, 256, 128), (1, 128, 512), (1, 512, 15)]
    for stage in (2, 3):  # Mconv1..7_stage{t} on [conv4_7_CPM, b_{t-1}, centre map], no conv of its own
        assert [row[1:] for row in _stage_layers(model, stage)] == [
            (7, 128 + 15 + 1, 128), *[(7, 128, 128)] * 4, (1, 128, 128), (1, 128, 15)]
        assert model.later_stages[stage - 2].image_conv is None


def test_trunk_is_shared_by_all_later_stages_and_run_once():
    model = CPM(stages=4, width=NARROW, input_size=64)
    trunk_params = {id(p) for p in model.trunk.parameters()}
    # One trunk module: no later stage owns a copy of its weights.
    for stage in model.later_stages:
        assert not trunk_params & {id(p) for p in stage.parameters()}
    calls, own_calls = [], []
    model.trunk.register_forward_hook(lambda *args: calls.append(1))
    for stage in model.later_stages:
        stage.image_conv.register_forward_hook(lambda module, inputs, output: own_calls.append(inputs[0]))
    beliefs = model(torch.rand(1, 3, 64, 64))
    assert len(calls) == 1
    # every stage's own conv5x5-32 reads the trunk's output itself (the same tensor), not another stage's
    assert len(own_calls) == 3 and all(x is own_calls[0] for x in own_calls)
    # The last stage's output depends on the trunk (through it, every later stage reads it).
    beliefs[:, -1].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trunk.parameters() if p.dim() > 1)
    # ... and on its own conv5x5-32, not on the other stages' (the earlier ones feed it beliefs only)
    assert model.later_stages[-1].image_conv[0].weight.grad.abs().sum() > 0


def test_stage_parameters_partition_the_model():
    model = CPM(stages=4, width=NARROW, input_size=64, batch_norm=True)
    per_stage = [{id(p) for p in model.stage_parameters(t)} for t in range(1, 5)]
    assert set().union(*per_stage) == {id(p) for p in model.parameters()}
    assert sum(len(s) for s in per_stage) == len(list(model.parameters()))  # disjoint
    trunk_params = {id(p) for p in model.trunk.parameters()}
    assert trunk_params <= per_stage[1]  # the trunk counts as stage 2's
    assert not trunk_params & (per_stage[2] | per_stage[3])
    for t in (2, 3, 4):  # each stage's own conv5x5-32 (and its BatchNorm) is that stage's
        assert {id(p) for p in model.later_stages[t - 2].image_conv.parameters()} <= per_stage[t - 1]
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
        loss = belief_map_loss(beliefs, torch.rand(2, 15, 8, 8), torch.ones(2, 14, dtype=torch.bool)).sum()
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


# torchvision's VGG-19 (`vgg19().features`, configuration "E"), written out: the reference the VGG
# front must reproduce once torchvision-named weights are loaded (torchvision cannot be imported here).
TORCHVISION_VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                         512, 512, 512, 512, "M")


def _torchvision_vgg19_features() -> nn.Sequential:
    layers, in_ch = [], 3
    for v in TORCHVISION_VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = v
    return nn.Sequential(*layers)


def test_vgg_front_normalises_as_the_imagenet_weights_expect(tmp_path):
    reference = _torchvision_vgg19_features().eval()
    generator = torch.Generator().manual_seed(0)
    weights = {}  # a torchvision-style weights file (random tensors, He-scaled so responses are not tiny)
    for name, tensor in reference.state_dict().items():
        fan_in = tensor[0].numel() if name.endswith("weight") else 1
        weights[f"features.{name}"] = torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / fan_in)
    weights["classifier.6.bias"] = torch.zeros(1000)
    torch.save(weights, tmp_path / "vgg19.pth")
    reference.load_state_dict({k[len("features."):]: v for k, v in weights.items() if k.startswith("features.")})

    model = CPM(backbone="vgg", stages=1, width=1.0, input_size=64).eval()
    assert "VGG-19 front" in load_init_weights(model, tmp_path / "vgg19.pth")
    block1 = []  # the response after conv1_1, conv1_2 and pool1 (features.4 in both numberings)
    model.features[4].register_forward_hook(lambda module, inputs, output: block1.append(output))
    images = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        model(images)
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        expected = reference[:5]((images - mean) / std)
        unnormalised = reference[:5](images - 0.5)
    assert block1[0].shape == expected.shape == (2, 64, 32, 32)
    assert torch.allclose(block1[0], expected, atol=1e-5, rtol=0)
    assert (block1[0] - unnormalised).abs().max() > 0.1 * expected.abs().max()
    # the paper backbone keeps its input in [-0.5, 0.5]; neither changes the state dict
    paper = CPM(stages=1, width=NARROW, input_size=64)
    assert torch.equal(paper.normalised_input(images), images - 0.5)
    assert not any("input_" in k for k in model.state_dict()) and not any("input_" in k for k in paper.state_dict())


def _earlier_layout_state(model: CPM) -> dict[str, torch.Tensor]:
    """`model`'s state dict as the earlier layout saved it: one shared conv5x5-32 at the end of `trunk`."""
    state, shared = {}, len(model.trunk)
    for key, value in model.state_dict().items():
        if ".image_conv." not in key:
            state[key] = value
        elif key.startswith("later_stages.0.image_conv."):  # image_conv.0 conv (.1 its BatchNorm)
            index, rest = key[len("later_stages.0.image_conv."):].split(".", 1)
            state[f"trunk.{shared + int(index)}.{rest}"] = value
    return state


@pytest.mark.parametrize("batch_norm", [False, True])
def test_an_earlier_layout_checkpoint_is_refused_naming_the_mismatch(tmp_path, batch_norm):
    model = CPM(stages=3, width=NARROW, input_size=64, batch_norm=batch_norm)
    old = _earlier_layout_state(model)
    shared = "trunk.12." if batch_norm else "trunk.9."
    assert f"{shared}weight" in old
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError) as err:
        load_init_weights(model, tmp_path / "old.pt")
    message = str(err.value)
    assert "old.pt does not fit this model" in message
    assert "missing from checkpoint: later_stages.0.image_conv.0." in message
    assert f"not in model: {shared}" in message
    assert f"earlier layout in which all stages >= 2 share one conv5x5-32 ({shared}*)" in message
    # a checkpoint of another size says only what differs (no layout note)
    with pytest.raises(CheckpointError) as err:
        load_model_state(CPM(stages=2, width=NARROW, input_size=64, batch_norm=batch_norm),
                         model.state_dict(), "checkpoint")
    assert "earlier layout" not in str(err.value) and "checkpoint has 3 stages, model has 2" in str(err.value)
