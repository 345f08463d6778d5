"""The Convolutional Pose Machine network (Wei et al., CVPR 2016), paper and VGG backbones.

Input: float images (B, 3, H, W), RGB in [0, 1], H and W multiples of 8. The paper backbone
subtracts 0.5; the VGG backbone normalises with ImageNet's mean and std (0.485, 0.456, 0.406 /
0.229, 0.224, 0.225), the input torchvision's VGG-19 weights were trained on.
Output: every stage's belief maps stacked, (B, T, P+1, H/8, W/8); the last map is the background.

paper backbone (Fig. 2; the released LSP model, pose_deploy_centerMap), k = stage1_kernel (9),
k' = max(1, k - 4) (5), channels x width:
  stage 1:  convk-128, pool, convk-128, pool, convk-128, pool, convk'-32, convk-512, conv1-512, conv1-(P+1)
  trunk x': convk-128, pool, convk-128, pool, convk-128, pool   (ONE module, run once, read by all stages >= 2)
  stage t:  its own convk'-32 on x' (conv4_stage2, conv1_stage3 .. conv1_stage6), then
            [that, b_{t-1}, centre map at stride 8] -> later_convs x conv(later_kernel)-128, conv1-128, conv1-(P+1)
  6 stages, 14 parts: 31,219,866 parameters, as the released model.
  Pools are max 3x3 stride 2 padding 1: exactly input / 2 for even input (Caffe's ceil mode gives
  the same size). Their window centres make the field of belief cell i centred on input pixel 8i,
  3.5 px off the cell centre 8i + 3.5 that the targets use; the convolutions learn that shift.
  Receptive field at the paper's kernels: 167 px after stage 1, 407 px after stage 2, +240 px per
  further stage (a stage's own convk'-32 adds to the image path only, whose 167 px stay below the
  previous beliefs' field).
vgg backbone (the released MPII/LSP models, pose_deploy_centerMap):
  features: VGG-19 conv1_1 .. conv4_2 (three 2x2 max-pools, stride 8), then conv4_3_CPM ..
            conv4_6_CPM 3x3-256 and conv4_7_CPM 3x3-128 (computed once, read by every stage)
  stage 1:  conv5_1_CPM 1x1-512, conv5_2_CPM 1x1-(P+1)
  stage t:  [features, b_{t-1}, centre map] -> later_convs x conv(later_kernel)-128, conv1-128, conv1-(P+1)
  with later_kernel / later_convs defaulting to 7 / 5 (paper backbone: 11 / 3); 6 stages, 14
  parts: 29,852,058 parameters. The VGG layers are named so that torchvision's vgg19
  `features.N` weights load (`load_vgg_weights`).

ReLU after every convolution except each stage's last; optional BatchNorm after each of those
(not inside the VGG front, whose ImageNet weights were trained without it).

Initialisation ("kaiming", default): He-normal (fan-in, ReLU gain) for convolutions followed by
ReLU, so activations keep their scale through the ~20 layers of an un-normalised net; each
stage's output convolution N(0, 0.01^2), so the initial beliefs are near zero and a stage does not
start by amplifying its predecessor; biases 0. "normal": N(0, 0.01^2) everywhere, as in the
original Caffe prototxt (and close to MMPose's CPM, std 0.001), which relies on BatchNorm or
the paper's Caffe loss scale to train.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import STRIDE
from .receptive_field import BACKBONES, Layer, LayerSpec, later_layout, narrow_trunk_kernel

# torchvision vgg19 `features` indices of conv1_1 .. conv4_2 and the channels they output.
VGG19_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21)
VGG19_CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512)
VGG19_POOL_AFTER = (2, 7, 16)  # conv indices followed by a 2x2 max-pool (features.4, .9, .18)
# The input torchvision's ImageNet weights expect: RGB in [0, 1], normalised per channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def scaled_channels(channels: int, width: float) -> int:
    """Channel count times the width multiplier, rounded, at least 1."""
    return max(1, int(round(channels * width)))


def center_map(height: int, width: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 1, H, W) Gaussian of `sigma` px centred on the crop centre ((W-1)/2, (H-1)/2)."""
    ys = torch.arange(height, device=device, dtype=dtype) - (height - 1) / 2.0
    xs = torch.arange(width, device=device, dtype=dtype) - (width - 1) / 2.0
    d2 = ys[:, None] ** 2 + xs[None, :] ** 2
    return torch.exp(-d2 / (2.0 * sigma * sigma))[None, None]


