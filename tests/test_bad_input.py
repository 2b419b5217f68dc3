"""Every bad input of the loading path, end to end through the CLI in a subprocess.

Each failing case must give exit code 2 and exactly one stderr line ``medaudit: error: …`` that
names the file (and the manifest row where there is one) and what to do, no traceback unless
``--debug``, and leave neither the ``--out`` folder nor a ``.out.partial-*`` staging folder behind.
The data are a dozen real 48×48 MNI152 patches from the bundled example.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
EXAMPLE_DATA = ROOT / "examples" / "mni-patches" / "test.npz"
CLASSES = ["csf_other", "grey_matter", "white_matter"]
FAST = ["--perturbation", "intensity.gamma", "--severities", "1", "--bootstrap", "0", "--quiet"]
N_IMAGES = 12

# Building TorchScript test models in this process: torch >= 2.9 deprecates torch.jit.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

CONFIG_YAML = """\
input:
  modality: mri
  dims: 2
  channels: 1
  intensity:
    scaling: fixed
    max_value: 255
  mean: [0.5]
  std: [0.25]
task:
  type: multiclass
  classes: [csf_other, grey_matter, white_matter]
audit:
  seed: 0
"""


def _cmd(args: list[str], debug: bool) -> list[str]:
    return [sys.executable, "-m", "medaudit.cli", *(["--debug"] if debug else []), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def run(args: list[str], debug: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(args, debug), capture_output=True, text=True, encoding="utf-8", env=_env(),
                          check=False)


def run_plain_and_debug(args: list[str]) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """The same command without and with ``--debug``, the two processes side by side."""
    procs = [subprocess.Popen(_cmd(a, debug), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              encoding="utf-8", env=_env())
             for a, debug in ((args, False), (args, True))]
    done = []
    for p, debug in zip(procs, (False, True)):
        out, err = p.communicate()
        done.append(subprocess.CompletedProcess(_cmd(args, debug), p.returncode, out, err))
    return done[0], done[1]


def error_lines(stderr: str) -> list[str]:
    """stderr without warnings and the ``config: …`` line every run starts with."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("medaudit: warning:", "config: "))]


# ---------------------------------------------------------------------------------------------
# Building inputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patches() -> tuple[np.ndarray, np.ndarray]:
    """A dozen real uint8 48×48 patches and their class indices (all three classes present)."""
    with np.load(EXAMPLE_DATA) as d:
        return d["images"][:N_IMAGES].copy(), d["labels"][:N_IMAGES].copy()


