"""Build the bundled segmentation example from the MNI152 template (real brain MRI).

Whole axial T1 slices with a tissue label map each, for examples/train_segmentation_example.py and
the audit in examples/mni-slices.yaml. Each slice is averaged over 2×2 pixels (1 mm → 2 mm pixels,
98×116) and cropped to 96×96 around the brain; the grey- and white-matter probability maps of
the ICBM 2009a template are averaged the same way, and every pixel is labelled

- 1 ``grey_matter`` / 2 ``white_matter``: the larger of P(GM), P(WM) where max(P(GM), P(WM)) ≥ 0.5
  (128 of 255; a tie goes to grey matter),
- 0 ``background``: everywhere else — CSF, skull, scalp and air.

Slices with almost no brain are skipped: those whose brain (grey + white matter) covers less
than a tenth of the largest slice's, and those holding only specks of one tissue (fewer than 50
pixels, 200 mm², of grey or of white matter: the lowest cerebellar slices, where a class's Dice
would be decided by a handful of pixels). The masks carry no spacing (an .npz has none), so medaudit's distances (HD95, ASSD,
NSD) are in pixels of 2 mm. Metadata column: level (inferior / middle / superior thirds of the
brain's z extent).

Test and training slices come from disjoint blocks of axial slices (8-slice blocks, every third
block is test, with the neighbouring slice on each side of a test block dropped, so no training
slice is within 2 mm of a test slice). The training data are plain slices; the variety (shifts, flips,
intensity gains) is added while training. It is one averaged brain: the example demonstrates the
tool, it is not a clinical model.

Template notice: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal
Neurological Institute, McGill University. Permission to use, copy, modify, and distribute this
software and its documentation for any purpose and without fee is hereby granted, provided that
the above copyright notice appear in all copies. The authors and McGill University make no
representations about the suitability of this software for any purpose. It is provided "as is"
without express or implied warranty.

Usage: python examples/build_segmentation_example.py [--shared ../shared/data/mni152] [--out examples/mni-slices]
Writes test.npz (committed) and train.npz (used by train_segmentation_example.py, not committed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

CLASSES = ["background", "grey_matter", "white_matter"]
SIZE = 96  # 96×96 slices of 2 mm pixels
BLOCK, CYCLE, GUARD = 8, 3, 1  # 8-slice blocks, every third one test, 1 guard slice each side
MIN_BRAIN = 0.1  # skip slices with less brain than this fraction of the largest slice's
MIN_TISSUE = 50  # ... and slices with fewer pixels than this of grey or of white matter


def load(shared: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1 (0–255) and the GM/WM probability maps (0–1), float32, on the template's 1 mm grid."""
    t1 = np.asarray(nib.load(shared / "t1.nii.gz").dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(shared / "gm.nii.gz").dataobj, dtype=np.float32) / 255
    wm = np.asarray(nib.load(shared / "wm.nii.gz").dataobj, dtype=np.float32) / 255
    return t1, gm, wm


def downsample(volume: np.ndarray) -> np.ndarray:
    """Mean over 2×2 in-plane pixels (x, y), every axial slice kept: [X/2, Y/2, Z]."""
    x, y = volume.shape[0] // 2 * 2, volume.shape[1] // 2 * 2
    v = volume[:x, :y]
    return v.reshape(x // 2, 2, y // 2, 2, -1).mean(axis=(1, 3))


def labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """0 background, 1 grey matter, 2 white matter (the rule in the module docstring)."""
    out = np.where(wm > gm, 2, 1).astype(np.uint8)
    out[np.maximum(gm, wm) < 0.5] = 0
    return out


def crop_box(brain: np.ndarray) -> tuple[slice, slice]:
    """A SIZE×SIZE in-plane window centred on the brain's bounding box, kept inside the volume."""
    box = []
    for axis in (0, 1):
        idx = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        start = (idx[0] + idx[-1] + 1) // 2 - SIZE // 2
        start = int(np.clip(start, 0, brain.shape[axis] - SIZE))
        box.append(slice(start, start + SIZE))
    return box[0], box[1]


def split_of(z: np.ndarray, z0: int) -> np.ndarray:
    """0 = train, 1 = test, -1 = dropped guard slice (block structure along z, from slice z0)."""
    rel = z - z0
    test = (rel // BLOCK) % CYCLE == 0
    # distance (in slices) from each slice to the nearest test slice
    test_z = rel[test]
    near = np.min(np.abs(rel[:, None] - test_z[None, :]), axis=1) if len(test_z) else np.full(len(z), 10**6)
    return np.where(test, 1, np.where(near <= GUARD, -1, 0))


def build(shared: Path) -> dict[str, dict[str, np.ndarray]]:
    """The train and test sets: ``images``/``masks`` uint8 [N, 96, 96] and ``meta_level`` per slice."""
    t1, gm, wm = load(shared)
    t1, gm, wm = downsample(t1), downsample(gm), downsample(wm)
    mask = labels(gm, wm)
    brain = mask > 0
    bx, by = crop_box(brain)
    area = brain.sum(axis=(0, 1))
    tissue = np.minimum((mask == 1).sum(axis=(0, 1)), (mask == 2).sum(axis=(0, 1)))
    zs = np.flatnonzero((area >= MIN_BRAIN * area.max()) & (tissue >= MIN_TISSUE))
    z_lo, z_hi = zs.min(), zs.max()
    split = split_of(zs, z_lo)
    out: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    for z, flag in zip(zs, split):
        if flag < 0:
            continue
        d = out["test" if flag == 1 else "train"]
        # rows: anterior at the top; columns: the template's x axis (as examples/build_example.py)
        d.setdefault("images", []).append(np.rint(t1[bx, by, z]).T[::-1].astype(np.uint8))
        d.setdefault("masks", []).append(mask[bx, by, z].T[::-1])
        third = (z - z_lo) / max(z_hi - z_lo, 1)
        d.setdefault("meta_level", []).append("inferior" if third < 1 / 3 else "middle" if third < 2 / 3 else "superior")
    return {
        name: {
            "images": np.stack(d["images"]).astype(np.uint8),
            "masks": np.stack(d["masks"]).astype(np.uint8),
            **{k: np.asarray(v).astype(str) for k, v in d.items() if k.startswith("meta_")},
        }
        for name, d in out.items()
    }


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=here.parents[1] / "shared" / "data" / "mni152")
    ap.add_argument("--out", type=Path, default=here / "mni-slices")
    args = ap.parse_args()
    data = build(args.shared)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, arrays in data.items():
        np.savez_compressed(args.out / f"{name}.npz", **arrays)
        levels, counts = np.unique(arrays["meta_level"], return_counts=True)
        pixels = np.bincount(arrays["masks"].ravel(), minlength=len(CLASSES)) / arrays["masks"].size
        print(f"{args.out / (name + '.npz')}: {len(arrays['images'])} slices "
              f"({', '.join(f'{lv} {c}' for lv, c in zip(levels, counts))}), "
              f"pixel fractions {', '.join(f'{c} {p:.2f}' for c, p in zip(CLASSES, pixels))}")


if __name__ == "__main__":
    main()
