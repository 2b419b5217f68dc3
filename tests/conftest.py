"""Shared fixtures: small real images cut from the MNI152 template in ../shared (skipped without it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mni152"


@pytest.fixture(scope="session")
def mni_t1() -> np.ndarray:
    """The 1 mm MNI152 T1 template as float32 in [0, 1] (197×233×189)."""
    path = SHARED / "t1.nii.gz"
    if not path.exists():
        pytest.skip(f"{path} not available")
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj, dtype=np.float32) / 255.0


@pytest.fixture(scope="session")
def mni_slices(mni_t1: np.ndarray) -> torch.Tensor:
    """Four axial 128×128 brain slices, ``[4, 1, 128, 128]`` float32 in [0, 1]."""
    zs = [60, 75, 90, 105]
    cx, cy = mni_t1.shape[0] // 2, mni_t1.shape[1] // 2 + 10
    sl = [mni_t1[cx - 64 : cx + 64, cy - 64 : cy + 64, z] for z in zs]
    return torch.from_numpy(np.stack(sl)[:, None].copy())


@pytest.fixture(scope="session")
def mni_volumes(mni_t1: np.ndarray) -> torch.Tensor:
    """Two 48³ brain volumes (2 mm, two different crops), ``[2, 1, 48, 48, 48]`` float32 in [0, 1]."""
    vol = torch.from_numpy(mni_t1[::2, ::2, ::2].copy())  # 99×117×95
    a = vol[25:73, 35:83, 25:73]
    b = vol[27:75, 40:88, 30:78]
    return torch.stack([a, b])[:, None].contiguous()
