"""End-to-end overhead of ``medaudit run`` against a plain inference loop.

Both sides run as fresh processes (imports included) on the same model, data, device and batch
size, doing the same number of forward passes (clean + every perturbation × severity):

* baseline: ``torch.jit.load`` + ``np.load`` + one ``torch.inference_mode()`` loop per scenario
  (contiguous tensors; ``--baseline-channels-last`` converts model and inputs to channels-last,
  the format ``medaudit run`` picks by default on a CPU, to isolate medaudit's own overhead);
* medaudit: ``medaudit run`` — loading, dry run, perturbing on the device, metrics with the
  bootstrap, temperature scaling, OOD detectors, analyses, report and results.

Prints wall times, the ratio medaudit ÷ baseline (target ≤ 1.25 on CPU, ≤ 1.15 on a GPU), the
in-process split medaudit records in results.json, and the peak resident memory of each process.

Usage::

    python benchmarks/overhead.py --model example --n 600
    python benchmarks/overhead.py --model densenet121 --n 256 --size 128 --perturbations 4
    python benchmarks/overhead.py --model example --n 1000 --n 10000 --perturbations 2   # memory vs N
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

BASELINE = r"""
import sys, time, numpy as np, torch
model_path, data_path, scenarios, batch, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
channels_last = sys.argv[6] == "channels_last"
t0 = time.perf_counter()
model = torch.jit.load(model_path, map_location=device).eval()
with np.load(data_path) as d:
    x = torch.from_numpy(d["images"].astype(np.float32) / 255.0)[:, None]
x = ((x - 0.5) / 0.25)
if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(scenarios):
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch].to(device, non_blocking=True))
            p = torch.softmax(out.float(), 1).cpu()
if device.startswith("cuda"):
    torch.cuda.synchronize()
print(time.perf_counter() - t0)
"""


def make_data(out: Path, n: int, size: int) -> Path:
    """Tile the bundled example patches to ``n`` samples of ``size``² (real MRI content).

    Every copy after the first gets seeded noise of up to ±2 grey levels, so no two samples are
    identical: exact duplicates give every detector score as many ties as there are copies and
    knn distances of zero, which no real test set has (the fourth session's 30,000-sample runs
    were slowed by that alone).
    """
    with np.load(ROOT / "examples" / "mni-patches" / "test.npz") as d:
        images, labels = d["images"], d["labels"]
    m = len(labels)
    reps = -(-n // m)
    images, labels = np.tile(images, (reps, 1, 1))[:n], np.tile(labels, reps)[:n]
    if n > m:
        noise = np.random.default_rng(0).integers(-2, 3, size=images[m:].shape)
        images[m:] = np.clip(images[m:].astype(np.int16) + noise, 0, 255).astype(images.dtype)
    if size != images.shape[-1]:
        t = torch.from_numpy(images.astype(np.float32))[:, None]
        images = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].round().clamp(0, 255).numpy().astype(np.uint8)
    path = out / f"data-{n}-{size}.npz"
    np.savez(path, images=images, labels=labels)
    return path


def make_model(out: Path, name: str) -> Path:
    if name == "example":
        return ROOT / "examples" / "model.pt"
    from monai.networks.nets import DenseNet121, resnet18

    torch.manual_seed(0)
    net = (DenseNet121(spatial_dims=2, in_channels=1, out_channels=3) if name == "densenet121"
           else resnet18(spatial_dims=2, n_input_channels=1, num_classes=3)).eval()
    path = out / f"{name}.pt"
    torch.jit.save(torch.jit.trace(net, torch.zeros(2, 1, 64, 64)), str(path))
    return path


def make_config(out: Path, name: str) -> Path:
    """The example config without its check (a benchmark model with random weights would fail
    it), and for another model than the example's without its feature layer (medaudit picks one)."""
    text = (ROOT / "examples" / "mni-patches.yaml").read_text().replace('checks:\n  - "clean.accuracy<0.9"\n', "checks: []\n")
    if name != "example":
        text = text.replace("  feature_layer: features\n", "")
    path = out / "config.yaml"
    path.write_text(text)
    return path


