"""The conformance kit (medaudit.testing): the built-ins pass it, and it catches broken objects."""

from __future__ import annotations

import importlib
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from medaudit.config import Config
from medaudit.detector import Detector
from medaudit.errors import DataError
from medaudit.hookspecs import hookimpl
from medaudit.metric import Metric, MetricContext
from medaudit.perturbation import Perturbation, finish, per_sample
from medaudit.plugin_manager import get_plugin_manager
from medaudit.rng import SampleRNG
from medaudit.settings import resolve_settings
from medaudit.testing import (
    CheckReport,
    DatasetLoader,
    check_plugin_object,
    parametrize_with_checks,
    phantom,
    subject,
    yield_checks,
)
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# What the built-ins contribute, discovered through the plugin manager as an audit does
# ---------------------------------------------------------------------------------------------

with warnings.catch_warnings():
    # plugins that other engineers have not finished yet are load failures, not our concern here
    warnings.simplefilter("ignore", RuntimeWarning)
    _PM = get_plugin_manager(warn=lambda m: None)

BUILTIN_PERTURBATIONS = [cls for _name, (_plugin, cls) in sorted(_PM.perturbations().items())
                         if _PM.infos[_plugin].distribution == "medaudit"]

# Keys the built-in metrics document as undefined (NaN) when a class is absent from the data
# (plugins/classification.py: "a ratio whose denominator is 0 on a row ... is NaN"; "macro AUROC
# is NaN when any class's one-vs-rest AUROC is undefined").
BUILTIN_NAN_KEYS: dict[str, tuple[str, ...]] = {
    "classification": ("auroc*", "sensitivity*", "specificity*", "balanced_accuracy/*"),
}


def _builtin_metrics() -> list[Any]:
    out = []
    for task, classes in (("binary", ["negative", "positive"]), ("multiclass", ["a", "b", "c"])):
        config = Config(task={"type": task, "classes": classes})
        for plugin, metrics in _PM.call_each("medaudit_metrics", config=config):
            if _PM.infos[plugin].distribution != "medaudit":
                continue
            for m in metrics:
                if task in m.tasks:
                    out.append(subject(m, name=f"{m.name}({task})", tasks=(task,), nan_keys=BUILTIN_NAN_KEYS.get(m.name, ())))
    return out


def _builtin_detectors() -> list[Any]:
    try:
        importlib.import_module("medaudit.plugins.ood")
    except ImportError:
        return []
    config = resolve_settings(Config(), _PM)
    return [d for plugin, ds in _PM.call_each("medaudit_detectors", config=config)
            if _PM.infos[plugin].distribution == "medaudit" for d in ds]


def _write_npz(folder: Path) -> Path:
    path = folder / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.random((6, 8, 8)).astype(np.float32), labels=np.array([0, 1, 2, 0, 1, 2]))
    return path


def _npz_loader() -> DatasetLoader:
    from medaudit.plugins.data_loaders import medaudit_open_dataset

    return DatasetLoader(open=medaudit_open_dataset, write_valid=_write_npz, name="data_loaders.npz",
                         config=Config(task={"type": "multiclass", "classes": ["a", "b", "c"]}))


BUILTIN_METRICS = _builtin_metrics()
BUILTIN_DETECTORS = _builtin_detectors()


def test_builtins_are_discovered() -> None:
    names = {cls.name for cls in BUILTIN_PERTURBATIONS}
    assert {"intensity.gamma", "intensity.contrast"} <= names
    assert {s.name for s in BUILTIN_METRICS} >= {"classification(binary)", "classification(multiclass)",
                                                 "calibration(binary)", "calibration(multiclass)"}


@parametrize_with_checks(BUILTIN_PERTURBATIONS)
def test_builtin_perturbation_conforms(obj: Any, check: Any) -> None:
    check(obj)


@parametrize_with_checks(BUILTIN_METRICS)
def test_builtin_metric_conforms(obj: Any, check: Any) -> None:
    check(obj)


