"""Receptive fields of the CPM, computed analytically from a layer spec and measured on a module.

Arithmetic: a stack of layers (kernel k_i, stride s_i) has receptive field
r = 1 + sum_i (k_i - 1) * j_i with j_i = prod_{l < i} s_l (the "jump", input pixels per step of
layer i's input grid). Padding moves the field but does not change its size.

A stage t >= 2 reads two image-dependent inputs on the stride-8 grid: the shared image-feature
trunk x' (paper: through the stage's own conv5x5-32, the `branch`) and the previous stage's
beliefs b_{t-1}. Its field is the larger of the two inputs' fields plus what its own convolutions
add. (The centre map does not depend on the image.) Both fields are centred on the same pixel,
so the larger one contains the other.
Paper layout (Fig. 2, the released LSP model): 167 px after stage 1, 407 after stage 2, +240
(3 x 10 x 8) per stage. The image path x' + conv5x5-32 is stage 1's stack up to that conv
(103 px), below every b_{t-1}'s field, so giving each stage its own conv5x5-32 (as the released
model does) leaves every field unchanged.

Small inputs (a person is about 0.7 x the crop side). Stage 1's field depends only on
stage1_kernel (k); with the stride-8 pooling fixed, 3x3 kernels still give 45 px:

    stage-1 field in px (and / person)   k=3          k=5          k=7          k=9 (paper)
    input  64 (person  45 px)            45 (1.00)    75 (1.67)   121 (2.70)   167 (3.71)
    input  96 (person  67 px)            45 (0.67)    75 (1.12)   121 (1.80)   167 (2.49)
    input 128 (person  90 px)            45 (0.50)    75 (0.84)   121 (1.35)   167 (1.86)
    input 368 (person 258 px)            45 (0.17)    75 (0.29)   121 (0.47)   167 (0.65)

Each stage >= 2 adds later_convs x (later_kernel - 1) x 8 px (its input's field is stage t-1's,
always larger than the trunk's): with 3 convs, +48 (kernel 3), +96 (5), +144 (7), +240 (11).
E.g. input 128, k=3, later kernel 3: 45 / 93 / 141 / 189 px = 0.50 / 1.04 / 1.57 / 2.11 persons.
So on CPU presets the receptive-field ablation wants 128 px inputs with k=3 (stage 1 sees half a
person); at 64-96 px stage 1 already sees most or all of it. `receptive_field_table` lists more.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .geometry import STRIDE

Layer = tuple[int, int]  # (kernel, stride), square kernels

PAPER_LATER_LAYOUT = (11, 3)  # three conv11x11 per stage >= 2 (paper Fig. 2)
VGG_LATER_LAYOUT = (7, 5)  # five conv7x7 per stage >= 2 (the released MPII/LSP models)
BACKBONES = ("paper", "vgg")


@dataclass(frozen=True)
class LayerSpec:
    """The (kernel, stride) of every convolution and pooling layer, per input path.

    stage1: image -> stage-1 beliefs. trunk: image -> the shared features that stages >= 2 read
    (the paper's trunk x', or the VGG features). branch: what each stage t >= 2 applies to the
    trunk's output before the concatenation (the paper's per-stage conv5x5-32; none for vgg).
    later: one stage t >= 2, from its concatenated input to its beliefs (all later stages have
    the same layout).
    """

    stage1: tuple[Layer, ...]
    trunk: tuple[Layer, ...]
    later: tuple[Layer, ...]
    branch: tuple[Layer, ...] = ()


def narrow_trunk_kernel(stage1_kernel: int) -> int:
    """Kernel of the conv5x5-32 layer for a given stage-1 kernel: 5 for the paper's 9, k - 4 else (>= 1).

    Keeps the paper's 4-pixel difference between the two kernel sizes and stays odd.
    """
    return max(1, stage1_kernel - 4)


def later_layout(backbone: str, later_kernel: int | None = None, later_convs: int | None = None) -> tuple[int, int]:
    """(kernel, count) of the large convolutions of each stage >= 2; None = the backbone's default."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}")
    default_kernel, default_convs = PAPER_LATER_LAYOUT if backbone == "paper" else VGG_LATER_LAYOUT
    kernel = default_kernel if later_kernel is None else int(later_kernel)
    convs = default_convs if later_convs is None else int(later_convs)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"later_kernel must be an odd integer >= 1, got {kernel}")
    if convs < 1:
        raise ValueError(f"later_convs must be >= 1, got {convs}")
    return kernel, convs


