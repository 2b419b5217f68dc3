"""Train the example classifier on MNI152 patches and save it as TorchScript.

A small CNN (three conv blocks → the central 4×4 of the feature map → linear) classifies the
tissue at the centre of a 48×48 T1 patch (csf_other / grey_matter / white_matter). Inputs are the patches
scaled to [0, 1] (divide by 255) and normalised with mean 0.5, std 0.25, exactly as the
example config tells medaudit. Deterministic on CPU for a given seed.

Usage: python examples/train_example.py [--data examples/mni-patches] [--out examples/model.pt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn


class PatchNet(nn.Module):
    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 4 * 4, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        # The label is the tissue at the patch centre, so keep where things are: centre 4×4 cells.
        h, w = f.shape[-2] // 2, f.shape[-1] // 2
        return self.classifier(f[:, :, h - 2:h + 2, w - 2:w + 2])


def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as d:
        x = torch.from_numpy(d["images"].astype(np.float32) / 255.0)[:, None]
        y = torch.from_numpy(d["labels"])
    return (x - 0.5) / 0.25, y


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=here / "mni-patches")
    ap.add_argument("--out", type=Path, default=here / "model.pt")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x, y = load(args.data / "train.npz")
    xt, yt = load(args.data / "test.npz")
    model = PatchNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.3f}")
    model.eval()
    torch.jit.save(torch.jit.script(model), str(args.out))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