def timed(cmd: list[str]) -> tuple[float, str, float]:
    """Wall seconds, stdout, and this child's peak RSS in MiB (fresh process per call)."""
    wrapper = ("import resource, subprocess, sys, time; t=time.perf_counter(); "
               "r=subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(r.stderr); print(r.stdout, end=''); "
               "print('__WALL__', time.perf_counter()-t); "
               "print('__RSS__', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(r.returncode)")
    res = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"command failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stdout[-1000:]}\n{res.stderr[-2000:]}")
    lines = res.stdout.splitlines()
    wall = float(next(line for line in lines if line.startswith("__WALL__")).split()[1])
    rss = float(next(line for line in lines if line.startswith("__RSS__")).split()[1])
    return wall, "\n".join(line for line in lines if not line.startswith("__")), rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["example", "densenet121", "resnet18"], default="example")
    ap.add_argument("--n", type=int, action="append", help="samples (repeatable); default 600")
    ap.add_argument("--size", type=int, default=48, help="image side (the example model needs 48)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--perturbations", type=int, default=0, help="use only the first K MRI-default perturbations (0: all)")
    ap.add_argument("--severities", default="1,2,3,4,5")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeats", type=int, default=1, help="time each side this many times and keep the fastest")
    ap.add_argument("--profile", type=Path, help="also run medaudit once under cProfile and write the top functions here")
    ap.add_argument("--baseline-channels-last", action="store_true",
                    help="run the baseline loop in channels-last memory format too (medaudit's own overhead when it "
                         "chose that format; without this flag the baseline is the plain loop of the issue's target)")
    args = ap.parse_args()
    sizes = args.n or [600]
    env_note = f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}"
    if args.device.startswith("cuda"):
        env_note += f" ({torch.cuda.get_device_name(0)})"
    print(f"# medaudit overhead benchmark — {env_note}")
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        model = make_model(tmpdir, args.model)
        cfg = make_config(tmpdir, args.model)
        from medaudit.config import load_config
        from medaudit.plugin_manager import get_plugin_manager
        from medaudit.runner import plan_scenarios

        config = load_config(cfg)
        pm = get_plugin_manager(warn=lambda m: None)
        _, chosen = plan_scenarios(config, pm.perturbations())
        names = sorted(chosen)[: args.perturbations or None]
        severities = [int(s) for s in args.severities.split(",")]
        n_scenarios = 1 + len(names) * len(severities)
        print(f"model {args.model}, {len(names)} perturbations × {len(severities)} severities + clean = {n_scenarios} scenarios")
        print(f"{'N':>7} {'baseline s':>11} {'medaudit s':>11} {'ratio':>6} {'fwd+perturb s':>14} {'rest s':>7} "
              f"{'base MiB':>9} {'audit MiB':>10}")
        for n in sizes:
            data = make_data(tmpdir, n, args.size)
            base_wall, _, base_rss = min(timed([sys.executable, "-c", BASELINE, str(model), str(data), str(n_scenarios),
                                                str(args.batch_size), args.device,
                                                "channels_last" if args.baseline_channels_last else "contiguous"])
                                          for _ in range(args.repeats))
            out = tmpdir / f"out-{n}"
            cmd = [sys.executable, "-m", "medaudit.cli", "run", str(model), "--data", str(data), "--config", str(cfg),
                   "--out", str(out), "--device", args.device, "--batch-size", str(args.batch_size),
                   "--model-batch-size", str(args.batch_size), "--quiet",
                   "--bootstrap", str(args.bootstrap), "--severities", args.severities, "--precision", args.precision]
            for name in names:
                cmd += ["--perturbation", name]
            runs = []
            for _ in range(args.repeats):  # keep the phases of the fastest run with its wall time
                wall, _, rss = timed(cmd)
                res = json.loads((out / "results.json").read_text())
                runs.append((wall, rss, res["timing"], res["environment"].get("memory_format", "contiguous")))
            audit_wall, audit_rss, t, memory_format = min(runs, key=lambda r: r[0])
            print(f"{n:>7} {base_wall:>11.1f} {audit_wall:>11.1f} {audit_wall / base_wall:>6.2f} "
                  f"{t['forward_seconds']:>14.1f} {audit_wall - t['forward_seconds']:>7.1f} {base_rss:>9.0f} {audit_rss:>10.0f}")
            phases = dict(t.get("phases", {}))
            # the rest: writing the outputs and the interpreter's exit (and start-up where /proc is missing)
            phases["other"] = audit_wall - sum(phases.values())
            print("        phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
            print(f"        memory format: medaudit {memory_format}, baseline "
                  f"{'channels_last' if args.baseline_channels_last else 'contiguous'}")
            if args.profile:  # a separate, untimed run: the profiler slows Python-heavy code down
                prof = tmpdir / "medaudit.prof"
                idx = cmd.index("medaudit.cli")
                subprocess.run([*cmd[:idx - 1], "-m", "cProfile", "-o", str(prof), *cmd[idx - 1:]], check=True,
                               capture_output=True)
                import io
                import pstats

                buf = io.StringIO()
                pstats.Stats(str(prof), stream=buf).sort_stats("cumulative").print_stats(60)
                pstats.Stats(str(prof), stream=buf).sort_stats("tottime").print_stats(40)
                args.profile.write_text(buf.getvalue())


if __name__ == "__main__":
    main()
