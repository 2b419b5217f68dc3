"""docs/plugins.md documents every hook exactly, and every hook has a test (datasette style)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from medaudit import hookspecs
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
    assert len(HOOKS) == 9


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
