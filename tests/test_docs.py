"""docs/plugins.md documents every hook exactly, and every hook has a test (datasette style)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest
from medaudit import hookspecs
from medaudit.metric import MetricContext
from medaudit.rng import SampleRNG
from medaudit.plugin_manager import get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"

HOOKS = sorted(name for name, obj in vars(hookspecs).items()
               if name.startswith("medaudit_") and hasattr(obj, f"{hookspecs.PROJECT}_spec"))


def signature_line(name: str) -> str:
    """``def name(arg: Annotation, ...) -> Return`` as written in the hookspec source."""
    sig = inspect.signature(getattr(hookspecs, name))
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {name}({params}) -> {sig.return_annotation}"


def test_hooks_are_found() -> None:
    # guards the collection above: the plugin manager knows exactly these hooks
    pm = get_plugin_manager(autoload=False)
    assert set(HOOKS) == {n for n in dir(pm.hook) if n.startswith("medaudit_")}
    assert len(HOOKS) == 11


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_signature_is_documented(hook: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    assert signature_line(hook) in text, f"docs/plugins.md lacks the exact signature: {signature_line(hook)}"
    assert f"### {hook}" in text, f"docs/plugins.md has no section '### {hook}'"


@pytest.mark.parametrize("hook", HOOKS)
def test_firstresult_hooks_are_marked(hook: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    spec = getattr(getattr(hookspecs, hook), f"{hookspecs.PROJECT}_spec")
    decorator = "@hookspec(firstresult=True)" if spec["firstresult"] else "@hookspec"
    assert f"{decorator}\n{signature_line(hook)}" in text


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook: str) -> None:
    pattern = re.compile(rf"^def test_hook_{hook}\(", re.MULTILINE)
    found = [p.name for p in (ROOT / "tests").glob("test_*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert found, f"no test named test_hook_{hook} in tests/"


def test_environment_variables_and_api_version_are_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    for needle in ("MEDAUDIT_TRACE", "MEDAUDIT_DISABLE_PLUGIN_AUTOLOAD", "MEDAUDIT_API_VERSION",
                   f"(now {hookspecs.HOOK_API_VERSION})", "[project.entry-points.medaudit]", "medaudit.testing",
                   "min_spatial_size", "nan_keys"):
        assert needle in text, needle


def _resolve(dotted: str) -> object:
    """The object a dotted ``medaudit.x.y`` name denotes: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("source", ["docs/plugins.md", "docs/scale-out.md", "README.md", "audit/hookspecs.py"])
def test_every_dotted_medaudit_name_exists(source: str) -> None:
    # hookspecs.py once told authors to use medaudit.hookimpl, which did not exist
    text = (ROOT / source).read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"\bmedaudit\.[A-Za-z_][\w.]*\w", text)))
    # file names (the config `run` looks for, ./medaudit.yaml) are not Python names
    names = [n for n in names if n.rsplit(".", 1)[-1] not in {"yaml", "yml", "toml", "json"}]
    assert "medaudit.hookimpl" in names or source in ("README.md", "docs/scale-out.md")
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"{source} names what medaudit does not have: {missing}"


def test_what_an_author_needs_is_documented() -> None:
    """What a third party needs to write a perturbation, metric, detector and section from
    docs/plugins.md alone: each item a first try without it got wrong (issue 19)."""
    text = DOC.read_text(encoding="utf-8")
    for method in sorted(n for n in vars(SampleRNG) if not n.startswith("_")):
        assert f"rng.{method}" in text, f"SampleRNG.{method}"
    assert "SampleRNG(sample_keys(stream_key(" in text  # how to build one in a test
    for f in dataclasses.fields(MetricContext):
        assert f"| `{f.name}` |" in text, f"MetricContext.{f.name}"
    for needle in (
        "`per_sample(v, x)`", "`__call__(x, severity, rng) -> (perturbed, params)`", "`summary` and `citation`",
        "`output_kind`", "`logits_only = True`", "`concurrent.futures.Future`", "**Cross-fitting.**",
        "`features`: the raw output of the layer", "probs[:, 1] >= threshold", "from medaudit import hookimpl",
        "optionalhook=True", "MEDAUDIT_OPEN_SUITES", "check_entry_point(", "check_report_section(",
        "perturbation:retina.glare ran",
    ):
        assert needle in text, needle
