"""Build the bundled example dataset from the MNI152 template (real brain MRI).

Labels are honest and come from the template itself: the tissue class at the centre of each
48×48 axial T1 patch, read from the ICBM 2009a grey- and white-matter probability maps
("grey_matter" if P(GM) > 0.6, "white_matter" if P(WM) > 0.6, "csf_other" if both < 0.15 inside
the dilated brain mask). Metadata columns: hemisphere (from the world x coordinate) and level
(inferior / middle / superior thirds of the brain's z extent).

Test and training patches come from disjoint blocks of axial slices (8-slice blocks, every
fourth block is test, with the neighbouring slice of each side dropped), but it is one averaged
brain: the example demonstrates the tool, it is not a clinical model.

Usage: python examples/build_example.py [--shared ../shared/data/mni152] [--out examples/mni-patches]
Writes test.npz (committed) and train.npz (used by train_example.py, not committed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

CLASSES = ["csf_other", "grey_matter", "white_matter"]
HALF = 24  # 48×48 patches


def load(shared: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    img = nib.load(shared / "t1.nii.gz")
    t1 = np.asarray(img.dataobj, dtype=np.uint8)
    gm = np.asarray(nib.load(shared / "gm.nii.gz").dataobj, dtype=np.float32) / 255
    wm = np.asarray(nib.load(shared / "wm.nii.gz").dataobj, dtype=np.float32) / 255
    return t1, gm, wm, img.affine


def candidates(gm: np.ndarray, wm: np.ndarray) -> dict[int, np.ndarray]:
    brain = ndimage.binary_dilation((gm + wm) > 0.5, iterations=3)
    label = np.full(gm.shape, -1, dtype=np.int8)
    label[brain & (gm < 0.15) & (wm < 0.15)] = 0
    label[gm > 0.6] = 1
    label[wm > 0.6] = 2
    inner = np.zeros_like(brain)
    inner[HALF:-HALF, HALF:-HALF, :] = True  # whole patch inside the slice
    return {k: np.argwhere((label == k) & inner) for k in range(3)}


def split_of(z: np.ndarray) -> np.ndarray:
    """0 = train, 1 = test, -1 = dropped guard slice (block structure along z)."""
    block, offset = z // 8, z % 8
    test = block % 4 == 0
    guard = (block % 4 == 1) & (offset == 0) | (block % 4 == 3) & (offset == 7)
    return np.where(guard, -1, test.astype(int))


def build(shared: Path, n_test_per_class: int, n_train_per_class: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    t1, gm, wm, affine = load(shared)
    rng = np.random.default_rng(seed)
    zext = np.argwhere((gm + wm) > 0.5)[:, 2]
    z_lo, z_hi = zext.min(), zext.max()
    out: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    for k, coords in candidates(gm, wm).items():
        split = split_of(coords[:, 2])
        for name, want, flag in (("test", n_test_per_class, 1), ("train", n_train_per_class, 0)):
            pool = coords[split == flag]
            pick = pool[rng.choice(len(pool), size=want, replace=False)]
            d = out[name]
            for x, y, z in pick:
                d.setdefault("images", []).append(t1[x - HALF:x + HALF, y - HALF:y + HALF, z].T[::-1].copy())
                d.setdefault("labels", []).append(k)
                world = affine @ np.array([x, y, z, 1.0])
                d.setdefault("meta_hemisphere", []).append("right" if world[0] > 0 else "left")
                third = (z - z_lo) / max(z_hi - z_lo, 1)
                d.setdefault("meta_level", []).append("inferior" if third < 1 / 3 else "middle" if third < 2 / 3 else "superior")
                d.setdefault("meta_voxel", []).append(f"{x},{y},{z}")
    result = {}
    for name, d in out.items():
        order = rng.permutation(len(d["labels"]))
        result[name] = {
            "images": np.stack(d["images"])[order].astype(np.uint8),
            "labels": np.asarray(d["labels"], dtype=np.int64)[order],
            **{k: np.asarray(v)[order].astype(str) for k, v in d.items() if k.startswith("meta_")},
        }
    return result


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=here.parents[1] / "shared" / "data" / "mni152")
    ap.add_argument("--out", type=Path, default=here / "mni-patches")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = build(args.shared, n_test_per_class=200, n_train_per_class=1200, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, arrays in data.items():
        np.savez_compressed(args.out / f"{name}.npz", **arrays)
        print(f"{args.out / (name + '.npz')}: {len(arrays['labels'])} patches, classes {np.bincount(arrays['labels'])}")


if __name__ == "__main__":
    main()