def write_config(tmp_path: Path, text: str = CONFIG_YAML) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def write_manifest(folder: Path, rows: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_manifest_columns(folder / "manifest.csv", ["path", "label"], rows)


def write_manifest_columns(manifest: Path, header: list[str], rows: Sequence[Sequence[str]]) -> Path:
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return manifest


def png_folder(folder: Path, patches: tuple[np.ndarray, np.ndarray], stem: str = "img") -> tuple[Path, list[str]]:
    """One PNG per patch plus ``manifest.csv``; returns the manifest and the file names in row order."""
    images, labels = patches
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        name = f"{stem}{i:02d}.png"
        Image.fromarray(img).save(folder / name)
        names.append(name)
    manifest = write_manifest(folder, [(n, CLASSES[int(lab)]) for n, lab in zip(names, labels)])
    return manifest, names


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def npy_folder(folder: Path, patches: tuple[np.ndarray, np.ndarray], bad_row: int, bad: np.ndarray) -> tuple[Path, str]:
    """One ``.npy`` per patch, row ``bad_row`` (0-based) replaced by ``bad``; returns the manifest and the bad name."""
    images, labels = patches
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        name = f"slice{i:02d}.npy"
        np.save(folder / name, bad if i == bad_row else img.astype(np.float32))
        rows.append((name, CLASSES[int(lab)]))
    return write_manifest(folder, rows), rows[bad_row][0]


class ThreeChannelNet(nn.Module):
    """Expects RGB input: fails on the 1-channel data."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


class RaisingNet(nn.Module):
    """No convolution to blame: raises an explicit error for single-channel input."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(48 * 48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("expected a 3-channel RGB batch")
        return self.head(x[:, 0].flatten(1))


class FiveClassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(48 * 48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


class SaturationRaisingNet(nn.Module):
    """Works on the first chunk (the dry run), raises on a chunk of saturated (all-white) images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.amin(dim=(1, 2, 3)) > 1.9).all()):
            raise RuntimeError("activation overflow on saturated input")
        return self.head(self.conv(x).mean(dim=(2, 3)))


def save_script(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def pickled_module(path: Path) -> Path:
    """A full nn.Module saved with torch.save (classes from torch only, so --trust-pickle can load it)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    torch.save(module, path)
    return path


# ---------------------------------------------------------------------------------------------
# The failing cases
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """``args`` for ``medaudit run`` (minus --config/--out), what the error line must contain, and the config."""

    args: list[str]
    must_contain: list[str]
    config: str = CONFIG_YAML


def case_missing_file(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    manifest, names = png_folder(tmp / "data", p)
    (tmp / "data" / names[4]).unlink()
    return Case([str(MODEL), "--data", str(tmp / "data")],
                [str(manifest), "row 5", repr(names[4]), str(tmp / "data" / names[4]), "does not exist", "fix the path"])


def case_truncated_png(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    manifest, names = png_folder(tmp / "data", p)
    truncate(tmp / "data" / names[2])
    return Case([str(MODEL), "--data", str(manifest)], [str(manifest), "row 3", names[2], "truncated or corrupt"])


def case_truncated_png_after_dry_run(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    """Row 10 is read by the shard loop, not by the one-batch dry run that checks the model first."""
    manifest, names = png_folder(tmp / "data", p)
    truncate(tmp / "data" / names[9])
    return Case([str(MODEL), "--data", str(manifest), "--model-batch-size", "4", "--batch-size", "4"],
                [str(manifest), "row 10", names[9], "truncated or corrupt"])


def case_header_only_png(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    """Truncated inside the PNG signature: Pillow cannot even identify the file."""
    manifest, names = png_folder(tmp / "data", p)
    (tmp / "data" / names[0]).write_bytes(b"\x89PNG\r\n")
    return Case([str(MODEL), "--data", str(manifest)], [str(manifest), "row 1", names[0], "corrupt"])


def case_volume_as_2d(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    volume = np.stack([p[0][0]] * 16).astype(np.float32)  # [16, 48, 48]: a 3-D stack, config says dims 2
    manifest, name = npy_folder(tmp / "data", p, 1, volume)
    return Case([str(MODEL), "--data", str(manifest)], [str(manifest), "row 2", name, "input.dims"])


def case_4d_volume_as_2d(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    volume = np.zeros((1, 8, 48, 48), dtype=np.float32)  # [C, D, H, W]
    manifest, name = npy_folder(tmp / "data", p, 6, volume)
    return Case([str(MODEL), "--data", str(manifest)], [str(manifest), "row 7", name, "input.dims"])


def case_unknown_label(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    manifest, _ = png_folder(tmp / "data", p)
    rows = list(csv.reader(manifest.read_text(encoding="utf-8").splitlines()))
    rows[8][1] = "gray_matter"  # a typo in data row 8
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return Case([str(MODEL), "--data", str(manifest)],
                [f"{manifest}: row 8 (sample id 'img07.png') has label 'gray_matter', but task.classes names 3 classes "
                 "(0–2): csf_other, grey_matter, white_matter"])


def case_stray_label_index(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    """One label 7 in a 3-class task (task.classes configured): its row, sample id and value, and the classes."""
    labels = p[1].copy()
    labels[8] = 7
    data = tmp / "d.npz"
    np.savez(data, images=p[0], labels=labels)
    return Case([str(MODEL), "--data", str(data)],
                [f"{data} ('labels'): row 9 (sample id '8') has label 7, but task.classes names 3 classes (0–2): "
                 "csf_other, grey_matter, white_matter"])


def case_stray_label_inferred(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    """task.classes not configured: classes 0–7 inferred from one stray 7 would have 3–6 empty."""
    labels = p[1].copy()
    labels[10] = 7
    data = tmp / "d.npz"
    np.savez(data, images=p[0], labels=labels)
    return Case([str(MODEL), "--data", str(data)],
                [f"{data} ('labels'): row 11 (sample id '10') has label 7, but no label is 3–6",
                 "inferred as 0–7 (8 classes, 4 without a sample)", "set task.classes"],
                config=CONFIG_YAML.replace("  classes: [csf_other, grey_matter, white_matter]\n", ""))


def case_stray_label_beyond_the_model(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    """task.classes not configured, labels 0–3 without a gap, a 3-output model: the row of the
    first label 3 is named, not just "task.classes names 4 classes"."""
    labels = p[1].copy()
    labels[5] = 3
    data = tmp / "d.npz"
    np.savez(data, images=p[0], labels=labels)
    return Case([str(MODEL), "--data", str(data)],
                ["the model outputs 3 values per sample but task.classes names 4 classes",
                 f"{data} (sample 5, id '5') has label '3', the first of 1 sample(s)", "set task.classes"],
                config=CONFIG_YAML.replace("  classes: [csf_other, grey_matter, white_matter]\n", ""))


def case_unlabelled_data(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    data = tmp / "d.npz"
    np.savez(data, images=p[0])
    return Case([str(MODEL), "--data", str(data)],
                [f"{data}: it holds no labels array (arrays: ['images']); --data needs labels, because every metric "
                 "compares the model's predictions with them (only an --ood-data set may be unlabelled)"])


def case_unlabelled_reference(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    data = tmp / "d.npz"
    np.savez(data, images=p[0], labels=p[1])
    manifest, names = png_folder(tmp / "ref", p)
    write_manifest_columns(manifest, ["path"], [[n] for n in names])
    return Case([str(MODEL), "--data", str(data), "--reference", str(manifest)],
                [f"{manifest}: the manifest has no 'label' column (columns: ['path']); --reference needs labels",
                 "mahalanobis"])


def case_ood_set_with_foreign_labels(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    """An OOD set labelled for another task: its labels are unused, and the error says to drop them."""
    data = tmp / "d.npz"
    np.savez(data, images=p[0], labels=p[1])
    manifest, names = png_folder(tmp / "ood", p)
    write_manifest(manifest.parent, [(n, "pneumonia") for n in names])
    return Case([str(MODEL), "--data", str(data), "--ood-data", str(manifest)],
                [f"{manifest}: row 1 (sample id 'img00.png') has label 'pneumonia', but task.classes names 3 classes",
                 "the labels of an --ood-data set are not used, so leave out its label column"])


def case_nan_pixels(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    bad = p[0][3].astype(np.float32)
    bad[10, 20] = np.nan
    manifest, name = npy_folder(tmp / "data", p, 3, bad)
    return Case([str(MODEL), "--data", str(manifest)], [str(manifest), "row 4", name, "NaN or Inf", "fix or remove"])


def case_inf_pixels(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    bad = p[0][0].astype(np.float32)
    bad[0, 0] = np.inf
    manifest, name = npy_folder(tmp / "data", p, 0, bad)
    return Case([str(MODEL), "--data", str(manifest)], [str(manifest), "row 1", name, "NaN or Inf"])


def case_empty_manifest(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    manifest = write_manifest(tmp / "data", [])
    return Case([str(MODEL), "--data", str(tmp / "data")], [str(manifest), "empty", "add one row per image"])


def case_empty_npz(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    data = tmp / "empty.npz"
    np.savez(data, images=np.zeros((0, 48, 48), dtype=np.uint8), labels=np.zeros((0,), dtype=np.int64))
    return Case([str(MODEL), "--data", str(data)], [str(data), "empty", "no images"])


def case_model_wrong_channels(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    data = tmp / "d.npz"
    np.savez(data, images=p[0], labels=p[1])
    model = save_script(ThreeChannelNet(), tmp / "rgb-model.pt")
    return Case([str(model), "--data", str(data)], [str(model), "expects 3 channels", "input.channels"])


def case_model_raises(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    data = tmp / "d.npz"
    np.savez(data, images=p[0], labels=p[1])
    model = save_script(RaisingNet(), tmp / "raising-model.pt")
    return Case([str(model), "--data", str(data)], [str(model), "raised on a batch of shape", "input.channels"])


def case_model_raises_keeps_its_message(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    """The TorchScript error's first line is boilerplate; the model's own message is its last line."""
    case = case_model_raises(tmp, p)
    case.must_contain.append("expected a 3-channel RGB batch")
    return case


def case_model_raises_after_dry_run(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    """The model handles chunk 1 (the dry run) and raises on chunk 3, whose images are saturated."""
    images = p[0].copy()
    images[8:] = 255
    data = tmp / "d.npz"
    np.savez(data, images=images, labels=p[1])
    model = save_script(SaturationRaisingNet(), tmp / "saturation-model.pt")
    return Case([str(model), "--data", str(data), "--model-batch-size", "4", "--batch-size", "4"],
                [str(model), "activation overflow on saturated input"])


def case_model_five_outputs(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    data = tmp / "d.npz"
    np.savez(data, images=p[0], labels=p[1])
    model = save_script(FiveClassNet(), tmp / "five-class-model.pt")
    return Case([str(model), "--data", str(data)], [str(model), "5 values per sample", "3 classes", "task.classes"])


def case_pickled_module(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    data = tmp / "d.npz"
    np.savez(data, images=p[0], labels=p[1])
    model = pickled_module(tmp / "full-module.pt")
    return Case([str(model), "--data", str(data)],
                [str(model), "arbitrary code", "--trust-pickle", "torch.jit.save", "state_dict"])


def case_truncated_png_in_workers(tmp: Path, p: tuple[np.ndarray, np.ndarray]) -> Case:
    """Row 7 is decoded by a DataLoader worker process: the dry run reads rows 1-4 in-process, and
    the preprocessing probe's 64 evenly spaced rows of 144 skip rows 6 and 7."""
    images, labels = p
    manifest, names = png_folder(tmp / "data", (np.tile(images, (12, 1, 1)), np.tile(labels, 12)))
    truncate(tmp / "data" / names[6])
    return Case([str(MODEL), "--data", str(manifest), "--workers", "2", "--model-batch-size", "4", "--batch-size", "4"],
                [str(manifest), "row 7", names[6], "truncated or corrupt"])


CASES: dict[str, Callable[[Path, tuple[np.ndarray, np.ndarray]], Case]] = {
    "1-missing-file": case_missing_file,
    "2-truncated-png": case_truncated_png,
    "2-truncated-png-after-dry-run": case_truncated_png_after_dry_run,
    "2-png-signature-only": case_header_only_png,
    "3-volume-as-2d": case_volume_as_2d,
    "3-4d-volume-as-2d": case_4d_volume_as_2d,
    "4-unknown-label": case_unknown_label,
    "4-stray-label-index": case_stray_label_index,
    "4-stray-label-inferred": case_stray_label_inferred,
    "4-stray-label-beyond-the-model": case_stray_label_beyond_the_model,
    "12-unlabelled-data": case_unlabelled_data,
    "12-unlabelled-reference": case_unlabelled_reference,
    "12-ood-set-with-foreign-labels": case_ood_set_with_foreign_labels,
    "5-nan-pixels": case_nan_pixels,
    "5-inf-pixels": case_inf_pixels,
    "6-empty-manifest": case_empty_manifest,
    "6-empty-npz": case_empty_npz,
    "7-model-wrong-channels": case_model_wrong_channels,
    "7-model-raises": case_model_raises,
    "7-model-raises-keeps-its-message": case_model_raises_keeps_its_message,
    "7-model-raises-after-dry-run": case_model_raises_after_dry_run,
    "8-model-five-outputs": case_model_five_outputs,
    "9-pickled-module": case_pickled_module,
    "11-truncated-png-in-workers": case_truncated_png_in_workers,
}


def assert_clean_failure(res: subprocess.CompletedProcess[str], out: Path, tmp: Path, must_contain: list[str]) -> None:
    detail = f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 2, detail
    lines = error_lines(res.stderr)
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("medaudit: error: "), detail
    for text in must_contain:
        assert text in line, f"{text!r} not in the error line\n{detail}"
    assert "Traceback" not in res.stderr, detail
    assert "Original Traceback" not in res.stderr, detail
    assert not out.exists(), f"{out} was left behind\n{detail}"
    assert not list(tmp.rglob(".out.partial-*")), detail
    assert not list(tmp.rglob(".medaudit-cache")), detail


XFAIL: dict[str, pytest.MarkDecorator] = {}  # both former core bugs are fixed in audit/runner.py


VARIANTS = {"2-truncated-png-after-dry-run", "2-png-signature-only", "3-4d-volume-as-2d", "5-inf-pixels",
            "7-model-raises-keeps-its-message", "7-model-raises-after-dry-run", "4-stray-label-index",
            "4-stray-label-inferred", "4-stray-label-beyond-the-model", "12-unlabelled-reference", "12-ood-set-with-foreign-labels"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=XFAIL[n]) if n in XFAIL else n for n in CASES])
def test_bad_input_exits_2_with_one_line(name: str, tmp_path: Path, patches: tuple[np.ndarray, np.ndarray]) -> None:
    case = CASES[name](tmp_path, patches)
    out = tmp_path / "out"
    args = ["run", *case.args, "--config", str(write_config(tmp_path, case.config)), "--out", str(out), *FAST]
    if name in VARIANTS:  # the same code path as a case checked with --debug below: the plain run is enough
        assert_clean_failure(run(args), out, tmp_path, case.must_contain)
        return
    plain, debug = run_plain_and_debug(args)
    assert_clean_failure(plain, out, tmp_path, case.must_contain)
    # --debug: the same error line, with the traceback before it, and still nothing left behind
    assert debug.returncode == 2, debug.stderr
    assert "Traceback (most recent call last)" in debug.stderr, debug.stderr
    assert error_lines(debug.stderr)[-1] == error_lines(plain.stderr)[0], debug.stderr
    if name.startswith("11-"):  # the error really came from a worker process
        assert "DataLoader worker process" in debug.stderr, debug.stderr
    assert not out.exists()
    assert not list(tmp_path.rglob(".out.partial-*"))


# ---------------------------------------------------------------------------------------------
# Inputs that must work
# ---------------------------------------------------------------------------------------------


def test_pickled_module_runs_with_trust_pickle(tmp_path: Path, patches: tuple[np.ndarray, np.ndarray]) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, images=patches[0], labels=patches[1])
    model = pickled_module(tmp_path / "full-module.pt")
    out = tmp_path / "out"
    res = run(["run", str(model), "--data", str(data), "--config", str(write_config(tmp_path)), "--out", str(out),
               "--trust-pickle", *FAST])
    assert res.returncode == 0, res.stdout + res.stderr
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["model"]["format"] == "pickle"
    assert results["model"]["path"] == str(model)
    assert results["scenarios"][0]["n_samples"] == N_IMAGES


def test_paths_with_spaces_and_unicode(tmp_path: Path, patches: tuple[np.ndarray, np.ndarray]) -> None:
    base = tmp_path / "dossier patients é" / "ü data"
    manifest, _ = png_folder(base / "coupes IRM ñ", patches, stem="coupe axiale ø ")
    model = base / "modèle v1 (copie).pt"
    model.write_bytes(MODEL.read_bytes())
    out = base / "sortie à"
    res = run(["run", str(model), "--data", str(manifest.parent), "--config", str(write_config(tmp_path)),
               "--out", str(out), *FAST])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"results: {out / 'results.json'}" in res.stdout
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["model"]["path"] == str(model)
    assert results["dataset"]["path"] == str(manifest)
    assert results["dataset"]["n_samples"] == N_IMAGES
    assert results["scenarios"][0]["n_samples"] == N_IMAGES
    assert "é" in (out / "report.html").read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.json", "tables"]


def test_unlabelled_ood_set_is_scored_like_a_labelled_one(tmp_path: Path, patches: tuple[np.ndarray, np.ndarray]) -> None:
    """An --ood-data set needs no labels: the same images without and with them get the same detection measures."""
    data = tmp_path / "d.npz"
    np.savez(data, images=patches[0], labels=patches[1])
    inverted = 255 - patches[0]
    np.savez(tmp_path / "unlabelled.npz", images=inverted)
    manifest, _ = png_folder(tmp_path / "labelled", (inverted, patches[1]))
    out = tmp_path / "out"
    res = run(["run", str(MODEL), "--data", str(data), "--ood-data", str(tmp_path / "unlabelled.npz"),
               "--ood-data", str(manifest), "--config", str(write_config(tmp_path)), "--out", str(out), *FAST])
    assert res.returncode == 0, res.stdout + res.stderr
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    by_id = {s["id"]: s for s in results["scenarios"]}
    unlabelled, labelled = by_id["ood:unlabelled"]["ood"], by_id["ood:manifest"]["ood"]
    assert unlabelled and set(unlabelled) == set(labelled)
    for detector, measures in unlabelled.items():
        assert set(measures) == {"auroc", "aupr", "fpr95", "fpr95_in", "aupr_trapz"}
        for name, value in measures.items():
            assert value["value"] is not None and value["value"] == labelled[detector][name]["value"], (detector, name)
    assert by_id["ood:unlabelled"]["n_samples"] == N_IMAGES


class TinyNet3d(nn.Module):
    """A 3-D classifier of three classes: runs only on [B, 1, D, H, W]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3, 4)))


def test_nifti_volumes_without_input_dims_run_as_3d(tmp_path: Path, patches: tuple[np.ndarray, np.ndarray]) -> None:
    """input.dims defaults to auto: NIfTI volumes are read as 3-D and results.json records dims 3."""
    import nibabel as nib

    folder = tmp_path / "volumes"
    folder.mkdir()
    rows = []
    for k in range(4):  # each volume: 3 patches stacked along Z, labelled by the first
        vol = np.stack([patches[0][3 * k + j] for j in range(3)], axis=-1).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), folder / f"vol{k}.nii.gz")
        rows.append((f"vol{k}.nii.gz", CLASSES[int(patches[1][3 * k])]))
    write_manifest(folder, rows)
    config = write_config(tmp_path, CONFIG_YAML.replace("  dims: 2\n", ""))
    torch.manual_seed(0)
    model = save_script(TinyNet3d(), tmp_path / "net3d.pt")
    out = tmp_path / "out"
    res = run(["run", str(model), "--data", str(folder), "--config", str(config), "--out", str(out), *FAST])
    assert res.returncode == 0, res.stdout + res.stderr
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["config"]["input"]["dims"] == 3
    assert results["scenarios"][0]["n_samples"] == 4
