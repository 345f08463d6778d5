"""Gradient magnitudes during training, stage by stage and layer by layer (the paper's Fig. 5).

At a few evenly spaced steps of each epoch, between backward and the optimizer step, a
`GradientSampler` measures on the device:
- per stage t: the L2 norm of the gradient of all of stage t's parameters (`CPM.stage_parameters`),
  logged per epoch as grad_norm_stage{t};
- per convolution (weight and bias together), in forward order with its stage: the L2 norm and a
  histogram of log10 |grad| over its elements (fixed half-decade bins; values below the range,
  zeros included, fall in the first bin, values above it in the last).
Each epoch's values are the means over its sampled steps. Everything stays on the device until the
epoch's end, when one copy brings it to the host: the other steps pay nothing but a set lookup.
A frozen stage (stage-wise training) has no gradient: its norms are 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

SAMPLED_STEPS_PER_EPOCH = 4
HISTOGRAM_LOG10_MIN, HISTOGRAM_LOG10_MAX, HISTOGRAM_BINS = -12.0, 2.0, 28  # half a decade per bin
GRADIENTS_FILE = "gradients.json"
FORMAT_VERSION = 1


def sampled_steps(steps: int, samples: int = SAMPLED_STEPS_PER_EPOCH) -> list[int]:
    """The 1-based steps measured in an epoch of `steps`: the middle of each of `samples` equal
    parts (every step when there are fewer steps than samples)."""
    samples = min(samples, steps)
    return sorted({int((i + 0.5) * steps / samples) + 1 for i in range(samples)})


def conv_layers(model: nn.Module) -> list[dict]:
    """Every convolution of a CPM as {"name", "stage", "depth", "module"}: stage by stage and in
    forward order within a stage (so stage 1's first convolution is depth 0, the last stage's
    output convolution the last)."""
    names = {id(module): name for name, module in model.named_modules()}
    layers = []
    for stage in range(1, model.stages + 1):
        for root in model.stage_modules(stage):
            for module in root.modules():
                if isinstance(module, nn.Conv2d):
                    layers.append({"name": names[id(module)], "stage": stage, "depth": len(layers), "module": module})
    return layers


def _grads(parameters) -> list[torch.Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def grad_norm(parameters, device) -> torch.Tensor:
    """L2 norm of the gradient of `parameters` taken together (0 when none has a gradient), a
    float64 scalar on `device`, computed without leaving it."""
    grads = _grads(parameters)
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.nn.utils.get_total_norm(grads).double()


def log10_histogram(grads: list[torch.Tensor], device) -> torch.Tensor:
    """Counts of log10 |g| over the elements of `grads`, in the fixed bins (float64, on `device`)."""
    if not grads:
        return torch.zeros(HISTOGRAM_BINS, dtype=torch.float64, device=device)
    values = torch.cat([g.detach().reshape(-1).float() for g in grads]).abs().log10()
    values = values.clamp(HISTOGRAM_LOG10_MIN, HISTOGRAM_LOG10_MAX)  # -inf (zeros) -> the first bin
    return torch.histc(values, HISTOGRAM_BINS, HISTOGRAM_LOG10_MIN, HISTOGRAM_LOG10_MAX).double()


def histogram_edges() -> list[float]:
    step = (HISTOGRAM_LOG10_MAX - HISTOGRAM_LOG10_MIN) / HISTOGRAM_BINS
    return [HISTOGRAM_LOG10_MIN + i * step for i in range(HISTOGRAM_BINS + 1)]


class GradientSampler:
    """Measures the gradients of `model` (the CPM itself, not a DDP or compiled wrapper: they share
    its parameters) at the sampled steps of one epoch of `steps` steps."""

    def __init__(self, model: nn.Module, steps: int, device, samples: int = SAMPLED_STEPS_PER_EPOCH):
        self.device = device
        self.steps = set(sampled_steps(steps, samples))
        self.stage_parameters = [model.stage_parameters(t) for t in range(1, model.stages + 1)]
        self.layers = conv_layers(model)
        self.sizes = [sum(p.numel() for p in layer["module"].parameters()) for layer in self.layers]
        # One row per sampled step: [stage norms..., layer norms..., layer histograms (flat)...].
        self.rows: list[torch.Tensor] = []
        self.taken: list[int] = []

    def after_backward(self, step: int) -> None:
        """Call between backward and the optimizer step, with the 1-based step number."""
        if step not in self.steps:
            return
        stages = [grad_norm(params, self.device) for params in self.stage_parameters]
        layer_grads = [_grads(layer["module"].parameters()) for layer in self.layers]
        norms = [grad_norm(layer["module"].parameters(), self.device) for layer in self.layers]
        hists = [log10_histogram(grads, self.device) for grads in layer_grads]
        self.rows.append(torch.cat([torch.stack(stages), torch.stack(norms), torch.cat(hists)]))
        self.taken.append(step)

    def epoch_summary(self) -> dict:
        """The epoch's means over its sampled steps, on the host (the one device-to-host copy):
        {"sampled_steps", "stage_grad_norm": [per stage], "layer_grad_norm": [per layer],
        "layer_histogram": [per layer: fraction of its gradient's elements per bin]}."""
        if not self.rows:
            return {}
        mean = torch.stack(self.rows).mean(dim=0).cpu().tolist()
        stages, layers = len(self.stage_parameters), len(self.layers)
        counts = mean[stages + layers:]
        return {"sampled_steps": list(self.taken), "stage_grad_norm": mean[:stages],
                "layer_grad_norm": mean[stages:stages + layers],
                "layer_histogram": [[c / size for c in counts[i * HISTOGRAM_BINS:(i + 1) * HISTOGRAM_BINS]]
                                    for i, size in enumerate(self.sizes)]}


def gradients_record(model: nn.Module, epochs: list[dict]) -> dict:
    """What gradients.json holds: the layers (name, stage, depth) and each epoch's summary."""
    return {"format_version": FORMAT_VERSION, "sampled_steps_per_epoch": SAMPLED_STEPS_PER_EPOCH,
            "stages": model.stages, "histogram_log10_edges": histogram_edges(),
            "layers": [{k: layer[k] for k in ("name", "stage", "depth")} for layer in conv_layers(model)],
            "epochs": epochs}


def write_gradients_file(model: nn.Module, epochs: list[dict], directory: Path) -> Path | None:
    """gradients.json in `directory` (None, and no file, when no epoch was measured)."""
    if not epochs:
        return None
    path = Path(directory) / GRADIENTS_FILE
    path.write_text(json.dumps(gradients_record(model, epochs)))
    return path
