"""Segmentation audit overhead: ``medaudit run`` on a MONAI UNet against a bare inference loop.

Both sides run as fresh processes on the same TorchScript UNet, data, device and batch size, doing
the same forward passes (clean + every perturbation × severity). The baseline loop only runs the
model and takes the arg-max map; the audit also perturbs (moving the masks with geometric
perturbations), computes per image Dice/IoU, HD95, ASSD, NSD (an exact distance transform on the
device) and the voxel calibration statistics, then the bootstrap, detectors and report.

Prints wall times, the ratio medaudit ÷ baseline (target ≤ 1.3 on CPU) and each process's peak
resident memory, which should not grow with the number of voxels kept per image: the audit keeps
per-image values, never the probability maps.

Usage::

    python benchmarks/segmentation.py --dims 2 --size 256 --n 32
    python benchmarks/segmentation.py --dims 3 --size 96 --n 8 --batch-size 2
    python benchmarks/segmentation.py --channels 8,16,32 --res-units 0   # a toy UNet
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import timed  # noqa: E402  (the same fresh-process timing as the classifier benchmark)

BASELINE = r"""
import sys, time, numpy as np, torch
model_path, data_path, scenarios, batch, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t0 = time.perf_counter()
model = torch.jit.load(model_path, map_location=device).eval()
with np.load(data_path) as d:
    x = torch.from_numpy(d["images"].astype(np.float32) / 255.0)[:, None]
x = (x - 0.5) / 0.25
with torch.inference_mode():
    for _ in range(scenarios):
        for i in range(0, len(x), batch):
            labels = model(x[i:i + batch].to(device)).argmax(dim=1).cpu()
if device.startswith("cuda"):
    torch.cuda.synchronize()
print(time.perf_counter() - t0)
"""


def make_data(out: Path, n: int, size: int, dims: int) -> Path:
    """Bright ellipsoids of random size and position on a dark, noisy background, with their masks."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(size) + 0.5] * dims, indexing="ij"))
    images, masks = [], []
    for _ in range(n):
        centre = rng.uniform(0.35, 0.65, dims) * size
        radii = rng.uniform(0.12, 0.25, dims) * size
        inside = (((grid - centre.reshape(-1, *[1] * dims)) / radii.reshape(-1, *[1] * dims)) ** 2).sum(0) < 1
        images.append(np.clip(np.where(inside, 180, 40) + rng.normal(0, 10, inside.shape), 0, 255).astype(np.uint8))
        masks.append(inside.astype(np.uint8))
    path = out / f"seg-{dims}d-{n}-{size}.npz"
    np.savez(path, images=np.stack(images), masks=np.stack(masks))
    return path


class _Working(torch.nn.Module):
    """The UNet's full forward pass plus a fixed intensity threshold, so the model segments the
    ellipsoids: an untrained network is near chance, and medaudit's preprocessing probe then tries
    every other input spec — a cost an audit of a working model never pays."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # intensity 110 of 255 after the (x / 255 − 0.5) / 0.25 normalisation of the configs below
        z = 10.0 * (x[:, :1] - (110.0 / 255.0 - 0.5) / 0.25)
        return 1e-3 * self.net(x) + torch.cat([-z, z], dim=1)


def make_model(out: Path, dims: int, size: int, channels: tuple[int, ...], res_units: int) -> Path:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=dims, in_channels=1, out_channels=2, channels=channels,
               strides=(2,) * (len(channels) - 1), num_res_units=res_units).eval()
    path = out / f"unet{dims}d.pt"
    torch.jit.save(torch.jit.trace(_Working(net).eval(), torch.zeros(1, 1, *[size] * dims)), str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, choices=[2, 3], default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--perturbations", default="mri.noise,mri.bias_field,geometry.rotation,intensity.gamma")
    ap.add_argument("--severities", default="1,3,5")
    ap.add_argument("--bootstrap", type=int, default=200)
    # MONAI's tutorial UNet (spleen segmentation): a model of the size teams deploy. "8,16,32" with
    # --res-units 0 is a toy whose forward pass costs less than any exact surface metric.
    ap.add_argument("--channels", default="16,32,64,128,256")
    ap.add_argument("--res-units", type=int, default=2)
    args = ap.parse_args()
    names = args.perturbations.split(",")
    severities = args.severities.split(",")
    n_scenarios = 1 + len(names) * len(severities)
    print(f"# medaudit segmentation benchmark — torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}")
    print(f"{args.dims}D {args.size}^{args.dims}, N={args.n}, {n_scenarios} scenarios, batch {args.batch_size}, "
          f"MONAI UNet channels {args.channels}, {args.res_units} residual units")
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        channels = tuple(int(c) for c in args.channels.split(","))
        data = make_data(tmpdir, args.n, args.size, args.dims)
        model = make_model(tmpdir, args.dims, args.size, channels, args.res_units)
        cfg = tmpdir / "seg.yaml"
        cfg.write_text(f"input: {{channels: 1, dims: {args.dims}, mean: [0.5], std: [0.25], "
                       "intensity: {scaling: fixed, max_value: 255}}\n"
                       "task: {type: segmentation, classes: [background, object]}\n")
        base_wall, _, base_rss = timed([sys.executable, "-c", BASELINE, str(model), str(data), str(n_scenarios),
                                        str(args.batch_size), args.device])
        out = tmpdir / "out"
        cmd = [sys.executable, "-m", "medaudit.cli", "run", str(model), "--data", str(data), "--config", str(cfg),
               "--out", str(out), "--device", args.device, "--batch-size", str(args.batch_size),
               "--model-batch-size", str(args.batch_size), "--quiet", "--bootstrap", str(args.bootstrap),
               "--severities", args.severities]
        for name in names:
            cmd += ["--perturbation", name]
        audit_wall, _, audit_rss = timed(cmd)
        timing = json.loads((out / "results.json").read_text())["timing"]
        print(f"baseline {base_wall:.1f} s ({base_rss:.0f} MiB)   medaudit {audit_wall:.1f} s ({audit_rss:.0f} MiB)   "
              f"ratio {audit_wall / base_wall:.2f}")
        print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing["phases"].items()))


if __name__ == "__main__":
    main()