@pytest.mark.skipif(not BUILTIN_DETECTORS, reason="medaudit.plugins.ood is not importable (or provides no detectors)")
@parametrize_with_checks(BUILTIN_DETECTORS)
def test_builtin_detector_conforms(obj: Any, check: Any) -> None:
    check(obj)


@parametrize_with_checks([_npz_loader()])
def test_builtin_npz_loader_conforms(obj: Any, check: Any) -> None:
    check(obj)


def test_whole_builtin_catalogue_reports_ok() -> None:
    """The one-call API an author uses: a report per object, every check passed or skipped with a reason."""
    for obj in BUILTIN_PERTURBATIONS + BUILTIN_DETECTORS:
        report = check_plugin_object(obj)
        assert report.records, obj
        report.assert_ok()


# ---------------------------------------------------------------------------------------------
# The kit catches broken objects
# ---------------------------------------------------------------------------------------------


class _GoodNoise(Perturbation):
    """A correct reference: additive Gaussian noise regenerated from a per-sample key."""

    name = "kit.good_noise"
    suite = "kit"
    summary = "Additive Gaussian noise."
    severities = {s: {"sigma": 0.02 * s} for s in range(1, 6)}

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"sigma": self.draw(rng, severity, "sigma"), "noise_key": rng.bits()}

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        noise = SampleRNG(params["noise_key"]).normal(*x.shape[1:])
        return finish(x.float() + per_sample(params["sigma"], x.float()) * noise, x)


class _GlobalRng(_GoodNoise):
    name = "kit.global_rng"

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        noise = torch.randn(x.shape, device=x.device)  # the bug: torch's global RNG
        return finish(x.float() + per_sample(params["sigma"], x.float()) * noise, x)


class _ReturnsNaN(_GoodNoise):
    name = "kit.nan"

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        y = super().apply(x, params).clone()
        y.view(y.shape[0], -1)[:, 0] = float("nan")
        return y


class _ChangesDtype(_GoodNoise):
    name = "kit.dtype"

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return super().apply(x, params).float()  # forgets to restore the input dtype


class _BatchMixing(_GoodNoise):
    name = "kit.batch_mixing"

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        # the bug: a batch statistic, so a sample's output depends on its batch-mates
        xf = x.float()
        return finish(xf + 5 * per_sample(params["sigma"], xf) * (xf.mean() - xf), x)


class _NotMonotone(_GoodNoise):
    name = "kit.not_monotone"
    severities = {1: {"sigma": 0.1}, 2: {"sigma": 0.08}, 3: {"sigma": 0.06}, 4: {"sigma": 0.04}, 5: {"sigma": 0.12}}


class _OutOfRange(_GoodNoise):
    name = "kit.out_of_range"

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        noise = SampleRNG(params["noise_key"]).normal(*x.shape[1:])
        return (x.float() + per_sample(params["sigma"], x.float()) * noise).to(x.dtype)  # no clamp


class _BadParams(_GoodNoise):
    name = "kit.bad_params"

    def sample(self, severity: int, rng: SampleRNG, shape: torch.Size) -> dict[str, Tensor]:
        return {"sigma": self.draw(rng, severity, "sigma")[:1], "noise_key": rng.bits()}  # not per-sample


class _HostSync(_GoodNoise):
    name = "kit.host_sync"

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        if params["sigma"].max() > 0.5:  # the bug: bool() of a device tensor waits for the GPU
            raise AssertionError("unreachable")
        return super().apply(x, params)


def test_good_perturbation_passes() -> None:
    report = check_plugin_object(_GoodNoise)
    report.assert_ok()
    assert {r.status for r in report.records} == {"passed"}