def _conv(in_ch: int, out_ch: int, kernel: int, batch_norm: bool, relu: bool = True) -> list[nn.Module]:
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=not (batch_norm and relu))
    conv.is_belief_output = not relu  # marks each stage's last convolution for initialisation
    layers: list[nn.Module] = [conv]
    if relu:
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    return layers


def _pool() -> nn.Module:
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


def _layers_of(modules: Sequence[nn.Module]) -> tuple[Layer, ...]:
    """(kernel, stride) of the convolutions and poolings among `modules`, in forward order."""
    spec = []
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Conv2d):
                spec.append((m.kernel_size[0], m.stride[0]))
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                k, s = m.kernel_size, m.stride
                spec.append((k if isinstance(k, int) else k[0], s if isinstance(s, int) else s[0]))
    return tuple(spec)


def _check_arguments(num_parts: int, stages: int, backbone: str, width: float, stage1_kernel: int,
                     input_size: int, init: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}")
    if stages < 1 or num_parts < 1 or width <= 0:
        raise ValueError(f"need stages >= 1, num_parts >= 1, width > 0; got {stages}, {num_parts}, {width}")
    if stage1_kernel < 1 or stage1_kernel % 2 == 0:
        raise ValueError(f"stage1_kernel must be an odd integer >= 1, got {stage1_kernel}")
    if input_size % STRIDE:
        raise ValueError(f"input_size must be a multiple of {STRIDE}, got {input_size}")
    if init not in ("kaiming", "normal"):
        raise ValueError(f"init must be 'kaiming' or 'normal', got {init!r}")


class LaterStage(nn.Module):
    """A stage t >= 2: image features (through its own `image_conv`, if any) + previous beliefs +
    centre map -> beliefs. `image_conv` is the paper backbone's per-stage convk'-32 (None for vgg)."""

    def __init__(self, in_ch: int, num_maps: int, kernel: int, convs: int, width: float, batch_norm: bool,
                 image_conv: nn.Module | None = None):
        super().__init__()
        self.image_conv = image_conv
        mid = scaled_channels(128, width)
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += _conv(in_ch if i == 0 else mid, mid, kernel, batch_norm)
        layers += _conv(mid, mid, 1, batch_norm)
        layers += _conv(mid, num_maps, 1, batch_norm, relu=False)
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, beliefs: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        if self.image_conv is not None:
            features = self.image_conv(features)
        return self.layers(torch.cat([features, beliefs, centre], dim=1))