# VGG-19 conv1_1 .. conv4_2: 3x3 convolutions and three 2x2 stride-2 max-pools.
VGG_FRONT_LAYERS: tuple[Layer, ...] = (
    (3, 1), (3, 1), (2, 2),
    (3, 1), (3, 1), (2, 2),
    (3, 1), (3, 1), (3, 1), (3, 1), (2, 2),
    (3, 1), (3, 1),
)
VGG_CPM_LAYERS: tuple[Layer, ...] = ((3, 1),) * 5  # conv4_3_CPM .. conv4_7_CPM


def cpm_layer_spec(backbone: str = "paper", stage1_kernel: int = 9, later_kernel: int | None = None,
                   later_convs: int | None = None) -> LayerSpec:
    """The layer spec of a CPM without building it (stage1_kernel is ignored by the vgg backbone)."""
    kernel, convs = later_layout(backbone, later_kernel, later_convs)
    later = ((kernel, 1),) * convs + ((1, 1), (1, 1))
    if backbone == "paper":
        k = int(stage1_kernel)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"stage1_kernel must be an odd integer >= 1, got {k}")
        pool = (3, 2)
        trunk = ((k, 1), pool, (k, 1), pool, (k, 1), pool)
        branch = ((narrow_trunk_kernel(k), 1),)
        return LayerSpec(stage1=trunk + branch + ((k, 1), (1, 1), (1, 1)), trunk=trunk, later=later, branch=branch)
    features = VGG_FRONT_LAYERS + VGG_CPM_LAYERS
    return LayerSpec(stage1=features + ((1, 1), (1, 1)), trunk=features, later=later)


def receptive_field_of_layers(layers: Iterable[Layer], rf: int = 1, jump: int = 1) -> tuple[int, int]:
    """(receptive field, jump) after `layers`, starting from a field `rf` on a grid of step `jump`."""
    for kernel, stride in layers:
        rf += (kernel - 1) * jump
        jump *= stride
    return rf, jump


def receptive_fields_from_spec(spec: LayerSpec, stages: int) -> list[int]:
    """Receptive field (input pixels) of each stage's beliefs, stage 1 .. `stages`."""
    rf1, jump1 = receptive_field_of_layers(spec.stage1)
    fields = [rf1]
    if stages >= 2:
        rf_trunk, jump_trunk = receptive_field_of_layers(spec.trunk + spec.branch)
        if jump_trunk != jump1:
            raise ValueError(f"trunk stride {jump_trunk} differs from stage-1 stride {jump1}: cannot concatenate")
        for _ in range(2, stages + 1):
            rf, _ = receptive_field_of_layers(spec.later, rf=max(rf_trunk, fields[-1]), jump=jump_trunk)
            fields.append(rf)
    return fields


_SPEC_KEYS = ("backbone", "stages", "stage1_kernel", "later_kernel", "later_convs")


def receptive_field_px(model_or_config: Any = None, **overrides: Any) -> list[int]:
    """Analytic receptive field (input pixels) per stage.

    Accepts a built `CPM` (reads its actual layers), a `ModelConfig` (or anything with its
    attributes), a dict, or keyword arguments (backbone, stages, stage1_kernel, later_kernel,
    later_convs), so a sweep can compute the field without building a network. Keywords override.
    """
    if model_or_config is not None and callable(getattr(model_or_config, "layer_spec", None)) and not overrides:
        return receptive_fields_from_spec(model_or_config.layer_spec(), model_or_config.stages)
    values: dict[str, Any] = {"backbone": "paper", "stages": 6, "stage1_kernel": 9,
                              "later_kernel": None, "later_convs": None}
    if isinstance(model_or_config, dict):
        values.update({k: v for k, v in model_or_config.items() if k in _SPEC_KEYS})
    elif model_or_config is not None:
        values.update({k: getattr(model_or_config, k) for k in _SPEC_KEYS if hasattr(model_or_config, k)})
    unknown = set(overrides) - set(_SPEC_KEYS)
    if unknown:
        raise TypeError(f"unknown receptive-field argument(s) {sorted(unknown)}; expected {list(_SPEC_KEYS)}")
    values.update(overrides)
    spec = cpm_layer_spec(values["backbone"], values["stage1_kernel"], values["later_kernel"], values["later_convs"])
    return receptive_fields_from_spec(spec, int(values["stages"]))