@pytest.mark.parametrize(("broken", "check", "reason"), [
    (_GlobalRng, "check_perturbation_deterministic", "never from torch/numpy global RNGs"),
    (_ReturnsNaN, "check_perturbation_finite_in_range", "NaN/Inf values in the output"),
    (_ChangesDtype, "check_perturbation_shape_dtype_device", "dtype torch.float16 became torch.float32"),
    (_BatchMixing, "check_perturbation_batch_split_invariant", "batch of 4 vs 1\\+3"),
    (_NotMonotone, "check_perturbation_severity_monotone", "falls from severity 1 to 2"),
    (_OutOfRange, "check_perturbation_finite_in_range", "leaves \\[0, 1\\]"),
    (_BadParams, "check_perturbation_sample_params", "first dimension must be the batch"),
    (_HostSync, "check_perturbation_no_host_sync", r"Tensor.__bool__\(\) at test_conformance.py:\d+"),
])
def test_kit_catches_broken_perturbation(broken: type[Perturbation], check: str, reason: str) -> None:
    report = check_plugin_object(broken)
    assert report.status_of(check) == "failed"
    failed = [r for r in report.failed if r.check.startswith(check)]
    assert any(__import__("re").search(reason, r.reason) for r in failed), [r.reason for r in failed]
    with pytest.raises(AssertionError, match=check):
        report.assert_ok()


def test_global_rng_is_caught_on_both_dims() -> None:
    report = check_plugin_object(_GlobalRng)
    assert {r.check for r in report.failed} >= {"check_perturbation_deterministic[2d]", "check_perturbation_deterministic[3d]"}


def test_dims_declaration_selects_checks() -> None:
    class Only2D(_GoodNoise):
        name = "kit.only_2d"
        dims = (2,)

    names = [c.name for c in yield_checks(Only2D)]
    assert "check_perturbation_deterministic[2d]" in names
    assert not any("[3d" in n for n in names)


def test_min_spatial_size_is_honoured() -> None:
    class NeedsSize(_GoodNoise):
        name = "kit.needs_size"
        min_spatial_size = 40

        def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
            if min(x.shape[2:]) < 40:
                raise ValueError("needs at least 40 pixels per side")
            return super().apply(x, params)

    check_plugin_object(NeedsSize).assert_ok()


def test_xfail_declaration_and_stale_xfail() -> None:
    # the global RNG breaks every check that compares two runs
    known = {"check_perturbation_deterministic": "known: issue 99", "check_perturbation_batch_split_invariant": "same bug",
             "check_perturbation_inference_mode": "same bug"}
    report = check_plugin_object(_GlobalRng, xfail=known)
    assert report.status_of("check_perturbation_deterministic") == "xfailed"
    assert report.ok, str(report)
    assert "expected: known: issue 99" in str(report)
    stale = check_plugin_object(_GoodNoise, xfail={"check_perturbation_deterministic[2d]": "was broken"})
    assert stale.status_of("check_perturbation_deterministic[2d]") == "xpassed"
    with pytest.raises(AssertionError, match=r"check_perturbation_deterministic\[2d\]\s+xpassed"):
        stale.assert_ok()


def test_report_str_is_a_table_of_failures() -> None:
    text = str(check_plugin_object(_ReturnsNaN))
    first, header, *rows = text.splitlines()
    assert first.startswith("kit.nan: ") and "failed" in first
    assert header.split() == ["check", "status", "reason"]
    assert any(r.split()[0] == "check_perturbation_finite_in_range[2d]" and r.split()[1] == "failed" for r in rows)


def test_parametrize_with_checks_ids_and_marks() -> None:
    mark = parametrize_with_checks([_GoodNoise], xfail={"check_perturbation_inference_mode": "demo"})
    argnames, params = mark.args
    assert argnames == "obj, check"
    ids = [p.id for p in params]
    assert "kit.good_noise-check_perturbation_deterministic[3d]" in ids
    assert len(ids) == len(set(ids))
    xfails = [p for p in params if p.marks]
    assert {p.id for p in xfails} == {"kit.good_noise-check_perturbation_inference_mode[2d]",
                                      "kit.good_noise-check_perturbation_inference_mode[3d]"}
    assert xfails[0].marks[0].kwargs == {"reason": "demo", "strict": True}


def test_real_images_option_feeds_the_severity_check() -> None:
    class ZeroOnBlank(_GoodNoise):
        """Changes the phantom but not blank images: blank real images expose the flat curve."""

        name = "kit.zero_on_blank"

        def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
            scale = per_sample(params["sigma"], x.float())
            return finish(x.float() * (1 - scale), x)

    check_plugin_object(ZeroOnBlank).assert_ok()
    fine = check_plugin_object(ZeroOnBlank, images={2: phantom(2, 2, seed=3)})
    assert fine.ok, str(fine)
    with pytest.raises(AssertionError, match=r"images for the 2D check"):
        check_plugin_object(ZeroOnBlank, images={2: torch.zeros(2, 32, 32)}).assert_ok()


