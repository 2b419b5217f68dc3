"""The CLI's malloc settings: when they apply, and that they stop the page faults they exist for."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medaudit.host_memory import _glibc, malloc_tunable, tune_malloc

glibc_only = pytest.mark.skipif(not _glibc(), reason="mallopt thresholds are glibc's")


@pytest.mark.parametrize("environ", [
    {"MALLOC_ARENA_MAX": "2"},
    {"MALLOC_MMAP_THRESHOLD_": "131072"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
    {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
    {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
])
def test_user_allocator_settings_are_left_alone(environ: dict[str, str]) -> None:
    assert not malloc_tunable(environ)
    assert not tune_malloc(environ)


@glibc_only
def test_tunes_glibc_without_user_settings() -> None:
    assert malloc_tunable({"PATH": "/usr/bin", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"})


# The OOD measures' bootstrap chunks: megabyte temporaries of several sizes created and freed in
# a loop. With glibc's defaults many of them are fresh memory whose pages fault on first touch.
_LOOP = r"""
import resource, sys, torch
from medaudit.host_memory import tune_malloc
from medaudit.ood_metrics import detection_measures
if sys.argv[1] == "tuned":
    assert tune_malloc({})
g = torch.Generator().manual_seed(0)
neg, pos = torch.randn(2048, generator=g), torch.randn(18, 2048, generator=g)
w = torch.randint(0, 3, (61, 2048), generator=g).double()
detection_measures(pos, neg, w, w)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    detection_measures(pos, neg, w, w)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _LOOP, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1])


@glibc_only
def test_tuned_malloc_reuses_memory_instead_of_faulting_it_in() -> None:
    default, tuned = _faults("default"), _faults("tuned")
    assert default > 10_000  # the problem is real here: ~40k page faults with the defaults
    assert tuned < default / 5  # 10-100x fewer in practice


def test_the_cli_tunes_malloc_after_the_forward_passes(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``medaudit run`` asks for the settings once the forward passes are done (they keep glibc's
    defaults, see the module docstring); the library API does not ask at all."""
    from pathlib import Path

    from click.testing import CliRunner

    import medaudit.audit as audit
    from medaudit.cli import cli

    events: list[str] = []
    real_forward = audit.run_forward
    monkeypatch.setattr(audit, "run_forward", lambda *a, **k: (events.append("forward"), real_forward(*a, **k))[1])
    monkeypatch.setattr(audit, "tune_malloc", lambda: events.append("tune") or True)
    root = Path(__file__).resolve().parents[1]
    args = ["run", str(root / "examples" / "model.pt"), "--data", str(root / "examples" / "mni-patches" / "test.npz"),
            "--config", str(root / "examples" / "mni-patches.yaml"), "--out", str(tmp_path / "out"), "--quiet",
            "--perturbation", "intensity.gamma", "--severities", "1", "--bootstrap", "20"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code in (0, 1), result.output
    assert events == ["forward", "tune"]
    assert "tune_allocator" in audit.run_audit.__kwdefaults__ and audit.run_audit.__kwdefaults__["tune_allocator"] is False
