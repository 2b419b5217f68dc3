"""OOD detection on a trained MONAI DenseNet121: do the feature detectors run, and do they beat the outputs?

What it measures. A MONAI ``DenseNet121`` (2D, 1 channel, 3 classes) is trained on CPU to name the
tissue at the centre of 48×48 axial patches of the MNI152 T1 template (csf_other / grey_matter /
white_matter, the bundled example's data: ``examples/build_example.py``). medaudit then audits it
against two external out-of-distribution sets built here:

* ``gm-maps``: the grey-matter probability map (0–255) cut at the test patches' positions and used
  as if it were an image: same anatomy and grid, different contrast (a "wrong sequence" input);
* ``ct-crops``: 48×48 crops of a real CT slice (pydicom's ``CT_small.dcm``, a 128×128 spine slice)
  at a grid of offsets and four flips, in a soft-tissue window (level 40 HU, width 400 HU, i.e.
  −160..240 HU mapped to 0..255): another modality and body part.

Each audit variant is one ``medaudit run`` of the same model, data and OOD sets with a config that
differs only by the variant's overrides (``VARIANTS``). The first variant has **no feature
settings at all** (medaudit's default, ``model.feature_layer: auto``); the second names
``features.denseblock3``, the layer the issue's filer found best. For every detector the script
prints the AUROC on each OOD set and under ``mri.motion@5``, the feature layer each audit used
(``model.feature_layer`` / ``model.feature_layer_source`` in results.json), and whether the best
feature-based detector beats the best output-based one (msp, max_logit, energy, entropy, gen,
kl_matching; ``histogram`` is model-free and reported apart), and by how much.

Phases (each timed): data (build the patches and OOD sets), train (DenseNet121, then
``torch.jit.trace`` + ``torch.jit.save``, the format medaudit loads), audit (one ``medaudit run``
per variant), table. Everything is written under ``benchmarks/.work/ood_densenet/`` (git-ignored),
which is rebuilt from scratch on every run unless ``--reuse-model`` is given.

Usage::

    python benchmarks/ood_densenet.py                         # about 2-3 minutes on 2 idle CPU cores
    python benchmarks/ood_densenet.py --epochs 2 --bootstrap 100
    python benchmarks/ood_densenet.py --reuse-model           # audits and table only

Needs the MNI152 files (``--shared``, default ``../shared/data/mni152``: ``t1.nii.gz``,
``gm.nii.gz``, ``wm.nii.gz``), monai and pydicom (for its bundled test file).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import nibabel as nib
import numpy as np
import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "ood_densenet"

# Input scaling exactly as examples/mni-patches.yaml (uint8 → [0, 1] → (x − 0.5) / 0.25); the
# training loop below applies the same, so medaudit feeds the model what it was trained on.
MEAN, STD, MAX_VALUE = 0.5, 0.25, 255.0

# The base config: deliberately NO feature settings (no model.feature_layer, no
# model.feature_layers), so the first variant shows what medaudit does by default.
BASE_CONFIG: dict[str, Any] = {
    "model": {
        "name": "MONAI DenseNet121 patch tissue classifier (benchmark)",
        "description": "monai.networks.nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=3), "
                       "trained by benchmarks/ood_densenet.py; traced TorchScript.",
        "intended_use": "Benchmark of medaudit's OOD detectors. Not for any clinical use.",
    },
    "input": {
        "modality": "mri",
        "dims": 2,
        "channels": 1,
        "intensity": {"scaling": "fixed", "max_value": int(MAX_VALUE)},
        "mean": [MEAN],
        "std": [STD],
    },
    "task": {"type": "multiclass", "classes": ["csf_other", "grey_matter", "white_matter"]},
    "audit": {"seed": 0, "batch_size": 200},
}

# Audit variants: (name, overrides deep-merged into BASE_CONFIG). Add a row to compare another
# setting (e.g. another layer); every variant gets its own output folder and table columns.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("denseblock3", {"model": {"feature_layer": "features.denseblock3"}}),
    # the paper's multi-layer setting named by hand: the dense blocks (the last one is 1×1 at 48²)
    ("blocks1-3", {"model": {"feature_layers": ["features.denseblock1", "features.denseblock2",
                                                "features.denseblock3"]}}),
]

# Detector families, as the issue counts them. Anything not listed is feature-based (it reads
# model.feature_layer): mahalanobis, knn, spectral, rmd and the head-based zoo.
OUTPUT_BASED = ("msp", "max_logit", "energy", "entropy", "gen", "kl_matching")
MODEL_FREE = ("histogram",)

OOD_SETS = ("gm-maps", "ct-crops")  # file stems: medaudit names their scenarios ood:<stem>
SHIFT_SCENARIO = "mri.motion@5"

# CT soft-tissue window (level 40 HU, width 400 HU): the window a radiologist reads soft tissue
# in; bone saturates to 255 and air to 0, as in any windowed CT shown to a network.
CT_LEVEL, CT_WIDTH = 40.0, 400.0


def import_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by path (``examples/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---------------------------------------------------------------------------------------------
# Phase 1: data


def build_data(shared: Path, n_train: int, n_test: int, ct_stride: int, seed: int,
               out: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Write test.npz, gm-maps.npz and ct-crops.npz under ``out``; return the train and test arrays.

    The ID patches come from the bundled example's builder, so labels, the z-block train/test
    split (disjoint slices with guard slices dropped: no leakage between neighbouring slices) and
    the metadata are exactly the example's.
    """
    ex = import_example("build_example")
    data = ex.build(shared, n_test_per_class=n_test, n_train_per_class=n_train, seed=seed)
    np.savez_compressed(out / "test.npz", **data["test"])

    # (a) GM probability map as an image, at the same voxels as the test patches: the OOD set
    # differs from the ID test set by contrast only, not by position or anatomy.
    gm = np.asarray(nib.load(shared / "gm.nii.gz").dataobj, dtype=np.uint8)
    half = ex.HALF
    gm_patches = []
    for voxel in data["test"]["meta_voxel"]:
        x, y, z = (int(v) for v in voxel.split(","))
        gm_patches.append(gm[x - half:x + half, y - half:y + half, z].T[::-1])  # same orientation as build()
    np.savez_compressed(out / "gm-maps.npz", images=np.stack(gm_patches).astype(np.uint8))

    # (b) Real CT: crops of the 128×128 test slice at a grid of offsets, each also flipped
    # left-right, up-down and both, to get a set the size of the ID test set's order.
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo = CT_LEVEL - CT_WIDTH / 2
    ct = np.clip((hu - lo) / CT_WIDTH, 0.0, 1.0) * 255.0
    size = 2 * half
    crops = []
    for r in range(0, ct.shape[0] - size + 1, ct_stride):
        for c in range(0, ct.shape[1] - size + 1, ct_stride):
            crop = ct[r:r + size, c:c + size]
            crops += [crop, crop[:, ::-1], crop[::-1, :], crop[::-1, ::-1]]
    np.savez_compressed(out / "ct-crops.npz", images=np.round(np.stack(crops)).astype(np.uint8))

    counts = {"train": len(data["train"]["labels"]), "test": len(data["test"]["labels"]),
              "gm-maps": len(gm_patches), "ct-crops": len(crops)}
    print("data: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f" (CT window L{CT_LEVEL:g}/W{CT_WIDTH:g} HU, crop stride {ct_stride}, 4 flips)")
    return data["train"], data["test"]


# ---------------------------------------------------------------------------------------------
# Phase 2: training


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 patches → the normalised float tensor medaudit will feed (same scaling as the config)."""
    x = torch.from_numpy(images.astype(np.float32) / MAX_VALUE)[:, None]
    return (x - MEAN) / STD


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 200) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return (pred == y).float().mean().item()


def train(train_arrays: dict[str, np.ndarray], test: dict[str, np.ndarray], epochs: int, seed: int,
          out: Path) -> dict[str, float]:
    from monai.networks.nets import DenseNet121

    torch.manual_seed(seed)
    x, y = to_tensor(train_arrays["images"]), torch.from_numpy(train_arrays["labels"])
    xt, yt = to_tensor(test["images"]), torch.from_numpy(test["labels"])
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps_per_epoch = -(-len(x) // 64)
    # One-cycle-like cosine decay per step: a few epochs from scratch converge without tuning.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)  # the shuffling is seeded too, not only the init
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(x):.3f}, test accuracy {accuracy(model, xt, yt):.3f} "
              f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    acc = {"train": accuracy(model, x, y), "test": accuracy(model, xt, yt)}
    # medaudit loads TorchScript; tracing records the eval-mode graph (BatchNorm running stats).
    # Check the traced module reproduces the eager one before saving it.
    with torch.no_grad():
        traced = torch.jit.trace(model, xt[:2])
        diff = (traced(xt[:200]) - model(xt[:200])).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"traced model differs from the eager one by {diff:g}")
    torch.jit.save(traced, str(out / "model.pt"))
    print(f"  train accuracy {acc['train']:.3f}, test accuracy {acc['test']:.3f}; saved {out / 'model.pt'}")
    return acc


# ---------------------------------------------------------------------------------------------
# Phase 3: audits


def medaudit_command() -> list[str]:
    exe = Path(sys.executable).parent / "medaudit"  # the venv's console script, next to its python
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "medaudit"]


def run_audit(name: str, overrides: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    out = WORK / "audits" / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = deep_merge(BASE_CONFIG, overrides)
    config_path = WORK / f"config-{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = medaudit_command() + ["run", str(WORK / "model.pt"), "--data", str(WORK / "test.npz"),
                                "--config", str(config_path), "--out", str(out),
                                "--severities", args.severities, "--bootstrap", str(args.bootstrap)]
    for stem in OOD_SETS:
        cmd += ["--ood-data", str(WORK / f"{stem}.npz")]
    for p in args.perturbation:
        cmd += ["--perturbation", p]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    (out / "stdout.log").write_text(proc.stdout)
    (out / "stderr.log").write_text(proc.stderr)
    # Exit code 1 only means a check failed; the results are still written. Anything else is an error.
    if proc.returncode not in (0, 1) or not (out / "results.json").exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"audit {name!r} failed with exit code {proc.returncode}: {' '.join(cmd)}")
    print(f"  {name}: {wall:.0f} s (exit {proc.returncode}), {out / 'results.json'}")
    return json.loads((out / "results.json").read_text()), wall


# ---------------------------------------------------------------------------------------------
# Phase 4: table


Auroc = tuple[float, float | None, float | None]  # value, bootstrap CI low, CI high


def aurocs(results: dict[str, Any]) -> dict[str, dict[str, Auroc]]:
    """scenario id → detector → AUROC with its CI, for the OOD sets and the shift scenario."""
    wanted = {f"ood:{s}" for s in OOD_SETS} | {SHIFT_SCENARIO}
    table: dict[str, dict[str, Auroc]] = {}
    for scenario in results["scenarios"]:
        if scenario["id"] in wanted:
            table[scenario["id"]] = {det: (m["auroc"]["value"], m["auroc"].get("ci_low"), m["auroc"].get("ci_high"))
                                     for det, m in scenario.get("ood", {}).items()
                                     if m.get("auroc", {}).get("value") is not None}
    return table


def kind_of(detector: str) -> str:
    return "output" if detector in OUTPUT_BASED else "model-free" if detector in MODEL_FREE else "feature"


def report(all_results: dict[str, dict[str, Any]]) -> None:
    per_variant = {name: aurocs(res) for name, res in all_results.items()}
    columns = [f"ood:{s}" for s in OOD_SETS] + [SHIFT_SCENARIO]
    short = {c: c.removeprefix("ood:") for c in columns}
    detectors = sorted({d for t in per_variant.values() for s in t.values() for d in s},
                       key=lambda d: ({"output": 0, "model-free": 1, "feature": 2}[kind_of(d)], d))
    print()
    for name, res in all_results.items():
        m = res["model"]
        print(f"{name}: model.feature_layer {m.get('feature_layer')!r} (source {m.get('feature_layer_source')}), "
              f"head {m.get('head')!r}")
        if m.get("feature_layer_note"):
            print(f"  note: {m['feature_layer_note']}")
        # Multi-layer detectors (spectral, mahalanobis_ensemble) read model.feature_layers where this
        # medaudit has it; shown so the table says which layers each number comes from.
        if m.get("feature_layers") is not None:
            print(f"  model.feature_layers {m['feature_layers']} (source {m.get('feature_layers_source')})")
    width = 13
    block = width * len(columns)
    print()
    print(" " * 33 + "".join(f"{'| ' + v:<{block + 2}}" for v in per_variant))
    header = f"{'detector':<21}{'kind':<12}" + "".join(
        "| " + "".join(f"{short[c]:>{width}}" for c in columns) for _ in per_variant)
    print(header)
    print("-" * len(header))
    for det in detectors:
        row = f"{det:<21}{kind_of(det):<12}"
        for table in per_variant.values():
            row += "| "
            for c in columns:
                value = table.get(c, {}).get(det)
                row += f"{'-' if value is None else f'{value[0]:.3f}':>{width}}"
        print(row)
    print("(AUROC, point values; '-': the detector did not run in that audit)")
    print()
    for v, table in per_variant.items():
        for c in columns:
            scores = table.get(c, {})
            best = {k: max(((a, d) for d, a in scores.items() if kind_of(d) == k), default=None)
                    for k in ("feature", "output", "model-free")}
            if best["feature"] is None or best["output"] is None:
                print(f"{v} {c}: best feature {best['feature']}, best output {best['output']}: no comparison "
                      "(a family did not run)")
                continue
            (fa, fd), (oa, od) = best["feature"], best["output"]
            verdict = "beats" if fa[0] > oa[0] else "does NOT beat"
            # "Clearly": the two bootstrap intervals do not overlap (a conservative reading).
            clear = (None if None in (fa[1], oa[2], fa[2], oa[1]) else
                     "95% CIs disjoint" if fa[1] > oa[2] or fa[2] < oa[1] else "95% CIs overlap")
            free = f"; model-free histogram {best['model-free'][0][0]:.3f}" if best["model-free"] else ""
            print(f"{v} {c}: best feature-based {fd} {fa[0]:.3f} {verdict} best output-based {od} {oa[0]:.3f} "
                  f"by {fa[0] - oa[0]:+.3f}" + (f" ({clear})" if clear else "") + free)


def print_warnings(all_results: dict[str, dict[str, Any]]) -> None:
    for name, res in all_results.items():
        records = res.get("warning_records") or [{"code": "", "message": w} for w in res.get("warnings", [])]
        if records:
            print(f"\n{name}: {len(records)} warning(s)")
            for w in records:
                print(f"  [{w.get('code', '')}] {w.get('message', '')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data" / "mni152",
                    help="folder with t1.nii.gz, gm.nii.gz, wm.nii.gz (MNI152)")
    ap.add_argument("--n-train", type=int, default=1200, help="training patches per class")
    ap.add_argument("--n-test", type=int, default=200, help="test patches per class (also the GM-map OOD set size)")
    ap.add_argument("--ct-stride", type=int, default=8, help="offset step of the CT crops, pixels")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--perturbation", action="append", default=None,
                    help="perturbation to run (repeatable) [mri.motion, mri.noise, mri.bias_field]")
    ap.add_argument("--severities", default="3,5")
    ap.add_argument("--bootstrap", type=int, default=200,
                    help="bootstrap resamples (CIs only; AUROCs are point values)")
    ap.add_argument("--reuse-model", action="store_true",
                    help="keep the data and model.pt already in the work folder; rerun the audits only")
    args = ap.parse_args()
    args.perturbation = args.perturbation or ["mri.motion", "mri.noise", "mri.bias_field"]

    timings: dict[str, float] = {}
    needed = ("model.pt", "test.npz") + tuple(f"{s}.npz" for s in OOD_SETS)
    reuse = args.reuse_model and all((WORK / f).exists() for f in needed)
    if not reuse:
        if WORK.exists():
            shutil.rmtree(WORK)  # from scratch: nothing of an earlier run may leak into this one
        WORK.mkdir(parents=True)
        t0 = time.perf_counter()
        train_arrays, test_arrays = build_data(args.shared, args.n_train, args.n_test, args.ct_stride, args.seed, WORK)
        timings["data"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        print(f"train: DenseNet121 on {len(train_arrays['labels'])} patches, {args.epochs} epochs, "
              f"{torch.get_num_threads()} threads")
        acc = train(train_arrays, test_arrays, args.epochs, args.seed, WORK)
        timings["train"] = time.perf_counter() - t0
        (WORK / "accuracy.json").write_text(json.dumps(acc))
    else:
        acc_file = WORK / "accuracy.json"
        print(f"reusing {WORK / 'model.pt'}" + (f" (accuracy {acc_file.read_text()})" if acc_file.exists() else ""))

    print("audit: " + ", ".join(name for name, _ in VARIANTS))
    all_results: dict[str, dict[str, Any]] = {}
    for name, overrides in VARIANTS:
        all_results[name], timings[f"audit {name}"] = run_audit(name, overrides, args)

    t0 = time.perf_counter()
    report(all_results)
    for name, results in all_results.items():  # the OOD section's closing recommendation, per variant
        rec = results.get("ood_recommendation")
        print(f"{name}: {rec['statement'] if rec else 'no recommendation (no harm statistics)'}")
    print_warnings(all_results)
    timings["table"] = time.perf_counter() - t0
    print("\ntimings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