# --- metrics ---------------------------------------------------------------------------------


class _WeightedAccuracy(Metric):
    name = "kit_accuracy"
    tasks: ClassVar[tuple[str, ...]] = ("binary", "multiclass")

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        w = weights.double()
        correct = (probs.argmax(dim=1) == labels).double()
        return {"kit_accuracy": (w @ correct) / w.sum(dim=1)}


class _OrderDependent(_WeightedAccuracy):
    name = "kit_order"

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        out = super().compute(probs, labels, weights, ctx)
        # the bug: "first sample" leaks into the value
        return {"kit_accuracy": out["kit_accuracy"] + 0.01 * probs[0, 0].double()}


class _IgnoresWeights(_WeightedAccuracy):
    name = "kit_unweighted"

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        acc = (probs.argmax(dim=1) == labels).double().mean()
        return {"kit_accuracy": acc.expand(weights.shape[0]).clone()}


class _ScalarResult(_WeightedAccuracy):
    name = "kit_scalar"

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        return {"kit_accuracy": super().compute(probs, labels, weights, ctx)["kit_accuracy"][0]}


class _NaNOnOneClass(_WeightedAccuracy):
    name = "kit_nan"

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        present = torch.bincount(labels, minlength=probs.shape[1]) > 0
        value = super().compute(probs, labels, weights, ctx)["kit_accuracy"]
        return {"kit_accuracy": torch.where(present.all(), value, torch.full_like(value, float("nan")))}


class _Mutates(_WeightedAccuracy):
    name = "kit_mutates"

    def compute(self, probs: Tensor, labels: Tensor, weights: Tensor, ctx: MetricContext) -> dict[str, Tensor]:
        weights /= weights.sum(dim=1, keepdim=True)  # the bug: in place on a shared tensor
        return super().compute(probs, labels, weights, ctx)


def test_good_metric_passes_on_each_task() -> None:
    report = check_plugin_object(_WeightedAccuracy())
    report.assert_ok()
    assert {r.check for r in report.records} >= {"check_metric_permutation_invariant[binary]",
                                                "check_metric_permutation_invariant[multiclass]"}


@pytest.mark.parametrize(("broken", "check", "reason"), [
    (_OrderDependent(), "check_metric_permutation_invariant", "after permuting the samples"),
    (_IgnoresWeights(), "check_metric_count_weights_equal_resampling", "count weights vs np.repeat"),
    (_ScalarResult(), "check_metric_returns_rows", "expected [R] = (4,)"),
    (_NaNOnOneClass(), "check_metric_edge_cases", "one class present: 'kit_accuracy' is NaN"),
    (_Mutates(), "check_metric_inputs_unchanged", "modified weights in place"),
])
def test_kit_catches_broken_metric(broken: Metric, check: str, reason: str) -> None:
    report = check_plugin_object(broken, tasks=("multiclass",))
    assert report.status_of(check) == "failed"
    assert any(reason in r.reason for r in report.failed if r.check.startswith(check)), str(report)


def test_documented_nan_keys_are_allowed() -> None:
    check_plugin_object(_NaNOnOneClass(), nan_keys=("kit_*",)).assert_ok()


# --- detectors -------------------------------------------------------------------------------


class _MaxSoftmax(Detector):
    name = "kit_msp"

    def score(self, embeddings: Tensor) -> Tensor:
        return 1.0 - torch.softmax(embeddings.float(), dim=1).amax(dim=1)


class _Centroid(Detector):
    """Feature distance to the nearest class centroid."""

    name = "kit_centroid"
    needs = "features"

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        assert features is not None
        return features.flatten(1).float()

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        self.centroids = torch.stack([embeddings[labels == k].mean(0) for k in labels.unique()])

    def score(self, embeddings: Tensor) -> Tensor:
        return torch.cdist(embeddings, self.centroids).amin(dim=1)


