"""Shared fixtures: small real images cut from the MNI152 template (tests/data, see its README)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

CROPS = Path(__file__).resolve().parent / "data" / "mni152_crops.npz"


@pytest.fixture(scope="session")
def mni_slices() -> torch.Tensor:
    """Four axial 128×128 slices of the MNI152 T1 template, ``[4, 1, 128, 128]`` float32 in [0, 1]."""
    with np.load(CROPS) as d:
        return torch.from_numpy(d["slices"].astype(np.float32) / 255.0)[:, None].contiguous()


@pytest.fixture(scope="session")
def mni_volumes() -> torch.Tensor:
    """Two 48³ brain volumes (2 mm, two different crops), ``[2, 1, 48, 48, 48]`` float32 in [0, 1]."""
    with np.load(CROPS) as d:
        return torch.from_numpy(d["volumes"].astype(np.float32) / 255.0)[:, None].contiguous()


@pytest.fixture(scope="session")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's example audit, run once per session through the CLI; its output folder."""
    from click.testing import CliRunner

    from medaudit.cli import cli

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("example") / "out"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(cli, ["run", "examples/model.pt", "--data", "examples/mni-patches/test.npz",
                                          "--config", "examples/mni-patches.yaml", "--out", str(out), "--quiet"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return out


#: pytorch-ood 0.4.0's per-sample scores of the post-hoc detectors on fixed feature maps (README beside it).
OOD_REFERENCE = Path(__file__).parent / "data" / "ood-reference" / "pytorch_ood_reference.npz"


@pytest.fixture(scope="session")
def ood_reference() -> dict[str, np.ndarray]:
    """The arrays of :data:`OOD_REFERENCE`, loaded once."""
    with np.load(OOD_REFERENCE) as f:
        return {k: f[k] for k in f.files}
