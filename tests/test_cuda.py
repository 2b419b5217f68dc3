"""GPU paths: perturbations, the runner, metrics and a whole audit on CUDA (skipped without CUDA).

CI has no GPU; these run on a developer's GPU machine (see benchmarks/README.md for the last run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medaudit.bootstrap import bootstrap_weights, evaluate
from medaudit.config import Config
from medaudit.metric import MetricContext
from medaudit.plugin_manager import get_plugin_manager
from medaudit.rng import SampleRNG, sample_keys, stream_key
from medaudit.testing import check_plugin_object

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = sorted(get_plugin_manager(warn=lambda m: None).perturbations().items())


@pytest.mark.parametrize(("name", "entry"), CATALOGUE, ids=[n for n, _ in CATALOGUE])
def test_perturbation_same_on_cpu_and_cuda(name: str, entry: tuple[str, type]) -> None:
    """The counter-based RNG gives the same corruption on either device (up to float rounding)."""
    cls = entry[1]
    pert = cls()
    for dims in cls.dims:
        size = 48 if dims == 2 else 24
        g = torch.Generator().manual_seed(0)
        x = torch.rand((3, 1) + (size,) * dims, generator=g)
        idx = torch.arange(3)
        key = stream_key(0, name, 4)
        cpu, _ = pert(x, 4, SampleRNG(sample_keys(key, idx)))
        gpu, _ = pert(x.cuda(), 4, SampleRNG(sample_keys(key, idx.cuda())))
        assert gpu.device.type == "cuda"
        # Integer steps (bit depth, JPEG quantisation) may land on the other side of a boundary for
        # a handful of pixels; everything else agrees to float rounding.
        close = (gpu.cpu() - cpu).abs() < 1e-4
        assert close.float().mean() > 0.999, f"{name} {dims}D: {(~close).sum()} pixels differ"
        half, _ = pert(x.cuda().half(), 4, SampleRNG(sample_keys(key, idx.cuda())))
        assert half.dtype == torch.float16 and torch.isfinite(half).all()


@pytest.mark.parametrize(("name", "entry"), CATALOGUE, ids=[n for n, _ in CATALOGUE])
def test_perturbation_conforms_on_cuda(name: str, entry: tuple[str, type]) -> None:
    check_plugin_object(entry[1], device="cuda").assert_ok()


def test_metrics_on_cuda_match_cpu() -> None:
    pm = get_plugin_manager(warn=lambda m: None)
    cfg = Config.model_validate({"task": {"classes": ["a", "b", "c"]}})
    metrics = [m for _, ms in pm.call_each("medaudit_metrics", config=cfg) for m in ms if "multiclass" in m.tasks]
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(500, 3, generator=g) * 2, 1)
    labels = torch.randint(0, 3, (500,), generator=g)
    w = bootstrap_weights(500, 200, 0)
    ctx = MetricContext("multiclass", ("a", "b", "c"))
    cpu, _ = evaluate(metrics, probs, labels, w, ctx)
    gpu, _ = evaluate(metrics, probs.cuda(), labels.cuda(), w.cuda(), ctx)
    for key, est in cpu.items():
        for stat in ("value", "ci_low", "ci_high"):
            a, b = est[stat], gpu[key][stat]
            assert (a is None and b is None) or abs(a - b) < 1e-5, (key, stat, a, b)


def test_audit_on_cuda_with_bf16(tmp_path: Path) -> None:
    out = tmp_path / "o"
    res = subprocess.run(
        [sys.executable, "-m", "medaudit.cli", "run", str(ROOT / "examples" / "model.pt"),
         "--data", str(ROOT / "examples" / "mni-patches" / "test.npz"), "--config", str(ROOT / "examples" / "mni-patches.yaml"),
         "--out", str(out), "--device", "cuda", "--precision", "bf16", "--quiet", "--bootstrap", "200",
         "--perturbation", "mri.motion", "--perturbation", "mri.bias_field", "--severities", "1,5"],
        capture_output=True, text=True, env={**os.environ})
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["device"] == "cuda"
    assert results["environment"]["precision"] == "bf16"
    assert results["scenarios"][0]["metrics"]["accuracy"]["value"] > 0.9
    assert results["scenarios"][0]["ood"] == {}  # clean has no OOD entry; perturbed ones do
    assert "mahalanobis" in results["scenarios"][-1]["ood"]


def test_segmentation_reduction_on_cuda_matches_cpu() -> None:
    """The device path (torch distance transform, no host synchronisation) against the CPU's
    (scipy's transform at the boundaries): the same per-image quantities."""
    from medaudit.config import TaskConfig
    from medaudit.plugins.segmentation.task import SegmentationTask

    g = torch.Generator().manual_seed(2)
    logits = 4 * torch.randn(3, 3, 24, 30, generator=g)
    logits = torch.nn.functional.avg_pool2d(logits, 5, stride=1, padding=2)  # blobs, not salt and pepper
    labels = torch.nn.functional.avg_pool2d(torch.randn(3, 3, 24, 30, generator=g), 5, stride=1, padding=2).argmax(1)
    spacing = torch.tensor([[1.0, 0.8]] * 3, dtype=torch.float64)
    cfg = TaskConfig(type="segmentation", classes=["bg", "a", "b"])
    task = SegmentationTask()
    cpu = task.reduce(logits, "logits", cfg, {"labels": labels, "spacing": spacing})
    gpu = task.reduce(logits.cuda(), "logits", cfg, {"labels": labels.cuda(), "spacing": spacing.cuda()})
    for name, value in cpu.items():
        torch.testing.assert_close(gpu[name].cpu(), value, rtol=1e-4, atol=1e-4, equal_nan=True, msg=name)


def test_segmentation_audit_on_cuda_matches_cpu(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_segmentation_audit import CONFIG_2D, disc_phantoms, save_model

    images, masks = disc_phantoms(12)
    import numpy as np

    np.savez(tmp_path / "discs.npz", images=images, masks=masks)
    (tmp_path / "seg.yaml").write_text(CONFIG_2D)
    model = save_model(tmp_path / "t.pt", 2)
    metrics = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        res = subprocess.run([sys.executable, "-m", "medaudit.cli", "run", str(model), "--data", str(tmp_path / "discs.npz"),
                              "--config", str(tmp_path / "seg.yaml"), "--out", str(out), "--device", device, "--quiet",
                              "--perturbation", "geometry.rotation", "--perturbation", "mri.noise", "--severities", "1,5"],
                             capture_output=True, text=True, env={**os.environ})
        assert res.returncode == 0, res.stderr
        results = json.loads((out / "results.json").read_text())
        metrics[device] = {s["id"]: s["metrics"] for s in results["scenarios"]}
    for sid, values in metrics["cpu"].items():
        for key in ("dice", "hd95", "nsd", "ece"):
            assert metrics["cuda"][sid][key]["value"] == pytest.approx(values[key]["value"], rel=1e-3, abs=1e-3), (sid, key)


@pytest.mark.parametrize("gpus_per_worker", ["1", "0.5"])
def test_ray_workers_sharing_the_gpu_give_the_local_gpu_results(tmp_path: Path, gpus_per_worker: str) -> None:
    """One Ray worker with the GPU, or two sharing it (fractional GPUs): results.json as the local
    executor's on the GPU, apart from what describes the run."""
    pytest.importorskip("ray", reason='needs Ray: pip install "medaudit[ray]"')
    from medaudit.results import audit_content

    base = ["run", str(ROOT / "examples" / "model.pt"), "--data", str(ROOT / "examples" / "mni-patches" / "test.npz"),
            "--config", str(ROOT / "examples" / "mni-patches.yaml"), "--device", "cuda", "--quiet", "--bootstrap", "50",
            "--perturbation", "mri.bias_field", "--severities", "2,4", "--shard-size", "128"]
    workers = str(round(1 / float(gpus_per_worker)))
    contents = []
    for name, extra in (("local", []), ("ray", ["--executor", "ray", "--ray-workers", workers,
                                                "--ray-gpus-per-worker", gpus_per_worker])):
        out = tmp_path / name
        res = subprocess.run([sys.executable, "-m", "medaudit.cli", *base, "--out", str(out), *extra],
                             capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        assert res.returncode == 0, res.stderr
        results = json.loads((out / "results.json").read_text())
        contents.append(audit_content(results))
    info = results["environment"]["executor"]
    assert info["workers"] == int(workers) and info["gpus"] == pytest.approx(1.0)
    assert all(p["gpus"] for p in info["worker_processes"])  # Ray gave each worker the GPU
    assert contents[1] == contents[0]
