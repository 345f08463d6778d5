"""Does the synthetic data need whole-body context to tell left from right? A 5-minute CPU check.

Trains two tiny fully-convolutional heatmap networks on the embedded synthetic set
(preprocessing.datasets.synthetic) for the same wall-clock budget and scores them on held-out
samples:
- small receptive field: a 3-conv trunk (stride 4, 18 px receptive field, about a quarter of the
  person's height at 96 px input) followed by 1x1 convolutions;
- large receptive field: the same trunk and head plus a context branch (pooled to stride 16, three
  3x3 convolutions, upsampled and concatenated): 142 px receptive field, more than the image.
Reported per network: PCK@0.2 (torso = left shoulder to right hip, in original image pixels),
PCK@0.2 when left and right are not told apart (a limb joint also counts as correct at the other
side's location: localisation alone), and the left/right swap rate (the fraction of limb joints
predicted closer to the opposite side's ground truth than to their own).
Expected: the small network localises limbs but swaps about half of them; the large one swaps far
fewer and has a higher PCK. Measured (generator version 2, seed 0, 1,500 training and 417 held-out
samples, 180 s per network on one loaded CPU core):
    small RF  18 px (0.26 x person height),  760 steps: PCK@0.2 31.0%, swap rate 43.6% (wrists+ankles 49.7%)
    large RF 142 px (2.04 x person height), 1063 steps: PCK@0.2 73.6%, swap rate 10.2% (wrists+ankles 24.0%)
The large network's swap rate starts at chance and falls (44% -> 16% -> 10% at 1, 2, 3 minutes)
as it learns to read the front/back cue; a run much shorter than about 2 minutes shows no effect.

    python bench/synthetic_check.py                 # 3 min per network on one core
    python bench/synthetic_check.py --seconds 60    # quicker, noisier
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpm_model.joints import LSP  # noqa: E402
from preprocessing.datasets.synthetic import SyntheticDataset  # noqa: E402

STRIDE = 4
FLIP_PERM = LSP.flip_permutation()
LIMB_JOINTS = np.array(sorted(j for pair in LSP.flip_pairs for j in pair))


def load_split(ds: SyntheticDataset, indices: np.ndarray, size: int):
    """Images downscaled to size x size (uint8 NCHW) and joints (N, 14, 2) in those pixels."""
    scale = size / ds.image_size
    images = np.empty((len(indices), 3, size, size), dtype=np.uint8)
    joints = np.empty((len(indices), 14, 2), dtype=np.float32)
    joints_orig = np.empty((len(indices), 14, 2), dtype=np.float64)
    for k, i in enumerate(indices):
        img = cv2.resize(ds.load_image(int(i)), (size, size), interpolation=cv2.INTER_AREA)
        images[k] = img.transpose(2, 0, 1)
        xy = ds.sample(int(i)).joints[:, :2]
        joints_orig[k] = xy
        joints[k] = (xy + 0.5) * scale - 0.5  # pixel centres at integers in both images
    return torch.from_numpy(images), torch.from_numpy(joints), joints_orig


def render_heatmaps(joints: torch.Tensor, size: int, sigma_cells: float = 1.0) -> torch.Tensor:
    """Gaussian targets (N, 14, size/STRIDE, size/STRIDE); cell i's centre is input pixel 4i + 1.5."""
    hm = size // STRIDE
    centres = torch.arange(hm, dtype=torch.float32) * STRIDE + (STRIDE - 1) / 2.0
    sigma = sigma_cells * STRIDE
    dx = centres[None, None, None, :] - joints[..., 0, None, None]
    dy = centres[None, None, :, None] - joints[..., 1, None, None]
    return torch.exp(-(dx**2 + dy**2) / (2 * sigma**2))