class _Backwards(_MaxSoftmax):
    name = "kit_backwards"

    def score(self, embeddings: Tensor) -> Tensor:
        return -super().score(embeddings)  # the bug: higher means *less* shifted


class _Drifts(_Centroid):
    name = "kit_drift"

    def score(self, embeddings: Tensor) -> Tensor:
        out = super().score(embeddings)
        self.centroids = 0.9 * self.centroids + 0.1 * embeddings.mean(0)  # the bug: updates while scoring
        return out


class _Random(_MaxSoftmax):
    name = "kit_random"

    def score(self, embeddings: Tensor) -> Tensor:
        return super().score(embeddings) + 1e-3 * torch.rand(embeddings.shape[0])


@pytest.mark.parametrize("good", [_MaxSoftmax(), _Centroid()], ids=lambda d: d.name)
def test_good_detectors_pass(good: Detector) -> None:
    check_plugin_object(good).assert_ok()


@pytest.mark.parametrize(("broken", "check"), [
    (_Backwards(), "check_detector_detects_obvious_shift"),
    (_Drifts(), "check_detector_score_keeps_state"),
    (_Random(), "check_detector_deterministic"),
])
def test_kit_catches_broken_detector(broken: Detector, check: str) -> None:
    assert check_plugin_object(broken).status_of(check) == "failed"


# --- dataset loaders ---------------------------------------------------------------------------


def _lenient_open(path: Path, config: Config) -> Any:
    """A broken loader: a missing file is a plain FileNotFoundError and garbage is read as zeros."""
    from medaudit.plugins.data_loaders import NpzDataset

    if not path.exists():
        raise FileNotFoundError(path)
    try:
        return NpzDataset(path, config)
    except DataError:
        return None


def test_kit_catches_broken_loader() -> None:
    loader = DatasetLoader(open=_lenient_open, write_valid=_write_npz, name="lenient",
                           config=Config(task={"type": "multiclass", "classes": ["a", "b", "c"]}))
    report = check_plugin_object(loader)
    assert report.status_of("check_loader_opens_valid") == "passed"
    assert report.status_of("check_loader_missing_file") == "failed"
    assert report.status_of("check_loader_bad_file[garbage]") == "failed"
    assert "not claimed" in next(r.reason for r in report.records if r.check == "check_loader_bad_file[garbage]")


def test_unknown_objects_are_refused() -> None:
    with pytest.raises(TypeError, match=r"cannot check 42"):
        check_plugin_object(42)


def test_report_records_name_object_and_check() -> None:
    report: CheckReport = check_plugin_object(_GoodNoise)
    assert all(r.object == "kit.good_noise" for r in report.records)
    assert len({r.check for r in report.records}) == len(report.records)


# ---------------------------------------------------------------------------------------------
# The plugin as installed: its entry point, and its report sections against real results
# ---------------------------------------------------------------------------------------------

RESULTS_SMALL = Path(__file__).resolve().parent / "fixtures" / "results-small.json"


