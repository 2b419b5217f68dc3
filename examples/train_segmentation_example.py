"""Train the example segmentation network on MNI152 slices and save it as TorchScript.

A small UNet (16–32–64 channels, two 2× downsamplings, BatchNorm/ReLU; the 64-channel 24×24
bottleneck is the submodule ``bottleneck``, which examples/mni-slices.yaml names as
``model.feature_layer``) labels every pixel of a 96×96 axial T1 slice as background / grey_matter /
white_matter and outputs logits ``[N, 3, 96, 96]``. Inputs are the slices scaled to [0, 1] (divide
by 255) and normalised with mean 0.5, std 0.25, exactly as the example config tells medaudit.

The loss is cross-entropy plus a soft Dice over the two tissue classes (the thin grey-matter ribbon
is what Dice rewards). The training set is a few dozen slices of one averaged brain, so each batch
gets a little variety on the fly: a shift of up to ±6 pixels (sub-pixel too) and a left-right flip
(applied to the image and its mask alike) and an intensity gain in [0.85, 1.15]. Deterministic on
CPU for a given seed and thread count. Prints the clean mean foreground Dice on the test set at the
end.

Usage: python examples/train_segmentation_example.py [--data examples/mni-slices] [--out examples/segmentation_model.pt]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

CLASSES = ["background", "grey_matter", "white_matter"]
MEAN, STD = 0.5, 0.25
SHIFT = 6  # pixels


def block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3×3 convolutions, each followed by BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class SliceUNet(nn.Module):
    """UNet with two levels: 96² (16 ch) → 48² (32 ch) → bottleneck 24² (64 ch) → back up to 96²."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.enc1 = block(1, 16)
        self.enc2 = block(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = block(32, 64)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec2 = block(64, 32)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec1 = block(32, 16)
        self.head = nn.Conv2d(16, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] ``[N, 1, 96, 96]`` float32 (not yet normalised) and masks ``[N, 96, 96]`` int64."""
    with np.load(path) as d:
        x = torch.from_numpy(d["images"].astype(np.float32) / 255.0)[:, None]
        y = torch.from_numpy(d["masks"].astype(np.int64))
    return x, y


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice: a shift of up to ±SHIFT pixels in each direction, in fractions of a pixel too
    (image resampled bilinearly, mask by the nearest pixel, zero/background outside), a left-right
    flip with probability 1/2 (image and mask alike) and an intensity gain in [0.85, 1.15].

    Sub-pixel shifts matter: bilinear resampling smooths the image a little, and a network that has
    only seen the template's pixels as they are loses much of its Dice on a slightly smoothed slice."""
    n, h, w = y.shape
    shift = (2 * torch.rand(n, 2, generator=gen) - 1) * SHIFT  # pixels, (x, y)
    flip = torch.rand(n, generator=gen) < 0.5
    gain = 0.85 + 0.3 * torch.rand(n, generator=gen)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0)
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2 * shift[:, 0] / w  # normalised coordinates (align_corners=False)
    theta[:, 1, 2] = 2 * shift[:, 1] / h
    grid = nn.functional.affine_grid(theta, [n, 1, h, w], align_corners=False)
    xs = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ys = nn.functional.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return (xs * gain[:, None, None, None]).clamp(0, 1), ys[:, 0].round().long()


def soft_dice_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 − the soft Dice of the tissue classes (1 and 2), over the whole batch."""
    p = logits.softmax(1)[:, 1:]
    t = nn.functional.one_hot(y, len(CLASSES)).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (p * t).sum((0, 2, 3))
    return 1 - (2 * inter / (p.sum((0, 2, 3)) + t.sum((0, 2, 3)) + 1e-6)).mean()


def dice_per_class(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dice of grey and white matter per slice, ``[N, 2]`` (NaN where a class is in neither map)."""
    out = []
    for k in range(1, len(CLASSES)):
        p, t = pred == k, y == k
        inter = (p & t).sum((1, 2)).float()
        total = (p.sum((1, 2)) + t.sum((1, 2))).float()
        out.append(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.full_like(total, float("nan"))))
    return torch.stack(out, 1)


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=here / "mni-slices")
    ap.add_argument("--out", type=Path, default=here / "segmentation_model.pt")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    x, y = load(args.data / "train.npz")
    xt, yt = load(args.data / "test.npz")
    model = SliceUNet(len(CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * ((len(x) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)

    def evaluate() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return dice_per_class(model(normalise(xt)).argmax(1), yt)

    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = augment(x[idx], y[idx], gen)
            logits = model(normalise(xb))
            loss = nn.functional.cross_entropy(logits, yb) + soft_dice_loss(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            dice = evaluate().nanmean(0)
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test Dice grey {dice[0]:.3f} white {dice[1]:.3f} "
                  f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    dice = evaluate()
    mean = dice.nanmean(1).mean().item()  # each slice's mean over its tissue classes, then over slices
    print(f"clean test Dice: mean foreground {mean:.3f}, grey_matter {dice[:, 0].nanmean():.3f}, "
          f"white_matter {dice[:, 1].nanmean():.3f} ({len(xt)} slices)")
    torch.jit.save(torch.jit.script(model), str(args.out))
    print(f"saved {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