def conv(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class HeatmapNet(nn.Module):
    """Trunk to stride 4, then either 1x1 convolutions (small receptive field) or, for the large
    receptive field, a cheap context branch pooled to stride 16 whose output is upsampled and
    concatenated with the stride-4 features before the same 1x1 head."""

    def __init__(self, large_rf: bool, width: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(conv(3, 16), nn.MaxPool2d(2), conv(16, 32), nn.MaxPool2d(2), conv(32, width))
        self.context = None
        if large_rf:
            self.context = nn.Sequential(nn.MaxPool2d(2), conv(width, width), nn.MaxPool2d(2),
                                         conv(width, width), conv(width, width), conv(width, width))
        head_in = 2 * width if large_rf else width
        self.head = nn.Sequential(conv(head_in, width, 1), conv(width, width, 1), nn.Conv2d(width, 14, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        if self.context is not None:
            c = nn.functional.interpolate(self.context(f), size=f.shape[-2:], mode="bilinear", align_corners=False)
            f = torch.cat([f, c], 1)
        return self.head(f)


def receptive_field(net: HeatmapNet) -> int:
    """Receptive field in input pixels: trunk, then (if present) the context branch."""
    rf, jump = 1, 1
    layers = list(net.trunk.modules()) + (list(net.context.modules()) if net.context is not None else [])
    for m in layers:
        if isinstance(m, nn.Conv2d):
            rf += (m.kernel_size[0] - 1) * m.dilation[0] * jump
        elif isinstance(m, nn.MaxPool2d):
            rf += (m.kernel_size - 1) * jump
            jump *= m.stride
    return rf


def decode(heatmaps: torch.Tensor) -> np.ndarray:
    """Arg-max with a parabolic sub-cell refinement, in input pixels. (N, 14, H, W) -> (N, 14, 2)."""
    n, p, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, p, -1)
    idx = flat.argmax(-1)
    y, x = (idx // w).numpy(), (idx % w).numpy()
    hmn = heatmaps.numpy()
    out = np.stack([x, y], -1).astype(np.float64)
    for a in range(n):
        for b in range(p):
            yy, xx, m = y[a, b], x[a, b], hmn[a, b]
            if 0 < xx < w - 1:
                l, c, r = m[yy, xx - 1], m[yy, xx], m[yy, xx + 1]
                den = l - 2 * c + r
                if den < 0:
                    out[a, b, 0] += float(np.clip(0.5 * (l - r) / den, -0.5, 0.5))
            if 0 < yy < h - 1:
                u, c, d = m[yy - 1, xx], m[yy, xx], m[yy + 1, xx]
                den = u - 2 * c + d
                if den < 0:
                    out[a, b, 1] += float(np.clip(0.5 * (u - d) / den, -0.5, 0.5))
    return out * STRIDE + (STRIDE - 1) / 2.0


def evaluate(net: nn.Module, images: torch.Tensor, gt_orig: np.ndarray, size: int, orig_size: int) -> dict:
    net.eval()
    preds = []
    with torch.no_grad():
        for s in range(0, len(images), 64):
            preds.append(decode(net(images[s:s + 64].float() / 255.0 - 0.5)))
    pred = np.concatenate(preds)
    pred = (pred + 0.5) * (orig_size / size) - 0.5  # back to original image pixels
    torso = np.linalg.norm(gt_orig[:, LSP.torso_pair[0]] - gt_orig[:, LSP.torso_pair[1]], axis=-1)
    dist_own = np.linalg.norm(pred - gt_orig, axis=-1) / torso[:, None]
    dist_other = np.linalg.norm(pred - gt_orig[:, FLIP_PERM], axis=-1) / torso[:, None]
    correct = dist_own <= 0.2
    correct_any_side = correct | (dist_other <= 0.2)
    swapped = dist_other[:, LIMB_JOINTS] < dist_own[:, LIMB_JOINTS]
    per_joint = correct.mean(0)
    return {
        "pck@0.2": float(correct.mean()),
        "pck@0.2_side_agnostic": float(correct_any_side.mean()),
        "swap_rate": float(swapped.mean()),
        "swap_rate_wrists_ankles": float(swapped[:, np.isin(LIMB_JOINTS, [0, 5, 6, 11])].mean()),
        "per_joint": {LSP.names[j]: round(float(per_joint[j]), 3) for j in range(14)},
    }


def train(net: nn.Module, images: torch.Tensor, joints: torch.Tensor, size: int, seconds: float,
          batch: int, lr: float, seed: int, progress=None, progress_every: float = 0.0) -> int:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    n = len(images)
    steps, start = 0, time.perf_counter()
    lr_dropped = False
    next_report = progress_every
    while time.perf_counter() - start < seconds:
        if not lr_dropped and time.perf_counter() - start > 0.8 * seconds:
            for g in opt.param_groups:
                g["lr"] = lr * 0.1
            lr_dropped = True
        net.train()
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = images[idx].float() / 255.0 - 0.5
        j = joints[idx].clone()
        # Horizontal flip with left/right swap (consistent with the data's labelling rule).
        flip = torch.rand(batch, generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        j[flip] = j[flip][:, FLIP_PERM]
        j[flip, :, 0] = size - 1 - j[flip, :, 0]
        target = render_heatmaps(j, size)
        loss = ((net(x) - target) ** 2).sum() / (2 * batch)  # Caffe-style Euclidean loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if progress is not None and progress_every > 0 and time.perf_counter() - start > next_report:
            progress(steps)
            next_report += progress_every
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="training wall-clock budget per network")
    ap.add_argument("--size", type=int, default=96, help="network input size (images are downscaled)")
    ap.add_argument("--train", type=int, default=1500, help="number of training samples")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=("small_rf", "large_rf"), help="train one of the two networks")
    ap.add_argument("--progress-every", type=float, default=0.0, help="seconds between held-out evaluations")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ds = SyntheticDataset(num_samples=2000, seed=args.seed, image_size=160)
    train_idx = ds.split_indices("train")[: args.train]
    test_idx = np.concatenate([ds.split_indices("val"), ds.split_indices("test")])
    t0 = time.perf_counter()
    tr_img, tr_joints, _ = load_split(ds, train_idx, args.size)
    te_img, _, te_orig = load_split(ds, test_idx, args.size)
    heights = [ds.sample(int(i)).extras["person_height_px"] * args.size / ds.image_size for i in train_idx]
    print(f"data: {len(train_idx)} train / {len(test_idx)} held-out samples rendered and resized in "
          f"{time.perf_counter() - t0:.1f} s; input {args.size} px, mean person height "
          f"{np.mean(heights):.0f} px")

    results = {}
    for name, large in (("small_rf", False), ("large_rf", True)):
        if args.only and name != args.only:
            continue
        torch.manual_seed(0)
        net = HeatmapNet(large)
        rf = receptive_field(net)

        def progress(steps, net=net, name=name):
            r = evaluate(net, te_img, te_orig, args.size, ds.image_size)
            print(f"  {name} step {steps}: PCK@0.2 {100 * r['pck@0.2']:.1f}%, swap {100 * r['swap_rate']:.1f}%",
                  flush=True)

        steps = train(net, tr_img, tr_joints, args.size, args.seconds, args.batch, args.lr, seed=1,
                      progress=progress, progress_every=args.progress_every)
        res = evaluate(net, te_img, te_orig, args.size, ds.image_size)
        res.update(receptive_field_px=rf, rf_over_person_height=rf / np.mean(heights), steps=steps)
        results[name] = res
        print(f"{name}: receptive field {rf} px ({rf / np.mean(heights):.2f} x person height), {steps} steps "
              f"of batch {args.batch}: PCK@0.2 {100 * res['pck@0.2']:.1f}%, side-agnostic PCK@0.2 "
              f"{100 * res['pck@0.2_side_agnostic']:.1f}%, left/right swap rate {100 * res['swap_rate']:.1f}% "
              f"(wrists+ankles {100 * res['swap_rate_wrists_ankles']:.1f}%)")
        print(f"  per joint PCK@0.2: {res['per_joint']}")
    if len(results) < 2:
        return
    ok = results["large_rf"]["swap_rate"] < 0.5 * results["small_rf"]["swap_rate"] and (
        results["large_rf"]["pck@0.2"] > results["small_rf"]["pck@0.2"])
    print("expected effect (large RF: less than half the swaps and a higher PCK):", "yes" if ok else "NO")


if __name__ == "__main__":
    main()
