"""Encoder audit overhead: ``medaudit run`` on a ViT-S/14 (DINOv2 shape) against a bare inference loop.

Both sides run as fresh processes on the same TorchScript encoder (Hugging Face ``Dinov2Model``
with ViT-S/14's shape — 384 wide, 12 blocks, 6 heads, patch 14 — random weights, nothing is
downloaded), the same grey data, device and batch size, doing the same forward passes: the audit
set clean and under every perturbation × severity, plus one clean pass over the reference set.
The baseline loop replicates the grey image to 3 channels, normalises with ImageNet's mean/std
(the ``dinov2`` preset), runs the model and keeps the pooled embedding (``pooler_output``) on the
device. The audit (``task.type: embedding`` with ``--reference``) also perturbs on the device,
fits the linear and k-NN probes on the reference embeddings once and applies them to every
scenario, scores the feature-based OOD detectors, computes the representation measures (cosine,
CKA, k-NN consistency) and the metrics with the bootstrap, then writes the report.

Prints wall times, the ratio medaudit ÷ baseline (the issue's target, ≤ 1.3 for a 224² ViT-S, is
about a GPU), each process's peak resident memory, and the audit's own ``timing.phases`` from
results.json (forward, external = the reference set, detectors = probes and OOD detectors,
representation, metrics, report, …).

Usage::

    python benchmarks/encoder.py --device cuda --n 512 --n-ref 512 --severities 1,3,5 --batch-size 64
    python benchmarks/encoder.py --size 112 --n 48 --n-ref 48 --layers 6          # a quick CPU check
    python benchmarks/encoder.py --data random --suites intensity,mri --repeats 3   # fastest of 3 per side
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import timed  # noqa: E402  (the same fresh-process timing as the classifier benchmark)

ROOT = Path(__file__).resolve().parents[1]

BASELINE = r"""
import sys, time, numpy as np, torch
model_path, data_path, ref_path, scenarios, batch, device = (sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                                              int(sys.argv[5]), sys.argv[6])
t0 = time.perf_counter()
model = torch.jit.load(model_path, map_location=device).eval()
def load(path):
    with np.load(path) as d:
        return torch.from_numpy(d["images"].astype(np.float32) / 255.0)[:, None]  # grey [N, 1, H, W] in [0, 1]
x, ref = load(data_path), load(ref_path)
# the dinov2 preset: ImageNet mean/std; the grey channel broadcasts to 3 (as medaudit replicates it)
mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
kept = []
with torch.inference_mode():
    for images in [x] * scenarios + [ref]:  # the audit set per scenario, then the reference set's clean pass
        emb = []
        for i in range(0, len(images), batch):
            xb = (images[i:i + batch].to(device, non_blocking=True) - mean) / std
            emb.append(model(xb)["pooler_output"].float())  # pooled [B, D], kept on the device
        kept.append(torch.cat(emb))
if device.startswith("cuda"):
    torch.cuda.synchronize()
print(time.perf_counter() - t0)
"""

CONFIG = """\
model:
  name: "ViT-S/14 (DINOv2 shape, random weights) benchmark"
  output_key: pooler_output
input:
  preset: dinov2
  spatial_size: [{size}, {size}]
  modality: mri
  intensity: {{scaling: fixed, max_value: 255}}
task:
  type: embedding
  classes: [csf_other, grey_matter, white_matter]
  probe_c: 1.0
  probe_k: 20
audit:
  seed: 0
  bootstrap: {bootstrap}
  severities: [{severities}]
  suites: [{suites}]
