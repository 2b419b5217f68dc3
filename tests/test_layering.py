"""The import rules between the core and the built-in plugins, read from the source with ``ast``.

1. The core (``audit/`` = ``medaudit``) imports no built-in plugin (``medaudit.plugins``).
2. A built-in plugin imports no other built-in plugin, absolutely or relatively; a plugin that
   is a package may import its own modules.

Built-ins stand on the documented core API only, exactly as a third-party plugin must, so a
helper two plugins share belongs in a core module (see docs/plugins.md, "Helper modules").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "audit"
PLUGINS = ROOT / "plugins"


def module_name(path: Path) -> str:
    """Dotted name of a source file as installed: ``audit/`` is ``medaudit``, ``plugins/`` is ``medaudit.plugins``."""
    if path.is_relative_to(PLUGINS):
        parts = ["medaudit", "plugins", *path.relative_to(PLUGINS).with_suffix("").parts]
    else:
        parts = ["medaudit", *path.relative_to(CORE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, absolute dotted name)`` of every import anywhere in ``source`` (functions included).

    ``from X import a`` yields ``X.a`` as well as ``X`` (``a`` may be a submodule); relative
    imports are resolved against ``module``; ``importlib.import_module("…")`` with a constant
    name counts as an import too.
    """
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.append((node.lineno, base))
            out.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def _names_of(path: Path) -> list[tuple[int, str]]:
    return imported_names(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def builtin_plugins() -> list[str]:
    """Top-level built-ins: every ``plugins/<name>.py`` and ``plugins/<name>/`` package."""
    names = {p.stem for p in PLUGINS.glob("*.py") if p.name != "__init__.py"}
    names |= {p.name for p in PLUGINS.iterdir() if (p / "__init__.py").is_file()}
    return sorted(names)


def plugin_sources(name: str) -> list[Path]:
    single = PLUGINS / f"{name}.py"
    return [single] if single.is_file() else sorted((PLUGINS / name).rglob("*.py"))


def test_core_imports_no_builtin_plugin() -> None:
    offences = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                for path in sorted(CORE.rglob("*.py"))
                for line, name in _names_of(path) if _within(name, "medaudit.plugins")]
    assert not offences, "the core must not import built-in plugins:\n" + "\n".join(offences)


@pytest.mark.parametrize("plugin", builtin_plugins())
def test_builtin_imports_no_other_builtin(plugin: str) -> None:
    own = f"medaudit.plugins.{plugin}"
    others = [f"medaudit.plugins.{n}" for n in builtin_plugins() if n != plugin]
    offences = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                for path in plugin_sources(plugin)
                for line, name in _names_of(path)
                if not _within(name, own) and any(_within(name, o) for o in others)]
    assert not offences, f"built-in plugin {plugin!r} imports other built-ins:\n" + "\n".join(offences)


# ---------------------------------------------------------------------------------------------
# The checker itself, on hand-written sources (it must catch every spelling of an import)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "module", "is_package", "expected"), [
    ("from .calibration import x", "medaudit.plugins.subgroups", False, "medaudit.plugins.calibration.x"),
    ("from ..calibration import x", "medaudit.plugins.subgroups.rows", False, "medaudit.plugins.calibration"),
    ("from . import calibration", "medaudit.plugins.ood", False, "medaudit.plugins.calibration"),
    ("from .rows import x", "medaudit.plugins.subgroups", True, "medaudit.plugins.subgroups.rows"),
    ("import medaudit.plugins.mri as m", "medaudit.plugins.ct", False, "medaudit.plugins.mri"),
    ("from medaudit import plugins", "medaudit.temperature", False, "medaudit.plugins"),
    ("from .plugins.calibration import C", "medaudit.temperature", False, "medaudit.plugins.calibration"),
    ("def f():\n    from medaudit.plugins.calibration import C", "medaudit.temperature", False,
     "medaudit.plugins.calibration"),
    ("import importlib\nimportlib.import_module('medaudit.plugins.ood')", "medaudit.audit", False, "medaudit.plugins.ood"),
])
def test_checker_resolves_imports(source: str, module: str, is_package: bool, expected: str) -> None:
    assert expected in [name for _, name in imported_names(source, module, is_package)]


def test_checker_module_names() -> None:
    assert module_name(CORE / "temperature.py") == "medaudit.temperature"
    assert module_name(PLUGINS / "subgroups" / "__init__.py") == "medaudit.plugins.subgroups"
    assert module_name(PLUGINS / "subgroups" / "rows.py") == "medaudit.plugins.subgroups.rows"
    assert not _within("medaudit.pluginsx", "medaudit.plugins") and _within("medaudit.plugins.ood", "medaudit.plugins")