def _installed(root: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    """A distribution ``medaudit-<name>`` with entry point ``name`` = module ``medaudit_<name>_mod``."""
    import sys
    import textwrap

    module = f"medaudit_{name}_mod"
    dist = root / f"medaudit_{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: medaudit-{name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[medaudit]\n{name} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, module, raising=False)


_GOOD_PLUGIN = """
    from medaudit import hookimpl
    from medaudit.plugins.intensity import Gamma

    MEDAUDIT_API_VERSION = 1

    class Tint(Gamma):
        name = "tint.gamma"
        suite = "tint"

    @hookimpl
    def medaudit_perturbations():
        return [Tint]
    """


def test_check_entry_point_passes_a_sound_plugin_and_the_builtins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medaudit.testing import check_entry_point

    _installed(tmp_path, monkeypatch, "tint", _GOOD_PLUGIN)
    info = check_entry_point("tint")
    assert (info.name, info.distribution, info.module) == ("tint", "medaudit-tint", "medaudit_tint_mod")
    assert check_entry_point("intensity").distribution == "medaudit"


@pytest.mark.parametrize(("source", "message"), [
    (_GOOD_PLUGIN.replace("def medaudit_perturbations", "def medaudit_perturbation"),
     'function "medaudit_perturbation" implements no medaudit hook (did you mean "medaudit_perturbations"?)'),
    (_GOOD_PLUGIN.replace("    @hookimpl\n", ""), 'function "medaudit_perturbations" is not decorated with @medaudit.hookimpl'),
    (_GOOD_PLUGIN.replace('"tint.gamma"', '"mri.zipper"').replace('"tint"', '"mri"'),
     'perturbation "mri.zipper" of plugin "tint" joins suite "mri" of plugin "mri"'),
    (_GOOD_PLUGIN.replace('"tint.gamma"', '"intensity.gamma"').replace('"tint"', '"intensity"'),
     'perturbation "intensity.gamma" is provided by two plugins'),
    (_GOOD_PLUGIN.replace("MEDAUDIT_API_VERSION = 1", "MEDAUDIT_API_VERSION = 2"), "targets medaudit hook API 2"),
    (_GOOD_PLUGIN.replace("MEDAUDIT_API_VERSION = 1", "import not_installed_anywhere"), "ModuleNotFoundError"),
], ids=["misspelt-hook", "no-hookimpl", "joins-builtin-suite", "name-clash", "api-version", "import-error"])
def test_check_entry_point_names_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                                               message: str) -> None:
    from medaudit.errors import PluginError
    from medaudit.testing import check_entry_point

    _installed(tmp_path, monkeypatch, "tint", source)
    with pytest.raises((AssertionError, PluginError), match=re.escape(message)):
        check_entry_point("tint")


def test_check_entry_point_without_the_entry_point() -> None:
    from medaudit.testing import check_entry_point

    with pytest.raises(AssertionError, match=r'no entry point "not-installed" in the "medaudit" group'):
        check_entry_point("not-installed")


class _SectionPlugin:
    """A section listing the audited scenarios and the model's name; ``template`` is swapped per test."""

    template = "<p>{{ results.model.name }}: {% for s in scenarios %}{{ s }} {% endfor %}</p>"

    @hookimpl
    def medaudit_report_sections(self, results: dict[str, Any]) -> list[Any]:
        from medaudit.sections import ReportSection

        ids = [s["id"] for s in results["scenarios"]]
        return [ReportSection("tint-scenarios", "Scenarios", self.template, context={"scenarios": ids})]


def test_check_report_section_renders_on_real_results() -> None:
    from medaudit.testing import check_report_section

    [html] = check_report_section(_SectionPlugin(), RESULTS_SMALL)
    assert "clean intensity.gamma@1 intensity.gamma@5 mri.noise@1 mri.noise@5" in html


class _Unescaped(_SectionPlugin):
    template = "<p>{{ results.model.name | safe }}</p>"


class _Broken(_SectionPlugin):
    template = "<p>{{ results.no_such_key.deeper }}</p>"


class _Nothing:
    @hookimpl
    def medaudit_report_sections(self, results: dict[str, Any]) -> list[Any]:
        return []


class _NotMarked:
    def medaudit_report_sections(self, results: dict[str, Any]) -> list[Any]:
        raise AssertionError("never called")


@pytest.mark.parametrize(("plugin", "message"), [
    (_Unescaped(), "section 'tint-scenarios' puts text from results.json into the HTML unescaped"),
    (_Broken(), "section 'tint-scenarios' does not render on these results: UndefinedError"),
    (_Nothing(), "returned no section for these results"),
    (_NotMarked(), 'implements no medaudit_report_sections hook (is it decorated with @medaudit.hookimpl?); '
                   'function "medaudit_report_sections" is not decorated'),
], ids=["unescaped", "template-error", "no-section", "no-hookimpl"])
def test_check_report_section_names_what_is_wrong(plugin: object, message: str) -> None:
    from medaudit.testing import check_report_section

    with pytest.raises(AssertionError, match=re.escape(message)):
        check_report_section(plugin, json.loads(RESULTS_SMALL.read_text()))