checks: []
"""


def make_data(out: Path, n: int, n_ref: int, size: int, kind: str) -> tuple[Path, Path]:
    """Audit and reference sets of grey uint8 ``size``² images with the bundled patches' labels.

    ``mni``: the example MNI152 patches (shuffled, so both sets hold every class), disjoint while
    ``n + n_ref`` ≤ 600, tiled with seeded ±2 grey-level noise beyond (no two samples identical),
    resized bilinearly; ``random``: uniform noise images with the same labels.
    """
    with np.load(ROOT / "examples" / "mni-patches" / "test.npz") as d:
        images, labels = d["images"], d["labels"]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    total = n + n_ref
    idx = np.tile(order, -(-total // len(order)))[:total]
    labels = labels[idx]
    if kind == "random":
        images = rng.integers(0, 256, size=(total, size, size), dtype=np.uint8)
    else:
        images = images[idx].copy()
        m = len(order)
        if total > m:
            noise = rng.integers(-2, 3, size=images[m:].shape)
            images[m:] = np.clip(images[m:].astype(np.int16) + noise, 0, 255).astype(np.uint8)
        if size != images.shape[-1]:
            t = torch.from_numpy(images.astype(np.float32))[:, None]
            images = (F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
                      .round().clamp(0, 255).numpy().astype(np.uint8))
    ref_path, data_path = out / "reference.npz", out / "audit.npz"
    np.savez(ref_path, images=images[:n_ref], labels=labels[:n_ref])
    np.savez(data_path, images=images[n_ref:], labels=labels[n_ref:])
    return data_path, ref_path


def make_model(out: Path, size: int, layers: int, hidden: int) -> Path:
    """The traced encoder; ``image_size`` is ``size`` so the position embeddings are used as they
    are (the trace would fix DINOv2's interpolation branch to the size it was traced at)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          intermediate_size=4 * hidden, image_size=size, patch_size=14)
    model = Dinov2Model(config).eval()
    path = out / "vits14.pt"
    with torch.no_grad(), warnings.catch_warnings():  # the tracer's notes on Hugging Face's shape checks
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, torch.zeros(2, 3, size, size), strict=False), str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="image side (a multiple of the patch size, 14)")
    ap.add_argument("--n", type=int, default=64, help="audit samples")
    ap.add_argument("--n-ref", type=int, default=64, help="reference samples (the probes are fitted on them)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per model call, both sides")
    ap.add_argument("--severities", default="3")
    ap.add_argument("--suites", default="intensity", help="comma-separated perturbation suites")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=1, help="time each side this many times and keep the fastest")
    ap.add_argument("--threads", help="medaudit's --threads (default: its own, auto: on a CPU the dry run times the "
                                      "model at each thread count; the baseline keeps torch's default)")
    ap.add_argument("--data", choices=["mni", "random"], default="mni",
                    help="the bundled MNI152 patches resized to --size, or uniform noise images")
    ap.add_argument("--layers", type=int, default=12,
                    help="transformer blocks (12: ViT-S; fewer for a quick CPU check)")
    ap.add_argument("--hidden", type=int, default=384, help="width (384: ViT-S; heads = width / 64, MLP = 4 × width)")
    args = ap.parse_args()
    if args.size % 14:
        raise SystemExit(f"--size {args.size} is not a multiple of the patch size 14")
    severities = ", ".join(s.strip() for s in args.severities.split(","))
    suites = ", ".join(s.strip() for s in args.suites.split(","))
    env_note = f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}"
    if args.device.startswith("cuda"):
        env_note += f" ({torch.cuda.get_device_name(0)})"
    print(f"# medaudit encoder benchmark — {env_note}")
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        cfg = tmpdir / "encoder.yaml"
        cfg.write_text(CONFIG.format(size=args.size, bootstrap=args.bootstrap, severities=severities, suites=suites),
                       encoding="utf-8")
        from medaudit.config import load_config
        from medaudit.plugin_manager import get_plugin_manager
        from medaudit.runner import plan_scenarios

        scenarios, _ = plan_scenarios(load_config(cfg), get_plugin_manager(warn=lambda m: None).perturbations())
        n_scenarios = len(scenarios)  # clean + every perturbation × severity
        data, ref = make_data(tmpdir, args.n, args.n_ref, args.size, args.data)
        model = make_model(tmpdir, args.size, args.layers, args.hidden)
        print(f"{args.size}², N={args.n} + reference {args.n_ref}, {n_scenarios} scenarios (suites {suites}, "
              f"severities {severities}) + the reference pass, batch {args.batch_size}, "
              f"DINOv2 {args.layers} blocks × {args.hidden} wide, patch 14, data {args.data}, "
              f"bootstrap {args.bootstrap}")
        base_cmd = [sys.executable, "-c", BASELINE, str(model), str(data), str(ref), str(n_scenarios),
                    str(args.batch_size), args.device]
        out = tmpdir / "out"
        cmd = [sys.executable, "-c", "from medaudit.cli import main; main()", "run", str(model),
               "--data", str(data), "--reference", str(ref), "--config", str(cfg), "--out", str(out),
               "--device", args.device, "--batch-size", str(args.batch_size),
               "--model-batch-size", str(args.batch_size), "--quiet"]
        if args.threads:
            cmd += ["--threads", args.threads]
        bases, audits = [], []
        for _ in range(args.repeats):  # alternate the sides, so a slow spell of a shared machine hits both
            wall, stdout, rss = timed(base_cmd)
            bases.append((wall, rss, float(stdout.split()[-1])))
            wall, _, rss = timed(cmd)
            audits.append((wall, rss, json.loads((out / "results.json").read_text())))
        base_wall, base_rss, base_inner = min(bases)
        audit_wall, audit_rss, res = min(audits, key=lambda r: r[0])  # the phases of the fastest run with its time
        if args.repeats > 1:
            print(f"all runs: baseline {', '.join(f'{b[0]:.1f}' for b in bases)} s; "
                  f"medaudit {', '.join(f'{r[0]:.1f}' for r in audits)} s (the fastest of each is used)")
        timing = res["timing"]
        print(f"baseline {base_wall:.1f} s (load + loop {base_inner:.1f} s; {base_rss:.0f} MiB)   "
              f"medaudit {audit_wall:.1f} s ({audit_rss:.0f} MiB)   ratio {audit_wall / base_wall:.2f}")
        phases = dict(timing.get("phases", {}))
        # the rest: writing the outputs and the interpreter's exit (and start-up where /proc is missing)
        phases["other"] = audit_wall - sum(phases.values())
        print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
        env = res.get("environment", {})
        print(f"medaudit: threads {env.get('threads')}, memory format {env.get('memory_format', 'contiguous')}; "
              f"clean linear probe accuracy {res['scenarios'][0]['metrics'].get('accuracy', {}).get('value')}")


if __name__ == "__main__":
    main()
