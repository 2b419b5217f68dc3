"""The perturbation boundary: a third-party perturbation that breaks its output contract loses its
scenarios, named, before it can skew the numbers or be blamed on the model."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medaudit.cli import cli
from medaudit.runner.guard import RANGE_TOLERANCE, ValueGuard, metadata_problem

ROOT = Path(__file__).resolve().parents[1]

# An installed-looking plugin: a module and a dist-info folder with the entry point, found by
# importlib.metadata on sys.path like any pip-installed plugin.
ACME = '''
import torch
from medaudit.hookspecs import hookimpl
from medaudit.perturbation import Perturbation


class _Acme:  # the shared part; each class below is the Perturbation
    suite = "acme"
    severities = {s: {"x": float(s)} for s in range(1, 6)}

    def sample(self, severity, rng, shape):
        return {}


class Narrow(_Acme, Perturbation):
    name = "acme.narrow"

    def apply(self, x, params):
        return x[..., :-1]


class Half(_Acme, Perturbation):
    name = "acme.half"

    def apply(self, x, params):
        return x[..., ::2, ::2]


class DropsOne(_Acme, Perturbation):
    name = "acme.drops_one"

    def apply(self, x, params):
        return x[:-1]


class Double(_Acme, Perturbation):
    name = "acme.double"

    def apply(self, x, params):
        return x.double()


class NaNs(_Acme, Perturbation):
    name = "acme.nans"

    def apply(self, x, params):
        y = x.clone()
        y[-1, :, 0, 0] = float("nan")  # one pixel of the batch's last sample
        return y


class Bright(_Acme, Perturbation):
    name = "acme.bright"

    def apply(self, x, params):
        return x + 0.5


class LongParams(_Acme, Perturbation):
    name = "acme.long_params"

    def sample(self, severity, rng, shape):
        return {"amount": torch.zeros(shape[0] + 1, device=rng.device)}

    def apply(self, x, params):
        return x


class Rounding(_Acme, Perturbation):
    """Unclamped arithmetic a few ulps above 1: within the tolerance, kept."""

    name = "acme.rounding"

    def apply(self, x, params):
        return x * (1 + 2e-7)


class AcmePlugin:
    @hookimpl
    def medaudit_perturbations(self):
        return [Narrow, Half, DropsOne, Double, NaNs, Bright, LongParams, Rounding]


plugin = AcmePlugin()
'''

EXPECTED = {
    "acme.narrow": r"returned shape \(224, 1, 48, 47\) for input \(224, 1, 48, 48\)",
    "acme.half": r"returned shape \(224, 1, 24, 24\) for input \(224, 1, 48, 48\)",
    "acme.drops_one": r"returned shape \(223, 1, 48, 48\) for input \(224, 1, 48, 48\)",
    "acme.double": r"returned dtype torch\.float64 for input torch\.float32",
    "acme.nans": r"returned NaN or Inf values",
    "acme.bright": r"returned values in \[0\.5[\d.]*, 1\.[\d.]+\], outside \[0, 1\]",
    "acme.long_params": r"returned parameter 'amount' with 225 values for a batch of 224",
}


def _install_acme(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root.mkdir()
    (root / "acme_guard_plugin.py").write_text(textwrap.dedent(ACME))
    info = root / "acme_guard_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-guard-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[medaudit]\nacme = acme_guard_plugin:plugin\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("MEDAUDIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)


def _run(out: Path, *args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, [
        "run", str(ROOT / "examples" / "model.pt"), "--data", str(ROOT / "examples" / "mni-patches" / "test.npz"),
        "--config", str(ROOT / "examples" / "mni-patches.yaml"), "--out", str(out), "--severities", "3",
        "--bootstrap", "20", "--quiet", *args])
    assert (out / "results.json").exists(), result.output
    return result.exit_code, json.loads((out / "results.json").read_text())


def test_contract_breaking_perturbations_are_left_out_by_name_through_the_cli(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The reference: the same audit without the plugin.
    code, plain = _run(tmp_path / "plain", "--perturbation", "intensity.gamma")
    assert code == 0
    _install_acme(tmp_path / "site", monkeypatch)
    code, res = _run(tmp_path / "acme", "--suite", "acme", "--perturbation", "intensity.gamma")
    assert code == 0  # isolated, not blamed on the model (2) nor an internal error (3)
    ids = [s["id"] for s in res["scenarios"]]
    assert ids == ["clean", "acme.rounding@3", "intensity.gamma@3"]
    for name, what in EXPECTED.items():
        pattern = (rf'perturbation "{re.escape(name)}" of plugin "acme" {what} in scenario '
                   rf"{re.escape(name)}@3; the scenario is left out")
        assert sum(bool(re.fullmatch(pattern, w)) for w in res["warnings"]) == 1, (name, res["warnings"])
    # The other scenarios' numbers are those of the audit without the plugin.
    by_id = {s["id"]: s for s in res["scenarios"]}
    for ref in plain["scenarios"]:
        for key in ("metrics", "drop", "ood", "params"):
            assert by_id[ref["id"]][key] == ref[key], (ref["id"], key)


def test_metadata_problems_are_found_without_touching_values() -> None:
    x = torch.rand(4, 1, 8, 8)
    assert metadata_problem(x, x.clone(), {"gamma": torch.ones(4), "noise_key": torch.zeros(4, 2)}) is None
    assert metadata_problem(x, x[..., :-1], {}) == "returned shape (4, 1, 8, 7) for input (4, 1, 8, 8)"
    assert metadata_problem(x, x.half(), {}) == "returned dtype torch.float16 for input torch.float32"
    assert metadata_problem(x, x.numpy(), {}) == "returned ndarray instead of a tensor"
    assert metadata_problem(x, x, {"gamma": torch.ones(5)}) == "returned parameter 'gamma' with 5 values for a batch of 4"


def test_value_guard_keeps_running_bounds_and_reports_once_per_shard() -> None:
    guard = ValueGuard()
    ok = torch.rand(4, 1, 8, 8)
    guard.observe("fine", ok)
    guard.observe("fine", torch.full((4, 1, 8, 8), 1 + RANGE_TOLERANCE / 2))  # float rounding: kept
    guard.observe("low", ok)
    guard.observe("low", ok - 0.25)  # a later batch leaves the range
    guard.observe("low", ok)  # and a later in-range batch does not hide it
    guard.observe("inf", ok.masked_fill(ok > 0.5, float("inf")))
    nan = ok.clone()
    nan[2, 0, 3, 3] = float("nan")
    guard.observe("nan", nan)
    guard.observe("nan", ok)
    problems = guard.problems()
    assert set(problems) == {"low", "inf", "nan"}
    lo = float((ok - 0.25).min())
    assert problems["low"] == f"returned values in [{lo:.6g}, {float(ok.max()):.6g}], outside [0, 1]"
    assert problems["inf"] == problems["nan"] == "returned NaN or Inf values"
    just_above = ValueGuard()
    just_above.observe("s", torch.full((2, 1, 4, 4), 1 + 2 * RANGE_TOLERANCE))
    assert just_above.problems() == {"s": "returned values in [1.00002, 1.00002], outside [0, 1]"}
