"""Throughput of every registered perturbation, and the ratio against TorchIO / MONAI.

For a 2D batch (256×256) and a 3D batch (128³) it times ``sample`` + ``apply`` of each
perturbation at severity 3 on the chosen device, and, for the transforms TorchIO or MONAI share,
the same kind of transform applied sample by sample as a dataset pipeline would (TorchIO on
``ScalarImage`` subjects, MONAI on channel-first tensors; both on the CPU). Both sides are the
best of the same number of timed repeats after a warm-up; ratios > 1 mean medaudit is faster.
Parameters of the reference transforms are matched to severity 3 of the medaudit perturbation
where the meaning is the same (see ``TORCHIO`` / ``MONAI`` below); for the MRI suite the
references are TorchIO's random transforms, at severity 3's parameters for motion, ghosting and spike
and at their defaults for the others.

    python benchmarks/perturbations.py --quick            # CPU, small batches, one repeat
    python benchmarks/perturbations.py --device cuda      # GPU throughput (references stay on CPU)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections.abc import Callable

import torch

from medaudit.perturbation import Perturbation
from medaudit.plugin_manager import get_plugin_manager
from medaudit.rng import SampleRNG, sample_keys, stream_key

Ref = Callable[[torch.Tensor], torch.Tensor]  # one [C, *spatial] sample in, one out


def _torchio() -> dict[str, Callable[[int], object]]:
    """Name -> factory(nd) of the equivalent TorchIO transform (None if torchio is missing)."""
    try:
        import torchio as tio
    except ImportError:
        return {}
    return {
        "intensity.gamma": lambda nd: tio.Gamma(gamma=1.45),                       # exp(0.375)
        "xray.noise": lambda nd: tio.Noise(mean=0.0, std=0.025, seed=0),           # read_sd, gain 0
        "xray.blur": lambda nd: tio.Blur(std=(1.1, 1.1, 0.0) if nd == 2 else 1.1),
        "xray.resolution": lambda nd: tio.RandomAnisotropy(axes=(0, 1), downsampling=(2.0, 2.6)),
        "geometry.rotation": lambda nd: tio.Affine(scales=1, degrees=(0, 0, 8.5) if nd == 2 else 5, translation=0),
        "geometry.translation": lambda nd: tio.Affine(scales=1, degrees=0, translation=6),
        "geometry.scale": lambda nd: tio.Affine(scales=1.12, degrees=0, translation=0),
        "geometry.flip_lr": lambda nd: tio.Flip(axes=(1,) if nd == 2 else (2,)),
        # motion, ghosting and spike at severity 3 (6 moves of 3-5 degrees and 2-3.5 % of a 128 mm
        # FOV; 2-3 ghosts of intensity 0.32-0.48, only the centre line restored; 2 spikes of 0.2-0.3)
        "mri.motion": lambda nd: tio.RandomMotion(degrees=(3, 5), translation=(2.6, 4.5), num_transforms=6),
        "mri.ghosting": lambda nd: tio.RandomGhosting(num_ghosts=(2, 3), intensity=(0.32, 0.48), restore=None),
        "mri.spike": lambda nd: tio.RandomSpike(num_spikes=(2, 2), intensity=(0.2, 0.3)),
        "mri.bias_field": lambda nd: tio.RandomBiasField(),
        "mri.anisotropy": lambda nd: tio.RandomAnisotropy(),
        "mri.noise": lambda nd: tio.RandomNoise(),
        "mri.gamma": lambda nd: tio.RandomGamma(),
    }


def _monai() -> dict[str, Callable[[int], object]]:
    try:
        import monai.transforms as mt
    except ImportError:
        return {}
    return {
        "intensity.gamma": lambda nd: mt.AdjustContrast(gamma=1.45),
        "intensity.contrast": lambda nd: mt.RandScaleIntensity(factors=0.5, prob=1.0),
        "intensity.histogram_shift": lambda nd: mt.RandHistogramShift(num_control_points=8, prob=1.0),
        "xray.noise": lambda nd: mt.RandGaussianNoise(prob=1.0, std=0.025),
        "xray.blur": lambda nd: mt.GaussianSmooth(sigma=1.1),
        "geometry.rotation": lambda nd: mt.Rotate(angle=0.15 if nd == 2 else (0.1, 0.1, 0.0), padding_mode="zeros"),
        "geometry.scale": lambda nd: mt.Zoom(zoom=1.12, keep_size=True, padding_mode="constant"),
        "geometry.flip_lr": lambda nd: mt.Flip(spatial_axis=nd - 1),
        "geometry.translation": lambda nd: mt.Affine(translate_params=(6.0,) * nd, padding_mode="zeros", image_only=True),
        "mri.bias_field": lambda nd: mt.RandBiasField(prob=1.0),
        "mri.gibbs": lambda nd: mt.RandGibbsNoise(prob=1.0),
        "mri.spike": lambda nd: mt.RandKSpaceSpikeNoise(prob=1.0),
        "mri.rician": lambda nd: mt.RandRicianNoise(prob=1.0),
    }


def _tio_apply(transform: object, x: torch.Tensor) -> torch.Tensor:
    import torchio as tio

    is_2d = x.ndim == 3
    img = tio.ScalarImage(tensor=x[..., None] if is_2d else x)
    out = transform(img).data  # type: ignore[operator]
    return out[..., 0] if is_2d else out


def _timeit(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (lazy init, caches, CUDA kernels)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def run(device: str, quick: bool, only: str | None, repeats: int) -> None:
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = get_plugin_manager().perturbations()
    tio_refs, monai_refs = _torchio(), _monai()
    configs = [(2, (16 if quick else 64, 1, 256, 256)), (3, (2 if quick else 8, 1, 128, 128, 128))]
    ref_samples = {2: 4 if quick else 16, 3: 1 if quick else 2}
    print(f"device={dev} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cpu={platform.processor() or platform.machine()} quick={quick}")
    if dev.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name(dev)}")
    header = f"{'perturbation':28s} {'dims':>4s} {'batch':>5s} {'medaudit/s':>11s} {'torchio/s':>10s} {'x tio':>7s} {'monai/s':>9s} {'x monai':>7s}"
    print(header)
    print("-" * len(header))
    for nd, shape in configs:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(shape, generator=gen).to(dev)
        keys = sample_keys(stream_key(0, "bench"), torch.arange(shape[0], device=dev))
        for name, (_, cls) in sorted(found.items()):
            if only and only not in name:
                continue
            if nd not in cls.dims:
                continue
            p: Perturbation = cls()

            def ours() -> torch.Tensor:
                return p(x, 3, SampleRNG(keys))[0]

            try:
                t = _timeit(ours, repeats, sync)
            except Exception as exc:  # report and go on: a broken plugin must not stop the table
                print(f"{name:28s} {nd:>4d} {shape[0]:>5d} error: {type(exc).__name__}: {exc}")
                continue
            ours_rate = shape[0] / t
            cells = [f"{name:28s} {nd:>4d} {shape[0]:>5d} {ours_rate:>11.1f}"]
            xs = x[: ref_samples[nd]].cpu()
            for refs, apply in ((tio_refs, _tio_apply), (monai_refs, lambda tr, s: tr(s))):
                if name not in refs:
                    cells.append(f"{'-':>10s} {'-':>7s}" if refs is tio_refs else f"{'-':>9s} {'-':>7s}")
                    continue
                transform = refs[name](nd)
                try:
                    # best of as many repeats as medaudit gets: one timing of a sample or two
                    # swung the 3D ratios by 2x on a shared machine
                    tr = _timeit(lambda: [apply(transform, s) for s in xs], repeats, lambda: None)
                    rate = xs.shape[0] / tr
                    width = 10 if refs is tio_refs else 9
                    cells.append(f"{rate:>{width}.1f} {ours_rate / rate:>7.1f}")
                except Exception as exc:
                    cells.append(f" ref error: {type(exc).__name__}")
            print(" ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--quick", action="store_true", help="small batches, one timed repeat")
    ap.add_argument("--only", default=None, help="only perturbations whose name contains this")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (best is kept)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    repeats = args.repeats or (1 if args.quick else 3)
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    run(args.device, args.quick, args.only, repeats)


if __name__ == "__main__":
    main()