class CPM(nn.Module):
    """Convolutional Pose Machine. See the module docstring for the layouts."""

    def __init__(self, num_parts: int = 14, stages: int = 6, backbone: str = "paper", width: float = 1.0,
                 stage1_kernel: int = 9, later_kernel: int | None = None, later_convs: int | None = None,
                 batch_norm: bool = False, input_size: int = 368, center_sigma: float = 21.0,
                 init: str = "kaiming"):
        super().__init__()
        _check_arguments(num_parts, stages, backbone, width, stage1_kernel, input_size, init)
        self.num_parts, self.stages, self.backbone, self.width = num_parts, stages, backbone, width
        self.stage1_kernel = stage1_kernel
        self.later_kernel, self.later_convs = later_layout(backbone, later_kernel, later_convs)
        self.batch_norm, self.input_size, self.center_sigma = batch_norm, input_size, center_sigma
        num_maps = num_parts + 1
        build = self._build_paper_front if backbone == "paper" else self._build_vgg_front
        feature_ch, image_conv = build(num_maps)
        self.later_stages = nn.ModuleList(
            LaterStage(feature_ch + num_maps + 1, num_maps, self.later_kernel, self.later_convs, width, batch_norm,
                       image_conv())
            for _ in range(stages - 1))
        mean, std = ((0.5,) * 3, (1.0,) * 3) if backbone == "paper" else (IMAGENET_MEAN, IMAGENET_STD)
        # Not in the state dict (fixed by the backbone); follows the model's device and dtype.
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._init_weights(init)

    def _channels(self, n: int) -> int:
        return scaled_channels(n, self.width)

    def _build_paper_front(self, num_maps: int):
        """stage1 and the shared trunk x'; returns (channels a later stage reads, its image conv)."""
        c, batch_norm = self._channels, self.batch_norm
        k, k_narrow = self.stage1_kernel, narrow_trunk_kernel(self.stage1_kernel)

        def image_trunk() -> list[nn.Module]:
            return [*_conv(3, c(128), k, batch_norm), _pool(),
                    *_conv(c(128), c(128), k, batch_norm), _pool(),
                    *_conv(c(128), c(128), k, batch_norm), _pool()]

        def narrow_conv() -> list[nn.Module]:
            return _conv(c(128), c(32), k_narrow, batch_norm)

        self.stage1 = nn.Sequential(*image_trunk(), *narrow_conv(),
                                    *_conv(c(32), c(512), k, batch_norm),
                                    *_conv(c(512), c(512), 1, batch_norm),
                                    *_conv(c(512), num_maps, 1, batch_norm, relu=False))
        # x': stage 1's layers up to its third pool, own weights, shared by all stages >= 2
        # (the released model's conv1..pool3_stage2); each stage >= 2 has its own convk'-32 on it.
        self.trunk = nn.Sequential(*image_trunk()) if self.stages >= 2 else None
        return c(32), lambda: nn.Sequential(*narrow_conv())

    def _build_vgg_front(self, num_maps: int):
        """The shared VGG features and stage1; later stages read the features as they are."""
        c, batch_norm = self._channels, self.batch_norm
        layers: list[nn.Module] = []
        self.vgg_layer_names: dict[int, str] = {}  # torchvision features index -> our module name
        in_ch = 3
        for index, out in zip(VGG19_CONV_INDICES, VGG19_CONV_CHANNELS):
            self.vgg_layer_names[index] = f"features.{len(layers)}"
            layers += _conv(in_ch, c(out), 3, batch_norm=False)
            in_ch = c(out)
            if index in VGG19_POOL_AFTER:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        for out in (256, 256, 256, 256, 128):  # conv4_3_CPM .. conv4_7_CPM
            layers += _conv(in_ch, c(out), 3, batch_norm)
            in_ch = c(out)
        self.features = nn.Sequential(*layers)
        self.stage1 = nn.Sequential(*_conv(c(128), c(512), 1, batch_norm),
                                    *_conv(c(512), num_maps, 1, batch_norm, relu=False))
        return c(128), lambda: None

    @classmethod
    def from_config(cls, model_config, num_parts: int = 14, input_size: int = 368) -> "CPM":
        """Build from a `cpm_model.config.ModelConfig` (its values are used as given)."""
        m = model_config
        return cls(num_parts=num_parts, stages=m.stages, backbone=m.backbone, width=m.width,
                   stage1_kernel=m.stage1_kernel, later_kernel=m.later_kernel, later_convs=m.later_convs,
                   batch_norm=m.batch_norm, input_size=input_size, center_sigma=m.center_sigma)

    def _init_weights(self, init: str) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "kaiming" and not m.is_belief_output:
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                else:
                    nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # --- structure ------------------------------------------------------------------------------
    def _image_path(self) -> list[nn.Module]:
        return [self.features] if self.backbone == "vgg" else []

    def stage_modules(self, stage: int) -> list[nn.Module]:
        """The modules whose parameters belong to stage `stage` (1-based).

        paper: the trunk x' belongs to stage 2 (stages >= 3 only reuse it; each owns its convk'-32).
        vgg: the shared features belong to stage 1.
        """
        if not 1 <= stage <= self.stages:
            raise ValueError(f"stage must be in 1..{self.stages}, got {stage}")
        if stage == 1:
            return [*self._image_path(), self.stage1]
        modules: list[nn.Module] = [self.later_stages[stage - 2]]
        if stage == 2 and self.backbone == "paper":
            modules.insert(0, self.trunk)
        return modules

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """Parameters of stage `stage` (1-based), for stage-wise training (freeze the others)."""
        return [p for module in self.stage_modules(stage) for p in module.parameters()]

    def layer_spec(self) -> LayerSpec:
        """(kernel, stride) per layer along each path, read from the built modules."""
        image = self._image_path()
        trunk = image if self.backbone == "vgg" else [self.trunk] if self.trunk is not None else []
        first_later = self.later_stages[0] if self.stages >= 2 else None
        branch = [first_later.image_conv] if first_later is not None and first_later.image_conv is not None else []
        later = [first_later.layers] if first_later is not None else []
        return LayerSpec(stage1=_layers_of([*image, self.stage1]), trunk=_layers_of(trunk), later=_layers_of(later),
                         branch=_layers_of(branch))

    def normalised_input(self, images: torch.Tensor) -> torch.Tensor:
        """What the first convolution sees: (images - mean) / std of the backbone (see the module docstring)."""
        return (images - self.input_mean.to(images.dtype)) / self.input_std.to(images.dtype)

    def earlier_layout_note(self, state_dict: dict) -> str | None:
        """Why `state_dict` does not load when it was saved by the earlier paper layout, whose stages
        >= 2 shared one convk'-32 (the trunk's last layer), else None."""
        if self.trunk is None:
            return None
        shared = f"trunk.{len(self.trunk)}."
        if not any(k.startswith(shared) for k in state_dict) or any(".image_conv." in k for k in state_dict):
            return None
        k = narrow_trunk_kernel(self.stage1_kernel)
        return (f"it has the earlier layout in which all stages >= 2 share one conv{k}x{k}-32 ({shared}*); "
                f"each stage >= 2 now has its own (later_stages.N.image_conv, as in the released model), "
                f"so train it again")

    # --- forward --------------------------------------------------------------------------------
    def pooled_center_map(self, images: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
        """Centre map (B or 1, 1, H/8, W/8): built for the input size unless given at input resolution."""
        height, width = images.shape[-2:]
        if centre is None:
            centre = center_map(height, width, self.center_sigma, images.device, images.dtype)
        elif centre.dim() == 3:
            centre = centre[:, None]
        if centre.shape[-2:] != (height, width):
            raise ValueError(f"center map of size {tuple(centre.shape[-2:])} does not match images {(height, width)}")
        # Caffe's pool_center_lower: 9x9 average, stride 8.
        return F.avg_pool2d(centre.to(images.dtype), kernel_size=9, stride=STRIDE, padding=4, count_include_pad=False)

    def forward(self, images: torch.Tensor, center_map: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> beliefs of every stage (B, T, P+1, H/8, W/8)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-1] % STRIDE or images.shape[-2] % STRIDE:
            raise ValueError(f"image height and width must be multiples of {STRIDE}, got {tuple(images.shape[-2:])}")
        x = self.normalised_input(images)
        if self.backbone == "vgg":
            features = self.features(x)
            beliefs = self.stage1(features)
        else:
            beliefs = self.stage1(x)
            features = self.trunk(x) if self.stages >= 2 else None
        outputs = [beliefs]
        if self.stages >= 2:
            centre = self.pooled_center_map(images, center_map).to(features.dtype)
            centre = centre.expand(images.shape[0], -1, -1, -1)
            for stage in self.later_stages:
                beliefs = stage(features, beliefs.to(features.dtype), centre)
                outputs.append(beliefs)
        return torch.stack(outputs, dim=1)


def load_vgg_weights(model: CPM, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy torchvision vgg19 conv1_1 .. conv4_2 weights (`features.N.weight/bias`) into a vgg CPM.

    Accepts a torchvision-style state dict (a leading "module." is ignored, other keys such as the
    classifier's are skipped). Returns the keys loaded. Raises naming every missing key and every
    shape mismatch (a width != 1 model cannot take ImageNet weights).
    """
    if model.backbone != "vgg":
        raise ValueError(f"load_vgg_weights needs a vgg-backbone CPM, this one is {model.backbone!r}")
    source = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    own = model.state_dict()
    pairs, missing, mismatched = [], [], []
    for index, name in model.vgg_layer_names.items():
        for suffix in ("weight", "bias"):
            src_key, dst_key = f"features.{index}.{suffix}", f"{name}.{suffix}"
            if src_key not in source:
                missing.append(src_key)
            elif tuple(source[src_key].shape) != tuple(own[dst_key].shape):
                mismatched.append(f"{src_key}: expected {tuple(own[dst_key].shape)}, "
                                  f"got {tuple(source[src_key].shape)}")
            else:
                pairs.append((src_key, dst_key))
    if missing or mismatched:
        problems = ([f"missing keys {missing}"] if missing else []) + (
            [f"shape mismatches: {'; '.join(mismatched)}"] if mismatched else [])
        raise ValueError("cannot load VGG-19 weights: " + " | ".join(problems))
    with torch.no_grad():
        for src_key, dst_key in pairs:
            own[dst_key].copy_(source[src_key].to(own[dst_key].dtype))
    return [src_key for src_key, _ in pairs]


__all__ = ["CPM", "STRIDE", "center_map", "load_vgg_weights", "scaled_channels"]
