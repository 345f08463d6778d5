"""The CPM training loss: L2 between predicted and ideal belief maps, at every stage."""

from __future__ import annotations

import contextlib

import torch

REDUCTIONS = ("sum", "mean")


def belief_map_loss(pred: torch.Tensor, target: torch.Tensor, part_mask: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """Each stage's squared error between its beliefs and the ideal maps: a (T,) tensor.

    pred (B, T, P+1, h, w); target (B, P+1, h, w); part_mask (B, P), true/nonzero where the part is
    annotated. Unannotated parts' maps are left out of the loss; the background map always counts.
    Per stage t, with S_t = sum over samples, valid maps and pixels of (pred_t - target)^2:
      "sum":  S_t / (2 B)  -- Caffe's EuclideanLoss, which the paper's lr (8e-5) assumes;
      "mean": S_t / (number of valid map pixels, h * w * sum of valid maps)  -- MMPose-like MSE.
    So sum / mean = (valid maps per sample) * h * w / 2, e.g. 15 * 46 * 46 / 2 = 15870 when all
    14 parts are annotated at 368 px: the "sum" gradients are that much larger.
    Returns the (T,) per-stage terms with their gradient, fp32 even under autocast; the caller
    picks the objective: `.sum()` (intermediate supervision), `[-1]` (last stage only) or
    `[t - 1]` (stage-wise training of stage t), and logs `.detach()`.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if pred.dim() != 5:
        raise ValueError(f"pred must have shape (B, T, P+1, h, w), got {tuple(pred.shape)}")
    batch, _, num_maps = pred.shape[:3]
    if tuple(target.shape) != (batch, *pred.shape[2:]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match pred {tuple(pred.shape)} without T")
    if tuple(part_mask.shape) != (batch, num_maps - 1):
        raise ValueError(f"part_mask must have shape {(batch, num_maps - 1)}, got {tuple(part_mask.shape)}")
    device_type = pred.device.type
    no_autocast = (torch.autocast(device_type=device_type, enabled=False)
                   if torch.amp.is_autocast_available(device_type) else contextlib.nullcontext())
    with no_autocast:
        pred32, target32 = pred.float(), target.float()
        background = torch.ones(batch, 1, device=pred.device)
        map_weight = torch.cat([(part_mask.to(pred.device) != 0).float(), background], dim=1)  # (B, P+1)
        squared = (pred32 - target32[:, None]) ** 2  # (B, T, P+1, h, w)
        per_map = squared.sum(dim=(-2, -1))  # (B, T, P+1)
        per_stage = (per_map * map_weight[:, None, :]).sum(dim=(0, 2))  # (T,)
        if reduction == "sum":
            per_stage = per_stage / (2.0 * batch)
        else:
            pixels_per_map = pred.shape[-2] * pred.shape[-1]
            per_stage = per_stage / (map_weight.sum() * pixels_per_map)
    return per_stage


__all__ = ["belief_map_loss", "REDUCTIONS"]