def receptive_field_table(input_sizes: Sequence[int] = (64, 96, 128), stage1_kernels: Sequence[int] = (3, 5, 7),
                          later_kernels: Sequence[int] = (3, 5, 7), stages: int = 4, later_convs: int = 3,
                          person_fraction: float = 0.7) -> list[dict[str, Any]]:
    """Rows (input size, kernels, RF per stage in px and relative to a person of person_fraction x input)."""
    rows = []
    for size in input_sizes:
        person = person_fraction * size
        for k1 in stage1_kernels:
            for kl in later_kernels:
                fields = receptive_field_px(backbone="paper", stages=stages, stage1_kernel=k1,
                                            later_kernel=kl, later_convs=later_convs)
                rows.append({"input_size": size, "stage1_kernel": k1, "later_kernel": kl, "later_convs": later_convs,
                             "rf_px": fields, "rf_per_person": [round(f / person, 2) for f in fields]})
    return rows


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def effective_receptive_field_px(model: nn.Module, stage: int, input_size: int | None = None) -> int:
    """Receptive field of stage `stage` (1-based) measured on the module, in input pixels.

    The extent of the nonzero input gradient of the central output cell of that stage's beliefs
    (the measured counterpart of `receptive_field_px`, not the "effective" Gaussian-like field of
    Luo et al.). To make every pixel of the true field show up, a float64 copy gets all conv
    weights = 1 / fan_in, zero biases, identity BatchNorm (eval) and an all-ones image: every
    activation is then positive, so no ReLU blocks a path and no sum cancels. Max-pooling routes
    its gradient to one element per window (its gradient support is a subset of the field), so
    the copy uses average pooling of the same kernel, stride and padding, which has the same field.
    The field is measured along x on a 16 x input_size image and along y on an input_size x 16
    one (a path along the kernels' central row or column reaches every offset, so the thin side
    does not clip the other axis), which is ~20x cheaper than a square image. `input_size`
    defaults to the analytic field plus a margin; a field that reaches the border raises.
    """
    if not 1 <= stage <= getattr(model, "stages", stage):
        raise ValueError(f"stage must be in 1..{model.stages}, got {stage}")
    if input_size is None:
        analytic = receptive_field_px(model)[stage - 1]
        input_size = STRIDE * math.ceil((analytic + 16) / STRIDE)  # the network takes multiples of it
    probe = copy.deepcopy(model).to(dtype=torch.float64, device="cpu").eval()
    for name, module in list(probe.named_modules()):
        if isinstance(module, nn.MaxPool2d):
            _set_submodule(probe, name, nn.AvgPool2d(module.kernel_size, module.stride, module.padding,
                                                     ceil_mode=module.ceil_mode))
    with torch.no_grad():
        for module in probe.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.fill_(1.0 / fan_in)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()  # running mean 0, var 1, weight 1, bias 0
    extents = [_gradient_extent(probe, stage, (_STRIP, input_size), axis=1),
               _gradient_extent(probe, stage, (input_size, _STRIP), axis=0)]
    return max(extents)


_STRIP = 16  # the other side of the probe image: the field along one axis needs no room along the other


def _gradient_extent(probe: nn.Module, stage: int, size: tuple[int, int], axis: int) -> int:
    """Extent along `axis` (0 = rows, 1 = columns) of the input gradient of the central output cell."""
    image = torch.ones(1, 3, *size, dtype=torch.float64, requires_grad=True)
    beliefs = probe(image)[0, stage - 1]  # (P+1, h, w)
    height, width = beliefs.shape[-2:]
    beliefs[:, height // 2, width // 2].sum().backward()
    support = image.grad[0].abs().sum(0) > 0
    hits = torch.nonzero(support.any(dim=1 - axis)).flatten()
    if hits.numel() == 0:
        raise RuntimeError("the probed output does not depend on the input (no gradient)")
    if hits[0] == 0 or hits[-1] == size[axis] - 1:
        raise ValueError(f"input_size {size[axis]} clips the receptive field of stage {stage}; use a larger one")
    return int(hits[-1] - hits[0] + 1)


__all__ = [
    "Layer",
    "LayerSpec",
    "cpm_layer_spec",
    "later_layout",
    "narrow_trunk_kernel",
    "receptive_field_of_layers",
    "receptive_fields_from_spec",
    "receptive_field_px",
    "receptive_field_table",
    "effective_receptive_field_px",
]
