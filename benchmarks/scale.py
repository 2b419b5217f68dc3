"""Scale-out: the same audit on 1, 2, 4 … Ray workers against the local executor.

Every run is a fresh ``medaudit run`` process on the same model, data and scenarios; the numbers
come from its results.json (``timing``, ``environment.executor``):

* ``local ×1``: the local executor on one torch thread — one worker's share of the machine, the
  reference for the speed-up and efficiency of the Ray runs (efficiency = speed-up ÷ workers);
* ``local ×C``: the local executor on every core (what one process gets without Ray);
* ``ray ×k``: k Ray workers of one CPU (one torch thread) each, k = 1, 2, 4 … up to the cores;
* on a machine with a GPU (``--gpu-fractions 1,0.5,0.25``): the local executor on the GPU, and
  1/f Ray workers sharing it with ``--ray-gpus-per-worker f``.

Printed per run: wall seconds, the forward phase (perturbing, the model, embeddings: the part
the workers share out; on Ray it includes starting the private instance and the workers), the
speed-up of the forward phase and of the whole audit, the efficiency, the workers' busy share
(their units' seconds ÷ workers × forward phase) and the driver's share of the wall time (what
stays in one process: preparing, fitting detectors, bootstrap, report). The goal is an
efficiency of at least 0.8 per added worker while workers ≤ cores and the forward passes
dominate (a model heavier than the example's, e.g. ``--model resnet18``).

Usage::

    python benchmarks/scale.py                                  # resnet18, 1200 samples, CPU workers
    python benchmarks/scale.py --model densenet121 --n 4000 --workers 1,2,4,8,16
    python benchmarks/scale.py --device cuda --gpu-fractions 1,0.5,0.25 --workers 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import make_config, make_data, make_model, timed  # noqa: E402  (the benchmarks' one copy of these helpers)


def _powers(cores: int) -> list[int]:
    out, k = [], 1
    while k < cores:
        out.append(k)
        k *= 2
    return [*out, cores]


def run(model: Path, data: Path, cfg: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """One audit in a fresh process; its wall seconds and what results.json says about the run."""
    cmd = [sys.executable, "-m", "medaudit.cli", "run", str(model), "--data", str(data), "--config", str(cfg),
           "--out", str(out), "--quiet", "--bootstrap", str(args.bootstrap), "--severities", args.severities,
           "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size),
           "--model-batch-size", str(args.batch_size), *extra]
    for name in args.perturbation:
        cmd += ["--perturbation", name]
    wall, _, _ = timed(cmd)
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {"wall": wall, "forward": res["timing"]["phases"]["forward"], "executor": res["environment"].get("executor") or {},
            "threads": res["environment"].get("threads")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["example", "densenet121", "resnet18"], default="resnet18")
    ap.add_argument("--n", type=int, default=1200, help="samples (the example patches, tiled with noise)")
    ap.add_argument("--size", type=int, default=64, help="image side (the example model needs 48)")
    ap.add_argument("--workers", default="", help="CPU Ray worker counts, e.g. 1,2,4 [1, 2, 4 … up to the cores; 0: none]")
    ap.add_argument("--gpu-fractions", default="", help="GPU share per Ray worker, e.g. 1,0.5,0.25 (needs a GPU)")
    ap.add_argument("--device", default="cpu", help="the local runs' and GPU workers' device (cpu or cuda)")
    ap.add_argument("--perturbation", action="append", help="repeatable [intensity.gamma, mri.noise, mri.bias_field]")
    ap.add_argument("--severities", default="2,4")
    ap.add_argument("--shard-size", type=int, default=128, help="samples per unit of work")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bootstrap", type=int, default=200)
    args = ap.parse_args()
    args.perturbation = args.perturbation or ["intensity.gamma", "mri.noise", "mri.bias_field"]
    cores = len(os.sched_getaffinity(0))
    workers = [int(w) for w in args.workers.split(",") if int(w) > 0] if args.workers else _powers(cores)
    fractions = [float(f) for f in args.gpu_fractions.split(",")] if args.gpu_fractions else []
    if fractions and not torch.cuda.is_available():
        raise SystemExit("--gpu-fractions needs a GPU; this machine has none")
    import ray

    note = f"torch {torch.__version__}, Ray {ray.__version__}, {cores} cores"
    if torch.cuda.is_available():
        note += f", {torch.cuda.get_device_name(0)}"
    scenarios = 1 + len(args.perturbation) * len(args.severities.split(","))
    print(f"# medaudit scale-out benchmark — {note}")
    print(f"model {args.model}, {args.n} samples of {args.size}², {scenarios} scenarios, shard size {args.shard_size}, "
          f"bootstrap {args.bootstrap}")
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        model, data = make_model(tmpdir, args.model), make_data(tmpdir, args.n, args.size)
        cfg = make_config(tmpdir, args.model)
        rows: list[tuple[str, int, dict[str, Any]]] = []

        def go(label: str, k: int, extra: list[str]) -> None:
            r = run(model, data, cfg, tmpdir / f"out-{len(rows)}", args, extra)
            rows.append((label, k, r))
            ref = rows[0][2]
            fwd_speedup, speedup = ref["forward"] / r["forward"], ref["wall"] / r["wall"]
            units = r["executor"].get("units") or []
            busy = f"{sum(u['seconds'] for u in units) / (k * r['forward']):.2f}" if units else "-"
            print(f"{label:<22} {r['wall']:>8.1f} {r['forward']:>8.1f} {fwd_speedup:>8.2f} {speedup:>8.2f} "
                  f"{fwd_speedup / k:>6.2f} {busy:>6} {(r['wall'] - r['forward']) / r['wall']:>7.2f}", flush=True)

        print(f"{'run':<22} {'wall s':>8} {'fwd s':>8} {'fwd ×':>8} {'wall ×':>8} {'eff':>6} {'busy':>6} {'driver':>7}")
        go("local ×1 (1 thread)", 1, ["--executor", "local", "--threads", "1", "--device", "cpu"])
        go(f"local ×{cores} ({cores} threads)", 1, ["--executor", "local", "--threads", str(cores), "--device", "cpu"])
        for k in workers:
            go(f"ray ×{k} (1 CPU each)", k, ["--executor", "ray", "--ray-workers", str(k), "--ray-cpus-per-worker", "1",
                                             "--device", "cpu"])
        if fractions:
            go("local GPU", 1, ["--executor", "local", "--device", args.device])
            gpu_ref = rows[-1][2]
            for f in fractions:
                k = round(1 / f)
                r = run(model, data, cfg, tmpdir / f"out-gpu-{f}", args,
                        ["--executor", "ray", "--ray-workers", str(k), "--ray-gpus-per-worker", str(f),
                         "--ray-cpus-per-worker", "1", "--device", args.device])
                print(f"{f'ray ×{k} ({f:g} GPU each)':<22} {r['wall']:>8.1f} {r['forward']:>8.1f} "
                      f"{gpu_ref['forward'] / r['forward']:>8.2f} {gpu_ref['wall'] / r['wall']:>8.2f} "
                      f"{'':>6} {'':>6} {(r['wall'] - r['forward']) / r['wall']:>7.2f}  (against local GPU)", flush=True)
        print("fwd ×, wall ×: speed-up of the forward phase and of the whole audit against local ×1; eff: fwd × ÷ "
              "workers; busy: the workers' unit seconds ÷ (workers × forward phase); driver: share of the wall time "
              "outside the forward phase")


if __name__ == "__main__":
    main()
